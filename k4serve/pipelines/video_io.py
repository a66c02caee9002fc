"""Frames in and out of files: H.264 mp4 (optionally with AAC audio) and PNG, through imageio-ffmpeg's ffmpeg."""

from __future__ import annotations

import struct
import subprocess
import tempfile
import wave
import zlib
from pathlib import Path

import imageio_ffmpeg
import numpy as np

FPS = 8  # the official T2V frame rate
CRF = 5  # the official writer's quality setting (near-lossless H.264)


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")


def encode_mp4(
    frames: np.ndarray, fps: float = FPS, audio: np.ndarray | None = None, sample_rate: int = 44100
) -> bytes:
    """uint8 frames [F, H, W, 3] (+ mono float audio in [-1, 1]) -> mp4 bytes (H.264 yuv420p, AAC)."""
    _check_frames(frames)
    f, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="k4serve-mp4-") as tmp:
        out = Path(tmp) / "out.mp4"
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-"]
        if audio is not None:
            wav = Path(tmp) / "audio.wav"
            write_wav(wav, audio, sample_rate)
            cmd += ["-i", str(wav), "-c:a", "aac", "-shortest"]
        cmd += [
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            str(CRF),
            "-movflags",
            "+faststart",
            str(out),
        ]
        result = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"ffmpeg failed to encode {f} frames: {result.stderr.decode(errors='replace')}")
        return out.read_bytes()


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Mono float audio in [-1, 1] -> 16-bit PCM wav."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
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


def write_output(path: str | Path, frames: np.ndarray, fps: float = FPS) -> Path:
    """Write frames to `path`: a PNG for a single image (seconds = 0), else an mp4."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(frames[0]) if len(frames) == 1 else encode_mp4(frames, fps))
    return path
