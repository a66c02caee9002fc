"""QK LayerNorm + RoPE (+ fp8 packing of Q/K/V) in one pass over the QKV projection output.

The DiT's attention input is `qkv [B, S, 3·H·D]` (rows [q; k; v], head-major). Per head, q and k get a
LayerNorm over D (fp32, affine), then visual tokens (index < n_visual) get RoPE on adjacent pairs in fp32.
  bf16: q and k are written back in place, so attention reads q, k, v as column slices of `qkv`.
  fp8:  writes `Fp8QKV` (see attention.py): q per (token, head) scales, k and v per (head, KV block).
One program owns a block of tokens of one (sample, head), which is exactly a K/V scale block in fp8 mode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from k4serve.kernels.attention import Fp8QKV
from k4serve.kernels.rounding import fp8_inverse_scale, to_fp8


@triton.jit
def _layer_norm(x, w_ptr, b_ptr, eps, D: tl.constexpr):
    """Row-wise LayerNorm of x [rows, D] in fp32 with affine weight/bias [D]."""
    cols = tl.arange(0, D)
    mean = tl.sum(x, 1) / D
    xc = x - mean[:, None]
    rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + tl.cast(eps, tl.float32))  # fp32 also from Inductor's fp64 floats
    w = tl.load(w_ptr + cols).to(tl.float32)
    b = tl.load(b_ptr + cols).to(tl.float32)
    return xc * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def _rope(x, cos, sin, BLOCK: tl.constexpr, D: tl.constexpr):
    """Rotate adjacent pairs (x[2i], x[2i+1]) by per-row angles: cos/sin [rows, D/2]."""
    x0, x1 = tl.split(tl.reshape(x, (BLOCK, D // 2, 2)))
    return tl.reshape(tl.join(cos * x0 - sin * x1, sin * x0 + cos * x1), (BLOCK, D))


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr, eps,
                         q8_ptr, k8_ptr, vt_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr,
                         seq_len, n_visual, num_heads, seq_pad,
                         D: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr):  # fmt: skip
    pid_s = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * num_heads + h
    rows = pid_s * BLOCK + tl.arange(0, BLOCK)
    valid = rows < seq_len
    cols = tl.arange(0, D)
    width = 3 * num_heads * D  # qkv row length
    q_ptrs = qkv_ptr + (b * seq_len + rows)[:, None] * width + h * D + cols[None, :]
    k_ptrs = q_ptrs + num_heads * D
    v_ptrs = k_ptrs + num_heads * D

    # 1. per-head LayerNorm (fp32), 2. RoPE on the visual rows (text rows: cos 1, sin 0)
    half = tl.arange(0, D // 2)
    visual = (rows < n_visual)[:, None]
    table = rows[:, None] * (D // 2) + half[None, :]
    cos = tl.load(cos_ptr + table, mask=visual, other=1.0)
    sin = tl.load(sin_ptr + table, mask=visual, other=0.0)
    q = tl.load(q_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    k = tl.load(k_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    q = _rope(_layer_norm(q, qw_ptr, qb_ptr, eps, D), cos, sin, BLOCK, D)
    k = _rope(_layer_norm(k, kw_ptr, kb_ptr, eps, D), cos, sin, BLOCK, D)
    k = tl.where(valid[:, None], k, 0.0)  # padded rows must not enter the K block's amax

    # 3. store: in place (bf16), or quantized with their scales (fp8)
    if FP8:
        q_inverse, q_scale = fp8_inverse_scale(tl.max(tl.abs(q), 1))
        out_ptrs = (b * seq_len + rows)[:, None] * (num_heads * D) + h * D + cols[None, :]
        tl.store(q8_ptr + out_ptrs, to_fp8(q, q_inverse[:, None]), mask=valid[:, None])
        tl.store(q_scale_ptr + bh * seq_len + rows, q_scale, mask=valid)
        k_inverse, k_scale = fp8_inverse_scale(tl.max(tl.max(tl.abs(k), 1), 0))
        tl.store(k8_ptr + out_ptrs, to_fp8(k, k_inverse), mask=valid[:, None])
        tl.store(k_scale_ptr + bh * (seq_pad // BLOCK) + pid_s, k_scale)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        v_inverse, v_scale = fp8_inverse_scale(tl.max(tl.max(tl.abs(v), 1), 0))
        # transposed [B*H*D, S_pad]: the whole block, padding included, so padded columns hold zeros
        vt_ptrs = vt_ptr + (bh * D + cols)[None, :] * seq_pad + rows[:, None]
        tl.store(vt_ptrs, to_fp8(v, v_inverse))
        tl.store(v_scale_ptr + bh * (seq_pad // BLOCK) + pid_s, v_scale)
    else:
        tl.store(q_ptrs, q.to(qkv_ptr.dtype.element_ty), mask=valid[:, None])
        tl.store(k_ptrs, k.to(qkv_ptr.dtype.element_ty), mask=valid[:, None])


def _launch(qkv, num_heads, q_norm, k_norm, cos, sin, n_visual, eps, block, outputs, seq_pad, fp8):
    b, s, width = qkv.shape
    d = width // (3 * num_heads)
    if not qkv.is_contiguous() or cos.shape != (n_visual, d // 2) or cos.dtype != torch.float32:
        raise ValueError(
            f"qkv must be contiguous [B, S, 3*H*D] and cos/sin fp32 [n_visual, D/2] = [{n_visual}, {d // 2}]; "
            f"got qkv {tuple(qkv.shape)} contiguous={qkv.is_contiguous()}, cos {tuple(cos.shape)} {cos.dtype}"
        )
    grid = (triton.cdiv(s, block), num_heads, b)
    _qk_norm_rope_kernel[grid](
        qkv, cos, sin, q_norm[0], q_norm[1], k_norm[0], k_norm[1], eps, *outputs,
        s, n_visual, num_heads, seq_pad, D=d, BLOCK=block, FP8=fp8, num_warps=4,
    )  # fmt: skip


def qk_norm_rope_(qkv: Tensor, num_heads: int, q_norm: tuple[Tensor, Tensor], k_norm: tuple[Tensor, Tensor],
                  cos: Tensor, sin: Tensor, n_visual: int, eps: float = 1e-5,
                  block: int = 64) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Normalise and rotate q, k of `qkv` [B, S, 3·H·D] in place; returns q, k, v as [B, S, H, D] views."""
    _launch(qkv, num_heads, q_norm, k_norm, cos, sin, n_visual, eps, block, [None] * 6, 0, False)
    return qkv.unflatten(2, (3, num_heads, -1)).unbind(2)


def qk_norm_rope_fp8(qkv: Tensor, num_heads: int, q_norm: tuple[Tensor, Tensor], k_norm: tuple[Tensor, Tensor],
                     cos: Tensor, sin: Tensor, n_visual: int, eps: float = 1e-5,
                     kv_block: int = 128) -> Fp8QKV:  # fmt: skip
    """Normalise and rotate q, k of `qkv` [B, S, 3·H·D] and pack q, k, v as fp8 for `flash_attention_fp8`."""
    b, s, width = qkv.shape
    d = width // (3 * num_heads)
    n_blocks = triton.cdiv(s, kv_block)
    new = dict(device=qkv.device)
    packed = Fp8QKV(
        q=torch.empty(b * s, num_heads * d, dtype=torch.float8_e4m3fn, **new),
        k=torch.empty(b * s, num_heads * d, dtype=torch.float8_e4m3fn, **new),
        v_t=torch.empty(b * num_heads * d, n_blocks * kv_block, dtype=torch.float8_e4m3fn, **new),
        q_scale=torch.empty(b, num_heads, s, dtype=torch.float32, **new),
        k_scale=torch.empty(b, num_heads, n_blocks, dtype=torch.float32, **new),
        v_scale=torch.empty(b, num_heads, n_blocks, dtype=torch.float32, **new),
    )
    outputs = [packed.q, packed.k, packed.v_t, packed.q_scale, packed.k_scale, packed.v_scale]
    _launch(qkv, num_heads, q_norm, k_norm, cos, sin, n_visual, eps, kv_block, outputs, n_blocks * kv_block, True)
    return packed


def qk_norm_rope_reference(qkv: Tensor, num_heads: int, q_norm: tuple[Tensor, Tensor], k_norm: tuple[Tensor, Tensor],
                           cos: Tensor, sin: Tensor, n_visual: int,
                           eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """float64 torch reference: q, k, v [B, S, H, D] after LayerNorm and RoPE (visual rows only)."""
    q, k, v = qkv.double().unflatten(2, (3, num_heads, -1)).unbind(2)

    def norm_rope(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], weight.double(), bias.double(), eps)
        x0, x1 = x[:, :n_visual, :, 0::2], x[:, :n_visual, :, 1::2]
        c, s = cos.double()[:, None], sin.double()[:, None]
        rotated = torch.stack([c * x0 - s * x1, s * x0 + c * x1], dim=-1).flatten(-2)
        return torch.cat([rotated, x[:, n_visual:]], dim=1)

    return norm_rope(q, *q_norm), norm_rope(k, *k_norm), v
