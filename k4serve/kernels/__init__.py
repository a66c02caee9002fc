"""Triton kernels for the fast DiT path, each with a torch reference beside it.

Without a CUDA device the kernels run in Triton's CPU interpreter (CI, the tiny-preset demo). Triton fixes that
choice for its own library functions when it is first imported, so the switch is made here, on import, and a
process that imported triton earlier (torch._dynamo does) is told how to fix it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ["TRITON_INTERPRET"] == "1" and not isinstance(tl.sum, InterpretedFunction):
        raise ImportError(
            "triton was imported before its CPU interpreter was selected, so the kernels cannot run here: "
            "set TRITON_INTERPRET=1 in the environment (or import k4serve.kernels before torch._dynamo / triton)"
        )
