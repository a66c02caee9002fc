"""int8 packing of Q and K for `attention.flash_attention_int8`, one pass over the normalised q, k.

Input: the [B, S, H, D] q, k views that `qk_norm_rope_` leaves in the QKV buffer (LayerNorm'd and rotated).
  q: int8 per (token, head): scale = amax over the head's D values / 127.
  k: smoothed (the per-(sample, head) mean over the sequence subtracted, softmax-invariant), then int8 per
     (head, block of kv_block tokens), which is one program's block here.
v is not touched: P·V runs in 16 bits. The torch reference is `attention.quantize_qk_int8_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from k4serve.kernels.attention import Int8QK
from k4serve.kernels.rounding import int8_inverse_scale, to_int8


@triton.jit
def _quantize_qk_kernel(q_ptr, k_ptr, k_mean_ptr, q8_ptr, k8_ptr, q_scale_ptr, k_scale_ptr,
                        q_row_stride, k_row_stride, seq_len, num_heads, n_blocks,
                        D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid_s = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * num_heads + h
    rows = pid_s * BLOCK + tl.arange(0, BLOCK)
    valid = rows < seq_len
    cols = tl.arange(0, D)
    token = (b * seq_len + rows)[:, None]
    dst = token * (num_heads * D) + h * D + cols[None, :]

    # 1. q per row
    q = tl.load(q_ptr + token * q_row_stride + h * D + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    q_inverse, q_scale = int8_inverse_scale(tl.max(tl.abs(q), 1))
    tl.store(q8_ptr + dst, to_int8(q, q_inverse[:, None]), mask=valid[:, None])
    tl.store(q_scale_ptr + bh * seq_len + rows, q_scale, mask=valid)
    # 2. k minus its mean, one scale for the block (padded rows are zeros, outside the amax)
    k = tl.load(k_ptr + token * k_row_stride + h * D + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    k = tl.where(valid[:, None], k - tl.load(k_mean_ptr + bh * D + cols)[None, :], 0.0)
    k_inverse, k_scale = int8_inverse_scale(tl.max(tl.max(tl.abs(k), 1), 0))
    tl.store(k8_ptr + dst, to_int8(k, k_inverse), mask=valid[:, None])
    tl.store(k_scale_ptr + bh * n_blocks + pid_s, k_scale)


def quantize_qk_int8(q: Tensor, k: Tensor, v: Tensor, kv_block: int = 128) -> Int8QK:
    """Pack q, k [B, S, H, D] (views with contiguous heads, e.g. of the QKV buffer) as int8 for the attention."""
    b, s, h, d = q.shape
    for t in (q, k):
        if t.shape != q.shape or t.stride(3) != 1 or t.stride(2) != d or t.stride(0) != s * t.stride(1):
            raise ValueError(
                f"q and k must be [B, S, H, D] views with contiguous heads (column slices of a [B, S, C] buffer); "
                f"got {tuple(t.shape)} with strides {tuple(t.stride())}"
            )
    n_blocks = triton.cdiv(s, kv_block)
    k_mean = k.mean(dim=1, dtype=torch.float32).contiguous()  # [B, H, D]: deterministic, unlike atomics
    new = dict(device=q.device)
    packed = Int8QK(
        q=torch.empty(b * s, h * d, dtype=torch.int8, **new),
        k=torch.empty(b * s, h * d, dtype=torch.int8, **new),
        q_scale=torch.empty(b, h, s, dtype=torch.float32, **new),
        k_scale=torch.empty(b, h, n_blocks, dtype=torch.float32, **new),
        v=v,
        kv_block=kv_block,
    )
    grid = (n_blocks, h, b)
    _quantize_qk_kernel[grid](
        q, k, k_mean, packed.q, packed.k, packed.q_scale, packed.k_scale,
        q.stride(1), k.stride(1), s, h, n_blocks, D=d, BLOCK=kv_block, num_warps=4,
    )  # fmt: skip
    return packed
