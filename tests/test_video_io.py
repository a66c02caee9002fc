"""mp4 writing: the chunk-fed encoder against the one-shot one, decoded back; failures and early exits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from k4serve.pipelines.video_io import (
    DEFAULT_MP4_PRESET,
    FPS,
    MP4_PRESETS,
    Mp4Encoder,
    decode_mp4,
    encode_mp4,
    mp4_settings,
)


def moving_gradient(frames: int, height: int = 64, width: int = 96) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x + 5 * i) % 256, (y + 3 * i) % 256, (x + y) % 256], -1) for i in range(frames)])


def test_chunks_fed_while_encoding_give_the_one_shot_video():
    frames = moving_gradient(9).astype(np.uint8)
    with Mp4Encoder(64, 96) as encoder:
        for chunk in (frames[:1], frames[1:5], frames[5:]):  # the VAE's chunk pattern: 1 + 4k frames
            encoder.write(chunk)
        streamed = encoder.finish()
    decoded, fps = decode_mp4(streamed)
    assert decoded.shape == frames.shape and fps == FPS
    np.testing.assert_array_equal(decoded, decode_mp4(encode_mp4(frames))[0])
    mse = ((decoded.astype(float) - frames) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 35  # crf 5: near-lossless, bar the 4:2:0 chroma


def x264_options(mp4: bytes) -> str:
    """The encoder settings x264 writes into its stream (an SEI message: 'options: cabac=1 ref=3 ...')."""
    return re.search(rb"x264 - core .*? options: ([ -~]*)", mp4).group(1).decode()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255**2 / ((a.astype(float) - b) ** 2).mean())


def test_official_preset_is_x264_medium_crf_5_and_the_default_keeps_its_psnr():
    frames = (moving_gradient(9) + np.random.default_rng(0).integers(0, 8, (9, 64, 96, 3))).astype(np.uint8)
    official = encode_mp4(frames, x264=mp4_settings("official"))
    default = encode_mp4(frames)
    # x264's medium preset: CABAC, 3 refs, hex search, subme 7, 3 B-frames (the official writer's defaults)
    assert re.search(r"cabac=1 ref=3 .* me=hex subme=7 .* bframes=3 .* crf=5\.0", x264_options(official))
    preset = MP4_PRESETS[DEFAULT_MP4_PRESET]
    assert f"crf={preset.crf}.0" in x264_options(default) and x264_options(default) != x264_options(official)
    loss = psnr(decode_mp4(official)[0], frames) - psnr(decode_mp4(default)[0], frames)
    assert loss < 0.5  # dB: the rule the default was chosen by (benchmarks/encode.py)
    with pytest.raises(ValueError, match=r"unknown mp4 preset 'slow'; choose one of \['fast', 'official'\]"):
        mp4_settings("slow")


def test_close_before_finish_stops_ffmpeg_and_removes_its_files():
    encoder = Mp4Encoder(64, 96)
    encoder.write(moving_gradient(4).astype(np.uint8))
    folder = Path(encoder.path).parent
    encoder.close()  # e.g. the client cancelled mid-decode
    assert encoder._process.poll() is not None and not folder.exists()


def test_ffmpeg_failure_is_reported_with_its_message():
    with Mp4Encoder(64, 95) as encoder:  # H.264 4:2:0 needs even sizes
        encoder.write(np.zeros((2, 64, 95, 3), np.uint8))
        with pytest.raises(RuntimeError, match="ffmpeg failed to encode 2 frames: .*divisible by 2"):
            encoder.finish()


def test_a_chunk_of_another_size_is_refused():
    with Mp4Encoder(64, 96) as encoder, pytest.raises(ValueError, match=r"frames are \[64, 64, 3\]"):
        encoder.write(np.zeros((1, 64, 64, 3), np.uint8))
