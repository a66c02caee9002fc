"""8-bit quantization shared by the fast engine and the exporters: fp8 (e4m3) and int8.

One recipe everywhere: symmetric scales per row of the last dimension, `x ≈ q * scale` with
`scale = amax(|row|) / 448` (e4m3) or `amax(|row|) / 127` (int8, rounded to nearest). A linear's weight
[out, in] is quantized once per output channel; its input activations per token. The fp8 GEMM runs through
`torch._scaled_mm` (fp32 accumulation, bf16 out, bias fused), the int8 one is `kernels.int8_gemm`.
Embeddings, modulations and the output layer stay bf16: callers choose which linears to convert.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FP8_DTYPE = torch.float8_e4m3fn
# the per-token operand formats the fused kernels can write for the next 8-bit GEMM (`quant=` of those kernels)
QUANT_DTYPES = {"fp8": FP8_DTYPE, "int8": torch.int8}
FP8_MAX = 448.0  # largest finite e4m3fn value
INT8_MAX = 127.0  # symmetric int8: -128 is never written
AMAX_FLOOR = 1e-12  # an all-zero row still gets a finite scale


def fp8_scale(amax: Tensor) -> Tensor:
    """Scale that maps |x| <= amax onto the e4m3 range, in fp32."""
    return amax.float().clamp(min=AMAX_FLOOR) / FP8_MAX


def to_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale rounded to e4m3 (scale broadcasts against x)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (last dim) quantization: (q e4m3 like x, scale fp32 [..., 1]) with x ≈ q * scale."""
    scale = fp8_scale(x.abs().amax(dim=-1, keepdim=True))
    return to_fp8(x, scale), scale


def int8_scale(amax: Tensor) -> Tensor:
    """Symmetric int8 scale (x ≈ round(x / scale), |round| <= 127) with the all-zero floor."""
    return amax.float().clamp(min=AMAX_FLOOR) / INT8_MAX


def to_int8(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale rounded to the nearest int8 (halves away from zero, as the Triton kernels round)."""
    y = x.float() / scale
    return torch.where(y >= 0, y + 0.5, y - 0.5).trunc().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_rowwise_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (last dim) int8 quantization: (q int8 like x, scale fp32 [..., 1]) with x ≈ q * scale."""
    scale = int8_scale(x.abs().amax(dim=-1, keepdim=True))
    return to_int8(x, scale), scale


class Fp8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as e4m3 per output channel and x quantized per token."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, out_dtype=torch.bfloat16,
                 fast_accum: bool = False):  # fmt: skip
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight_scale.shape != (1, weight.shape[0]):
            raise ValueError("Fp8Linear wants an e4m3 weight [out, in] and an fp32 scale [1, out]; use from_linear")
        self.register_buffer("weight", weight)  # [out, in] row-major: .t() is the column-major operand
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype))
        self.out_dtype = out_dtype
        self.fast_accum = fast_accum  # Hopper fp8 MMA without fp32 promotion: ~20% faster, a little less exact

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, out_dtype: torch.dtype | None = None, fast_accum: bool = False
    ) -> Fp8Linear:
        """Quantize an nn.Linear's weight once; output and bias in `out_dtype` (default: the linear's dtype)."""
        weight, scale = quantize_rowwise(linear.weight.detach())
        return cls(weight, scale.reshape(1, -1), linear.bias, out_dtype or linear.weight.dtype, fast_accum)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantized_weight(self) -> Tensor:
        """W as fp32 (what the GEMM effectively multiplies by)."""
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: Tensor, x_scale: Tensor | None = None) -> Tensor:
        """x [..., in] (any float dtype, or e4m3 with its per-token fp32 scale [..., 1]) -> [..., out]."""
        if x_scale is None:
            x, x_scale = quantize_rowwise(x)
        lead = x.shape[:-1]
        out = torch._scaled_mm(
            x.reshape(-1, self.in_features),
            self.weight.t(),
            scale_a=x_scale.reshape(-1, 1).float(),
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
            use_fast_accum=self.fast_accum,
        )
        return out.view(*lead, self.out_features)


def quantized_dtype(quant: str | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a fused kernel writes for `quant` (None: `dtype` itself, unquantized)."""
    if quant is not None and quant not in QUANT_DTYPES:
        raise ValueError(f"quant must be None or one of {sorted(QUANT_DTYPES)}; got {quant!r}")
    return dtype if quant is None else QUANT_DTYPES[quant]
