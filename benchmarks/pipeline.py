"""End-to-end T2V on one GPU: per-stage time, memory and error of the in-process pipeline, full size, random weights.

    python benchmarks/pipeline.py --seconds 12 --size 384x672 --engines eager fast

Stages: T5 encode, the 4 DiT steps, the VAE decode (97 frames at 12 s), the H.264 encode of those frames, each
alone; then the VAE decode and H.264 encode as the pipeline runs them (`encode_video`: each chunk encoded on the CPU
while the GPU decodes the next). total = T5 + DiT + that. Engines:
  eager          the official code's path: bf16 autocast with SDPA's flash backend, the reference VAE decoder,
                 the official writer's x264 settings (mp4 preset `official`)
  eager-cudnn    the same with SDPA free to pick cuDNN (its default on Hopper)
  fast           `PipelineSettings(engine="fast")` with every other setting at the pipeline's defaults: the default
                 attention and linear kernels, the channels-last CUDA-graphed VAE, the default mp4 preset
  fast-official-mp4   the same with the official writer's x264 settings
  fast-int8-linears   the same with int8 DiT GEMMs (`--linear int8`)
`--fast-attention NAME` runs the fast engines with that DiT attention instead of the default's.
x0 and frame errors are relative L2 errors against the eager row's latents and uint8 frames for the same seed (the
first engine given should be `eager`). Each engine is warmed up once, then timed `--repeat` times; medians are
printed and appended to benchmarks/RESULTS.md, with the gap to the 3.0 s target per stage.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback

import numpy as np
import torch
from results import append_table
from torch.nn.attention import SDPBackend, sdpa_kernel

from k4serve.cli_options import parse_size
from k4serve.engines.options import ATTENTION, AUTO, resolve_fast_options
from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline
from k4serve.pipelines.video_io import encode_mp4

ALL_SDPA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
EAGER = {"engine": "eager", "attention": "sdpa", "linear": "bf16", "mp4_preset": "official"}
# name -> PipelineSettings fields that differ from the pipeline's defaults
ENGINES = {
    "eager": EAGER,
    "eager-cudnn": EAGER,
    "fast": {"engine": "fast"},
    "fast-official-mp4": {"engine": "fast", "mp4_preset": "official"},
    "fast-int8-linears": {"engine": "fast", "linear": "int8"},
}
TARGET_S = 3.0
PROMPT = "a red fox running through fresh snow, golden hour"


def timed(fn):
    """(result, seconds) of fn() with the GPU drained before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run_once(pipeline: T2VPipeline, height: int, width: int, seconds: int, seed: int, dit_sdpa: list) -> tuple:
    """(seconds per stage, x0 latents, uint8 frames) for one prompt; the DiT's SDPA calls use only `dit_sdpa`."""
    text, t_text = timed(lambda: pipeline.encode_prompt(PROMPT))
    with sdpa_kernel(dit_sdpa):  # T5 passes an attention mask (its position bias), which flash does not take
        latents, t_dit = timed(lambda: pipeline.sample(text, height, width, seconds, seed))
    frames, t_vae = timed(lambda: pipeline.decode(latents))
    _, t_mp4 = timed(lambda: encode_mp4(frames, x264=pipeline.x264))
    _, t_streamed = timed(lambda: pipeline.encode_video(latents))
    stages = {"t5": t_text, "dit": t_dit, "vae": t_vae, "mp4": t_mp4, "vae+mp4": t_streamed}
    stages["total"] = t_text + t_dit + t_streamed
    return stages, latents.float().cpu(), frames


def relative_error(x: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    x, ref = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (x, ref))
    return ((x - ref).norm() / ref.norm()).item()


def measure(name: str, height: int, width: int, seconds: int, repeat: int, fast_attention: str) -> dict:
    """Build the engine's pipeline, warm it up (seed 0: the outputs compared across engines), time `repeat` runs;
    the fast engines' DiT attention is `fast_attention` (an ATTENTION option; auto: the default rule's)."""
    fields = ENGINES[name]
    if fields["engine"] == "fast":
        fields = {**fields, "attention": fast_attention}
    settings = PipelineSettings(preset="flash-512", device="cuda", **fields)
    pipeline = T2VPipeline.from_settings(settings)
    backends = [SDPBackend.FLASH_ATTENTION] if name == "eager" else ALL_SDPA
    _, latents, frames = run_once(pipeline, height, width, seconds, 0, backends)  # kernels, autotuning, graphs
    torch.cuda.reset_peak_memory_stats()
    runs = [run_once(pipeline, height, width, seconds, i + 1, backends)[0] for i in range(repeat)]
    s = pipeline.settings
    # what `auto` stood for on this machine (fa4 only where flash-attn-4 is installed)
    attention, linear = (resolve_fast_options(s.attention, s.linear, "cuda", pipeline.dit.config.head_dim)
                         if s.engine == "fast" else (s.attention, s.linear))  # fmt: skip
    resolved = "" if (attention, linear) == (s.attention, s.linear) else f" = {attention}, {linear}"
    return {
        "label": f"{name} ({s.attention}, {s.linear}{resolved}, VAE {type(pipeline.vae_decoder).__name__}, "
        f"mp4 {s.mp4_preset})",
        "median": {stage: statistics.median(run[stage] for run in runs) for stage in runs[0]},
        "allocated": torch.cuda.max_memory_allocated() / 2**30,
        "reserved": torch.cuda.max_memory_reserved() / 2**30,
        "latents": latents,
        "frames": frames,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--size", type=parse_size, default=(384, 672))
    parser.add_argument("--engines", nargs="+", choices=sorted(ENGINES), default=["eager", "fast"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--fast-attention",
        choices=ATTENTION,
        default=AUTO,
        help="the fast engines' DiT attention (default: auto, the bf16-level default on this host)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    height, width = args.size

    rows = []
    for name in args.engines:
        try:
            rows.append(measure(name, height, width, args.seconds, args.repeat, args.fast_attention))
        except Exception:  # one failing engine must not stop the others
            traceback.print_exc()
            rows.append({"label": f"{name}: failed (traceback above)"})
        gc.collect()  # the engine's pipeline (graphs included) before the next one is built
        torch.cuda.empty_cache()

    # Speed-ups and errors against the first row (eager, the official code's class of kernels, when it ran).
    base = rows[0] if "median" in rows[0] else None
    stages = ("t5", "dit", "vae", "mp4", "vae+mp4", "total")
    header = (
        "| engine | T5 s | DiT 4 steps s | VAE s | mp4 s | VAE+mp4 overlapped s | total s | total × vs first "
        "| peak alloc GiB | reserved GiB | x0 rel. err vs first | frames rel. err vs first |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for row in rows:
        if "median" not in row:
            lines.append(f"| {row['label']} |" + " |" * 11)
            continue
        m = row["median"]
        speedup = f"{base['median']['total'] / m['total']:.2f}" if base else "—"
        errors = " | ".join(
            f"{relative_error(row[key], base[key]):.2e}" if base else "—" for key in ("latents", "frames")
        )
        lines.append(
            f"| {row['label']} | " + " | ".join(f"{m[s]:.3f}" for s in stages)
            + f" | {speedup} | {row['allocated']:.1f} | {row['reserved']:.1f} | {errors} |"
        )  # fmt: skip
    notes = []
    for row in rows:
        if "median" in row and row["label"].startswith("fast ("):
            m = row["median"]
            gap = m["total"] - TARGET_S
            verdict = "meets" if gap <= 0 else f"misses by {gap:.2f} s"
            notes.append(
                f"{row['label']}: total {m['total']:.2f} s {verdict} the {TARGET_S} s target; T5 {m['t5']:.2f} + "
                f"DiT {m['dit']:.2f} + VAE+mp4 {m['vae+mp4']:.2f} (VAE alone {m['vae']:.2f}, mp4 alone {m['mp4']:.2f})"
            )
    table = "\n".join([header, *lines] + ([""] + notes if notes else []))
    print(table)
    if not args.no_write:
        command = "python benchmarks/pipeline.py " + " ".join(
            [f"--seconds {args.seconds}", f"--size {height}x{width}", f"--repeat {args.repeat}", "--engines"]
            + args.engines
        )
        title = f"End-to-end pipeline, {args.seconds} s {height}x{width}, random weights"
        append_table(title, command, f"median of {args.repeat} after a warm-up", table)


if __name__ == "__main__":
    main()
