"""Attention at the DiT's exact shape on one GPU: every backend's speed and error in one run.

    python benchmarks/attention.py [--size 384x672 --seconds 12] [--backends sdpa,triton,triton-fp8] [--results]
    python benchmarks/attention.py --backends cuda,cuda-int8 --cuda-sources padded=/tmp/attention_sm90.cu

One call at [1, S, 48, 64] (12 s at 384x672: S = 25,424, 7.94 TFLOP) per backend:
  kernel ms    the attention kernel alone on packed operands (median of `triton.testing.do_bench`)
  call ms      what the engine runs per call: the kernel plus its operand packing (int8: the Q/K quantization
               pass; cudnn-fp8: the per-tensor quantization and the output's dequantization; triton-fp8 packs
               inside the QK-norm/RoPE pass, so its call is the kernel)
  error        rel. L2 vs float64 on the first and last head, for N(0, 1) q, k, v (issue 12's inputs) and for
               the DiT's own distribution (per-head LayerNorm'd, RoPE-rotated q, k; random v)
Rows of ours list every Triton tiling tried; the engine uses the fastest. A backend that cannot run here is
listed with the reason. `benchmarks/dit.py` prints this table first and feeds it to the default rule.
`--cuda-sources NAME=FILE ...` adds rows for changed copies of our CUDA kernel (`git show BRANCH:k4serve/kernels/
attention_sm90.cu > FILE`), built and measured beside the committed one in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from k4serve.cli_options import parse_size
from k4serve.engines.torch import TRITON_RECIPES
from k4serve.kernels import attention as attn
from k4serve.kernels import attention_sm90
from k4serve.kernels import library_attention as library
from k4serve.kernels.qk_int8 import quantize_qk_int8
from k4serve.kernels.qk_norm_rope import qk_norm_rope_
from k4serve.models.dit import PRESETS, DiTConfig, RoPE3D
from k4serve.pipelines.t2v import latent_shape

TEXT_LEN = 224
DEVICE, DTYPE = "cuda", torch.bfloat16
SDPA_BACKENDS = {"sdpa-flash": [SDPBackend.FLASH_ATTENTION], "sdpa-cudnn": [SDPBackend.CUDNN_ATTENTION]}


@dataclass
class Row:
    name: str  # an engine option (sdpa, triton, fa4, ...) or a variant of one ("triton 64x128 w4 s2", ...)
    option: str | None  # the engine option this row measures, None for a variant the engine does not run
    kernel_ms: float = math.nan
    call_ms: float = math.nan
    error_randn: float = math.nan
    error_dit: float = math.nan
    note: str = ""


def qkv_inputs(config: DiTConfig, grid: tuple[int, int, int], seed: int) -> dict[str, tuple[Tensor, ...]]:
    """Two sets of q, k, v [1, S, H, D] bf16 views of a QKV buffer: N(0, 1), and the DiT's distribution."""
    h, d, n = config.num_heads, config.head_dim, math.prod(grid)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    randn = torch.randn(1, n + TEXT_LEN, 3 * h * d, device=DEVICE, generator=g).to(DTYPE)
    raw = (2 * torch.randn(1, n + TEXT_LEN, 3 * h * d, device=DEVICE, generator=g) + 0.5).to(DTYPE)
    # LayerNorm weights and biases as init_random_weights draws them
    norms = [(1 + 0.1 * torch.randn(d, device=DEVICE, generator=g), 0.02 * torch.randn(d, device=DEVICE, generator=g))
             for _ in range(2)]  # fmt: skip
    tables = RoPE3D(config.axes_dims, config.max_positions)(grid)
    cos, sin = (t.flatten(1).float().contiguous().to(DEVICE) for t in tables)
    return {
        "randn": randn.unflatten(2, (3, h, d)).unbind(2),
        "dit": qk_norm_rope_(raw, h, *norms, cos, sin, n),
    }


def reference_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[list[int], Tensor]:
    """float64 attention of the first and last head: ([heads], [1, S, 2*D])."""
    heads = [0, q.shape[2] - 1]
    return heads, attn.attention_reference(*(t[:, :, heads] for t in (q, k, v)))


def backend_calls(name: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """(kernel on packed operands, the engine's whole call) for a library or SDPA backend; both -> [1, S, H*D]."""
    b, s, h, d = q.shape
    if name in SDPA_BACKENDS or name == "sdpa":  # plain sdpa: torch's own choice, as the engine's

        def call() -> Tensor:
            with sdpa_kernel(SDPA_BACKENDS[name]) if name in SDPA_BACKENDS else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2).reshape(b, s, h * d)

        return call, call
    if name == "fa4":
        return (lambda: library.fa4_attention(q, k, v)), (lambda: library.fa4_attention(q, k, v))
    packed = library.cudnn_fp8_attention.pack(q, k, v)

    def kernel() -> Tensor:
        packed.run()
        return packed.output()

    return kernel, lambda: library.cudnn_fp8_attention(q, k, v)


def triton_calls(recipe: str, config: attn.AttentionConfig, q, k, v, smooth_k: bool = False):
    """(kernel on packed operands, the engine's call) of our kernel for one recipe and tiling."""
    if recipe == "bf16":
        run = lambda: attn.flash_attention(q, k, v, config)  # noqa: E731
        return run, run
    if recipe == "fp8":
        packed = attn.quantize_qkv_fp8(q, k, v, smooth_k=smooth_k)  # the engine packs inside the QK-norm pass
        run = lambda: attn.flash_attention_fp8(packed, config)  # noqa: E731
        return run, run
    packed = quantize_qk_int8(q, k, v)
    return (lambda: attn.flash_attention_int8(packed, config)), (
        lambda: attn.flash_attention_int8(quantize_qk_int8(q, k, v), config)
    )


def cuda_calls(recipe: str, variant: str, q, k, v, source: Path = attention_sm90.SOURCE):
    """(kernel on packed operands, the engine's call) of our CUDA kernel, one recipe (cuda: bf16, cuda-int8) and
    variant (of `source`)."""
    if recipe == "cuda":
        run = lambda: attention_sm90.flash_attention_sm90(q, k, v, variant, source)  # noqa: E731
        return run, run
    packed = quantize_qk_int8(q, k, v)
    return (lambda: attention_sm90.flash_attention_int8_sm90(packed, variant, source)), (
        lambda: attention_sm90.flash_attention_int8_sm90(quantize_qk_int8(q, k, v), variant, source)
    )


def measure(row: Row, calls_for: Callable[[tuple[Tensor, ...]], tuple[Callable, Callable]], inputs, refs) -> Row:
    """Time `row` on the N(0, 1) inputs and take its error on both input sets; a failure is noted, not raised."""
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    try:
        for kind, qkv in inputs.items():
            kernel, call = calls_for(qkv)
            heads, expected = refs[kind]
            b, s, h, d = qkv[0].shape
            out = call().view(b, s, h, d)[:, :, heads].flatten(2)
            error = ((out.double() - expected).norm() / expected.norm()).item()
            setattr(row, f"error_{kind}", error)
            if kind == "randn":
                row.kernel_ms, row.call_ms = bench(kernel), bench(call)
    except Exception as error:  # one backend failing must not stop the table
        row.note = f"failed: {type(error).__name__}: {str(error)[:160]}"
    return row


CUDA_RECIPES = ("cuda", "cuda-int8")
BACKENDS = ("sdpa", *TRITON_RECIPES, *CUDA_RECIPES, *library.LIBRARIES)


def attention_rows(config: DiTConfig, grid: tuple[int, int, int], backends: tuple[str, ...] = BACKENDS,
                   cuda_sources: dict[str, Path] | None = None) -> list[Row]:  # fmt: skip
    """Every backend (of `backends`; sdpa includes its flash and cuDNN rows) and Triton tiling at this token grid
    (+ 224 text tokens), and both variants of each of `cuda_sources` (name -> a changed copy of our CUDA kernel);
    see the module docstring."""
    inputs = qkv_inputs(config, grid, seed=0)
    refs = {kind: reference_heads(*qkv) for kind, qkv in inputs.items()}
    seq = math.prod(grid) + TEXT_LEN
    rows = [measure(Row(name, "sdpa" if name == "sdpa" else None), lambda qkv, n=name: backend_calls(n, *qkv), inputs,
                    refs) for name in (*SDPA_BACKENDS, "sdpa") if "sdpa" in backends]  # fmt: skip
    for option, recipe in TRITON_RECIPES.items():
        if option not in backends:
            continue
        timings = attn.tune_attention(1, seq, config.num_heads, config.head_dim, recipe)
        ranked = sorted(timings, key=timings.get)
        for i, c in enumerate(ranked):
            label = f"{option} {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"
            row = Row(label, option if i == 0 else None)  # the engine runs the fastest tiling
            if math.isinf(timings[c]):
                rows.append(Row(label + " (failed to build)", None))
                continue
            rows.append(measure(row, lambda qkv, r=recipe, c=c: triton_calls(r, c, *qkv), inputs, refs))
        if recipe == "fp8":  # the same kernel on smoothed keys: what smoothing alone buys e4m3
            best = ranked[0]
            row = Row(f"{option} {best.block_m}x{best.block_n}, smoothed K (torch packing)", None)
            rows.append(measure(row, lambda qkv, c=best: triton_calls("fp8", c, *qkv, smooth_k=True), inputs, refs))
    reason = attention_sm90.unavailable_reason(DEVICE)
    sources = {"": attention_sm90.SOURCE, **{f" ({name})": path for name, path in (cuda_sources or {}).items()}}
    cuda_rows = itertools.product((r for r in CUDA_RECIPES if r in backends), sources.items(), attention_sm90.VARIANTS)
    for recipe, (suffix, source), variant in cuda_rows:
        label = f"{recipe} {variant}{suffix}"
        option = recipe if variant == attention_sm90.DEFAULT_VARIANT and not suffix else None
        if reason is not None:
            rows.append(Row(label, None, note=f"skipped: {reason}"))
            continue
        calls = lambda qkv, r=recipe, v=variant, s=source: cuda_calls(r, v, *qkv, source=s)  # noqa: E731
        rows.append(measure(Row(label, option), calls, inputs, refs))
    for name in (name for name in library.LIBRARIES if name in backends):
        reason = library.unavailable_reason(name, DEVICE)
        if reason is not None:
            rows.append(Row(name, None, note=f"skipped: {reason}"))
            continue
        rows.append(measure(Row(name, name), lambda qkv, n=name: backend_calls(n, *qkv), inputs, refs))
    return rows


def format_rows(rows: list[Row], flops: float) -> list[str]:
    """The markdown table of `attention_rows`."""
    lines = ["| backend | kernel ms | TFLOP/s | call ms | call TFLOP/s | error N(0,1) | error DiT | note |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        speed = [f"{ms:.3f} | {flops / ms / 1e9:.0f}" if ms == ms else "— | —" for ms in (r.kernel_ms, r.call_ms)]
        errors = " | ".join(f"{e:.2e}" if e == e else "—" for e in (r.error_randn, r.error_dit))
        name = f"**{r.name}**" if r.option else r.name
        lines.append(f"| {name} | {speed[0]} | {speed[1]} | {errors} | {r.note} |")
    return lines


def engine_table(rows: list[Row], flops: float) -> dict[str, tuple[float, float]]:
    """engine option -> (TFLOP/s of its whole call, worse of its two errors): what `choose_fast_default` reads."""
    return {r.option: (flops / r.call_ms / 1e12, max(r.error_randn, r.error_dit))
            for r in rows if r.option and r.call_ms == r.call_ms}  # fmt: skip


def token_grid(config: DiTConfig, height: int, width: int, seconds: int) -> tuple[int, int, int]:
    """The DiT's (t, h, w) token grid for a video size."""
    shape = latent_shape(height, width, seconds)
    return tuple(n // p for n, p in zip(shape[:3], config.patch_size, strict=True))


def cuda_source(text: str) -> tuple[str, Path]:
    """NAME=FILE of --cuda-sources."""
    name, sep, file = text.partition("=")
    if not sep or not name or not Path(file).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=FILE with an existing FILE, got {text!r}")
    return name, Path(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(384, 672), help="HEIGHTxWIDTH")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--results", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--backends", type=lambda text: tuple(text.split(",")), default=BACKENDS,
                        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)")  # fmt: skip
    parser.add_argument("--cuda-sources", nargs="+", type=cuda_source, default=[], metavar="NAME=FILE",
                        help="changed copies of our CUDA kernel's source, measured beside it")  # fmt: skip
    args = parser.parse_args()
    if unknown := set(args.backends) - set(BACKENDS):
        parser.error(f"unknown --backends {','.join(sorted(unknown))}: choose from {','.join(BACKENDS)}")
    config = PRESETS["flash-512"]
    grid = token_grid(config, *args.size, args.seconds)
    seq = math.prod(grid) + TEXT_LEN
    flops = attn.attention_flops(1, seq, config.num_heads, config.head_dim)
    table = "\n".join(format_rows(attention_rows(config, grid, args.backends, dict(args.cuda_sources)), flops))
    print(table)
    if args.results:
        from results import append_table

        title = f"Attention, one call at [1, {seq}, {config.num_heads}, {config.head_dim}] ({flops / 1e12:.2f} TFLOP)"
        append_table(title, "python " + " ".join(sys.argv), "medians of triton.testing.do_bench", table)


if __name__ == "__main__":
    main()
