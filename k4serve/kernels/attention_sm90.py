"""Our Hopper attention kernel in CUDA C++ (`attention_sm90.cu`): the triton-int8 recipe, FA3-scheduled.

Triton 3.6 cannot warp-specialize on Hopper (no producer warpgroup, no register reallocation, no ping-pong between
two consumer warpgroups: benchmarks/NOTES.md), so this kernel is written where those exist. Same operands as
`attention.flash_attention_int8` (an `Int8QK` from `qk_int8.quantize_qk_int8`, head_dim 64, 128-key K scale
blocks) and the same result up to accumulation order. The source is compiled once per machine with the host's
nvcc for sm_90a into a cache folder (~10 s) and called through ctypes on the current torch stream.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from k4serve.kernels.attention import Int8QK

SOURCE = Path(__file__).with_name("attention_sm90.cu")
NVCC_FLAGS = ("-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC")
HEAD_DIM, KV_BLOCK = 64, 128
# plain: row sums on the FMA pipe, O rescaled every block; fast: row sums from the tensor cores (a ones column in
# V's tile) and lazy rescaling (the max moves only past a 2^8 growth). The engine runs DEFAULT_VARIANT.
VARIANTS = {"plain": 0, "fast": 1}
DEFAULT_VARIANT = "fast"
_LIBRARIES: dict[Path, ctypes.CDLL] = {}  # source -> its loaded build (benchmarks/attention.py A/B-tests other sources)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.is_file() else shutil.which("nvcc")


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot run on `device` (None: it can): it needs a Hopper GPU and nvcc to build it."""
    device = torch.device(device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return "cuda-int8 needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"cuda-int8 is built for sm_90a (Hopper); this GPU is sm_{major}{minor}"
    if _nvcc() is None:
        return "cuda-int8 is compiled at first use: put nvcc on PATH or set CUDA_HOME"
    return None


def build(out_dir: Path | None = None, source: Path = SOURCE) -> Path:
    """Compile `source` (cached by its and the flags' hash) and return the shared library's path."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("cuda-int8 is compiled at first use: put nvcc on PATH or set CUDA_HOME")
    digest = hashlib.sha256(source.read_bytes() + " ".join(NVCC_FLAGS).encode()).hexdigest()[:16]
    out_dir = out_dir or Path(os.environ.get("K4SERVE_CACHE", Path.home() / ".cache" / "k4serve"))
    library = out_dir / f"attention_sm90_{digest}.so"
    if not library.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run([nvcc, *NVCC_FLAGS, "-o", str(partial), str(source)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed to build {source}:\n{result.stderr[-4000:]}")
        partial.replace(library)  # atomic: concurrent first uses (several Triton instances) never load a half file
    return library


def _library(source: Path = SOURCE) -> ctypes.CDLL:
    if source not in _LIBRARIES:
        library = ctypes.CDLL(str(build(source=source)))
        fn = library.k4serve_attention_int8_sm90
        fn.restype = ctypes.c_int
        pointer, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
        fn.argtypes = [pointer] * 5 + [i64, pointer, i32, i32, i32, i32, i32, pointer]
        _LIBRARIES[source] = library
    return _LIBRARIES[source]


def flash_attention_int8_sm90(packed: Int8QK, variant: str = DEFAULT_VARIANT, source: Path = SOURCE) -> Tensor:
    """Attention over int8 Q·Kᵀ operands and the bf16 v (see `Int8QK`) -> [B, S, H*64] bf16. `source` is for A/B
    tests of a changed kernel (same entry point and arguments)."""
    b, s, h, d, v = packed.batch, packed.seq_len, packed.num_heads, packed.head_dim, packed.v
    if d != HEAD_DIM or packed.kv_block != KV_BLOCK or v.dtype != torch.bfloat16:
        raise ValueError(f"cuda-int8 takes head_dim {HEAD_DIM}, KV scale blocks of {KV_BLOCK} and a bf16 v; got "
                         f"{d}, {packed.kv_block}, {v.dtype}: use attention='triton-int8'")  # fmt: skip
    if v.stride(3) != 1 or v.stride(2) != d or v.stride(0) != s * v.stride(1) or v.data_ptr() % 16 or v.stride(1) % 8:
        raise ValueError(f"v must be a [B, S, H, D] view with contiguous, 16-byte aligned rows; got {v.stride()}")
    out = torch.empty(b, s, h * d, device=v.device, dtype=torch.bfloat16)
    stream = torch.cuda.current_stream(v.device).cuda_stream
    error = _library(source).k4serve_attention_int8_sm90(
        packed.q.data_ptr(), packed.k.data_ptr(), packed.q_scale.data_ptr(), packed.k_scale.data_ptr(),
        v.data_ptr(), v.stride(1), out.data_ptr(), b, s, h, packed.k_scale.shape[-1], VARIANTS[variant], stream,
    )  # fmt: skip
    if error:
        raise RuntimeError(f"cuda-int8 kernel launch failed: CUDA error {error}")
    return out
