"""Row-wise GELU (exact erf) and per-token 8-bit quantization: the input stage of the next linear.

Between the feed-forward GEMMs the GELU is folded into the quantization pass that the 8-bit paths need
anyway (one read of the hidden activations, one e4m3 / int8 write); in bf16 it is a single elementwise pass.
With the GELU off the same kernel is the plain per-token quantizer (attention output -> out projection).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from k4serve.kernels.quantize import quantized_dtype
from k4serve.kernels.rounding import store_row


@triton.jit
def _gelu_quant_kernel(x_ptr, y_ptr, y_scale_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr, GELU: tl.constexpr,
                       QUANT: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    store_row(y_ptr, y_scale_ptr, row, D, cols, x, mask, QUANT)


def _launch(x: Tensor, gelu: bool, quant: str | None) -> tuple[Tensor, Tensor | None]:
    if not x.is_contiguous():
        raise ValueError(f"expected a contiguous [..., D] tensor; got strides {tuple(x.stride())}")
    d = x.shape[-1]
    y = torch.empty(x.shape, device=x.device, dtype=quantized_dtype(quant, x.dtype))
    y_scale = None if quant is None else torch.empty(*x.shape[:-1], 1, device=x.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(d)
    _gelu_quant_kernel[(x.numel() // d,)](
        x, y, y_scale, D=d, BLOCK_D=block_d, GELU=gelu, QUANT=quant or "", num_warps=min(16, max(1, block_d // 512))
    )
    return y, y_scale


def gelu(x: Tensor, quant: str | None = None) -> tuple[Tensor, Tensor | None]:
    """GELU(x) (exact erf form) -> (same dtype, None), or with quant "fp8" / "int8" (that format, per-row fp32
    scale [..., 1])."""
    return _launch(x, gelu=True, quant=quant)


def quantize_rows(x: Tensor, quant: str = "fp8") -> tuple[Tensor, Tensor]:
    """Per-row e4m3 (or int8) quantization of a contiguous [..., D] tensor: (q, fp32 scale [..., 1])."""
    return _launch(x, gelu=False, quant=quant)
