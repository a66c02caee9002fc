"""Row-wise GELU (exact erf) and per-token 8-bit quantization: the input stage of the next linear.

Between the feed-forward GEMMs the GELU is folded into the quantization pass that the 8-bit paths need
anyway (one read of the hidden activations, one e4m3 / int8 write); in bf16 it is a single elementwise pass.
With the GELU off the same kernel is the plain per-token quantizer (attention output -> out projection).

A program holds its whole row in registers (the per-token scale needs the row's absmax before the first store) as
up to 4 power-of-two chunks, so a row of 12288 (the DiT's FF width) is 3 x 4096 lanes, not 16384 with a quarter
masked off. Where the output is 8-bit, erf comes from Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, its
reciprocal from the rsqrt unit; GELU's error <= 2.1e-7 in float64), 1e5 times below the int8 step (amax / 127).
By sm_90 SASS at the FF shape into int8 (`python tests/sm90_lowering.py gelu-quant`, Triton 3.9, no GPU), that is 30
instructions per value, against 46 with libdevice's erf in the same chunks and 60 for the earlier one-block kernel
(16384 lanes, a quarter masked off). That kernel took 44.7 ms of each int8 DiT forward on an H100 (42 FF GELUs, 42
attention-output quantizes: 49 GB, 15 ms at HBM speed; benchmarks/RESULTS.md, 2026-12-07); this one is not timed
on a GPU yet. The bf16 output keeps libdevice's erf, the official formula.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from k4serve.kernels.quantize import quantized_dtype
from k4serve.kernels.rounding import fp8_inverse_scale, int8_inverse_scale, to_fp8, to_int8

MAX_CHUNKS = 4


@triton.jit
def _gelu_for_8bit(x):
    """0.5 x (1 + erf(x / sqrt 2)) with erf(z) = 1 - poly(t) exp(-z²), t = 1 / (1 + p z) for z = |x| / sqrt 2."""
    z = tl.abs(x) * 0.7071067811865476
    r = tl.math.rsqrt(1.0 + 0.3275911 * z)
    t = r * r
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    h = 0.5 * x * poly * tl.exp2(z * z * -1.4426950408889634)  # x Φ(-|x|) up to the sign of x
    return tl.where(x >= 0, x - h, h)


@triton.jit
def _load_chunk(x_ptr, row, chunk: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, GELU: tl.constexpr,
                QUANT: tl.constexpr):  # fmt: skip
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    if GELU:
        if QUANT == "":
            x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        else:
            x = _gelu_for_8bit(x)
    return x


@triton.jit
def _store_chunk(y_ptr, row, chunk: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, y, inverse,
                 QUANT: tl.constexpr):  # fmt: skip
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    if QUANT == "fp8":
        y = to_fp8(y, inverse)
    elif QUANT == "int8":
        y = to_int8(y, inverse)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=cols < D)


@triton.jit
def _gelu_quant_kernel(x_ptr, y_ptr, y_scale_ptr, D: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
                       GELU: tl.constexpr, QUANT: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x0 = _load_chunk(x_ptr, row, 0, D, BLOCK, GELU, QUANT)
    amax = tl.abs(x0)
    if CHUNKS > 1:
        x1 = _load_chunk(x_ptr, row, 1, D, BLOCK, GELU, QUANT)
        amax = tl.maximum(amax, tl.abs(x1))
    if CHUNKS > 2:
        x2 = _load_chunk(x_ptr, row, 2, D, BLOCK, GELU, QUANT)
        amax = tl.maximum(amax, tl.abs(x2))
    if CHUNKS > 3:
        x3 = _load_chunk(x_ptr, row, 3, D, BLOCK, GELU, QUANT)
        amax = tl.maximum(amax, tl.abs(x3))
    inverse = 1.0
    if QUANT == "fp8":
        inverse, scale = fp8_inverse_scale(tl.max(amax, 0))
        tl.store(y_scale_ptr + row, scale)
    elif QUANT == "int8":
        inverse, scale = int8_inverse_scale(tl.max(amax, 0))
        tl.store(y_scale_ptr + row, scale)
    _store_chunk(y_ptr, row, 0, D, BLOCK, x0, inverse, QUANT)
    if CHUNKS > 1:
        _store_chunk(y_ptr, row, 1, D, BLOCK, x1, inverse, QUANT)
    if CHUNKS > 2:
        _store_chunk(y_ptr, row, 2, D, BLOCK, x2, inverse, QUANT)
    if CHUNKS > 3:
        _store_chunk(y_ptr, row, 3, D, BLOCK, x3, inverse, QUANT)


def row_chunks(d: int) -> tuple[int, int]:
    """(chunk lanes, chunks) covering a row of d: the smallest power of two that takes it in MAX_CHUNKS."""
    block = triton.next_power_of_2(triton.cdiv(d, MAX_CHUNKS))
    return block, triton.cdiv(d, block)


def row_warps(d: int) -> int:
    """Warps per row of d: up to 32 values a thread (a 12288-wide row: 16 warps, 24 values a thread)."""
    return min(16, max(1, triton.next_power_of_2(d) // 1024))


def _launch(x: Tensor, gelu: bool, quant: str | None) -> tuple[Tensor, Tensor | None]:
    if not x.is_contiguous():
        raise ValueError(f"expected a contiguous [..., D] tensor; got strides {tuple(x.stride())}")
    d = x.shape[-1]
    y = torch.empty(x.shape, device=x.device, dtype=quantized_dtype(quant, x.dtype))
    y_scale = None if quant is None else torch.empty(*x.shape[:-1], 1, device=x.device, dtype=torch.float32)
    block, chunks = row_chunks(d)
    _gelu_quant_kernel[(x.numel() // d,)](
        x, y, y_scale, D=d, BLOCK=block, CHUNKS=chunks, GELU=gelu, QUANT=quant or "",
        num_warps=row_warps(d),
    )  # fmt: skip
    return y, y_scale


def gelu(x: Tensor, quant: str | None = None) -> tuple[Tensor, Tensor | None]:
    """GELU(x) (exact erf form) -> (same dtype, None), or with quant "fp8" / "int8" (that format, per-row fp32
    scale [..., 1]; erf to 1.5e-7, see the module docstring)."""
    return _launch(x, gelu=True, quant=quant)


def quantize_rows(x: Tensor, quant: str = "fp8") -> tuple[Tensor, Tensor]:
    """Per-row e4m3 (or int8) quantization of a contiguous [..., D] tensor: (q, fp32 scale [..., 1])."""
    return _launch(x, gelu=False, quant=quant)
