"""Triton kernels for the fast DiT path, each with a torch reference beside it.

Without a CUDA device the kernels run in Triton's CPU interpreter (CI, the tiny-preset demo). Triton fixes that
choice for its own library functions when it is first imported, so the switch is made here, on import, and a
process that imported triton earlier (torch._dynamo does) is told how to fix it.
"""

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    # (without triton, only the torch modules here import: the fp8 quantizer that the ONNX exporter uses)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ["TRITON_INTERPRET"] == "1" and not isinstance(tl.sum, InterpretedFunction):
        raise ImportError(
            "triton was imported before its CPU interpreter was selected, so the kernels cannot run here: "
            "set TRITON_INTERPRET=1 in the environment (or import k4serve.kernels before torch._dynamo / triton)"
        )


def module_found(name: str) -> bool:
    """Whether module `name` can be imported here, without importing it (a broken parent package counts as no)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` the current CUDA device for the block (nothing for a CPU device).

    Triton launches a kernel, and torch makes its side streams and CUDA graphs, on the *current* device, not on
    the device of the tensors: work on a second GPU (a Triton instance on GPU 1, a device map) must say so.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cache_folder() -> Path:
    """Where compiled kernels and tuned library plans are kept between processes: $K4SERVE_CACHE, else
    ~/.cache/k4serve (a deployment points it at a folder baked into its image)."""
    return Path(os.environ.get("K4SERVE_CACHE", Path.home() / ".cache" / "k4serve"))
