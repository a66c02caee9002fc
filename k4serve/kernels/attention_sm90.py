"""Our Hopper attention kernel in CUDA C++ (`attention_sm90.cu`), FA3-scheduled, in two recipes.

Triton 3.6 cannot warp-specialize on Hopper (no producer warpgroup, no register reallocation, no ping-pong between
consumer warpgroups: benchmarks/NOTES.md), so this kernel is written where those exist.
  - `flash_attention_sm90` (engine option `cuda`): bf16 Q·Kᵀ and P·V over the bf16 q, k, v views of the QKV buffer,
    the same arithmetic as `attention.flash_attention` (bf16-level error).
  - `flash_attention_int8_sm90` (`cuda-int8`): the triton-int8 recipe, same operands as
    `attention.flash_attention_int8` (an `Int8QK` from `qk_int8.quantize_qk_int8`, head_dim 64, 128-key K scale
    blocks) and the same result up to accumulation order.
The source is compiled once per machine with the host's nvcc for sm_90a into a cache folder (~20 s; $K4SERVE_CACHE,
else ~/.cache/k4serve) and called through ctypes on the current torch stream. A host without nvcc (NVIDIA's Triton
image) runs a build made elsewhere for the same source: `python -m k4serve.kernels.attention_sm90 --cache DIR`
where nvcc is (no GPU needed), then K4SERVE_CACHE=DIR (deploy/k8s/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from k4serve.kernels import cache_folder
from k4serve.kernels.attention import Int8QK

SOURCE = Path(__file__).with_name("attention_sm90.cu")
NVCC_FLAGS = ("-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC")
HEAD_DIM, KV_BLOCK = 64, 128
# plain: row sums on the FMA pipe, O rescaled every block; fast: row sums from the tensor cores (a ones column in
# V's tile) and lazy rescaling (the max moves only past a 2^8 growth). The engine runs DEFAULT_VARIANT.
VARIANTS = {"plain": 0, "fast": 1}
DEFAULT_VARIANT = "fast"
_LIBRARIES: dict[Path, ctypes.CDLL] = {}  # source -> its loaded build (benchmarks/attention.py A/B-tests other sources)
_KERNEL = "our CUDA attention kernel (cuda, cuda-int8)"
_NO_NVCC = (f"{_KERNEL} is compiled at first use: put nvcc on PATH or set CUDA_HOME, or point K4SERVE_CACHE at a "
            "folder where `python -m k4serve.kernels.attention_sm90 --cache FOLDER` built it")  # fmt: skip


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.is_file() else shutil.which("nvcc")


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot run on `device` (None: it can): it needs a Hopper GPU and nvcc to build it."""
    device = torch.device(device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{_KERNEL} needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"{_KERNEL} is built for sm_90a (Hopper); this GPU is sm_{major}{minor}"
    if _nvcc() is None and not library_path().exists():
        return _NO_NVCC
    return None


def library_path(out_dir: Path | None = None, source: Path = SOURCE) -> Path:
    """Where the build of `source` is cached: named by the hash of the source and the flags, so a changed kernel
    never loads a stale build."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(NVCC_FLAGS).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_folder()
    return out_dir / f"attention_sm90_{digest}.so"


def build(out_dir: Path | None = None, source: Path = SOURCE) -> Path:
    """The shared library of `source`: its cached build, else compiled now with nvcc."""
    library = library_path(out_dir, source)
    if not library.exists():
        nvcc = _nvcc()
        if nvcc is None:
            raise RuntimeError(_NO_NVCC)
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run([nvcc, *NVCC_FLAGS, "-o", str(partial), str(source)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed to build {source}:\n{result.stderr[-4000:]}")
        partial.replace(library)  # atomic: concurrent first uses (several Triton instances) never load a half file
    return library


def _library(source: Path = SOURCE) -> ctypes.CDLL:
    if source not in _LIBRARIES:
        library = ctypes.CDLL(str(build(source=source)))
        pointer, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
        int8, bf16 = library.k4serve_attention_int8_sm90, library.k4serve_attention_bf16_sm90
        int8.argtypes = [pointer] * 5 + [i64, pointer, i32, i32, i32, i32, i32, pointer]
        bf16.argtypes = [pointer] * 3 + [i64, i64, pointer, i32, i32, i32, i32, pointer]
        int8.restype = bf16.restype = ctypes.c_int
        _LIBRARIES[source] = library
    return _LIBRARIES[source]


def _check_view(name: str, t: Tensor) -> None:
    """The kernel reads [B, S, H, 64] bf16 views token row by token row, in 16-byte pieces."""
    b, s, h, d = t.shape
    if t.dtype != torch.bfloat16 or d != HEAD_DIM:
        raise ValueError(f"{name} must be bf16 with head_dim {HEAD_DIM}; got {t.dtype}, head_dim {d}")
    if t.stride(3) != 1 or t.stride(2) != d or t.stride(0) != s * t.stride(1) or t.data_ptr() % 16 or t.stride(1) % 8:
        raise ValueError(f"{name} must be a [B, S, H, D] view with contiguous, 16-byte aligned rows; got "
                         f"strides {t.stride()}")  # fmt: skip


TENSOR_MAP_ERROR = 1000  # the kernel source's kTensorMapError: + the CUresult of cuTensorMapEncodeTiled


def _launched(error: int, option: str) -> None:
    if error >= TENSOR_MAP_ERROR:
        raise RuntimeError(f"{option}: the TMA tensor map could not be encoded (CUresult {error - TENSOR_MAP_ERROR})")
    if error:
        raise RuntimeError(f"{option} kernel launch failed: CUDA error {error}")


def flash_attention_sm90(q: Tensor, k: Tensor, v: Tensor, variant: str = DEFAULT_VARIANT,
                         source: Path = SOURCE) -> Tensor:  # fmt: skip
    """softmax(q kᵀ / 8) v with bf16 Q·Kᵀ for q, k, v [B, S, H, 64] bf16 views (q and k with one row stride, as
    the QKV buffer's) -> [B, S, H*64] bf16. `source` is for A/B tests of a changed kernel."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_view(name, t)
    if q.shape != k.shape or q.shape != v.shape or q.stride() != k.stride():
        raise ValueError(f"q, k, v must share one shape and q, k one layout; got {tuple(q.shape)} {q.stride()}, "
                         f"{tuple(k.shape)} {k.stride()}, {tuple(v.shape)}")  # fmt: skip
    b, s, h, d = q.shape
    out = torch.empty(b, s, h * d, device=q.device, dtype=torch.bfloat16)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    error = _library(source).k4serve_attention_bf16_sm90(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(1), v.stride(1), out.data_ptr(), b, s, h,
        VARIANTS[variant], stream,
    )  # fmt: skip
    _launched(error, "cuda")
    return out


def flash_attention_int8_sm90(packed: Int8QK, variant: str = DEFAULT_VARIANT, source: Path = SOURCE) -> Tensor:
    """Attention over int8 Q·Kᵀ operands and the bf16 v (see `Int8QK`) -> [B, S, H*64] bf16. `source` is for A/B
    tests of a changed kernel (same entry points and arguments)."""
    b, s, h, d, v = packed.batch, packed.seq_len, packed.num_heads, packed.head_dim, packed.v
    if d != HEAD_DIM or packed.kv_block != KV_BLOCK:
        raise ValueError(f"cuda-int8 takes head_dim {HEAD_DIM} and KV scale blocks of {KV_BLOCK}; got {d}, "
                         f"{packed.kv_block}: use attention='triton-int8'")  # fmt: skip
    _check_view("v", v)
    out = torch.empty(b, s, h * d, device=v.device, dtype=torch.bfloat16)
    stream = torch.cuda.current_stream(v.device).cuda_stream
    error = _library(source).k4serve_attention_int8_sm90(
        packed.q.data_ptr(), packed.k.data_ptr(), packed.q_scale.data_ptr(), packed.k_scale.data_ptr(),
        v.data_ptr(), v.stride(1), out.data_ptr(), b, s, h, packed.k_scale.shape[-1], VARIANTS[variant], stream,
    )  # fmt: skip
    _launched(error, "cuda-int8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=f"Build {_KERNEL} into a cache folder (nvcc needed, no GPU).")
    parser.add_argument("--cache", type=Path, help="the folder (default: $K4SERVE_CACHE, else ~/.cache/k4serve)")
    print(build(parser.parse_args().cache))


if __name__ == "__main__":
    main()
