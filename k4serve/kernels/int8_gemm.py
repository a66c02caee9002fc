"""int8 GEMM for the fast DiT's `int8` linears: y = (x_q · W_qᵀ) · x_scale · w_scale + bias in one kernel.

x_q is int8 per token (written by the fused norm / GELU passes with `quant="int8"`), W_q int8 per output channel
(quantized once, `Int8Linear.from_linear`). The products accumulate exactly in int32 (|Σ| <= K·127² < 2^31 for
K < 133,000); the epilogue scales in fp32, adds the bias and rounds once to the output dtype.

Why int8 when e4m3 runs on the same 8-bit tensor cores at the same rate: e4m3 keeps 3 mantissa bits wherever the
scale puts a value, so each operand carries ~3.7 % rms rounding error and so does the GEMM; an int8 step of
amax / 127 per token is ~1.2 % of a LayerNorm'd row's rms (1.7 % after the GELU), benchmarks/NOTES.md "int8
linears". The price: one large outlier in a token coarsens that whole row, where e4m3 would not care.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor, nn
from triton.tools.tensor_descriptor import TensorDescriptor

from k4serve.kernels.gelu_quant import quantize_rows
from k4serve.kernels.quantize import quantize_rowwise_int8


def _set_tma_blocks(nargs: dict) -> None:
    """A TMA config's tile is its descriptors' box: set before each launch (autotune tries several)."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _configs(tma: bool) -> list[triton.Config]:
    """Hopper tilings for the DiT's shapes (K, N multiples of 128): wgmma tiles of 128-256 rows and columns,
    64-256 bytes of K per stage; the CPU interpreter gets one small tile (every config would run there). Why 256
    (pointer loads): Triton does not pipeline a wgmma whose accumulator is not fp32 (a rule of its pipeliner: the
    PTX waits for each K step's MMAs before the next step's are issued), so a deeper K step issues twice the MMAs
    per exposed wait, in two stages of 96 KiB. Autotuning times every tiling, so one that is slower is never
    picked."""
    hook = _set_tma_blocks if tma else None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, pre_hook=hook)]
    tiles = [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 256, 64, 8, 4),
             (128, 128, 128, 4, 4)]  # fmt: skip
    if not tma:  # a TMA box row of 256 bytes is twice the 128-byte swizzle span: not tried on a GPU yet
        tiles += [(128, 256, 256, 8, 2), (256, 128, 256, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s,
                          pre_hook=hook)
            for m, n, k, w, s in tiles]  # fmt: skip


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (row block, column block) in grouped order: GROUP_M consecutive row blocks
    walk the column blocks together, sharing W's tiles in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _store_scaled(acc, pid_m, pid_n, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The epilogue: the int32 tile times both scales, plus the bias, rounded once to y's dtype."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < M
    in_cols = cols < N
    x_scale = tl.load(x_scale_ptr + rows, mask=in_rows, other=0.0)
    w_scale = tl.load(w_scale_ptr + cols, mask=in_cols, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])


@triton.autotune(configs=_configs(tma=False), key=["M", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_gemm_kernel(x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, K,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """Operands loaded through pointers (cp.async), any K."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # rows / columns past the edge load a wrapped (valid) row and are never stored: no masks in the main loop
    load_rows = tl.max_contiguous(tl.multiple_of(rows % M, BLOCK_M), BLOCK_M).to(tl.int64)
    load_cols = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N).to(tl.int64)
    x_ptrs = x_ptr + load_rows[:, None] * K + ks[None, :]
    w_ptrs = w_ptr + load_cols[None, :] * K + ks[:, None]  # [BLOCK_K, BLOCK_N] tile of W [N, K]: K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            in_k = ks < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=in_k[None, :], other=0)
            w = tl.load(w_ptrs, mask=in_k[:, None], other=0)
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _store_scaled(acc, pid_m, pid_n, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.autotune(configs=_configs(tma=True), key=["M", "N", "K"])
@triton.jit
def _int8_gemm_tma_kernel(x_desc, w_desc, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, K,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """Operands loaded by the TMA engine from descriptors (zero-filled past every edge, ragged K included)."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])  # [BLOCK_N, BLOCK_K] of W [N, K]
        acc = tl.dot(x, w.T, acc, out_dtype=tl.int32)
    _store_scaled(acc, pid_m, pid_n, x_scale_ptr, w_scale_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS, BLOCK_M, BLOCK_N)


LOADS = ("pointers", "tma")


def int8_linear(x: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16, loads: str = "pointers") -> Tensor:  # fmt: skip
    """x [..., K] int8 with its per-row fp32 scale [..., 1]; weight [N, K] int8 with its per-channel fp32 scale
    [N]; bias [N] or None -> y [..., N] in `out_dtype`. `loads`: how the operand tiles reach shared memory,
    "pointers" (cp.async: the measured default, benchmarks/NOTES.md) or "tma" (descriptors, where K is a multiple
    of 16, the TMA's stride alignment; else pointers), which `benchmarks/dit.py` times beside it."""
    n, k = weight.shape
    if x.dtype != torch.int8 or weight.dtype != torch.int8 or x.shape[-1] != k:
        raise ValueError(f"int8_linear wants int8 x [..., {k}] and int8 weight [N, K]; got x {x.dtype} "
                         f"{tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}")  # fmt: skip
    if not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError("int8_linear wants contiguous x and weight (rows of K bytes)")
    if loads not in LOADS:
        raise ValueError(f"loads={loads!r}: choose one of {LOADS}")
    m = x.numel() // k
    if x_scale.numel() != m or weight_scale.numel() != n or (bias is not None and bias.numel() != n):
        raise ValueError(f"scales must be one per row of x ({m}) and per output channel ({n}), bias one per channel")
    y = torch.empty(*x.shape[:-1], n, device=x.device, dtype=out_dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    scales = (x_scale.float().contiguous(), weight_scale.float().contiguous(), bias, y, m, n, k)
    if loads == "tma" and k % 16 == 0:
        # the box is set per config (_set_tma_blocks)
        x_desc = TensorDescriptor.from_tensor(x.reshape(m, k), [1, 16])
        w_desc = TensorDescriptor.from_tensor(weight, [1, 16])
        _int8_gemm_tma_kernel[grid](x_desc, w_desc, *scales, HAS_BIAS=bias is not None)
    else:
        _int8_gemm_kernel[grid](x, weight, *scales, HAS_BIAS=bias is not None)
    return y


def int8_linear_reference(x: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor,
                          bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """float64 y = (x · x_scale)(W · w_scale)ᵀ + bias: what the kernel computes before its output rounding."""
    y = (x.double() * x_scale.double()) @ (weight.double() * weight_scale.double().reshape(-1, 1)).T
    return y if bias is None else y + bias.double()


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 per output channel and x quantized to int8 per token."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, out_dtype=torch.bfloat16):
        super().__init__()
        if weight.dtype != torch.int8 or weight_scale.shape != (weight.shape[0],):
            raise ValueError("Int8Linear wants an int8 weight [out, in] and an fp32 scale [out]; use from_linear")
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype))
        self.out_dtype = out_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype | None = None) -> Int8Linear:
        """Quantize an nn.Linear's weight once; output and bias in `out_dtype` (default: the linear's dtype)."""
        weight, scale = quantize_rowwise_int8(linear.weight.detach())
        return cls(weight, scale.reshape(-1), linear.bias, out_dtype or linear.weight.dtype)

    def dequantized_weight(self) -> Tensor:
        """W as fp32 (what the GEMM effectively multiplies by)."""
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: Tensor, x_scale: Tensor | None = None) -> Tensor:
        """x [..., in] (a float dtype, or int8 with its per-token fp32 scale [..., 1]) -> [..., out]."""
        if x_scale is None:
            x, x_scale = quantize_rows(x.contiguous(), "int8")
        return int8_linear(x, x_scale, self.weight, self.weight_scale, self.bias, self.out_dtype)
