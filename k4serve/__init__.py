"""k4serve: a serving engine for Kandinsky 4.0 T2V Flash."""

import importlib.util
import os

# Without a GPU our Triton kernels run in Triton's CPU interpreter, which must be chosen before triton is first
# imported, and transformers, torch.onnx and torch.export import it early: choose it here, before any of them
# (k4serve.kernels checks the choice took effect).
if "TRITON_INTERPRET" not in os.environ and importlib.util.find_spec("triton") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
