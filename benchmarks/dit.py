"""DiT benchmark on one GPU: the eager reference against the fast engine, full size, random weights.

    python benchmarks/dit.py --results benchmarks/RESULTS.md

For each (height, width, seconds) it runs the 4-step Flash sampler (same noise, same text embedding) through
  eager      the reference module under bf16 autocast with SDPA's flash backend forced (the official code path)
  fast-*     k4serve.engines.torch.FastDiT (attention sdpa|triton|triton-fp8, linear bf16|fp8, CUDA graphs)
and prints time per step (median) and for the 4 steps, achieved TFLOP/s, peak GPU memory, and the relative
error and cosine similarity of the final x0 against the eager bf16 reference. Before that, the attention
kernel alone at the largest size: cuDNN and flash SDPA beside every Triton tiling tried (bf16 and fp8).
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
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel

from k4serve.engines.torch import TEXT_LEN, FastDiT
from k4serve.kernels import attention as attn
from k4serve.kernels.quantize import quantize_rowwise
from k4serve.models.dit import DiTConfig, build_dit
from k4serve.models.schedulers import FlashSampler
from k4serve.pipelines.t2v import latent_shape

PATHS = {  # name -> (attention, linear); a str = the eager reference with that SDPA backend
    "eager": "flash",
    "eager-cudnn": "cudnn",  # the same bf16 model through another kernel: the bf16 noise floor of x0
    "fast-sdpa": ("sdpa", "bf16"),
    "fast-bf16": ("triton", "bf16"),
    "fast-fp8-attn": ("triton-fp8", "bf16"),
    "fast-fp8-linear": ("triton", "fp8"),
    "fast-fp8": ("triton-fp8", "fp8"),
    "fast-fp8-fastacc": ("triton-fp8", "fp8-fast"),
}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def tokens(config: DiTConfig, height: int, width: int, seconds: int) -> tuple[tuple[int, ...], int, int]:
    """Latent shape [T, H/8, W/8, 16], visual tokens, joint sequence length."""
    shape = latent_shape(height, width, seconds)
    n_visual = math.prod(n // p for n, p in zip(shape[:3], config.patch_size, strict=True))
    return shape, n_visual, n_visual + TEXT_LEN


def step_flops(config: DiTConfig, n_visual: int, seq: int) -> tuple[float, float]:
    """(linear, attention) matmul FLOPs of one DiT forward (embeddings and out layer included)."""
    d, ff, blocks = config.model_dim, config.ff_dim, 2 * config.num_blocks
    linear = 2 * seq * blocks * (4 * d * d + 2 * d * ff)
    linear += 2 * n_visual * d * (config.patch_numel * config.in_visual_dim) * 2 + 2 * TEXT_LEN * config.in_text_dim * d
    return linear, blocks * attn.attention_flops(1, seq, config.num_heads, config.head_dim)


def attention_table(config: DiTConfig, seq: int) -> list[tuple[str, float, float]]:
    """(name, ms, rel. error on head 0 vs fp32) for SDPA backends and every Triton tiling, at one call's shape."""
    h, d = config.num_heads, config.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = torch.randn(1, seq, 3, h, d, device="cuda", dtype=torch.bfloat16, generator=g).unbind(2)
    head = [t[:, :, 0].float() for t in (q, k, v)]  # [1, S, D]
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(*head)[0]  # [S, D]

    def error(out):
        out = out.reshape(seq, h, d)[:, 0].float()
        return ((out - expected).norm() / expected.norm()).item()

    rows = []
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            run = lambda: F.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
            rows.append((name, triton.testing.do_bench(run, return_mode="median"), error(run().transpose(1, 2))))
    packed = attn.quantize_qkv_fp8(q, k, v)
    for fp8 in (False, True):
        timings = attn.tune_attention(1, seq, h, d, fp8=fp8)
        for config_, ms in sorted(timings.items(), key=lambda item: item[1]):
            c = config_
            name = f"triton-{'fp8' if fp8 else 'bf16'} {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"
            if math.isinf(ms):
                rows.append((name + " (failed)", ms, float("nan")))
                continue
            out = attn.flash_attention_fp8(packed, c) if fp8 else attn.flash_attention(q, k, v, c)
            rows.append((name, ms, error(out)))
    return rows


def gemm_runs(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """One linear three ways: bf16 F.linear, fp8 rowwise _scaled_mm, and the same with fast accumulation."""
    x8, xs = quantize_rowwise(x)
    w8, ws = quantize_rowwise(w)
    fp8 = dict(bias=bias, out_dtype=torch.bfloat16)
    return {
        "bf16": lambda: F.linear(x, w, bias),
        "fp8": lambda: torch._scaled_mm(x8, w8.t(), xs, ws.t(), **fp8),
        "fp8 fast-accum": lambda: torch._scaled_mm(x8, w8.t(), xs, ws.t(), use_fast_accum=True, **fp8),
    }


def gemm_table(config: DiTConfig, seq: int) -> list[tuple[str, float, float]]:
    """(name, ms, TFLOP/s) of a block's four linears at this sequence length."""
    d, ff = config.model_dim, config.ff_dim
    rows = []
    for k, n in ((d, 3 * d), (d, d), (d, ff), (ff, d)):
        x = torch.randn(seq, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for name, run in gemm_runs(x, w, bias).items():
            ms = triton.testing.do_bench(run, return_mode="median")
            rows.append((f"{seq}x{k} @ {k}x{n} {name}", ms, 2 * seq * k * n / ms / 1e9))
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
        if family is None and any(tag in name for tag in ("_attention_kernel", "flash", "fmha", "cudnn")):
            family = "attention"
        if family is None and any(tag in name for tag in ("gemm", "nvjet", "cutlass", "xmma")):
            family = "gemm"
        families[family or "other"] += event.device_time_total / 1e3
    return families


def run_path(dit, name: str, shape, text, repeats: int, profile: bool) -> dict:
    """Sample 4 steps `repeats` times through one path; DiT time per step (median), peak memory, final x0."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    choice = PATHS[name]
    breakdown = None
    prepare = time.perf_counter()
    if isinstance(choice, str):

        def denoiser(x, t):
            with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(BACKENDS[choice]):
                return dit(x, text, t)

        denoiser(torch.randn((1, *shape), device="cuda", dtype=torch.bfloat16), torch.tensor([999], device="cuda"))
    else:
        engine = FastDiT(dit, attention=choice[0], linear=choice[1])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="384x672x12,512x512x2,512x512x6", help="HxWxSECONDS,...")
    parser.add_argument("--paths", default="eager,eager-cudnn,fast-sdpa,fast-bf16,fast-fp8-attn,fast-fp8-linear,"
                        "fast-fp8,fast-fp8-fastacc",
                        help="paths at the first size; later sizes run eager,fast-bf16,fast-fp8")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="4-step samples per fast path (eager: 1)")
    parser.add_argument("--results", type=Path, help="append the markdown tables to this file")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]

    dit = build_dit("flash-512", device="cuda", dtype=torch.bfloat16)
    config = dit.config
    text = torch.randn(1, TEXT_LEN, config.in_text_dim, generator=torch.Generator().manual_seed(1))
    text = text.to("cuda", torch.bfloat16)
    props = torch.cuda.get_device_properties(0)
    header = (f"{datetime.date.today()} · {props.name} · torch {torch.__version__} · triton {triton.__version__} · "
              f"cuDNN {torch.backends.cudnn.version()} · `python {' '.join(sys.argv)}`")  # fmt: skip
    lines = [f"### DiT benchmark, {header}", ""]

    # 1. the attention kernel alone, one call at the first size
    shape, n_visual, seq = tokens(config, *sizes[0])
    flops = attn.attention_flops(1, seq, config.num_heads, config.head_dim)
    lines += [f"Attention, one call: [1, {seq}, {config.num_heads}, {config.head_dim}], "
              f"{flops / 1e12:.2f} TFLOP; error = rel. L2 vs fp32 math on head 0", "",
              "| kernel | ms | TFLOP/s | rel. error |", "|---|---|---|---|"]  # fmt: skip
    for name, ms, err in attention_table(config, seq):
        lines.append(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err:.2e} |")
    print("\n".join(lines), flush=True)

    lines += ["", "| GEMM (one block linear) | ms | TFLOP/s |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.3f} | {tflops:.0f} |" for name, ms, tflops in gemm_table(config, seq)]
    print("\n".join(lines[-14:]), flush=True)

    # 2. the 4-step sampler per size and path
    lines += ["", "| size | path | DiT s/step | 4 steps s | TFLOP/s | speed-up | peak GiB | prepare s "
              "| x0 rel. err | x0 cosine |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, (height, width, seconds) in enumerate(sizes):
        shape, n_visual, seq = tokens(config, height, width, seconds)
        total_flops = sum(step_flops(config, n_visual, seq))
        names = args.paths.split(",") if i == 0 else ["eager", "fast-bf16", "fast-fp8"]
        results = {}
        for name in names:
            repeats = 1 if name.startswith("eager") else args.repeats
            results[name] = run_path(dit, name, shape, text, repeats, i == 0)
            r, ref = results[name], results["eager"]
            err, cos = compare(r["x0"], ref["x0"])
            row = (f"| {height}x{width} {seconds}s ({seq} tok) | {name} | {r['step']:.3f} | {4 * r['step']:.2f} | "
                   f"{total_flops / r['step'] / 1e12:.0f} | {ref['step'] / r['step']:.2f}x | {r['peak']:.1f} | "
                   f"{r['prepare']:.1f} | {err:.2e} | {cos:.5f} |")  # fmt: skip
            lines.append(row)
            print(row, flush=True)
        if i == 0:
            breakdowns = {name: r["breakdown"] for name, r in results.items() if r["breakdown"]}
            families = next(iter(breakdowns.values()))
            title = f"Kernel time per forward at {height}x{width} {seconds}s (ms, one forward, no graph)"
            breakdown_lines = ["", title, "", "| path | " + " | ".join(families) + " | total |",
                               "|---|" + "---|" * (len(families) + 1)]  # fmt: skip
            for name, b in breakdowns.items():
                breakdown_lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in b.values())
                                       + f" | {sum(b.values()):.1f} |")  # fmt: skip
    lines += breakdown_lines
    print("\n".join(lines))
    if args.results:
        existing = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
        args.results.write_text(existing.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
