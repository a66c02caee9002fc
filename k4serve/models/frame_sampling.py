"""Which frames of a video V2A sees: the official `load_video` (kandinsky4_video2audio/utils.py).

The clip is cut to whole seconds (at most 12), and 96 frames are spread evenly over what is kept. Pure functions
on frame counts: the one definition the media code (decoding, muxing) and the CogVLM2 encoder share.
"""

from __future__ import annotations

import numpy as np

NUM_FRAMES = 96  # frames the official pipeline samples for CogVLM2-Video (its num_frames=96)
MAX_DURATION_S = 12  # the official max_duration_sec: longer videos are cut to their first 12 s


def official_trim(n_frames: int, fps: float, max_seconds: int = MAX_DURATION_S) -> tuple[int, int]:
    """(seconds, frames kept) of the official load_video: int(n / fps) capped at max_seconds, int(seconds * fps).
    (0, 0) for a clip under one second: the caller says why that is refused."""
    seconds = min(int(n_frames / fps), max_seconds)
    return seconds, int(seconds * fps)


def conditioning_frame_indices(n_frames: int, count: int = NUM_FRAMES) -> np.ndarray:
    """The official `np.linspace(0, n - 1, count, dtype=int)` over the kept frames: `count` frames spread evenly
    (repeats when fewer are kept)."""
    return np.linspace(0, n_frames - 1, count, dtype=int)
