"""`k4serve` command line: generate in process, serve over Triton, request from a server."""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

from k4serve.engines.base import ATTENTION, ENGINES, LINEAR
from k4serve.pipelines.t2v import MAX_SEED, PIPELINE_PRESETS, SUPPORTED_SIZES, RequestError


def parse_size(text: str) -> tuple[int, int]:
    """'384x672' (height x width) -> (384, 672)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        allowed = ", ".join(f"{h}x{w}" for h, w in SUPPORTED_SIZES)
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, one of: {allowed}") from None
    return height, width


def parse_device(text: str) -> str | dict[str, str]:
    """'cuda' or a per-component map 'text_encoder=cuda:1,dit=cuda:0,vae=cuda:1'."""
    if "=" not in text:
        return text
    try:
        return dict(item.split("=", 1) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("device map must read text_encoder=DEV,dit=DEV,vae=DEV") from None


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text description of the video")
    parser.add_argument("-o", "--output", default="out.mp4", help="mp4 path (a .png is written for --seconds 0)")
    parser.add_argument("--seconds", type=int, default=12, help="duration, 0..12 (0: a single image)")
    parser.add_argument("--size", type=parse_size, default=(384, 672), help="HEIGHTxWIDTH, e.g. 384x672")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (random if absent; printed)")
    parser.add_argument("--device", type=parse_device, default="cpu", help="cuda, cpu, or a per-component map")
    add_model_arguments(parser, preset="tiny", engine="eager", attention="sdpa", linear="bf16")


def add_model_arguments(
    parser: argparse.ArgumentParser,
    preset: str | None = None,
    engine: str | None = None,
    attention: str | None = None,
    linear: str | None = None,
) -> None:
    """--preset --weights --engine --attention --linear, shared by `generate` and `serve` (None: not set here)."""
    parser.add_argument("--preset", choices=sorted(PIPELINE_PRESETS), default=preset)
    parser.add_argument("--weights", default=None, help="official weights directory (README: Official weights)")
    parser.add_argument("--engine", choices=ENGINES, default=engine)
    parser.add_argument("--attention", choices=ATTENTION, default=attention, help="the DiT's attention kernel")
    parser.add_argument("--linear", choices=LINEAR, default=linear, help="the DiT's linear-layer dtype")


def run_generate(args: argparse.Namespace) -> int:
    from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline, num_frames, validate_request

    height, width = args.size
    seed = random.randint(0, MAX_SEED) if args.seed is None else args.seed
    validate_request(args.prompt, height, width, args.seconds, seed)  # fail before loading anything
    settings = PipelineSettings(
        preset=args.preset,
        weights=args.weights,
        device=args.device,
        engine=args.engine,
        attention=args.attention,
        linear=args.linear,
    )
    started = time.perf_counter()
    pipeline = T2VPipeline.from_settings(settings)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.setdefault(stage, tqdm(total=total, desc=f"{stage:>12}", unit="step", leave=True))
        bar.update(done - bar.n)
        if done == total:
            bar.close()

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


def build_parser() -> argparse.ArgumentParser:
    from k4serve.client.cli import add_request_arguments
    from k4serve.serving.cli import add_serve_arguments

    parser = argparse.ArgumentParser(prog="k4serve", description="Kandinsky 4.0 T2V Flash serving engine")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(commands.add_parser("generate", help="prompt -> mp4, in this process"))
    add_serve_arguments(commands.add_parser("serve", help="run tritonserver on the model repository"))
    add_request_arguments(commands.add_parser("request", help="send a prompt to a running server"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "serve":
            from k4serve.serving.cli import run_serve

            return run_serve(args)
        from k4serve.client.cli import run_request

        return run_request(args)
    except (RequestError, OSError, ValueError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:  # only serve / request import optional packages
        print(
            f"error: {error}: `k4serve {args.command}` needs the serve extra: pip install 'k4serve[serve]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
