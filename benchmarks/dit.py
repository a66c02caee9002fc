"""DiT benchmark on one GPU: the eager reference against every fast-engine setting, full size, random weights.

    python benchmarks/dit.py --results benchmarks/RESULTS.md

One run prints, at the first size (default 12 s at 384x672, 25,424 tokens):
  1. the attention table of benchmarks/attention.py: every backend's TFLOP/s and per-call error at the exact shape
  2. a block's four GEMMs in bf16, fp8 and int8: time and error against float64
  3. the 4-step Flash sampler (same noise, same text embedding) through
       eager      the reference module under bf16 autocast with SDPA's flash backend forced (the official path)
       eager-cudnn  the same through cuDNN's SDPA: the bf16 noise floor of x0
       fast       k4serve.engines.torch.FastDiT for every attention x linear option (CUDA graphs)
     with time per step (median) and for the 4 steps, TFLOP/s, peak memory, and x0's relative error and cosine
     against eager measured in the same run;
  4. the `fast` default that the rule of k4serve.engines.options picks from these tables, beside the recorded one;
  5. each bf16-linear path's kernel time per forward by family (profiler).
Later sizes (--sizes) run eager and the recorded default only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from attention import BACKENDS, attention_rows, engine_table, format_rows, token_grid
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel

from k4serve.engines import options
from k4serve.engines.torch import TEXT_LEN, FastDiT
from k4serve.kernels import attention as attn
from k4serve.kernels.int8_gemm import int8_linear
from k4serve.kernels.quantize import quantize_rowwise, quantize_rowwise_int8
from k4serve.models.dit import DiTConfig, build_dit
from k4serve.models.schedulers import FlashSampler
from k4serve.pipelines.t2v import latent_shape

EAGER = {"eager": SDPBackend.FLASH_ATTENTION, "eager-cudnn": SDPBackend.CUDNN_ATTENTION}
EAGER_LABELS = {"eager": ("sdpa-flash", "bf16 autocast"), "eager-cudnn": ("sdpa-cudnn", "bf16 autocast")}


def tokens(config: DiTConfig, height: int, width: int, seconds: int) -> tuple[tuple[int, ...], int, int]:
    """Latent shape [T, H/8, W/8, 16], visual tokens, joint sequence length."""
    n_visual = math.prod(token_grid(config, height, width, seconds))
    return latent_shape(height, width, seconds), n_visual, n_visual + TEXT_LEN


def step_flops(config: DiTConfig, n_visual: int, seq: int) -> tuple[float, float]:
    """(linear, attention) matmul FLOPs of one DiT forward (embeddings and out layer included)."""
    d, ff, blocks = config.model_dim, config.ff_dim, 2 * config.num_blocks
    linear = 2 * seq * blocks * (4 * d * d + 2 * d * ff)
    linear += 2 * n_visual * d * (config.patch_numel * config.in_visual_dim) * 2 + 2 * TEXT_LEN * config.in_text_dim * d
    return linear, blocks * attn.attention_flops(1, seq, config.num_heads, config.head_dim)


def gemm_runs(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """One linear six ways: bf16 F.linear; fp8 rowwise _scaled_mm, also with fast accumulation; int8 per token x
    per channel through our Triton GEMM (operands loaded by the TMA, or through pointers), and through cuBLAS
    (torch._int_mm, then the scales and bias in torch). The activations' quantization is left out of every 8-bit
    run: the engine fuses it into the pass before."""
    x8, xs = quantize_rowwise(x)
    w8, ws = quantize_rowwise(w)
    xi, xis = quantize_rowwise_int8(x)
    wi, wis = quantize_rowwise_int8(w)
    wis = wis.reshape(-1)
    fp8 = dict(bias=bias, out_dtype=torch.bfloat16)
    return {
        "bf16": lambda: F.linear(x, w, bias),
        "fp8": lambda: torch._scaled_mm(x8, w8.t(), xs, ws.t(), **fp8),
        "fp8 fast-accum": lambda: torch._scaled_mm(x8, w8.t(), xs, ws.t(), use_fast_accum=True, **fp8),
        "int8 (ours, Triton, TMA loads)": lambda: int8_linear(xi, xis, wi, wis, bias, loads="tma"),
        "int8 (ours, Triton, pointer loads)": lambda: int8_linear(xi, xis, wi, wis, bias, loads="pointers"),
        "int8 cuBLAS + torch epilogue": lambda: (torch._int_mm(xi, wi.t()) * xis * wis + bias).to(torch.bfloat16),
    }


def gemm_table(config: DiTConfig, seq: int) -> list[tuple[str, float, float, float]]:
    """(name, ms, TFLOP/s, error) of a block's four linears at this sequence length. Inputs: LayerNorm'd N(0, 1)
    rows (for the FF2 input, their GELU), weights N(0, 1/K); error: relative L2 of the first 1,024 output rows
    against the float64 product of the bf16 operands."""
    d, ff = config.model_dim, config.ff_dim
    rows = []
    for k, n in ((d, 3 * d), (d, d), (d, ff), (ff, d)):
        x = F.layer_norm(torch.randn(seq, k, device="cuda"), (k,))
        x = (F.gelu(x) if k == ff else x).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
        bias = (0.02 * torch.randn(n, device="cuda")).to(torch.bfloat16)
        exact = x[:1024].double() @ w.double().T + bias.double()
        for name, run in gemm_runs(x, w, bias).items():
            try:
                ms = triton.testing.do_bench(run, return_mode="median")
                error = ((run()[:1024].double() - exact).norm() / exact.norm()).item()
            except Exception as failure:  # one variant failing (a Triton without TMA support) must not stop the rest
                name, ms, error = f"{name}: failed: {type(failure).__name__}: {str(failure)[:120]}", math.nan, math.nan
            rows.append((f"{seq}x{k} @ {k}x{n} {name}", ms, 2 * seq * k * n / ms / 1e9, error))
    return rows


def kernel_breakdown(engine: FastDiT, x: torch.Tensor, text: torch.Tensor, time_: torch.Tensor) -> dict[str, float]:
    """ms per DiT forward by kernel family, from one forward (no graph) under the profiler."""
    engine.forward(x, text, time_)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        engine.forward(x, text, time_)
        torch.cuda.synchronize()
    families = dict.fromkeys(("gemm", "attention", "qk_norm_rope", "norm_modulate", "gelu_quant", "other"), 0.0)
    for event in profile.key_averages():
        if event.device_type != DeviceType.CUDA:
            continue
        name = event.key.lower()
        family = next((f for f in ("qk_norm_rope", "norm_modulate", "gelu_quant") if f in name), None)
        if family is None and any(
            tag in name for tag in ("_attention_kernel", "attention_sm90", "flash", "fmha", "sdpa", "cudnn")
        ):
            family = "attention"
        if family is None and any(tag in name for tag in ("gemm", "nvjet", "cutlass", "xmma")):
            family = "gemm"
        families[family or "other"] += event.device_time_total / 1e3
    return families


def run_path(dit, setting: str | tuple[str, str], shape, text, repeats: int, profile: bool) -> dict:
    """Sample 4 steps `repeats` times through an eager path (its name) or a fast (attention, linear) setting;
    DiT time per step (median), peak memory, final x0."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    breakdown = None
    prepare = time.perf_counter()
    if isinstance(setting, str):

        def denoiser(x, t):
            with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(EAGER[setting]):
                return dit(x, text, t)

        denoiser(torch.randn((1, *shape), device="cuda", dtype=torch.bfloat16), torch.tensor([999], device="cuda"))
    else:
        engine = FastDiT(dit, attention=setting[0], linear=setting[1])
        engine.load([(1, *shape)])
        denoiser = lambda x, t: engine(x, text, t)  # noqa: E731
        if profile:
            x = torch.randn((1, *shape), device="cuda", dtype=torch.bfloat16)
            breakdown = kernel_breakdown(engine, x, text, torch.tensor([499], device="cuda"))
    torch.cuda.synchronize()
    prepare = time.perf_counter() - prepare
    steps, x0 = [], None

    def timed(x, t):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = denoiser(x, t)
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - start)
        return out

    with torch.no_grad():
        for _ in range(repeats):
            x = FlashSampler()(timed, shape, [0], "cuda", torch.bfloat16)
            x0 = x if x0 is None else x0
    return {"step": statistics.median(steps), "peak": torch.cuda.max_memory_allocated() / 2**30, "x0": x0,
            "prepare": prepare, "breakdown": breakdown}  # fmt: skip


def compare(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    x, ref = x.double().flatten(), ref.double().flatten()
    return ((x - ref).norm() / ref.norm()).item(), F.cosine_similarity(x, ref, dim=0).item()


def fast_reason(setting: tuple[str, str]) -> str | None:
    """Why a fast setting cannot run on this GPU (a library backend not installed), None if it can."""
    return options.unavailable_reason(setting[0], "cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="384x672x12", help="HxWxSECONDS,...; the first gets every table")
    parser.add_argument("--repeats", type=int, default=1, help="4-step samples per fast setting (eager: 1)")
    parser.add_argument("--attentions", default=",".join(options.ATTENTION_OPTIONS), help="fast settings' attention")
    parser.add_argument("--linears", default=",".join(options.LINEAR_OPTIONS), help="fast settings' linears")
    parser.add_argument("--table-backends", default=",".join(BACKENDS),
                        help="backends of the attention table (1.), from which the rule (4.) picks")  # fmt: skip
    parser.add_argument(
        "--profile-linears",
        default="bf16",
        help="fast settings with these linears also get the kernel time per forward (one more forward)",
    )
    parser.add_argument("--results", type=Path, help="append the markdown tables to this file")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    fast = [(a, lin) for a in args.attentions.split(",") for lin in args.linears.split(",")]  # every combination

    dit = build_dit("flash-512", device="cuda", dtype=torch.bfloat16)
    config = dit.config
    text = torch.randn(1, TEXT_LEN, config.in_text_dim, generator=torch.Generator().manual_seed(1))
    text = text.to("cuda", torch.bfloat16)
    props = torch.cuda.get_device_properties(0)
    header = (f"{datetime.date.today()} · {props.name} · torch {torch.__version__} · triton {triton.__version__} · "
              f"cuDNN {torch.backends.cudnn.version()} · `python {' '.join(sys.argv)}`")  # fmt: skip
    lines = [f"### DiT benchmark, {header}", ""]

    def emit(new: list[str]) -> None:
        lines.extend(new)
        print("\n".join(new), flush=True)

    # 1. the attention kernels alone, one call at the first size
    grid = token_grid(config, *sizes[0])
    seq = math.prod(grid) + TEXT_LEN
    flops = attn.attention_flops(1, seq, config.num_heads, config.head_dim)
    rows = attention_rows(config, grid, tuple(args.table_backends.split(",")))
    emit([f"Attention, one call: [1, {seq}, {config.num_heads}, {config.head_dim}], {flops / 1e12:.2f} TFLOP; "
          "error = rel. L2 vs float64 on the first and last head (**bold**: the tiling the engine runs)", "",
          *format_rows(rows, flops)])  # fmt: skip
    # 2. a block's GEMMs
    emit(["", "| GEMM (one block linear) | ms | TFLOP/s | rel. err vs float64 |", "|---|---|---|---|",
          *(f"| {name} | {ms:.3f} | {tflops:.0f} | {error:.2e} |"
            for name, ms, tflops, error in gemm_table(config, seq))])  # fmt: skip

    # 3. the 4-step sampler per size and setting
    emit(["", "| size | path | attention | linear | DiT s/step | 4 steps s | TFLOP/s | speed-up | peak GiB | prepare s "
          "| x0 rel. err | x0 cosine |", "|---|---|---|---|---|---|---|---|---|---|---|---|"])  # fmt: skip
    recorded = options.resolve_fast_options(options.AUTO, options.AUTO, "cuda")
    breakdowns, dit_table = {}, {}
    for i, (height, width, seconds) in enumerate(sizes):
        shape, n_visual, seq = tokens(config, height, width, seconds)
        total_flops = sum(step_flops(config, n_visual, seq))
        size = f"{height}x{width} {seconds}s ({seq} tok)"
        results = {}
        for setting in [*EAGER, *fast] if i == 0 else ["eager", recorded]:
            path = setting if isinstance(setting, str) else "fast"
            attention, linear = EAGER_LABELS[setting] if isinstance(setting, str) else setting
            reason = None if isinstance(setting, str) else fast_reason(setting)
            if reason is not None:
                emit([f"| {size} | {path} | {attention} | {linear} | skipped: {reason} |"])
                continue
            try:
                repeats = 1 if isinstance(setting, str) else args.repeats
                profile = i == 0 and not isinstance(setting, str) and linear in args.profile_linears.split(",")
                results[setting] = r = run_path(dit, setting, shape, text, repeats, profile)
            except Exception as error:  # one setting failing must not stop the others
                emit([f"| {size} | {path} | {attention} | {linear} | failed: {type(error).__name__}: "
                      f"{str(error)[:200]} |"])  # fmt: skip
                continue
            if "eager" not in results:
                raise RuntimeError("the eager reference failed: no x0 to compare against (see its row)")
            ref = results["eager"]
            err, cos = compare(r["x0"], ref["x0"])
            if i == 0 and not isinstance(setting, str):
                dit_table[setting] = (4 * r["step"], err)
            if r["breakdown"]:
                breakdowns[f"{attention}/{linear}"] = r["breakdown"]
            emit([f"| {size} | {path} | {attention} | {linear} | {r['step']:.3f} | {4 * r['step']:.2f} | "
                  f"{total_flops / r['step'] / 1e12:.0f} | {ref['step'] / r['step']:.2f}x | {r['peak']:.1f} | "
                  f"{r['prepare']:.1f} | {err:.2e} | {cos:.5f} |"])  # fmt: skip
            del r

    # 4. the default rule on this run's tables
    measured = engine_table(rows, flops)
    try:
        pick = options.choose_fast_default(measured, dit_table)
        verdict = "as recorded" if pick == recorded else "differs: update ATTENTION_OPTIONS / DIT_TABLE"
        pick_line = f"**The rule on this run's tables picks `fast` = {pick[0]} + {pick[1]} linears** ({verdict}"
    except ValueError as error:
        pick_line = f"**The rule found no default on this run's tables**: {error} ("
    emit(["", f"{pick_line}; recorded default in k4serve/engines/options.py on this machine: {recorded[0]} + "
          f"{recorded[1]}). Rule: the fastest attention call with error <= {options.BF16_LEVEL:g}, then the fastest "
          f"linears whose x0 error <= {options.X0_BUDGET:g}."])  # fmt: skip

    # 5. kernel time per forward
    if breakdowns:
        families = next(iter(breakdowns.values()))
        height, width, seconds = sizes[0]
        emit(["", f"Kernel time per forward at {height}x{width} {seconds}s (ms, one forward, no graph)", "",
              "| attention/linear | " + " | ".join(families) + " | total |", "|---|" + "---|" * (len(families) + 1),
              *(f"| {name} | " + " | ".join(f"{v:.1f}" for v in b.values()) + f" | {sum(b.values()):.1f} |"
                for name, b in breakdowns.items())])  # fmt: skip
    if args.results:
        existing = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
        args.results.write_text(existing.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
