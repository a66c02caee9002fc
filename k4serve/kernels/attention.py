"""Joint (non-causal) flash attention in Triton for the DiT: bf16, and fp8 with block-scaled Q/K/V.

Layouts are the ones the fused QK-norm/RoPE kernel writes, so nothing is transposed on the way:
  bf16  q, k, v: [B, S, H, D] views with a common row stride (e.g. slices of the QKV projection output).
  fp8   `Fp8QKV`: q, k [B*S, H*D] e4m3 with q scaled per (token, head) and k per (head, KV block of tokens);
        v transposed to [B*H*D, S_pad] e4m3 (the fp8 tensor-core instruction wants P·V's reduction dim
        contiguous), scaled per (head, KV block).
Output: [B, S, H*D] in the input dtype (bf16 for fp8), ready for the output projection.

The inner loop is FlashAttention-2's online softmax in base 2 with fp32 accumulation. fp8 follows
SageAttention2 / FlashAttention-3: Q·Kᵀ in e4m3 with the scales applied to the fp32 scores, P scaled by
2^8 into e4m3's range (folded into the subtracted max), and V's per-block scale folded into the running
rescale factor, so the hot loop does no more elementwise work than the bf16 one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from k4serve.kernels.quantize import fp8_scale, quantize_rowwise, to_fp8

LOG2E = 1.4426950408889634
P_SHIFT = tl.constexpr(8.0)  # fp8 P = exp2(s - m + 8) lies in (0, 256]: e4m3's subnormals start at 2^-9


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_CONFIG = AttentionConfig()
# tilings worth timing on the H100 (benchmarks/NOTES.md): one 4-warp warpgroup per 64-row block wins at hd 64
CANDIDATES = tuple(
    AttentionConfig(bm, bn, w, s)
    for bm, bn, w, s in ((64, 128, 4, 2), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3))
)
_TUNED: dict[tuple, AttentionConfig] = {}


@dataclass
class Fp8QKV:
    """fp8 operands of one attention call (see the module docstring for layouts)."""

    q: Tensor  # [B*S, H*D] e4m3
    k: Tensor  # [B*S, H*D] e4m3
    v_t: Tensor  # [B*H*D, S_pad] e4m3, S_pad a multiple of kv_block
    q_scale: Tensor  # [B, H, S] fp32
    k_scale: Tensor  # [B, H, S_pad / kv_block] fp32
    v_scale: Tensor  # [B, H, S_pad / kv_block] fp32

    @property
    def batch(self) -> int:
        return self.q_scale.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q_scale.shape[1]

    @property
    def seq_len(self) -> int:
        return self.q_scale.shape[2]

    @property
    def kv_block(self) -> int:
        return self.v_t.shape[1] // self.k_scale.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[1] // self.num_heads


@triton.jit
def _scores(q, desc_k, kv_row, k_col, start_n):
    """Raw scores of the query block against keys [start_n, start_n + BLOCK_N): [BLOCK_M, BLOCK_N] fp32."""
    k = desc_k.load([kv_row + start_n, k_col])  # [BLOCK_N, D]
    return tl.dot(q, k.T)


@triton.jit
def _update(s, acc, l_i, m_i, sv_prev, row_scale, desc_v, k_scale_ptr, v_scale_ptr, kv_row, v_row, v_col, start_n,
            seq_len, FP8: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
            KV_BLOCK: tl.constexpr):  # fmt: skip
    """Online-softmax update with one KV block's scores; returns (acc, l_i, m_i, V scale of acc)."""
    if FP8:
        block = start_n // KV_BLOCK
        row_scale = row_scale * tl.load(k_scale_ptr + block)
    if MASK:
        cols = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(cols[None, :] < seq_len, s, float("-inf"))
    # scales are positive, so the row max of the scaled scores is the scaled row max
    m_ij = tl.maximum(m_i, tl.max(s, 1) * row_scale)
    if FP8:
        x = s * row_scale[:, None] - (m_ij - P_SHIFT)[:, None]
    else:
        x = s * row_scale[:, None] - m_ij[:, None]
    p = tl.math.exp2(x)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    if FP8:
        # acc is kept in units of the current V block's scale: rescale by the ratio of old to new
        sv = tl.load(v_scale_ptr + block)
        acc = acc * (alpha * (sv_prev / sv))[:, None]
        v_t = desc_v.load([v_row, v_col + start_n])  # [D, BLOCK_N]
        acc = tl.dot(p.to(tl.float8e4nv), v_t.T, acc)
        sv_prev = sv
    else:
        acc = acc * alpha[:, None]
        v = desc_v.load([kv_row + start_n, v_col])  # [BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij, sv_prev


@triton.jit
def _attention_kernel(desc_q, desc_k, desc_v, out_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr,
                      seq_len, num_heads, out_row_stride, n_kv_blocks, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      KV_BLOCK: tl.constexpr, FP8: tl.constexpr):  # fmt: skip
    """One (query block, batch·head) program: O = softmax(Q Kᵀ · scale) V over all seq_len keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_row = b * seq_len  # first row of this sample in the [B*S, ...] views
    k_col = h * HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)

    # 1. this block's queries (rows past seq_len are finite neighbours; their outputs are not stored)
    q = desc_q.load([kv_row + pid_m * BLOCK_M, h * HEAD_DIM])  # [BLOCK_M, D]
    if FP8:
        q_scale = tl.load(q_scale_ptr + pid_bh * seq_len + rows, mask=rows < seq_len, other=1.0)
        row_scale = q_scale * qk_scale
        k_scale_ptr += pid_bh * n_kv_blocks
        v_scale_ptr += pid_bh * n_kv_blocks
        v_row = pid_bh * HEAD_DIM  # v_t rows of this (sample, head); its columns are tokens
        v_col = 0
    else:
        row_scale = tl.full([BLOCK_M], qk_scale, tl.float32)
        v_row = 0
        v_col = h * HEAD_DIM

    # 2. online softmax over the KV blocks: full blocks unmasked, the ragged tail masked
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    sv_prev = tl.full([], 1.0, tl.float32)
    n_full = (seq_len // BLOCK_N) * BLOCK_N
    args = (desc_v, k_scale_ptr, v_scale_ptr, kv_row, v_row, v_col)
    for start_n in range(0, n_full, BLOCK_N):
        s = _scores(q, desc_k, kv_row, k_col, start_n)
        acc, l_i, m_i, sv_prev = _update(s, acc, l_i, m_i, sv_prev, row_scale, *args, start_n, seq_len,
                                         FP8, False, BLOCK_N, KV_BLOCK)  # fmt: skip
    if n_full < seq_len:
        s = _scores(q, desc_k, kv_row, k_col, n_full)
        acc, l_i, m_i, sv_prev = _update(s, acc, l_i, m_i, sv_prev, row_scale, *args, n_full, seq_len,
                                         FP8, True, BLOCK_N, KV_BLOCK)  # fmt: skip

    # 3. normalise and store this head's slice of [B, S, H*D]
    out = acc * (sv_prev / l_i)[:, None]
    cols = tl.arange(0, HEAD_DIM)
    ptrs = out_ptr + (kv_row + rows)[:, None] * out_row_stride + h * HEAD_DIM + cols[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < seq_len)[:, None])


def _check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ValueError(
            f"the Triton attention kernels need a power-of-two head_dim >= 16, got {d}: use attention='sdpa'"
        )


def _row_descriptor(t: Tensor, block: list[int]) -> TensorDescriptor:
    """TMA descriptor over the [B*S, H*D] matrix of a [B, S, H, D] view (heads contiguous, any row stride)."""
    b, s, h, d = t.shape
    _check_head_dim(d)
    if t.stride(3) != 1 or t.stride(2) != d or t.stride(0) != s * t.stride(1):
        raise ValueError(
            f"attention operands must be [B, S, H, D] views with contiguous heads (a column slice of a "
            f"[B, S, C] buffer); got strides {tuple(t.stride())}: pass .contiguous()"
        )
    return TensorDescriptor(t, [b * s, h * d], [t.stride(1), 1], block)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, config: AttentionConfig | None = None) -> Tensor:
    """softmax(q kᵀ / √D) v for q, k, v [B, S, H, D] (fp16/bf16/fp32) -> [B, S, H*D] in q's dtype."""
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share shape and dtype; got {q.shape}/{q.dtype}, {k.shape}, {v.shape}")
    b, s, h, d = q.shape
    config = config or _TUNED.get((b, s, h, d, False), DEFAULT_CONFIG)
    desc_q = _row_descriptor(q, [config.block_m, d])
    desc_k = _row_descriptor(k, [config.block_n, d])
    desc_v = _row_descriptor(v, [config.block_n, d])
    out = torch.empty(b, s, h * d, device=q.device, dtype=q.dtype)
    _launch(desc_q, desc_k, desc_v, out, None, None, None, b, s, h, d, 1, 1, False, config)
    return out


def flash_attention_fp8(packed: Fp8QKV, config: AttentionConfig | None = None,
                        out_dtype: torch.dtype = torch.bfloat16) -> Tensor:  # fmt: skip
    """Attention over fp8 operands (see `Fp8QKV`) with fp32 accumulation -> [B, S, H*D] in `out_dtype`."""
    b, s, h, d, kv = packed.batch, packed.seq_len, packed.num_heads, packed.head_dim, packed.kv_block
    _check_head_dim(d)
    config = config or _TUNED.get((b, s, h, d, True), AttentionConfig(block_n=min(DEFAULT_CONFIG.block_n, kv)))
    if kv % config.block_n:
        raise ValueError(f"block_n {config.block_n} must divide the fp8 KV scale block {kv}")
    desc_q = TensorDescriptor.from_tensor(packed.q, [config.block_m, d])
    desc_k = TensorDescriptor.from_tensor(packed.k, [config.block_n, d])
    desc_v = TensorDescriptor.from_tensor(packed.v_t, [d, config.block_n])
    out = torch.empty(b, s, h * d, device=packed.q.device, dtype=out_dtype)
    scales = (packed.q_scale, packed.k_scale, packed.v_scale)
    n_blocks = packed.k_scale.shape[-1]
    _launch(desc_q, desc_k, desc_v, out, *scales, b, s, h, d, n_blocks, kv, True, config)
    return out


def _launch(desc_q, desc_k, desc_v, out, q_scale, k_scale, v_scale, b, s, h, d, n_blocks, kv_block,
            fp8, config: AttentionConfig) -> None:  # fmt: skip
    grid = (triton.cdiv(s, config.block_m), b * h)
    _attention_kernel[grid](
        desc_q, desc_k, desc_v, out, q_scale, k_scale, v_scale,
        s, h, out.stride(1), n_blocks, LOG2E / math.sqrt(d),
        HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, KV_BLOCK=kv_block, FP8=fp8,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def quantize_qkv_fp8(q: Tensor, k: Tensor, v: Tensor, kv_block: int = 128) -> Fp8QKV:
    """Torch reference of the fp8 packing: q per (token, head); k, v per (head, block of kv_block tokens)."""
    b, s, h, d = q.shape
    n_blocks = triton.cdiv(s, kv_block)
    q8, q_scale = quantize_rowwise(q)  # scale [B, S, H, 1]

    def per_block(x: Tensor) -> tuple[Tensor, Tensor]:  # -> e4m3 [B, nb, kv_block, H, D], scale [B, H, nb]
        x = F.pad(x, (0, 0, 0, 0, 0, n_blocks * kv_block - s)).view(b, n_blocks, kv_block, h, d)
        scale = fp8_scale(x.abs().amax(dim=(2, 4), keepdim=True))  # [B, nb, 1, H, 1]
        return to_fp8(x, scale), scale.view(b, n_blocks, h).transpose(1, 2).contiguous()

    k8, k_scale = per_block(k)
    v8, v_scale = per_block(v)
    return Fp8QKV(
        q=q8.reshape(b * s, h * d),
        k=k8.flatten(1, 2)[:, :s].reshape(b * s, h * d),
        v_t=v8.permute(0, 3, 4, 1, 2).reshape(b * h * d, n_blocks * kv_block).contiguous(),
        q_scale=q_scale[..., 0].transpose(1, 2).contiguous(),
        k_scale=k_scale,
        v_scale=v_scale,
    )


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √D) v in float64 for q, k, v [B, S, H, D] -> [B, S, H*D]."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)


def attention_flops(batch: int, seq_len: int, num_heads: int, head_dim: int) -> float:
    """Matmul FLOPs of one non-causal attention call (Q·Kᵀ and P·V)."""
    return 4.0 * batch * num_heads * seq_len * seq_len * head_dim


def tune_attention(batch: int, seq_len: int, num_heads: int, head_dim: int, fp8: bool,
                   candidates=CANDIDATES) -> dict[AttentionConfig, float]:  # fmt: skip
    """Time each candidate config at this shape on the GPU (ms, inf if it fails to build); keep the fastest."""
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, seq_len, 3, num_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(2)
    packed = quantize_qkv_fp8(q, k, v) if fp8 else None
    timings = {}
    for config in candidates:
        if fp8 and packed.kv_block % config.block_n:
            continue
        if fp8:
            run = lambda c=config: flash_attention_fp8(packed, c)  # noqa: E731
        else:
            run = lambda c=config: flash_attention(q, k, v, c)  # noqa: E731
        try:
            timings[config] = do_bench(run, warmup=25, rep=100, return_mode="median")
        except Exception as error:  # a config the compiler rejects (registers, shared memory, asm) is skipped
            timings[config] = float("inf")
            print(f"attention config {config} failed: {type(error).__name__}: {str(error)[:200]}")
    _TUNED[(batch, seq_len, num_heads, head_dim, fp8)] = min(timings, key=timings.get)
    return timings


def ensure_tuned(batch: int, seq_len: int, num_heads: int, head_dim: int, fp8: bool) -> AttentionConfig:
    """The tiling the kernels use at this shape, tuned on first use (GPU)."""
    key = (batch, seq_len, num_heads, head_dim, fp8)
    if key not in _TUNED:
        tune_attention(batch, seq_len, num_heads, head_dim, fp8)
    return _TUNED[key]
