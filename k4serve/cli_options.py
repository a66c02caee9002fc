"""Argument types and options shared by several `k4serve` subcommands.

Every CLI module (generate, serve, request, ...) imports from here and from nothing above it, so the
subcommand modules never import each other's parsers: `k4serve.cli` only assembles them.
"""

from __future__ import annotations

import argparse

from k4serve.engines.base import ENGINES
from k4serve.engines.options import ATTENTION, LINEAR, describe_attention, describe_linear, option_help
from k4serve.pipelines.t2v import PIPELINE_PRESETS, SUPPORTED_SIZES
from k4serve.pipelines.video_io import MP4_PRESETS


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
