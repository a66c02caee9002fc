"""Probing an mp4 with ffmpeg itself (test helper): its stream description, its audio decoded back, its frames."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from k4serve.pipelines.video_io import decode_mp4

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def probe_mp4(data: bytes, tmp_path: Path) -> tuple[str, np.ndarray, int]:
    """(ffmpeg's description of the streams, the audio decoded back to int16 at its own rate, video frames)."""
    path = tmp_path / "probe.mp4"
    path.write_bytes(data)
    info = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    audio = subprocess.run(
        [FFMPEG, "-loglevel", "error", "-i", str(path), "-map", "0:a", "-f", "s16le", "-"], capture_output=True
    ).stdout
    return info, np.frombuffer(audio, np.int16), len(decode_mp4(data)[0])
