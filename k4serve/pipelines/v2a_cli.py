"""`k4serve v2a in.mp4 -o out.mp4`: give a video a generated soundtrack (Kandinsky 4.0 V2A), in this process."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from k4serve.cli_options import add_audio_arguments, parse_device, v2a_settings
from k4serve.pipelines.media import MediaError
from k4serve.pipelines.v2a import UPLOAD_LIMITS, V2A_ENGINES
from k4serve.pipelines.video_io import DEFAULT_MP4_PRESET, MP4_PRESETS


def add_v2a_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `k4serve v2a`."""
    parser.add_argument("video", help="the input video (mp4, webm, mkv, mov, ...: anything ffmpeg reads)")
    parser.add_argument("-o", "--output", default="out.mp4", help="mp4 path: the kept frames with the generated sound")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (random if absent; printed)")
    parser.add_argument(
        "--device", type=parse_device, default="cpu", help="cuda, cpu, or a map encoder=,unet=,vocoder="
    )
    parser.add_argument(
        "--engine",
        choices=V2A_ENGINES,
        default="eager",
        help="fast: the UNet under CUDA graphs; aoti|tensorrt|onnxruntime: its engine in --engine-dir",
    )
    parser.add_argument("--engine-dir", default=None, help="the folder `k4serve export ... --model v2a-unet` wrote")
    parser.add_argument("--mp4-preset", choices=sorted(MP4_PRESETS), default=DEFAULT_MP4_PRESET, help="H.264 settings")
    add_audio_arguments(parser, prompt_flag="--prompt")


def run_v2a(args: argparse.Namespace) -> int:
    """Read the video, generate its sound, write the mp4; 0 on success. Every check runs before a model loads."""
    from k4serve.pipelines.cli import progress_bars
    from k4serve.pipelines.media import decode_video
    from k4serve.pipelines.t2v import resolve_seed, validate_seed
    from k4serve.pipelines.v2a import V2APipeline, validate_prompts

    validate_prompts(args.audio_prompt, args.negative_prompt)
    validate_seed(args.seed)
    seed = resolve_seed(args.seed)
    source = Path(args.video)
    size = source.stat().st_size  # before reading it: an oversized file is refused unread
    if size > UPLOAD_LIMITS.max_bytes:
        limit = UPLOAD_LIMITS.max_bytes
        raise MediaError(f"{source} has {size} bytes; at most {limit} are accepted: send a shorter or smaller video")
    clip = decode_video(source.read_bytes(), UPLOAD_LIMITS)
    if clip.notice:
        print(f"note: {clip.notice}")
    started = time.perf_counter()
    pipeline = V2APipeline.from_settings(v2a_settings(args, "tiny", args.device, args.engine))
    mp4, audio = pipeline.add_audio(
        clip, args.audio_prompt, args.negative_prompt, seed, timing=args.timing, progress=progress_bars()
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(mp4)
    print(
        f"wrote {output} ({len(clip.frames)} frames at {clip.fps:g} fps, {audio.duration_s:.2f} s of audio at "
        f"{audio.sample_rate} Hz, timing {args.timing}, seed {seed}) in {time.perf_counter() - started:.1f} s"
    )
    return 0
