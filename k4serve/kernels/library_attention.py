"""Library attention backends of the fast DiT: FlashAttention-4 (bf16) and cuDNN's fp8 SDPA graph.

Both come from optional GPU packages (the `gpu` extra: `pip install 'k4serve[gpu]'`) and are imported on first
use, so this module imports on any machine; a missing package raises `BackendUnavailable` naming it.
Contract of both: q, k, v [B, S, H, D] bf16 views with contiguous heads (the column slices of the QKV buffer
that `qk_norm_rope_` leaves) -> [B, S, H*D] bf16, softmax scale 1/√D, no mask.
  fa4        `flash_attn.cute.flash_attn_func` (FlashAttention-4's CuTe DSL kernels; on Hopper its sm90
             forward: 192x128 tiles, two consumer warpgroups, P from registers). Strided views are read in place.
  cudnn-fp8  cuDNN's `sdpa_fp8` node, per-tensor scales only: q, k, v quantized to e4m3 by their amax (one
             device-side pass, no host sync), P scaled by 448 inside, and on Hopper the output is e4m3 too
             (scaled by V's range), dequantized here. One graph per shape, built once and cached.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from k4serve.kernels import module_found
from k4serve.kernels.quantize import FP8_MAX
from k4serve.kernels.rounding import fp8_inverse_scale, to_fp8


@dataclass(frozen=True)
class LibraryBackend:
    module: str  # what is imported
    package: str  # what to pip install
    min_capability: int  # compute capability major (9: Hopper)


LIBRARIES = {
    "fa4": LibraryBackend("flash_attn.cute", "flash-attn-4", 9),
    "cudnn-fp8": LibraryBackend("cudnn", "nvidia-cudnn-frontend", 9),
}


class BackendUnavailable(ImportError):
    """An attention backend's package or GPU is missing; the message names the fix."""


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why library backend `name` cannot run on `device` (None: it can), without importing its package."""
    library = LIBRARIES[name]
    device = torch.device(device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{name} needs a CUDA GPU"
    major = torch.cuda.get_device_capability(device)[0]
    if major < library.min_capability:
        return f"{name} needs compute capability {library.min_capability}.0+ (Hopper); this GPU is {major}.x"
    if not module_found(library.module):
        return f"{name} needs `{library.module}`: pip install {library.package} (or pip install 'k4serve[gpu]')"
    return None


def _import(name: str):
    library = LIBRARIES[name]
    try:
        return importlib.import_module(library.module)
    except ImportError as error:
        raise BackendUnavailable(
            f"attention={name!r} needs `{library.module}`: pip install {library.package} "
            f"(or pip install 'k4serve[gpu]'); importing it failed: {error}"
        ) from error


# ---- FlashAttention-4 ----


def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """FlashAttention-4 forward: q, k, v [B, S, H, D] bf16 -> [B, S, H*D] bf16."""
    b, s, h, d = q.shape
    out, _ = _import("fa4").flash_attn_func(q, k, v, softmax_scale=1.0 / math.sqrt(d), causal=False)
    return out.view(b, s, h * d)


# ---- cuDNN fp8 SDPA ----


@triton.jit
def _per_tensor_fp8_kernel(x_ptr, amax_ptr, out_ptr, width, BLOCK: tl.constexpr):
    """Row r, slot j (q, k, v) of x [R, 3, width] -> e4m3 out [R, 3, width] scaled by 448 / amax[j]."""
    row = tl.program_id(0)
    slot = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    offsets = (row * 3 + slot) * width + cols
    inverse, _ = fp8_inverse_scale(tl.load(amax_ptr + slot).to(tl.float32))
    x = tl.load(x_ptr + offsets, mask=cols < width, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, to_fp8(x, inverse), mask=cols < width)


def quantize_qkv_per_tensor(qkv: Tensor) -> tuple[Tensor, Tensor]:
    """qkv [B, S, 3, H, D] -> (e4m3 like qkv, descales [3] fp32: amax / 448 of q, k, v)."""
    b, s, three, h, d = qkv.shape
    rows = qkv.view(b * s, 3, h * d)
    amax = torch.linalg.vector_norm(rows, ord=math.inf, dim=(0, 2))  # one pass, no |x| temporary
    out = torch.empty(qkv.shape, device=qkv.device, dtype=torch.float8_e4m3fn)
    block = 1024
    _per_tensor_fp8_kernel[(b * s, 3, triton.cdiv(h * d, block))](rows, amax, out, h * d, BLOCK=block)
    return out, amax.float().clamp(min=1e-12) / FP8_MAX


@dataclass
class _CudnnFp8Graph:
    graph: object
    tensors: dict  # role -> the graph's tensor handle
    workspace: Tensor
    scale_s: Tensor  # [1, 1, 1, 1] fp32: 448 (P <= 1, so P·448 fills e4m3's range)
    descale_s: Tensor


class CudnnFp8Attention:
    """cuDNN frontend fp8 SDPA over the QKV buffer; one graph per (shape, device), built on first use."""

    def __init__(self):
        self._graphs: dict[tuple, _CudnnFp8Graph] = {}
        self._handles: dict[int, object] = {}

    def _handle(self, cudnn, device: torch.device):
        if device.index not in self._handles:
            self._handles[device.index] = cudnn.create_handle()
        return self._handles[device.index]

    def _build(self, cudnn, qkv8: Tensor) -> _CudnnFp8Graph:
        b, s, _, h, d = qkv8.shape
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self._handle(cudnn, qkv8.device), is_cuda_graph_replay_expected=True)  # fmt: skip
        # [B, H, S, D] views of the [B, S, 3, H, D] buffer and of the [B, S, H, D] output
        qkv_stride = [s * 3 * h * d, d, 3 * h * d, 1]
        t = {role: graph.tensor(name=role, dim=[b, h, s, d], stride=qkv_stride, data_type=e4m3) for role in "qkv"}
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        for role in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t[role] = graph.tensor(name=role, **scalar)
        o, _, amax_s, amax_o = graph.sdpa_fp8(
            q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
            descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
            attn_scale=1.0 / math.sqrt(d), generate_stats=False, use_causal_mask=False, name="sdpa_fp8",
        )  # fmt: skip
        o.set_output(True).set_dim([b, h, s, d]).set_stride([s * h * d, d, h * d, 1]).set_data_type(e4m3)
        for amax in (amax_s, amax_o):  # statistics for delayed scaling, which a one-shot inference does not need
            amax.set_output(False).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1])
        t["o"] = o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        new = dict(device=qkv8.device, dtype=torch.float32)
        workspace = torch.empty(graph.get_workspace_size(), device=qkv8.device, dtype=torch.uint8)
        scale_s = torch.full((1, 1, 1, 1), FP8_MAX, **new)
        return _CudnnFp8Graph(graph, t, workspace, scale_s, 1.0 / scale_s)

    def pack(self, q: Tensor, k: Tensor, v: Tensor) -> _CudnnFp8Call:
        """Quantize q, k, v [B, S, H, D] bf16 (slices of one [B, S, 3, H, D] buffer) and bind one call's buffers."""
        cudnn = _import("cudnn-fp8")
        b, s, h, d = q.shape
        step = h * d * q.element_size()
        if q.stride(1) != 3 * h * d or k.data_ptr() != q.data_ptr() + step or v.data_ptr() != k.data_ptr() + step:
            raise ValueError("cudnn-fp8 reads q, k, v as the three column blocks of one QKV buffer [B, S, 3*H*D]")
        qkv = q.as_strided((b, s, 3, h, d), (q.stride(0), q.stride(1), h * d, d, 1))
        qkv8, descales = quantize_qkv_per_tensor(qkv)
        out8 = torch.empty(b, s, h, d, device=q.device, dtype=torch.float8_e4m3fn)
        key = (b, s, h, d, q.device.index)
        if key not in self._graphs:
            self._graphs[key] = self._build(cudnn, qkv8)
        plan = self._graphs[key]
        descale = descales.view(3, 1, 1, 1, 1)
        t = plan.tensors

        def bhsd(x: Tensor) -> Tensor:  # the [B, H, S, D] geometry the graph declares, same bytes
            return x.permute(0, 2, 1, 3)

        pack = {t["q"]: bhsd(qkv8[:, :, 0]), t["k"]: bhsd(qkv8[:, :, 1]), t["v"]: bhsd(qkv8[:, :, 2]),
                t["o"]: bhsd(out8), t["descale_q"]: descale[0], t["descale_k"]: descale[1],
                t["descale_v"]: descale[2], t["descale_s"]: plan.descale_s, t["scale_s"]: plan.scale_s,
                t["scale_o"]: 1.0 / descale[2]}  # fmt: skip
        # |O| <= max |v|, so O scaled by 448 / amax(v) fits e4m3: V's descale is the output's
        return _CudnnFp8Call(cudnn, plan, pack, self._handle(cudnn, q.device), out8, descale[2].view(1), q.dtype)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v [B, S, H, D] bf16 slices of one [B, S, 3, H, D] buffer -> [B, S, H*D] bf16."""
        call = self.pack(q, k, v)
        call.run()
        return call.output()


@dataclass
class _CudnnFp8Call:
    """One bound cuDNN fp8 SDPA call: `run` is the library's kernel alone, `output` dequantizes."""

    cudnn: object
    plan: _CudnnFp8Graph
    pack: dict
    handle: object
    out8: Tensor  # [B, S, H, D] e4m3
    descale_o: Tensor  # [1] fp32
    dtype: torch.dtype

    def run(self) -> None:
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(self.out8.device).cuda_stream)
        self.plan.graph.execute(self.pack, self.plan.workspace, handle=self.handle)

    def output(self) -> Tensor:
        b, s, h, d = self.out8.shape
        return (self.out8.view(b, s, h * d).float() * self.descale_o).to(self.dtype)


cudnn_fp8_attention = CudnnFp8Attention()
