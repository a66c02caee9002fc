"""Request values as they arrive over the wire -> checked Python values; every refusal names what is allowed.

The stage contracts live here too: what each stage's tensors may be (the supported buckets, dtypes, finite
values), checked on shapes first and on values second, before a stage allocates anything of its own. A request
that breaks one gets RequestError (INVALID_ARGUMENT) naming the allowed values, whichever entry point sent it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from k4serve.models.audio import latent_width
from k4serve.models.cogvlm2_video import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, PROMPT_TOKENS
from k4serve.models.frame_sampling import NUM_FRAMES as CONDITIONING_FRAMES
from k4serve.models.t5 import MAX_TOKENS
from k4serve.pipelines.media import MAX_SECONDS as MAX_CLIP_SECONDS
from k4serve.pipelines.media import check_frames as check_clip_frames
from k4serve.pipelines.t2v import (
    LATENT_CHANNELS,
    MAX_SECONDS,
    SUPPORTED_SIZES,
    RequestError,
    num_frames,
    num_latent_frames,
    resolve_seed,
    validate_request,
)
from k4serve.pipelines.v2a import TIMINGS, UPLOAD_LIMITS, validate_prompts
from k4serve.pipelines.video_io import FPS

SPATIAL_COMPRESSION = 8  # pixels per latent cell along H and W (CogVideoX VAE)
LATENT_FRAME_COUNTS = tuple(num_latent_frames(s) for s in range(MAX_SECONDS + 1))  # 1, 3, 5, ..., 25
FRAME_COUNTS = tuple(num_frames(s) for s in range(MAX_SECONDS + 1))  # 1, 9, 17, ..., 97
LATENT_SIZES = tuple((h // SPATIAL_COMPRESSION, w // SPATIAL_COMPRESSION) for h, w in SUPPORTED_SIZES)
SAMPLE_RATES = (16000, 22050, 24000, 32000, 44100, 48000)  # V2A writes 44.1 kHz; the others are common rates
MAX_AUDIO_SECONDS = MAX_SECONDS + 1  # a 97-frame video lasts 12.125 s at 8 fps
CLIP_SECONDS = range(1, MAX_CLIP_SECONDS + 1)  # V2A makes sound for whole seconds of video
AUDIO_LATENT_WIDTHS = tuple(latent_width(s) for s in CLIP_SECONDS)  # 12, 24, 36, ..., 148

# validate_request checks a whole request; a stage that sees only part of it fills the rest with a value
# known to pass, so each check lives in one place (the pipeline).
_VALID_PROMPT = "-"
_VALID_SIZE = SUPPORTED_SIZES[0]


def decode_text(raw: bytes | str, name: str = "PROMPT") -> str:
    """A BYTES element -> its text, which must be UTF-8."""
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(
                f"{name} must be UTF-8 text: byte {raw[error.start]:#04x} at position {error.start} is not valid "
                "UTF-8 (send the text encoded as UTF-8)"
            ) from None
    return raw


def decode_prompt(raw: bytes | str) -> str:
    """A BYTES element -> the prompt text; it must be UTF-8 and pass the pipeline's prompt rules."""
    prompt = decode_text(raw)
    validate_request(prompt, *_VALID_SIZE, 0)
    return prompt


def decode_audio_prompts(
    prompt: bytes | str | None, negative_prompt: bytes | str | None, prompt_name: str = "PROMPT"
) -> tuple[str, str]:
    """The V2A prompt and negative prompt of a request (None: the official defaults), UTF-8 and within V2A's
    length; `prompt_name` is the request's name for the prompt (t2va: AUDIO_PROMPT)."""
    prompt = DEFAULT_PROMPT if prompt is None else decode_text(prompt, prompt_name)
    negative_prompt = (
        DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else decode_text(negative_prompt, "NEGATIVE_PROMPT")
    )
    validate_prompts(prompt, negative_prompt)
    return prompt, negative_prompt


def decode_timing(raw: bytes | str | None) -> str:
    """TIMING of the muxer: "pad" (default: the video keeps its frame rate) or "retime" (the official's)."""
    timing = "pad" if raw is None else decode_text(raw, "TIMING")
    if timing not in TIMINGS:
        raise RequestError(f"TIMING must be one of {', '.join(TIMINGS)}, got {timing!r}")
    return timing


@dataclass(frozen=True)
class VideoShape:
    """What a sampler request asks for besides the prompt."""

    height: int
    width: int
    seconds: int
    seed: int

    @classmethod
    def checked(cls, height: int, width: int, seconds: int, seed: int | None) -> VideoShape:
        """Validate size, duration and seed (drawing a seed if absent)."""
        shape = cls(height, width, seconds, resolve_seed(seed))
        validate_request(_VALID_PROMPT, height, width, seconds, shape.seed)
        return shape


def _sizes(sizes: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{h}x{w}" for h, w in sizes)


def _counts(counts: Sequence[int]) -> str:
    shown = [*map(str, counts[:3]), "...", str(counts[-1])] if len(counts) > 4 else map(str, counts)
    return ", ".join(shown)


def check_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse a tensor of another dtype (Triton checks the wire type; this guards in-process callers too)."""
    if tensor.dtype != dtype:
        wire = {torch.float32: "FP32", torch.uint8: "UINT8", torch.int32: "INT32", torch.int64: "INT64"}[dtype]
        raise RequestError(f"{name} must be {wire}, got {str(tensor.dtype).removeprefix('torch.')}")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN or infinite values, which would come out as a NaN latent or a black video."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise RequestError(f"{name} holds {bad} NaN or infinite values: send finite numbers")


def check_embeddings(embeddings: torch.Tensor, text_dim: int) -> None:
    """EMBEDDINGS: float32 [224, text_dim], finite (the text encoder's last hidden state)."""
    check_dtype("EMBEDDINGS", embeddings, torch.float32)
    if list(embeddings.shape) != [MAX_TOKENS, text_dim]:
        raise RequestError(
            f"EMBEDDINGS must be [{MAX_TOKENS}, {text_dim}] (the text_encoder's output), got {list(embeddings.shape)}"
        )
    check_finite("EMBEDDINGS", embeddings)


def check_latents(latents: torch.Tensor) -> None:
    """LATENTS: float32 [T, H/8, W/8, 16] of a supported size and duration (T = 1 or 2 * seconds + 1), finite."""
    check_dtype("LATENTS", latents, torch.float32)
    shape = list(latents.shape)
    if (
        len(shape) != 4
        or shape[0] not in LATENT_FRAME_COUNTS
        or tuple(shape[1:3]) not in LATENT_SIZES
        or shape[3] != LATENT_CHANNELS
    ):
        raise RequestError(
            f"LATENTS must be [T, H/8, W/8, {LATENT_CHANNELS}] with T one of {_counts(LATENT_FRAME_COUNTS)} "
            f"(2 x seconds + 1, or 1 for an image) and H/8 x W/8 one of {_sizes(LATENT_SIZES)}; got {shape}"
        )
    check_finite("LATENTS", latents)


def check_frames(frames: torch.Tensor) -> None:
    """FRAMES: uint8 [F, H, W, 3] of a supported size and frame count (F = 8 * seconds + 1, or 1)."""
    check_dtype("FRAMES", frames, torch.uint8)
    shape = list(frames.shape)
    if len(shape) != 4 or shape[0] not in FRAME_COUNTS or tuple(shape[1:3]) not in SUPPORTED_SIZES or shape[3] != 3:
        raise RequestError(
            f"FRAMES must be RGB [F, H, W, 3] with F one of {_counts(FRAME_COUNTS)} (8 x seconds + 1 at {FPS} fps, "
            f"or 1) and H x W one of {_sizes(SUPPORTED_SIZES)}; got {shape}"
        )


def check_sample_rate(sample_rate: int) -> None:
    """SAMPLE_RATE: one of the allowed rates (Hz)."""
    if sample_rate not in SAMPLE_RATES:
        raise RequestError(f"SAMPLE_RATE must be one of {', '.join(map(str, SAMPLE_RATES))} Hz, got {sample_rate}")


def check_audio(audio: torch.Tensor, sample_rate: int) -> None:
    """AUDIO: mono float32 [N], 1 <= N <= 13 s at `sample_rate` (already checked), finite."""
    check_dtype("AUDIO", audio, torch.float32)
    longest = MAX_AUDIO_SECONDS * sample_rate
    if audio.dim() != 1 or not 1 <= audio.shape[0] <= longest:
        raise RequestError(
            f"AUDIO must be mono samples [N] with 1 <= N <= {longest} ({MAX_AUDIO_SECONDS} s at {sample_rate} Hz), "
            f"got {list(audio.shape)}"
        )
    check_finite("AUDIO", audio)


def check_t2v_clip(frames: torch.Tensor) -> None:
    """FRAMES for V2A from t2v's vae_decoder: FRAMES of a supported bucket lasting at least one second (V2A makes
    sound for the whole seconds of the video; a 0 s video is a single image)."""
    check_frames(frames)
    if frames.shape[0] < FPS + 1:
        raise RequestError(
            f"FRAMES must last at least 1 s ({FPS + 1} frames at {FPS} fps) to get sound, got {frames.shape[0]} "
            "frame(s): V2A makes sound for whole seconds of video"
        )


def check_fps(fps: float) -> None:
    """FPS: the frame rate of an uploaded clip, finite, above 0 and at most the upload limit."""
    if not math.isfinite(fps) or not 0 < fps <= UPLOAD_LIMITS.max_fps:
        raise RequestError(f"FPS must be a frame rate above 0 and at most {UPLOAD_LIMITS.max_fps:g}, got {fps:g}")


def check_uploaded_clip(frames: torch.Tensor, fps: float) -> None:
    """FRAMES at FPS of an uploaded clip: uint8 RGB [F >= 1, H, W, 3] of an even size within the upload limits."""
    check_fps(fps)
    check_dtype("FRAMES", frames, torch.uint8)
    check_clip_frames(frames.cpu().numpy(), fps, UPLOAD_LIMITS)


def check_clip_seconds(seconds: int) -> None:
    """CLIP_SECONDS: the whole seconds of the clip the audio is made for, 1..12."""
    if seconds not in CLIP_SECONDS:
        raise RequestError(
            f"CLIP_SECONDS must be a whole number from 1 to {MAX_CLIP_SECONDS} (the trimmed clip's, as "
            f"v2a_encoder returns it), got {seconds}"
        )


def check_v2a_features(prompt: torch.Tensor, video: torch.Tensor, feature_dim: int) -> None:
    """PROMPT_FEATURES float32 [2, 100, D] and VIDEO_FEATURES float32 [2, 96, D] ([uncond; cond], D the UNet's
    feature width), finite."""
    expected = {"PROMPT_FEATURES": (prompt, PROMPT_TOKENS), "VIDEO_FEATURES": (video, CONDITIONING_FRAMES)}
    for name, (features, rows) in expected.items():
        check_dtype(name, features, torch.float32)
        if list(features.shape) != [2, rows, feature_dim]:
            raise RequestError(
                f"{name} must be [2, {rows}, {feature_dim}] ([uncond; cond] as v2a_encoder returns them, "
                f"{feature_dim} the loaded model's width), got {list(features.shape)}"
            )
    for name, (features, _) in expected.items():
        check_finite(name, features)


def check_audio_latents(latents: torch.Tensor, channels: int, rows: int) -> None:
    """AUDIO_LATENTS: float32 [channels, rows, w] with w the latent width of 1..12 s, finite."""
    check_dtype("AUDIO_LATENTS", latents, torch.float32)
    shape = list(latents.shape)
    if len(shape) != 3 or shape[:2] != [channels, rows] or shape[2] not in AUDIO_LATENT_WIDTHS:
        raise RequestError(
            f"AUDIO_LATENTS must be [{channels}, {rows}, w] with w one of {_counts(AUDIO_LATENT_WIDTHS)} (1 to "
            f"{MAX_CLIP_SECONDS} s, as v2a_sampler returns them); got {shape}"
        )
    check_finite("AUDIO_LATENTS", latents)
