"""`k4serve generate "prompt" -o out.mp4 [--audio]`: text -> video (with sound: T2V then V2A) in this process."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from k4serve.cli_options import add_audio_arguments, add_model_arguments, parse_device, parse_size, v2a_settings
from k4serve.pipelines.video_io import DEFAULT_MP4_PRESET

V2A_PRESET_OF = {"tiny": "tiny", "flash-512": "kandinsky4-v2a"}  # generate --audio: the V2A models beside T2V's


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
    sound = parser.add_argument_group("sound (--audio: V2A on the generated frames, muxed into the same mp4)")
    sound.add_argument("--audio", action="store_true", help="give the video a generated soundtrack (AAC, 44.1 kHz)")
    add_audio_arguments(sound, prompt_flag="--audio-prompt", prefix="v2a-")


def progress_bars() -> Callable[[str, int, int], None]:
    """progress(stage, done, total) drawing one tqdm bar per stage."""
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:  # (not setdefault: that would build a bar on every call)
            bars[stage] = tqdm(total=total, desc=f"{stage:>12}", unit="step", leave=True)
        bar = bars[stage]
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return progress


def run_generate(args: argparse.Namespace) -> int:
    """Generate one video and write it; 0 on success."""
    from k4serve.pipelines.t2v import T2VPipeline, num_frames, resolve_seed, validate_request

    height, width = args.size
    seed = resolve_seed(args.seed)
    validate_request(args.prompt, height, width, args.seconds, seed)  # fail before loading anything
    if args.audio:
        return run_generate_with_audio(args, seed)
    started = time.perf_counter()
    pipeline = T2VPipeline.from_settings(t2v_settings(args))
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


def t2v_settings(args: argparse.Namespace):
    """The T2V pipeline's settings from generate's options."""
    from k4serve.pipelines.t2v import PipelineSettings

    return PipelineSettings(
        preset=args.preset,
        weights=args.weights,
        device=args.device,
        engine=args.engine,
        engine_dir=args.engine_dir,
        attention=args.attention,
        linear=args.linear,
        mp4_preset=args.mp4_preset,
    )


def run_generate_with_audio(args: argparse.Namespace, seed: int) -> int:
    """Text -> video -> its soundtrack -> one mp4 (H.264 + AAC); V2A takes the seed of the video."""
    from k4serve.pipelines.t2v import RequestError, T2VPipeline
    from k4serve.pipelines.v2a import V2APipeline, validate_prompts
    from k4serve.pipelines.video_io import FPS

    if args.seconds < 1:
        raise RequestError("--audio needs --seconds 1..12: V2A generates sound for whole seconds of video")
    validate_prompts(args.audio_prompt, args.negative_prompt)
    height, width = args.size
    started = time.perf_counter()
    # the V2A pipeline first: its strict weight checks fail before the video is generated
    engine = "eager" if args.engine == "eager" else "fast"  # exported T2V engines: V2A's fast path beside them
    v2a = V2APipeline.from_settings(v2a_settings(args, V2A_PRESET_OF[args.preset], args.device, engine))
    t2v = T2VPipeline.from_settings(t2v_settings(args))
    progress = progress_bars()
    latents = t2v.latents(args.prompt, height, width, args.seconds, seed, progress)
    frames = t2v.decode(latents)
    progress("vae", 1, 1)
    mp4, audio = v2a.add_audio(
        frames, args.audio_prompt, args.negative_prompt, seed, fps=FPS, timing=args.timing, progress=progress
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(mp4)
    kept = int(audio.seconds * FPS)  # the official V2A keeps whole seconds: 12 s of T2V's 97 frames are 96
    print(
        f"wrote {output} ({kept} frames, {height}x{width}, {audio.duration_s:.2f} s of audio, timing {args.timing}, "
        f"seed {seed}) in {time.perf_counter() - started:.1f} s"
    )
    return 0
