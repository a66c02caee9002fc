"""The float dtype an export computes in, for each --dtype (no ONNX import: AOTI exports use it too)."""

from __future__ import annotations

import torch

from k4serve.export.errors import ExportError

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8_CARRIERS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # fp16 would flush the 1e-12 amax floor to zero


def compute_dtype(dtype: str, fp8_carrier: str = "bf16") -> torch.dtype:
    """The float dtype a graph computes in: the dtype itself, or fp8's carrier around its quantized linears."""
    if dtype == "fp8":
        if fp8_carrier not in FP8_CARRIERS:
            raise ExportError(f"--fp8-carrier must be one of {sorted(FP8_CARRIERS)}, got {fp8_carrier!r}")
        return FP8_CARRIERS[fp8_carrier]
    if dtype not in FLOAT_DTYPES:
        raise ExportError(f"--dtype must be one of fp32, fp16, bf16, fp8; got {dtype!r}")
    return FLOAT_DTYPES[dtype]
