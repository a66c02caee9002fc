"""Argument types and options shared by several `k4serve` subcommands.

Every CLI module (generate, serve, request, ...) imports from here and from nothing above it, so the
subcommand modules never import each other's parsers: `k4serve.cli` only assembles them.
"""

from __future__ import annotations

import argparse

from k4serve.engines.base import ENGINES
from k4serve.engines.options import ATTENTION, LINEAR, describe_attention, describe_linear, option_help
from k4serve.models.cogvlm2_video import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT
from k4serve.pipelines.t2v import PIPELINE_PRESETS, SUPPORTED_SIZES
from k4serve.pipelines.v2a import PIPELINE_PRESETS as V2A_PRESETS
from k4serve.pipelines.v2a import TIMINGS, V2ASettings
from k4serve.pipelines.video_io import MP4_PRESETS


def parse_size(text: str) -> tuple[int, int]:
    """'384x672' (height x width) -> (384, 672)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        allowed = ", ".join(f"{h}x{w}" for h, w in SUPPORTED_SIZES)
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, one of: {allowed}") from None
    return height, width


# A client gives up on a request after this long unless told otherwise: a request the server never answers (on the
# H200, Triton 2.51 left a stream unanswered when its entry point's stub process died under it) must not hang a
# command-line client. A 12 s video takes seconds on a GPU and minutes on a loaded CPU.
REQUEST_TIMEOUT_S = 900.0


def parse_timeout(text: str) -> float | None:
    """'900' -> 900.0; '0' -> None (no limit)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"--timeout takes seconds >= 0 (0: no limit), got {text!r}")
    return seconds or None


def add_timeout_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """`--timeout SECONDS` (default REQUEST_TIMEOUT_S; 0: no limit) as args.timeout, None for no limit."""
    parser.add_argument(
        "--timeout",
        type=parse_timeout,
        default=REQUEST_TIMEOUT_S,
        help=f"give up on {what} after this many seconds (default {REQUEST_TIMEOUT_S:g}; 0: wait as long as it takes)",
    )


def parse_device(text: str) -> str | dict[str, str]:
    """'cuda' or a per-component map 'text_encoder=cuda:1,dit=cuda:0,vae=cuda:1'."""
    if "=" not in text:
        return text
    try:
        return dict(item.split("=", 1) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("device map must read text_encoder=DEV,dit=DEV,vae=DEV") from None


def add_model_arguments(
    parser: argparse.ArgumentParser,
    preset: str | None = None,
    engine: str | None = None,
    attention: str | None = None,
    linear: str | None = None,
    mp4_preset: str | None = None,
) -> None:
    """--preset --weights --engine --engine-dir --attention --linear --mp4-preset, shared by `generate` and `serve`
    (None: not set here)."""
    parser.add_argument("--preset", choices=sorted(PIPELINE_PRESETS), default=preset)
    parser.add_argument("--weights", default=None, help="official weights directory (README: Official weights)")
    parser.add_argument("--engine", choices=ENGINES, default=engine)
    parser.add_argument(
        "--engine-dir", default=None, help="with --engine aoti|tensorrt|onnxruntime: the folder `k4serve export` wrote"
    )
    attention_help = "--engine fast's attention kernel (error: one call vs fp32). "
    parser.add_argument("--attention", choices=ATTENTION, default=attention, metavar="NAME",
                        help=attention_help + option_help(ATTENTION, describe_attention))  # fmt: skip
    linear_help = "--engine fast's linear layers (x0: the 4-step sample vs bf16 eager). "
    parser.add_argument("--linear", choices=LINEAR, default=linear, metavar="NAME",
                        help=linear_help + option_help(LINEAR, describe_linear))  # fmt: skip
    encodings = "; ".join(f"{name}: x264 {s.preset} crf {s.crf}" for name, s in MP4_PRESETS.items())
    parser.add_argument("--mp4-preset", choices=sorted(MP4_PRESETS), default=mp4_preset,
                        help=f"H.264 settings ({encodings}; official is the official writer's)")  # fmt: skip


def add_audio_arguments(parser: argparse.ArgumentParser, prompt_flag: str, prefix: str = "") -> None:
    """V2A's options, shared by `v2a` and `generate --audio`: the sound's prompt (`prompt_flag`), --negative-prompt,
    --timing, and the V2A models' --{prefix}preset --{prefix}weights --{prefix}encoder-weights."""
    parser.add_argument(
        prompt_flag,
        dest="audio_prompt",
        default=DEFAULT_PROMPT,
        metavar="TEXT",
        help=f"what the sound should be (CogVLM2 reads 100 tokens; default {DEFAULT_PROMPT!r})",
    )
    parser.add_argument(
        "--negative-prompt",
        default=DEFAULT_NEGATIVE_PROMPT,
        metavar="TEXT",
        help=f"what it should not be (default {DEFAULT_NEGATIVE_PROMPT!r})",
    )
    parser.add_argument(
        "--timing",
        choices=TIMINGS,
        default="pad",
        help="pad (default): the video keeps its frame rate and the audio is padded with silence to "
        "its length; retime: the official mapping, the frames played over the audio's length",
    )
    parser.add_argument(
        f"--{prefix}preset",
        dest="v2a_preset",
        choices=sorted(V2A_PRESETS),
        default=None,
        help="V2A model sizes (default: tiny, or kandinsky4-v2a beside generate's flash-512)",
    )
    parser.add_argument(
        f"--{prefix}weights",
        dest="v2a_weights",
        default=None,
        metavar="DIR",
        help="the ai-forever/kandinsky-4-v2a snapshot (README: 'Video to audio: weights')",
    )
    parser.add_argument(
        f"--{prefix}encoder-weights",
        dest="v2a_encoder_weights",
        default=None,
        metavar="DIR",
        help="the THUDM/cogvlm2-video-llama3-chat snapshot, if not inside the V2A weights",
    )


def v2a_settings(args: argparse.Namespace, preset: str, device: str | dict[str, str], engine: str) -> V2ASettings:
    """The V2A pipeline's settings from add_audio_arguments' options (`preset` unless --preset was given)."""
    return V2ASettings(
        preset=args.v2a_preset or preset,
        weights=args.v2a_weights,
        encoder_weights=args.v2a_encoder_weights,
        device=device,
        engine=engine,
        engine_dir=getattr(args, "engine_dir", None),
        mp4_preset=args.mp4_preset,
    )
