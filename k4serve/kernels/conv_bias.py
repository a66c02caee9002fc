"""The bias add of a channels-last (NDHWC) convolution, in one vectorised pass.

torch's cuDNN conv3d does not fuse the bias: it adds it afterwards with a broadcast `add_`, which TensorIterator
runs through its non-vectorised kernel (a [C] vector broadcast over [N·T·H·W, C] is not contiguous): 1.5 TB/s on
the H200 at the decoder's widest feature map, against 3.97 TB/s here (`benchmarks/vae_kernels.py`). Here the output
is a [rows, C] matrix with contiguous rows: each program adds the bias to one [rows, channels] tile, with torch's
rounding (bf16 + bf16 computed in fp32, rounded once). The fast decoder adds most conv biases inside the next pass
over the output instead (`engines/vae.py`); this adds the others, and a resnet's skip connection with its bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from k4serve.kernels import on_device
from k4serve.kernels.library_conv import cudnn_conv

TILE = 8192  # elements per program
WARPS = 8
MAX_TILE_CHANNELS = 256


@triton.jit
def _channel_bias_kernel(y_ptr, bias_ptr, residual_ptr, rows, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         RESIDUAL: tl.constexpr):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < C)[None, :]
    offsets = r.to(tl.int64)[:, None] * C + c[None, :]
    y = tl.load(y_ptr + offsets, mask=mask)
    bias = tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    y = (y.to(tl.float32) + bias[None, :]).to(y.dtype)
    if RESIDUAL:  # then + residual, rounded again: torch's add_ after the biased conv
        y = (y.to(tl.float32) + tl.load(residual_ptr + offsets, mask=mask).to(tl.float32)).to(y.dtype)
    tl.store(y_ptr + offsets, y, mask=mask)


def add_channel_bias_(y: Tensor, bias: Tensor, residual: Tensor | None = None) -> Tensor:
    """y [B, C, ...] stored channels-last (C innermost) += bias [C] per channel, in place; returns y. With
    `residual` (like y), y = (y + bias) + residual, each sum rounded to y's dtype (a resnet's biased conv, then
    its skip connection)."""
    c = y.shape[1]
    if bias.shape != (c,) or y.stride(1) != 1 or not y.permute(0, *range(2, y.dim()), 1).is_contiguous():
        raise ValueError(f"y must be [B, C, ...] channels-last with bias [C]; got y {tuple(y.shape)} strides "
                         f"{y.stride()}, bias {tuple(bias.shape)}")  # fmt: skip
    if residual is not None and (residual.shape != y.shape or residual.stride() != y.stride()):
        raise ValueError(f"residual {tuple(residual.shape)} must have y's shape and layout {tuple(y.shape)}")
    rows = y.numel() // c
    block_c = min(triton.next_power_of_2(c), MAX_TILE_CHANNELS)
    block_r = TILE // block_c
    with on_device(y.device):
        _channel_bias_kernel[(triton.cdiv(rows, block_r), triton.cdiv(c, block_c))](
            y,
            bias,
            y if residual is None else residual,
            rows,
            c,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            RESIDUAL=residual is not None,
            num_warps=WARPS,
        )
    return y


CONV_BACKENDS = ("torch", "cudnn")


def conv3d_channels_last(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int, int],
                         backend: str = "torch") -> Tensor:  # fmt: skip
    """F.conv3d(x, weight, bias, padding=padding) with an NDHWC output and the bias added by this module's kernel;
    the conv itself by torch (its cuDNN path) or by `backend="cudnn"`: the cuDNN frontend's fastest plan
    (`kernels/library_conv.py`, NDHWC x and weight)."""
    if backend == "cudnn":
        y = cudnn_conv(x, weight, padding)
    elif backend == "torch":
        y = F.conv3d(x, weight, None, padding=padding).contiguous(memory_format=torch.channels_last_3d)
    else:
        raise ValueError(f"conv backend {backend!r}: choose one of {CONV_BACKENDS}")
    return y if bias is None else add_channel_bias_(y, bias)
