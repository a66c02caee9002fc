"""Frames in and out of files: H.264 mp4 (optionally with AAC audio) and PNG, through imageio-ffmpeg's ffmpeg.

Audio and video timing (README "Video to audio: timing"): by default the video keeps its frame rate and the
audio is padded with silence (or cut) to the video's length, so every frame plays at its own time and the
AAC stream ends with the last frame; `timing="retime"` reproduces the official instead, which keeps the
audio and plays the frames at n_frames / audio_seconds fps (moviepy's `ImageSequenceClip(fps=...)`).
"""

from __future__ import annotations

import contextlib
import queue
import struct
import subprocess
import tempfile
import threading
import wave
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import imageio_ffmpeg
import numpy as np

FPS = 8  # the official T2V frame rate
SAMPLE_RATE = 44100  # of audio given without one
AudioTiming = Literal["pad", "retime"]


@dataclass(frozen=True)
class X264Settings:
    """libx264's speed preset and constant rate factor (lower: closer to the frames, larger files)."""

    preset: str
    crf: int


# `official`: the official writer (torchvision's write_video with crf 5 at x264's default preset, medium).
# `fast`: the default, picked by benchmarks/encode.py as the fastest setting whose PSNR against the source frames
# stays within 0.5 dB of the official one's (RESULTS.md, "H.264 encode settings": +0.14 dB, ~5x faster, files
# ~1.5x larger: ultrafast drops CABAC and B-frames).
MP4_PRESETS: dict[str, X264Settings] = {
    "official": X264Settings("medium", 5),
    "fast": X264Settings("ultrafast", 5),
}
DEFAULT_MP4_PRESET = "fast"


def mp4_settings(name: str) -> X264Settings:
    """The x264 settings of an mp4 preset name; ValueError naming the choices for any other."""
    if name not in MP4_PRESETS:
        raise ValueError(f"unknown mp4 preset {name!r}; choose one of {sorted(MP4_PRESETS)}")
    return MP4_PRESETS[name]


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")


class Mp4Encoder:
    """H.264 (yuv420p) + optional AAC mp4 through ffmpeg, fed frame chunks as they come.

    A thread feeds ffmpeg's stdin, so `write` returns at once and ffmpeg encodes on the CPU while the caller
    decodes the next chunk on the GPU. `finish()` returns the mp4 bytes. Audio (mono float in [-1, 1]) is
    muxed as given: fit it to the video first (`fit_audio_to_video`, or `encode_mp4` does it). No `-shortest`:
    it drops the last video frame when both streams have the same length.
    """

    def __init__(self, height: int, width: int, fps: float | Fraction = FPS, audio: np.ndarray | None = None,
                 sample_rate: int = SAMPLE_RATE, x264: X264Settings = MP4_PRESETS[DEFAULT_MP4_PRESET]):  # fmt: skip
        self.shape = (height, width, 3)
        self.frames = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="k4serve-mp4-")
        tmp = Path(self._tmp.name)
        self.path = tmp / "out.mp4"
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
        if audio is not None:
            write_wav(tmp / "audio.wav", audio, sample_rate)
            cmd += ["-i", str(tmp / "audio.wav"), "-c:a", "aac"]
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", x264.preset, "-crf", str(x264.crf)]
        cmd += ["-movflags", "+faststart", str(self.path)]
        self._log = (tmp / "ffmpeg.log").open("wb")  # a file, not a pipe: ffmpeg never blocks on its stderr
        self._process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log)
        self._chunks: queue.Queue[np.ndarray | None] = queue.Queue()
        self._feeder = threading.Thread(target=self._feed, name="mp4-feeder", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        try:
            while (chunk := self._chunks.get()) is not None:
                self._process.stdin.write(memoryview(chunk))
        except BrokenPipeError:  # ffmpeg exited; finish() reports its log
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.close()

    def write(self, frames: np.ndarray) -> None:
        """Queue uint8 frames [F, H, W, 3] for encoding (not copied: leave them unchanged until finish())."""
        _check_frames(frames)
        if frames.shape[1:] != self.shape:
            raise ValueError(f"frames are {list(frames.shape[1:])}, this encoder takes {list(self.shape)}")
        self.frames += len(frames)
        self._chunks.put(np.ascontiguousarray(frames))

    def finish(self) -> bytes:
        """Wait for ffmpeg and return the mp4 bytes; raise RuntimeError with ffmpeg's message if it failed."""
        self._chunks.put(None)
        self._feeder.join()
        try:
            if self._process.wait() != 0:
                log = (Path(self._tmp.name) / "ffmpeg.log").read_text(errors="replace")
                raise RuntimeError(f"ffmpeg failed to encode {self.frames} frames: {log}")
            return self.path.read_bytes()
        finally:
            self.close()

    def close(self) -> None:
        """Stop ffmpeg if it still runs (the caller gave up) and remove the files; safe to call again."""
        if self._process.poll() is None:
            self._process.kill()
        self._chunks.put(None)
        self._feeder.join()
        self._process.wait()
        self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> Mp4Encoder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def encode_mp4(
    frames: np.ndarray,
    fps: float = FPS,
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
    timing: AudioTiming = "pad",
    x264: X264Settings = MP4_PRESETS[DEFAULT_MP4_PRESET],
) -> bytes:
    """uint8 frames [F, H, W, 3] (+ mono float audio in [-1, 1]) -> mp4 bytes (H.264 yuv420p, AAC).

    timing "pad": the video keeps `fps`, the audio is padded with silence or cut to F / fps; "retime": the audio
    is kept and the frames play at F / audio_seconds fps (the official). Either way the streams end together.
    """
    _check_frames(frames)
    if audio is not None:
        if timing == "pad":
            audio = fit_audio_to_video(audio, len(frames), fps, sample_rate)
        elif timing == "retime":
            fps = retimed_fps(len(frames), len(audio), sample_rate)
        else:
            raise ValueError(f"timing must be 'pad' or 'retime', got {timing!r}")
    with Mp4Encoder(frames.shape[1], frames.shape[2], fps, audio, sample_rate, x264) as encoder:
        encoder.write(frames)
        return encoder.finish()


def fit_audio_to_video(audio: np.ndarray, n_frames: int, fps: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono audio [N] -> [round(n_frames / fps * sample_rate)]: silence appended, or the tail cut."""
    length = round(n_frames * sample_rate / fps)
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)[:length]
    return np.pad(audio, (0, length - len(audio)))


def retimed_fps(n_frames: int, n_samples: int, sample_rate: int = SAMPLE_RATE) -> Fraction:
    """The official frame rate for muxing: n_frames spread over the audio's duration (exact, as a fraction)."""
    if n_samples <= 0:
        raise ValueError("retiming needs audio with at least one sample")
    return Fraction(n_frames * sample_rate, n_samples)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Mono float audio in [-1, 1] -> 16-bit PCM wav; x * 32768 rounded, so int16 / 32768 audio round-trips."""
    pcm = np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """mp4 bytes -> (uint8 frames [F, H, W, 3], fps)."""
    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
        tmp.write(data)
        tmp.flush()
        reader = imageio_ffmpeg.read_frames(tmp.name, pix_fmt="rgb24")
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(frame, np.uint8).reshape(h, w, 3) for frame in reader]
    return np.stack(frames), float(meta["fps"])


def encode_png(frame: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (8-bit RGB, no filtering)."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"a PNG frame must be uint8 [H, W, 3], got {frame.dtype} {list(frame.shape)}")
    h, w, _ = frame.shape

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = np.concatenate([np.zeros((h, 1), np.uint8), frame.reshape(h, w * 3)], axis=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )
