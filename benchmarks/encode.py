"""H.264 encode settings for the T2V mp4: x264 preset x crf -> time, PSNR, size; the official writer as reference.

    python benchmarks/encode.py                                   # synthetic 97 x 384 x 672 frames
    python benchmarks/encode.py --frames video.mp4 --repeat 3     # or real frames (an mp4, or a uint8 .npy)

Each setting encodes the same frames through `k4serve.pipelines.video_io.encode_mp4` (the pipeline's encoder:
ffmpeg's libx264, yuv420p, all cores), decoded back with ffmpeg. Columns: median wall time of `--repeat` encodes,
PSNR of the decoded clip against the source frames (RGB, over all frames), PSNR against the official setting's
decoded clip, the mp4's size. The official writer (x264 medium, crf 5) is the reference row: a setting may replace
it as the default when its PSNR vs the source is within 0.5 dB of the official one's. No GPU is used; the table is
printed last and appended to benchmarks/RESULTS.md with the CPU it ran on.

The synthetic clip stands in for VAE output: a smooth colour field and soft-edged discs in motion over a panning
band-limited texture, with light per-frame grain (x264 must code detail, motion and noise, as in decoded video).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from results import append_table

from k4serve.cli_options import parse_size
from k4serve.pipelines.video_io import MP4_PRESETS, X264Settings, decode_mp4, encode_mp4

PRESETS = ("medium", "fast", "faster", "veryfast", "superfast", "ultrafast")
CRFS = (1, 3, 5, 7)
OFFICIAL = MP4_PRESETS["official"]
MAX_PSNR_LOSS_DB = 0.5


def synthetic_frames(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [F, H, W, 3]: moving smooth colour, moving discs, a panning 1/f texture and grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    # band-limited texture, 1/f spectrum, twice the width so it can pan
    noise = np.fft.rfft2(rng.standard_normal((height, 2 * width)))
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(2 * width)[None, :]
    texture = np.fft.irfft2(noise / np.maximum(np.hypot(fy, fx), 1.0 / width), s=(height, 2 * width))
    texture = (texture / texture.std()).astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    discs = rng.uniform(0.1, 0.9, size=(4, 6))  # x0, y0, vx, vy, radius, hue per disc
    for f in range(frames):
        phase = f / frames
        pan = int(2 * f) % width
        detail = 22.0 * texture[:, pan : pan + width]
        image = np.stack(
            [
                128 + 70 * np.sin(2 * np.pi * (1.3 * x + 0.4 * y + phase)) + detail,
                120 + 60 * np.cos(2 * np.pi * (0.7 * y - 0.5 * x - 0.5 * phase)) + 0.8 * detail,
                110 + 50 * np.sin(2 * np.pi * (x * y + 0.8 * phase)) + 0.6 * detail,
            ],
            axis=-1,
        )
        for x0, y0, vx, vy, radius, hue in discs:
            cx, cy = (x0 + 0.3 * (vx - 0.5) * f / 8) % 1.0, (y0 + 0.3 * (vy - 0.5) * f / 8) % 1.0
            inside = 0.5 - 0.5 * np.tanh((np.hypot(x - cx, (y - cy) * height / width) - 0.15 * radius) * 100)
            colour = 255 * np.array([hue, 1 - hue, 0.5 + 0.5 * np.sin(6 * hue)], np.float32)
            image = image * (1 - inside[..., None]) + colour * inside[..., None]
        image += rng.normal(0.0, 1.5, size=image.shape)
        out[f] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def load_frames(path: Path) -> np.ndarray:
    """uint8 [F, H, W, 3] from an mp4 (decoded) or a .npy file."""
    if path.suffix == ".npy":
        return np.load(path)
    return decode_mp4(path.read_bytes())[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 clips over all values."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def measure(frames: np.ndarray, x264: X264Settings, repeat: int) -> tuple[float, bytes]:
    """(median seconds, mp4 bytes) of encoding `frames` with `x264`."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mp4 = encode_mp4(frames, x264=x264)
        times.append(time.perf_counter() - start)
    return statistics.median(times), mp4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=Path, default=None, help="an mp4 or uint8 .npy [F, H, W, 3]; else synthetic")
    parser.add_argument("--num-frames", type=int, default=97, help="synthetic: frames (12 s at 8 fps: 97)")
    parser.add_argument("--size", type=parse_size, default=(384, 672), help="synthetic: HEIGHTxWIDTH")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--crfs", nargs="+", type=int, default=list(CRFS))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    frames = load_frames(args.frames) if args.frames else synthetic_frames(args.num_frames, *args.size)
    settings = [OFFICIAL] + [
        X264Settings(p, c) for p in args.presets for c in args.crfs if X264Settings(p, c) != OFFICIAL
    ]
    rows, official_frames = [], None
    for x264 in settings:
        seconds, mp4 = measure(frames, x264, args.repeat)
        decoded = decode_mp4(mp4)[0]
        if official_frames is None:
            official_frames = decoded
        rows.append((x264, seconds, psnr(decoded, frames), psnr(decoded, official_frames), len(mp4)))
        print(f"{x264.preset} crf {x264.crf}: {seconds:.2f} s, {rows[-1][2]:.2f} dB", flush=True)

    reference_time, reference_psnr, reference_size = rows[0][1], rows[0][2], rows[0][4]
    eligible = [row for row in rows if row[2] >= reference_psnr - MAX_PSNR_LOSS_DB]
    fastest = min(eligible, key=lambda row: row[1])[0]
    header = (
        "| x264 preset | crf | encode s | × official | PSNR vs source dB | Δ vs official dB | PSNR vs official's "
        "output dB | size MB | size × official |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for x264, seconds, to_source, to_official, size in rows:
        mark = " (official)" if x264 == OFFICIAL else " **fastest within 0.5 dB**" if x264 == fastest else ""
        lines.append(
            f"| {x264.preset}{mark} | {x264.crf} | {seconds:.2f} | {reference_time / seconds:.2f} | {to_source:.2f} "
            f"| {to_source - reference_psnr:+.2f} | {to_official:.2f} | {size / 1e6:.1f} "
            f"| {size / reference_size:.2f} |"
        )
    f, h, w, _ = frames.shape
    source = args.frames.name if args.frames else "synthetic"
    table = "\n".join([header, *lines])
    print(table)
    print(f"fastest within {MAX_PSNR_LOSS_DB} dB of the official setting: {fastest.preset} crf {fastest.crf}")
    if not args.no_write:
        command = "python benchmarks/encode.py " + " ".join(
            ([f"--frames {args.frames}"] if args.frames else [f"--num-frames {f}", f"--size {h}x{w}"])
            + ["--presets", *args.presets, "--crfs", *map(str, args.crfs), f"--repeat {args.repeat}"]
        )
        title = f"H.264 encode settings, {f} x {h}x{w} frames ({source}), {os.cpu_count()} CPUs visible"
        load = os.getloadavg()[0]  # the machine may be shared: its load when the run ended
        method = f"median of {args.repeat} encodes, libx264 on all cores, load average {load:.1f} at the end"
        append_table(title, command, method, table)


if __name__ == "__main__":
    main()
