"""Which frames of an uploaded video V2A sees: the official `load_video` (kandinsky4_video2audio/utils.py).

The clip is cut to whole seconds (at most 12), and 96 frames are spread evenly over what is kept. Pure functions
on frame counts, so the media code (decoding, muxing) and the CogVLM2 encoder share one definition.
"""

from __future__ import annotations

import numpy as np

NUM_FRAMES = 96  # frames the official pipeline samples for CogVLM2-Video
MAX_DURATION_S = 12  # longer uploads are cut to their first 12 s


def trimmed_clip(n_frames: int, fps: float, max_s: int = MAX_DURATION_S) -> tuple[int, int]:
    """(duration_s, frames kept): whole seconds int(n/fps) capped at `max_s`, and the int(duration·fps) first
    frames the official keeps (for sampling and for the output video). A clip under one second is an error."""
    if n_frames < 1 or not fps > 0:
        raise ValueError(f"a video needs at least one frame and a positive frame rate (got {n_frames} at {fps} fps)")
    duration_s = min(int(n_frames / fps), max_s)
    if duration_s < 1:
        raise ValueError(
            f"the video lasts {n_frames / fps:.2f} s ({n_frames} frames at {fps} fps); V2A needs at least 1 s"
        )
    return duration_s, int(duration_s * fps)


def sample_frame_indices(n_frames: int, fps: float, num: int = NUM_FRAMES, max_s: int = MAX_DURATION_S) -> np.ndarray:
    """The `num` frame indices the official samples: linspace(0, kept - 1, num) truncated to int (repeats allowed
    when fewer frames are kept than sampled)."""
    _, kept = trimmed_clip(n_frames, fps, max_s)
    return np.linspace(0, kept - 1, num).astype(int)
