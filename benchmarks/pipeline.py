"""End-to-end T2V on one GPU: per-stage time and peak memory of the in-process pipeline, full size, random weights.

    python benchmarks/pipeline.py --seconds 12 --size 384x672 --engines eager fast-bf16 fast-fp8

Stages: T5 encode, the 4 DiT steps, the VAE decode (97 frames at 12 s), the H.264 encode, each alone; then the
VAE decode and H.264 encode as the pipeline runs them (`encode_video`: each chunk encoded on the CPU while the
GPU decodes the next). total = T5 + DiT + that. Engine "fast" also runs the VAE's norms through the fused Triton
kernel. Each engine is warmed up once, then timed `--repeat` times; medians are printed and appended to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from results import append_table
from torch.nn.attention import SDPBackend, sdpa_kernel

from k4serve.cli_options import parse_size
from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline
from k4serve.pipelines.video_io import encode_mp4

ALL_SDPA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# name -> (engine, attention, linear) of PipelineSettings. `eager` runs SDPA's flash backend (the official code's
# flash_attn class of kernel, as benchmarks/dit.py); `eager-cudnn` lets SDPA pick cuDNN, its default on Hopper.
ENGINES = {
    "eager": ("eager", "sdpa", "bf16"),
    "eager-cudnn": ("eager", "sdpa", "bf16"),
    "fast-bf16": ("fast", "triton", "bf16"),
    "fast-fp8": ("fast", "triton-fp8", "fp8-fast"),
}


def timed(fn):
    """(result, seconds) of fn() with the GPU drained before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run_once(pipeline: T2VPipeline, height: int, width: int, seconds: int, seed: int, dit_sdpa: list) -> dict:
    """Seconds per stage for one prompt; the DiT's SDPA calls may use only the `dit_sdpa` backends."""
    text, t_text = timed(lambda: pipeline.encode_prompt("a red fox running through fresh snow, golden hour"))
    with sdpa_kernel(dit_sdpa):  # T5 passes an attention mask (its position bias), which flash does not take
        latents, t_dit = timed(lambda: pipeline.sample(text, height, width, seconds, seed))
    frames, t_vae = timed(lambda: pipeline.decode(latents))
    _, t_mp4 = timed(lambda: encode_mp4(frames))
    _, t_streamed = timed(lambda: pipeline.encode_video(latents))
    return {"t5": t_text, "dit": t_dit, "vae": t_vae, "mp4": t_mp4, "vae+mp4": t_streamed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--size", type=parse_size, default=(384, 672))
    parser.add_argument("--engines", nargs="+", choices=sorted(ENGINES), default=list(ENGINES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    height, width = args.size

    rows = []
    for name in args.engines:
        engine, attention, linear = ENGINES[name]
        settings = PipelineSettings(
            preset="flash-512", device="cuda", engine=engine, attention=attention, linear=linear
        )
        pipeline = T2VPipeline.from_settings(settings)
        backends = [SDPBackend.FLASH_ATTENTION] if name == "eager" else ALL_SDPA
        run_once(pipeline, height, width, args.seconds, 0, backends)  # warm-up: kernels, autotuning, graphs
        torch.cuda.reset_peak_memory_stats()
        runs = [run_once(pipeline, height, width, args.seconds, i, backends) for i in range(args.repeat)]
        median = {stage: statistics.median(run[stage] for run in runs) for stage in runs[0]}
        median["total"] = statistics.median(run["t5"] + run["dit"] + run["vae+mp4"] for run in runs)
        rows.append((f"{name} ({attention}, {linear})", median, torch.cuda.max_memory_allocated() / 2**30))
        del pipeline
        torch.cuda.empty_cache()

    # Speed-ups against the first row (eager, the official code's class of kernels, when it ran).
    base = rows[0][1]
    header = (
        f"| engine | T5 s | DiT 4 steps s | VAE s | mp4 s | VAE+mp4 overlapped s | total s | DiT × "
        f"| total × vs {rows[0][0].split()[0]} | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    stages = ("t5", "dit", "vae", "mp4", "vae+mp4", "total")
    lines = [
        f"| {label} | "
        + " | ".join(f"{m[s]:.3f}" for s in stages)
        + f" | {base['dit'] / m['dit']:.2f} | {base['total'] / m['total']:.2f} | {peak:.1f} |"
        for label, m, peak in rows
    ]
    table = "\n".join([header, *lines])
    print(table)
    if not args.no_write:
        command = "python benchmarks/pipeline.py " + " ".join(
            [
                f"--seconds {args.seconds}",
                f"--size {height}x{width}",
                f"--repeat {args.repeat}",
                "--engines",
                *args.engines,
            ]
        )
        title = f"End-to-end pipeline, {args.seconds} s {height}x{width}, random weights"
        append_table(title, command, f"median of {args.repeat} after a warm-up", table)


if __name__ == "__main__":
    main()
