"""Gated residual add + LayerNorm + adaLN modulation, producing the next GEMM's input in one pass.

Per token row of the joint sequence (stream = visual if the row index < n_visual, else text):
  x   ← x + gate[stream] · delta            (optional: the previous sub-layer's gated residual, bf16 roundings
                                              as the official autocast run: gate·delta, then the sum)
  y   = LayerNorm(x) · scale1[stream] + shift[stream]   (fp32; scale1 = 1 + scale, precomputed by the caller)
and y is stored as the next linear's input: bf16, or e4m3 / int8 with a per-row fp32 scale.
`rows` < S restricts the pass to the first rows of each sample (the out layer only reads visual tokens).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from k4serve.kernels.quantize import quantized_dtype
from k4serve.kernels.rounding import store_row


@triton.jit
def _norm_modulate_kernel(x_ptr, delta_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, y_ptr, y_scale_ptr,
                          seq_len, rows, n_visual, eps, gate_sb, gate_ss, mod_sb, mod_ss,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DELTA: tl.constexpr,
                          QUANT: tl.constexpr):  # fmt: skip
    s = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    stream = (s >= n_visual).to(tl.int32)
    x_ptrs = x_ptr + (b * seq_len + s) * D + cols
    x = tl.load(x_ptrs, mask=mask, other=0.0)

    # 1. gated residual, rounded like the reference's two separate ops
    if HAS_DELTA:
        delta = tl.load(delta_ptr + (b * seq_len + s) * D + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + b * gate_sb + stream * gate_ss + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + (gate * delta).to(x.dtype).to(tl.float32)).to(x.dtype)
        tl.store(x_ptrs, x, mask=mask)

    # 2. LayerNorm in fp32
    xf = x.to(tl.float32)
    mean = tl.sum(xf, 0) / D
    xc = tl.where(mask, xf - mean, 0.0)
    # eps in fp32 also where Inductor (AOTI packages) passes Python floats as fp64, which would make y fp64 and
    # the e4m3 store unlowerable (no f64 -> f8 conversion)
    rstd = tl.rsqrt(tl.sum(xc * xc, 0) / D + tl.cast(eps, tl.float32))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    xn = xc * rstd * w + bias

    # 3. modulation of this row's stream, then the next GEMM's input
    shift = tl.load(shift_ptr + b * mod_sb + stream * mod_ss + cols, mask=mask, other=0.0).to(tl.float32)
    scale1 = tl.load(scale_ptr + b * mod_sb + stream * mod_ss + cols, mask=mask, other=0.0).to(tl.float32)
    y = xn * scale1 + shift
    out = b * rows + s
    store_row(y_ptr, y_scale_ptr, out, D, cols, y, mask, QUANT)


def norm_modulate(x: Tensor, norm: tuple[Tensor, Tensor], shift: Tensor, scale1: Tensor, n_visual: int,
                  delta: Tensor | None = None, gate: Tensor | None = None, rows: int | None = None,
                  quant: str | None = None, eps: float = 1e-5) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """y = LN(x [+= gate·delta]) · scale1 + shift per stream -> (y [B, rows, D], per-row fp32 scale or None).

    quant: None (y in x's dtype), "fp8" or "int8" (y per token in that format, for the next 8-bit GEMM).
    x, delta [B, S, D] contiguous (x is updated in place when delta is given); shift, scale1, gate
    [B, 2, D] views (stream 0 visual, 1 text; a stream stride of 0 shares one vector); norm = (weight, bias).
    """
    b, s, d = x.shape
    rows = s if rows is None else rows
    if not x.is_contiguous() or (delta is not None and (delta.shape != x.shape or not delta.is_contiguous())):
        raise ValueError(f"x and delta must be contiguous [B, S, D]; got {tuple(x.shape)}, "
                         f"{None if delta is None else tuple(delta.shape)}")  # fmt: skip
    if shift.stride() != scale1.stride() or shift.stride(-1) != 1 or (gate is not None and gate.stride(-1) != 1):
        raise ValueError("shift and scale1 must be [B, 2, D] views with equal strides and a contiguous last dim")
    y = torch.empty(b, rows, d, device=x.device, dtype=quantized_dtype(quant, x.dtype))
    y_scale = None if quant is None else torch.empty(b, rows, 1, device=x.device, dtype=torch.float32)
    gate_strides = (0, 0) if gate is None else (gate.stride(0), gate.stride(1))
    block_d = triton.next_power_of_2(d)
    _norm_modulate_kernel[(rows, b)](
        x, delta, gate, norm[0], norm[1], shift, scale1, y, y_scale,
        s, rows, n_visual, eps, *gate_strides, shift.stride(0), shift.stride(1),
        D=d, BLOCK_D=block_d, HAS_DELTA=delta is not None, QUANT=quant or "", num_warps=min(16, max(1, block_d // 256)),
    )  # fmt: skip
    return y, y_scale


def norm_modulate_reference(x: Tensor, norm: tuple[Tensor, Tensor], shift: Tensor, scale1: Tensor, n_visual: int,
                            delta: Tensor | None = None, gate: Tensor | None = None,
                            eps: float = 1e-5) -> tuple[Tensor, Tensor]:  # fmt: skip
    """float64 reference: (updated x, y) for the same arguments (all rows)."""
    x = x.double()
    stream = (torch.arange(x.shape[1], device=x.device) >= n_visual).long()  # [S]
    if delta is not None:
        x = x + gate.double()[:, stream] * delta.double()
    xn = torch.nn.functional.layer_norm(x, x.shape[-1:], norm[0].double(), norm[1].double(), eps)
    return x, xn * scale1.double()[:, stream] + shift.double()[:, stream]
