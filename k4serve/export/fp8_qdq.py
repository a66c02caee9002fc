"""fp8 linears for export: QuantizeLinear / DequantizeLinear pairs carrying k4serve.kernels.quantize's recipe.

The recipe of the fast engine: e4m3, symmetric, `scale = max(amax, 1e-12) / 448`; weights per output channel
(computed once, stored as an e4m3 initializer), activations per token (computed in the graph from the token's
amax). In ONNX (opset 21+):

    weight   DequantizeLinear(W_e4m3 [out, in], w_scale [out], axis=0)                       per-axis
    input    QuantizeLinear(x, x_scale [.., 1], axis=-1, block_size=in, output_dtype=e4m3)    one block per token
             -> DequantizeLinear(same scale, same block)
    then     MatMul(x_dq, W_dqᵀ) + bias: the DQ -> MatMul <- DQ pattern TensorRT fuses into one fp8 GEMM.

The scales are in the graph's carrier dtype (fp32, or bf16 for TensorRT): a strongly typed network gives a Q/DQ
layer the type of its scale, and one scale serves both Q and DQ, so rounding it to bf16 moves the grid by at
most 2^-9 without biasing the result. Zero points are omitted (zero), as TensorRT requires.

In torch the pair is two custom ops with the ONNX semantics (what onnxruntime computes, bit for bit on the CPU),
and `ONNX_TRANSLATIONS` tells torch.onnx.export which ONNX nodes they become.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx import TensorProto
from onnxscript import opset23 as op
from torch import Tensor, nn

from k4serve.kernels.quantize import FP8_DTYPE, fp8_scale, to_fp8


@torch.library.custom_op("k4serve_export::quantize_rows_fp8", mutates_args=())
def quantize_rows_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """x [..., D] / scale [..., 1] rounded to e4m3, saturating (ONNX QuantizeLinear, one block per row)."""
    return to_fp8(x, scale.float())


@quantize_rows_fp8.register_fake
def _(x: Tensor, scale: Tensor) -> Tensor:
    return torch.empty_like(x, dtype=FP8_DTYPE)


@torch.library.custom_op("k4serve_export::dequantize_rows_fp8", mutates_args=())
def dequantize_rows_fp8(q: Tensor, scale: Tensor) -> Tensor:
    """q [..., D] e4m3 * scale [..., 1] (or a weight's [out]: one per row), in the scale's dtype (ONNX
    DequantizeLinear)."""
    rows = scale[:, None] if scale.dim() == 1 else scale
    return (q.float() * rows.float()).to(scale.dtype)


@dequantize_rows_fp8.register_fake
def _(q: Tensor, scale: Tensor) -> Tensor:
    return torch.empty_like(q, dtype=scale.dtype)


def _quantize_rows_onnx(x, scale):
    rank = len(x.shape)
    return op.QuantizeLinear(
        x, scale, axis=rank - 1, block_size=x.shape[rank - 1], output_dtype=TensorProto.FLOAT8E4M3FN
    )


def _dequantize_rows_onnx(q, scale):
    rank = len(q.shape)
    if len(scale.shape) == 1:  # a weight's per-output-channel scale [out]: per-axis along the rows
        return op.DequantizeLinear(q, scale, axis=0)
    return op.DequantizeLinear(q, scale, axis=rank - 1, block_size=q.shape[rank - 1])


ONNX_TRANSLATIONS = {
    torch.ops.k4serve_export.quantize_rows_fp8.default: _quantize_rows_onnx,
    torch.ops.k4serve_export.dequantize_rows_fp8.default: _dequantize_rows_onnx,
}


class QDQLinear(nn.Module):
    """An nn.Linear as fp8 Q/DQ: e4m3 weight per output channel, input quantized per token, in `carrier` dtype."""

    def __init__(self, linear: nn.Linear, carrier: torch.dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = fp8_scale(weight.abs().amax(dim=1)).to(carrier)  # [out]: the scale the graph carries
        self.register_buffer("weight", to_fp8(weight, scale.float()[:, None]))  # [out, in] e4m3
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(carrier))

    def forward(self, x: Tensor) -> Tensor:
        x_scale = fp8_scale(x.abs().amax(dim=-1, keepdim=True)).to(x.dtype)  # per token
        x = dequantize_rows_fp8(quantize_rows_fp8(x, x_scale), x_scale)
        weight = dequantize_rows_fp8(self.weight, self.weight_scale)
        return F.linear(x, weight, self.bias)


def quantize_linears(pairs: list[tuple[nn.Module, str]], carrier: torch.dtype) -> int:
    """Replace each (parent, attribute) nn.Linear with its QDQLinear, in place; the number replaced."""
    for parent, name in pairs:
        setattr(parent, name, QDQLinear(getattr(parent, name), carrier))
    return len(pairs)
