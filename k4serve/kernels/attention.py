"""Joint (non-causal) flash attention in Triton for the DiT: bf16, and two quantized recipes.

Layouts are the ones the fused QK-norm/RoPE kernel writes, so nothing is transposed on the way:
  bf16  q, k, v: [B, S, H, D] views with a common row stride (e.g. slices of the QKV projection output).
  fp8   `Fp8QKV`: q, k [B*S, H*D] e4m3 with q scaled per (token, head) and k per (head, KV block of tokens);
        v transposed to [B*H*D, S_pad] e4m3 (the fp8 tensor-core instruction wants P·V's reduction dim
        contiguous), scaled per (head, KV block).
  int8  `Int8QK`: q, k [B*S, H*D] int8 with the same scale granularity as fp8, k smoothed (its per-head mean
        over the sequence subtracted: softmax-invariant); v stays the 16-bit [B, S, H, D] view.
Output: [B, S, H*D] in the input dtype (bf16 for the quantized recipes), ready for the output projection.

The inner loop is FlashAttention-2's online softmax in base 2 with fp32 accumulation. fp8 follows
SageAttention2 / FlashAttention-3: Q·Kᵀ in e4m3 with the scales applied to the fp32 scores, P scaled by
2^8 into e4m3's range (folded into the subtracted max), and V's per-block scale folded into the running
rescale factor, so the hot loop does no more elementwise work than the bf16 one. int8 follows
SageAttention1: Q·Kᵀ on the 8-bit tensor cores in int8 (7 bits of mantissa-equivalent against e4m3's 3),
P·V in 16 bits. Why that recipe (e4m3 P and V alone cost 3.5 % at random v): benchmarks/NOTES.md.
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

from k4serve.kernels.quantize import fp8_scale, int8_scale, quantize_rowwise, to_fp8, to_int8

LOG2E = 1.4426950408889634
P_SHIFT = tl.constexpr(8.0)  # fp8 P = exp2(s - m + 8) lies in (0, 256]: e4m3's subnormals start at 2^-9
# int8 Q·Kᵀ accumulates exactly in int32. Its conversion to fp32 is an integer add: the bits of 1.5·2^23 plus an
# integer |s| < 2^22 are the float 1.5·2^23 + s, and the bias folds into the per-row constant the softmax
# subtracts anyway, so the hot loop has no I2F (a quarter-rate conversion). |s| <= D·127² < 2^22 for D <= 256.
SCORE_BIAS = tl.constexpr(12582912.0)
SCORE_BIAS_BITS = tl.constexpr(0x4B400000)


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
class _ScaledQK:
    """Q and K quantized per (token, head) and per (head, KV block) for the 8-bit Q·Kᵀ."""

    q: Tensor  # [B*S, H*D] e4m3 or int8
    k: Tensor  # [B*S, H*D] same dtype
    q_scale: Tensor  # [B, H, S] fp32
    k_scale: Tensor  # [B, H, ceil(S / kv_block)] fp32

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
    def head_dim(self) -> int:
        return self.q.shape[1] // self.num_heads


@dataclass
class Fp8QKV(_ScaledQK):
    """fp8 operands of one attention call (see the module docstring for layouts)."""

    v_t: Tensor  # [B*H*D, S_pad] e4m3, S_pad a multiple of kv_block
    v_scale: Tensor  # [B, H, S_pad / kv_block] fp32

    @property
    def kv_block(self) -> int:
        return self.v_t.shape[1] // self.k_scale.shape[2]


@dataclass
class Int8QK(_ScaledQK):
    """int8 Q/K (K smoothed) and the 16-bit V of one attention call."""

    v: Tensor  # [B, S, H, D] fp16/bf16, heads contiguous (a column slice of the QKV buffer)
    kv_block: int


@triton.jit
def _scores(q, desc_k, kv_row, k_col, start_n):
    """Raw scores of the query block against keys [start_n, start_n + BLOCK_N): [BLOCK_M, BLOCK_N] fp32,
    offset by SCORE_BIAS for int8 operands (see there)."""
    k = desc_k.load([kv_row + start_n, k_col])  # [BLOCK_N, D]
    s = tl.dot(q, k.T)
    if s.dtype == tl.int32:  # int8 operands
        s = (s + SCORE_BIAS_BITS).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _update(s, acc, l_i, m_i, sv_prev, row_scale, desc_v, k_scale_ptr, v_scale_ptr, kv_row, v_row, v_col, start_n,
            seq_len, RECIPE: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
            KV_BLOCK: tl.constexpr):  # fmt: skip
    """Online-softmax update with one KV block's scores; returns (acc, l_i, m_i, V scale of acc)."""
    block = start_n // KV_BLOCK
    if RECIPE != "bf16":  # per-block K scale
        row_scale = row_scale * tl.load(k_scale_ptr + block)
    if MASK:
        cols = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(cols[None, :] < seq_len, s, float("-inf"))
    # scales are positive, so the row max of the scaled scores is the scaled row max
    bias = SCORE_BIAS if RECIPE == "int8" else 0.0  # int8 scores arrive biased (see SCORE_BIAS)
    m_ij = tl.maximum(m_i, (tl.max(s, 1) - bias) * row_scale)
    if RECIPE == "fp8":
        x = s * row_scale[:, None] - (m_ij - P_SHIFT)[:, None]
    else:
        x = s * row_scale[:, None] - (m_ij + bias * row_scale)[:, None]
    p = tl.math.exp2(x)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    if RECIPE == "fp8":
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
                      KV_BLOCK: tl.constexpr, RECIPE: tl.constexpr):  # fmt: skip
    """One (query block, batch·head) program: O = softmax(Q Kᵀ · scale) V over all seq_len keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_row = b * seq_len  # first row of this sample in the [B*S, ...] views
    k_col = h * HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor (AOTI packages) passes Python floats as fp64

    # 1. this block's queries (rows past seq_len are finite neighbours; their outputs are not stored)
    q = desc_q.load([kv_row + pid_m * BLOCK_M, h * HEAD_DIM])  # [BLOCK_M, D]
    if RECIPE != "bf16":  # per-row Q scale
        q_scale = tl.load(q_scale_ptr + pid_bh * seq_len + rows, mask=rows < seq_len, other=1.0)
        row_scale = q_scale * qk_scale
        k_scale_ptr += pid_bh * n_kv_blocks
    else:
        row_scale = tl.full([BLOCK_M], qk_scale, tl.float32)
    if RECIPE == "fp8":
        v_scale_ptr += pid_bh * n_kv_blocks
        v_row = pid_bh * HEAD_DIM  # v_t rows of this (sample, head); its columns are tokens
        v_col = 0
    else:
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
        acc, l_i, m_i, sv_prev = _update(s, acc, l_i, m_i, sv_prev, row_scale, *args, start_n, seq_len, RECIPE,
                                         False, BLOCK_N, KV_BLOCK)  # fmt: skip
    if n_full < seq_len:
        s = _scores(q, desc_k, kv_row, k_col, n_full)
        acc, l_i, m_i, sv_prev = _update(s, acc, l_i, m_i, sv_prev, row_scale, *args, n_full, seq_len, RECIPE,
                                         True, BLOCK_N, KV_BLOCK)  # fmt: skip

    # 3. normalise and store this head's slice of [B, S, H*D]
    out = acc * (sv_prev / l_i)[:, None]
    cols = tl.arange(0, HEAD_DIM)
    ptrs = out_ptr + (kv_row + rows)[:, None] * out_row_stride + h * HEAD_DIM + cols[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < seq_len)[:, None])


def head_dim_reason(d: int) -> str | None:
    """Why our Triton attention kernels cannot take head_dim `d` (None: they can)."""
    if d < 16 or d > 256 or d & (d - 1):
        return f"the Triton attention kernels need a power-of-two head_dim in [16, 256], got {d}: use attention='sdpa'"
    return None


def _check_head_dim(d: int) -> None:
    reason = head_dim_reason(d)
    if reason is not None:
        raise ValueError(reason)


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
    config = config or _TUNED.get((b, s, h, d, "bf16"), DEFAULT_CONFIG)
    desc_q = _row_descriptor(q, [config.block_m, d])
    desc_k = _row_descriptor(k, [config.block_n, d])
    desc_v = _row_descriptor(v, [config.block_n, d])
    out = torch.empty(b, s, h * d, device=q.device, dtype=q.dtype)
    _launch(desc_q, desc_k, desc_v, out, (None, None, None), (b, s, h, d), 1, 1, "bf16", config)
    return out


def _scaled_qk_descriptors(packed: _ScaledQK, recipe: str, config: AttentionConfig | None):
    """The tiling (tuned, or the default capped at the scale block) and the Q, K descriptors of a packed call."""
    b, s, h, d, kv = packed.batch, packed.seq_len, packed.num_heads, packed.head_dim, packed.kv_block
    _check_head_dim(d)
    config = config or _TUNED.get((b, s, h, d, recipe), AttentionConfig(block_n=min(DEFAULT_CONFIG.block_n, kv)))
    if kv % config.block_n:
        raise ValueError(f"block_n {config.block_n} must divide the {recipe} KV scale block {kv}")
    desc_q = TensorDescriptor.from_tensor(packed.q, [config.block_m, d])
    desc_k = TensorDescriptor.from_tensor(packed.k, [config.block_n, d])
    return config, desc_q, desc_k


def flash_attention_fp8(packed: Fp8QKV, config: AttentionConfig | None = None,
                        out_dtype: torch.dtype = torch.bfloat16) -> Tensor:  # fmt: skip
    """Attention over fp8 operands (see `Fp8QKV`) with fp32 accumulation -> [B, S, H*D] in `out_dtype`."""
    config, desc_q, desc_k = _scaled_qk_descriptors(packed, "fp8", config)
    b, s, h, d = packed.batch, packed.seq_len, packed.num_heads, packed.head_dim
    desc_v = TensorDescriptor.from_tensor(packed.v_t, [d, config.block_n])
    out = torch.empty(b, s, h * d, device=packed.q.device, dtype=out_dtype)
    scales = (packed.q_scale, packed.k_scale, packed.v_scale)
    _launch(desc_q, desc_k, desc_v, out, scales, (b, s, h, d), packed.k_scale.shape[-1], packed.kv_block, "fp8",
            config)  # fmt: skip
    return out


def flash_attention_int8(packed: Int8QK, config: AttentionConfig | None = None) -> Tensor:
    """Attention with int8 Q·Kᵀ and 16-bit P·V (see `Int8QK`), fp32 accumulation -> [B, S, H*D] in v's dtype."""
    config, desc_q, desc_k = _scaled_qk_descriptors(packed, "int8", config)
    b, s, h, d = packed.batch, packed.seq_len, packed.num_heads, packed.head_dim
    desc_v = _row_descriptor(packed.v, [config.block_n, d])
    out = torch.empty(b, s, h * d, device=packed.q.device, dtype=packed.v.dtype)
    scales = (packed.q_scale, packed.k_scale, None)
    _launch(desc_q, desc_k, desc_v, out, scales, (b, s, h, d), packed.k_scale.shape[-1], packed.kv_block, "int8",
            config)  # fmt: skip
    return out


def _launch(desc_q, desc_k, desc_v, out, scales, shape, n_blocks, kv_block, recipe, config: AttentionConfig) -> None:
    b, s, h, d = shape
    grid = (triton.cdiv(s, config.block_m), b * h)
    _attention_kernel[grid](
        desc_q, desc_k, desc_v, out, *scales,
        s, h, out.stride(1), n_blocks, LOG2E / math.sqrt(d),
        HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=config.block_n, KV_BLOCK=kv_block,
        RECIPE=recipe, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def _per_block(x: Tensor, kv_block: int) -> tuple[Tensor, Tensor]:
    """x [B, S, H, D] zero-padded to whole blocks -> ([B, nb, kv_block, H, D], amax per (block, head) [B, H, nb])."""
    b, s, h, d = x.shape
    n_blocks = triton.cdiv(s, kv_block)
    x = F.pad(x, (0, 0, 0, 0, 0, n_blocks * kv_block - s)).view(b, n_blocks, kv_block, h, d)
    return x, x.abs().amax(dim=(2, 4)).transpose(1, 2)


def smoothed_keys(k: Tensor) -> Tensor:
    """k [B, S, H, D] minus its per-(sample, head) mean over the sequence, in fp32.

    q·(k_j − μ) = q·k_j − q·μ shifts every score of a query row by the same amount, so the softmax (and the
    output) is unchanged, while the common offset that would otherwise eat the quantization range is gone.
    """
    return k.float() - k.mean(dim=1, keepdim=True, dtype=torch.float32)


def quantize_qkv_fp8(q: Tensor, k: Tensor, v: Tensor, kv_block: int = 128, smooth_k: bool = False) -> Fp8QKV:
    """Torch reference of the fp8 packing: q per (token, head); k (smoothed if asked), v per (head, KV block)."""
    b, s, h, d = q.shape
    q8, q_scale = quantize_rowwise(q)  # scale [B, S, H, 1]

    def per_block(x: Tensor) -> tuple[Tensor, Tensor]:  # -> e4m3 [B, nb, kv_block, H, D], scale [B, H, nb]
        x, amax = _per_block(x, kv_block)
        scale = fp8_scale(amax)
        return to_fp8(x, scale.transpose(1, 2)[:, :, None, :, None]), scale.contiguous()

    k8, k_scale = per_block(smoothed_keys(k) if smooth_k else k)
    v8, v_scale = per_block(v)
    n_pad = v8.shape[1] * kv_block
    return Fp8QKV(
        q=q8.reshape(b * s, h * d),
        k=k8.flatten(1, 2)[:, :s].reshape(b * s, h * d),
        q_scale=q_scale[..., 0].transpose(1, 2).contiguous(),
        k_scale=k_scale,
        v_t=v8.permute(0, 3, 4, 1, 2).reshape(b * h * d, n_pad).contiguous(),
        v_scale=v_scale,
    )


def quantize_qk_int8_reference(q: Tensor, k: Tensor, v: Tensor, kv_block: int = 128) -> Int8QK:
    """Torch reference of the int8 packing (`qk_int8.quantize_qk_int8` is the kernel): q per (token, head),
    k smoothed then per (head, KV block); v passed through."""
    b, s, h, d = q.shape
    q_scale = int8_scale(q.abs().amax(dim=-1, keepdim=True))  # [B, S, H, 1]
    k_blocks, k_amax = _per_block(smoothed_keys(k), kv_block)
    k_scale = int8_scale(k_amax)
    k8 = to_int8(k_blocks, k_scale.transpose(1, 2)[:, :, None, :, None])
    return Int8QK(
        q=to_int8(q, q_scale).reshape(b * s, h * d),
        k=k8.flatten(1, 2)[:, :s].reshape(b * s, h * d),
        q_scale=q_scale[..., 0].transpose(1, 2).contiguous(),
        k_scale=k_scale.contiguous(),
        v=v,
        kv_block=kv_block,
    )


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √D) v in float64 for q, k, v [B, S, H, D] -> [B, S, H*D]."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)


def attention_flops(batch: int, seq_len: int, num_heads: int, head_dim: int) -> float:
    """Matmul FLOPs of one non-causal attention call (Q·Kᵀ and P·V)."""
    return 4.0 * batch * num_heads * seq_len * seq_len * head_dim


RECIPES = ("bf16", "fp8", "int8")  # the kernel's operand recipes (a tuning key each)


def tune_attention(batch: int, seq_len: int, num_heads: int, head_dim: int, recipe: str,
                   candidates=CANDIDATES) -> dict[AttentionConfig, float]:  # fmt: skip
    """Time each candidate config at this shape on the GPU (ms, inf if it fails to build); keep the fastest."""
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, seq_len, 3, num_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(2)
    packed = {"bf16": None, "fp8": quantize_qkv_fp8, "int8": quantize_qk_int8_reference}[recipe]
    packed = packed and packed(q, k, v)
    timings = {}
    for config in candidates:
        if packed is not None and packed.kv_block % config.block_n:
            continue
        if recipe == "fp8":
            run = lambda c=config: flash_attention_fp8(packed, c)  # noqa: E731
        elif recipe == "int8":
            run = lambda c=config: flash_attention_int8(packed, c)  # noqa: E731
        else:
            run = lambda c=config: flash_attention(q, k, v, c)  # noqa: E731
        try:
            timings[config] = do_bench(run, warmup=25, rep=100, return_mode="median")
        except Exception as error:  # a config the compiler rejects (registers, shared memory, asm) is skipped
            timings[config] = float("inf")
            print(f"attention config {config} failed: {type(error).__name__}: {str(error)[:200]}")
    _TUNED[(batch, seq_len, num_heads, head_dim, recipe)] = min(timings, key=timings.get)
    return timings


def ensure_tuned(batch: int, seq_len: int, num_heads: int, head_dim: int, recipe: str) -> AttentionConfig:
    """The tiling the kernels use at this shape and recipe (`RECIPES`), tuned on first use (GPU)."""
    key = (batch, seq_len, num_heads, head_dim, recipe)
    if key not in _TUNED:
        tune_attention(batch, seq_len, num_heads, head_dim, recipe)
    return _TUNED[key]
