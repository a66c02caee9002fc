"""Uploaded videos for V2A: probe, check against limits, decode from bytes, trim as the official `load_video`.

The official reads the whole file with `torchvision.io.read_video` (every decoded frame, no frame-rate
conversion, no rotation) and then keeps the first `int(n / fps)` whole seconds, at most 12
(`kandinsky4_video2audio/utils.py load_video`). We decode with the ffmpeg of imageio-ffmpeg the same way
(`-fps_mode passthrough -noautorotate`), but only as many frames as that trim can keep, and only after the
container's metadata has passed the limits, so an upload cannot make the server decode an hour of 4K video.
The frame rate is ffmpeg's average rate as it prints it (two decimals: 29.97 for 30000/1001), which gives
the official's trim (computed from the exact rate) for integer rates and for 24000/1001, 30000/1001 and
60000/1001 at every duration up to 12 s.
"""

from __future__ import annotations

import numbers
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from k4serve.models.frame_sampling import MAX_DURATION_S as MAX_SECONDS
from k4serve.models.frame_sampling import official_trim
from k4serve.pipelines.t2v import RequestError


class MediaError(RequestError):
    """An upload V2A cannot use; the message says what is wrong and what to send instead."""


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be; everything is checked from the container's metadata before decoding."""

    max_bytes: int = 256 * 2**20  # the upload itself
    max_pixels: int = 1920 * 1088  # width x height of one frame (1080p)
    max_fps: float = 120.0
    max_decoded_bytes: int = 6 * 2**30  # the RGB frames of the kept seconds (12 s of 1080p60: 4.5 GiB)
    timeout_s: float = 300.0  # for probing and decoding each


@dataclass(frozen=True)
class VideoStream:
    """What ffmpeg says about an upload's first video stream."""

    index: int  # the stream's index in the container
    codec: str
    width: int
    height: int
    fps: float
    container: str  # ffmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    duration_s: float | None  # of the container; None when ffmpeg cannot tell


@dataclass(frozen=True)
class TrimmedVideo:
    """A video cut to whole seconds as the official `load_video` does; the V2A input and its output's frames."""

    frames: np.ndarray  # uint8 [F, H, W, 3] with F = int(seconds * fps)
    fps: float
    seconds: int  # the audio duration to generate (1..12)
    trimmed: bool  # frames were dropped: the video was longer than `seconds`
    source_seconds: float  # the input's duration

    @property
    def notice(self) -> str | None:
        """A sentence for the response when frames were dropped."""
        if not self.trimmed:
            return None
        return (
            f"the video was trimmed from {self.source_seconds:.2f} s to its first {self.seconds} s "
            f"({len(self.frames)} frames at {self.fps:g} fps): V2A works on whole seconds, at most {MAX_SECONDS}"
        )


def trim_video(
    frames: np.ndarray, fps: float, source_seconds: float | None = None, max_seconds: int = MAX_SECONDS
) -> TrimmedVideo:
    """uint8 frames [N, H, W, 3] at fps -> the official trim; MediaError if less than one whole second."""
    seconds, kept = official_trim(len(frames), fps, max_seconds)
    if seconds < 1:
        raise MediaError(
            f"the video is shorter than 1 s ({len(frames)} frames at {fps:g} fps): V2A needs at least one second"
        )
    source = len(frames) / fps if source_seconds is None else source_seconds
    return TrimmedVideo(frames[:kept], fps, seconds, trimmed=kept < len(frames), source_seconds=source)


def clip_seconds(n_frames: int, fps: float, max_seconds: int = MAX_SECONDS) -> int:
    """The whole seconds of a clip that `trim_video` kept: the smallest s with int(s * fps) == n_frames.

    Not a second trim: trimming is not idempotent (12 s at 29.97 fps keeps 359 frames, which would trim to 11 s),
    so frames are trimmed once, where they are decoded, and later stages recover the seconds from the count.
    MediaError for frames that are no such clip."""
    for seconds in range(1, max_seconds + 1):
        if int(seconds * fps) == n_frames:
            return seconds
    raise MediaError(
        f"{n_frames} frames at {fps:g} fps are not a clip of whole seconds (1 to {max_seconds}): trim the video "
        "first (trim_video / decode_video keep int(s * fps) frames of its first s = min(int(n / fps), 12) seconds)"
    )


def check_frames(frames: np.ndarray, fps: float, limits: UploadLimits = UploadLimits()) -> None:
    """MediaError naming the fix unless `frames` are uint8 RGB [F >= 1, H, W, 3] at a positive fps, within the
    upload limits and of an even size (what decode_video guarantees for an uploaded file)."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        got = f"{frames.dtype} {list(frames.shape)}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise MediaError(f"frames must be a uint8 RGB array [frames, height, width, 3], got {got}")
    if len(frames) == 0 or 0 in frames.shape[1:3]:
        raise MediaError(f"no frames (shape {list(frames.shape)}): send at least one second of video")
    if not isinstance(fps, numbers.Real) or not fps > 0:
        raise MediaError(f"the frame rate must be a positive number of frames per second, got {fps!r}")
    stream = VideoStream(0, "rawvideo", frames.shape[2], frames.shape[1], float(fps), "frames", len(frames) / fps)
    check_limits(stream, len(frames), limits)


def decode_video(data: bytes, limits: UploadLimits = UploadLimits(), max_seconds: int = MAX_SECONDS) -> TrimmedVideo:
    """Video file bytes (any container ffmpeg reads) -> its first whole seconds, trimmed as the official.

    Raises MediaError (a RequestError: INVALID_ARGUMENT) for empty or oversized input, input that is not a
    video, a still image, no video stream, sizes or rates past `limits`, odd sizes, or no decodable frame.
    """
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise MediaError("the upload is empty: send the bytes of a video file (mp4, webm, mkv, mov, ...)")
    if len(data) > limits.max_bytes:
        raise MediaError(f"the upload has {len(data)} bytes; at most {limits.max_bytes} are accepted")
    with tempfile.TemporaryDirectory(prefix="k4serve-upload-") as tmp:
        path = Path(tmp) / "upload"  # no extension: ffmpeg recognises the container by its content
        path.write_bytes(data)
        stream = probe_video(path, limits.timeout_s)
        max_frames = int(max_seconds * stream.fps) + 1  # one past what the trim can keep: tells if it trimmed
        check_limits(stream, max_frames, limits)
        frames = _decode_frames(path, stream, max_frames, limits.timeout_s)
    if len(frames) == 0:
        raise MediaError("the video stream has no decodable frames: send a video with at least one second of frames")
    source_seconds = stream.duration_s if stream.duration_s is not None else len(frames) / stream.fps
    return trim_video(frames, stream.fps, source_seconds, max_seconds)


def check_limits(stream: VideoStream, max_frames: int, limits: UploadLimits) -> None:
    """MediaError naming the limit for a stream too large to decode, or that the mp4 writer cannot encode."""
    w, h = stream.width, stream.height
    if w * h > limits.max_pixels:
        raise MediaError(f"frames are {w}x{h}; at most {limits.max_pixels} pixels per frame are accepted: scale down")
    if stream.fps > limits.max_fps:
        raise MediaError(f"the frame rate is {stream.fps:g} fps; at most {limits.max_fps:g} is accepted")
    decoded = max_frames * w * h * 3
    if decoded > limits.max_decoded_bytes:
        raise MediaError(
            f"{max_frames} frames of {w}x{h} would take {decoded} bytes decoded (at most "
            f"{limits.max_decoded_bytes}): lower the resolution or the frame rate"
        )
    if w % 2 or h % 2:
        raise MediaError(f"frames are {w}x{h}; H.264 4:2:0 output needs an even width and height: crop or scale")


def probe_video(path: str | Path, timeout_s: float = UploadLimits.timeout_s) -> VideoStream:
    """The first video stream of a file, from `ffmpeg -i`; MediaError if there is none or it is a still image."""
    try:
        result = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
            capture_output=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as error:
        raise MediaError(f"reading the upload's metadata took more than {timeout_s:g} s") from error
    return parse_ffmpeg_probe(result.stderr.decode(errors="replace"))


def parse_ffmpeg_probe(log: str) -> VideoStream:
    """Parse the input description ffmpeg prints for `-i FILE` (see probe_video)."""
    container = re.search(r"^Input #0, (.+), from '", log, re.MULTILINE)
    if container is None:
        reason = log.strip().splitlines()[-1] if log.strip() else "no output"
        raise MediaError(f"the upload is not a video ffmpeg can read ({reason})")
    container = container.group(1)
    streams = [
        line
        for line in log.splitlines()
        if re.match(r"\s*Stream #0:\d+", line) and ": Video: " in line and "(attached pic)" not in line
    ]
    if not streams:
        raise MediaError(f"the upload ({container}) has no video stream: send a file with video frames")
    if container == "image2" or container.endswith("_pipe"):
        raise MediaError(f"the upload is a still image ({container}), not a video")
    line = streams[0]
    # "h264 (High) (avc1 / 0x31637661), yuv420p(progressive), 64x48 [SAR 1:1 DAR 4:3], 30 fps, 30 tbr, ..."
    fields = [f.strip() for f in re.split(r",(?![^()\[\]]*[)\]])", line.split(": Video: ", 1)[1])]
    size = next((m for f in fields if (m := re.match(r"(\d+)x(\d+)\b", f))), None)
    rates = {
        m.group(3): float(m.group(1)) * (1000 if m.group(2) else 1)
        for f in fields
        if (m := re.fullmatch(r"(\d+(?:\.\d+)?)(k?) (fps|tbr)", f))
    }
    fps = rates.get("fps") or rates.get("tbr")
    if size is None or not fps:
        raise MediaError(f"ffmpeg cannot tell the video's size or frame rate: {line.strip()}")
    duration = re.search(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", log)
    return VideoStream(
        index=int(re.match(r"\s*Stream #0:(\d+)", line).group(1)),
        codec=fields[0].split()[0],
        width=int(size.group(1)),
        height=int(size.group(2)),
        fps=fps,
        container=container,
        duration_s=None if duration is None else 3600 * int(duration[1]) + 60 * int(duration[2]) + float(duration[3]),
    )


def _decode_frames(path: Path, stream: VideoStream, max_frames: int, timeout_s: float) -> np.ndarray:
    """At most max_frames RGB frames [F, H, W, 3] of the stream, read straight into one array."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-noautorotate", "-i", str(path)]
    cmd += ["-map", f"0:{stream.index}", "-frames:v", str(max_frames), "-fps_mode", "passthrough"]
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    frames = np.empty((max_frames, stream.height, stream.width, 3), np.uint8)
    buffer = memoryview(frames).cast("B")
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: ffmpeg never blocks on its stderr
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        timed_out = threading.Event()
        watchdog = threading.Timer(timeout_s, lambda: (timed_out.set(), process.kill()))
        watchdog.start()
        try:
            filled = 0
            while filled < len(buffer) and (n := process.stdout.readinto(buffer[filled:])):
                filled += n
            process.stdout.close()
            returncode = process.wait()
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        log.seek(0)
        message = log.read().decode(errors="replace").strip()
    if timed_out.is_set():
        raise MediaError(f"decoding the video took more than {timeout_s:g} s")
    reason = message.splitlines()[-1] if message else f"exit status {returncode}"
    if returncode != 0 and filled == 0:
        raise MediaError(f"the video stream has no decodable frames (ffmpeg: {reason})")
    if returncode != 0:
        raise MediaError(f"ffmpeg could not decode the video: {reason}")
    frame_bytes = stream.height * stream.width * 3
    if filled % frame_bytes:
        raise MediaError(f"the decoded frames are not {stream.width}x{stream.height} as the container says")
    return frames[: filled // frame_bytes]
