"""`k4serve generate "prompt" -o out.mp4`: text -> video in this process."""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from k4serve.cli_options import add_model_arguments, parse_device, parse_size
from k4serve.pipelines.t2v import MAX_SEED
from k4serve.pipelines.video_io import DEFAULT_MP4_PRESET


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `k4serve generate`."""
    parser.add_argument("prompt", help="text description of the video")
    parser.add_argument("-o", "--output", default="out.mp4", help="mp4 path (a .png is written for --seconds 0)")
    parser.add_argument("--seconds", type=int, default=12, help="duration, 0..12 (0: a single image)")
    parser.add_argument("--size", type=parse_size, default=(384, 672), help="HEIGHTxWIDTH, e.g. 384x672")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (random if absent; printed)")
    parser.add_argument("--device", type=parse_device, default="cpu", help="cuda, cpu, or a per-component map")
    add_model_arguments(parser, preset="tiny", engine="eager", attention="auto", linear="auto",
                        mp4_preset=DEFAULT_MP4_PRESET)  # fmt: skip


def progress_bars() -> Callable[[str, int, int], None]:
    """progress(stage, done, total) drawing one tqdm bar per stage."""
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.setdefault(stage, tqdm(total=total, desc=f"{stage:>12}", unit="step", leave=True))
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return progress


def run_generate(args: argparse.Namespace) -> int:
    """Generate one video and write it; 0 on success."""
    from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline, num_frames, validate_request

    height, width = args.size
    seed = random.randint(0, MAX_SEED) if args.seed is None else args.seed
    validate_request(args.prompt, height, width, args.seconds, seed)  # fail before loading anything
    settings = PipelineSettings(
        preset=args.preset,
        weights=args.weights,
        device=args.device,
        engine=args.engine,
        engine_dir=args.engine_dir,
        attention=args.attention,
        linear=args.linear,
        mp4_preset=args.mp4_preset,
    )
    started = time.perf_counter()
    pipeline = T2VPipeline.from_settings(settings)
    progress = progress_bars()
    latents = pipeline.latents(args.prompt, height, width, args.seconds, seed, progress)
    # mp4 (PNG for 0 s), each VAE chunk H.264-encoded while the next decodes
    video = pipeline.encode_video(latents, lambda done, total: progress("vae+mp4", done, total))
    output = Path(args.output)
    if args.seconds == 0 and output.suffix != ".png":
        output = output.with_suffix(".png")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(video)
    frames = num_frames(args.seconds)
    print(f"wrote {output} ({frames} frames, {height}x{width}, seed {seed}) in {time.perf_counter() - started:.1f} s")
    return 0
