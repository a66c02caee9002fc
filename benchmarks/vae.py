"""CogVideoX VAE decode on one GPU: torch norms vs the fused Triton GroupNorm + modulation + SiLU kernel.

    python benchmarks/vae.py --seconds 12 --size 384x672

The full-size decoder (CogVideoX-5b's shape, random weights) decodes the latents of one video in bf16 with each
norm path; the float32 torch decode of the same latents is the reference both are measured against (relative
error of the video, and how many uint8 frame values differ from the reference's). Medians of `--repeat` runs
after a warm-up; the table is printed and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from results import append_table

from k4serve.cli_options import parse_size
from k4serve.models.cogvideox_vae import build_cogvideox_decoder
from k4serve.pipelines.t2v import latent_shape


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """The pipeline's float -> uint8 conversion (truncating, as the official writer)."""
    return (255.0 * ((video.float() + 1.0) / 2.0).clip(0.0, 1.0)).to(torch.uint8)


def time_decode(decoder, z: torch.Tensor, repeat: int) -> tuple[torch.Tensor, float, float]:
    """(video, median seconds, peak GiB) of decoder.decode(z)."""
    decoder.decode(z)  # warm-up: cuDNN heuristics, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        video = decoder.decode(z)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return video, statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--size", type=parse_size, default=(384, 672))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    height, width = args.size
    t, h, w, c = latent_shape(height, width, args.seconds)
    z = torch.randn(1, c, t, h, w, device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    with torch.no_grad():
        decoder, _ = build_cogvideox_decoder("cogvideox-5b", "cuda", torch.float32, seed=0)
        torch.backends.cudnn.allow_tf32 = False  # a true float32 reference (cuDNN convs default to TF32)
        reference = decoder.decode(z)
        torch.backends.cudnn.allow_tf32 = True
        reference_frames = to_uint8(reference)
        decoder = decoder.to(torch.bfloat16)
        rows = []
        for norms in ("torch", "triton"):
            decoder.use_triton_norms(norms == "triton")
            video, seconds, peak = time_decode(decoder, z.to(torch.bfloat16), args.repeat)
            error = ((video.double() - reference.double()).norm() / reference.double().norm()).item()
            differing = (to_uint8(video) != reference_frames).double().mean().item()
            rows.append((norms, seconds, peak, error, differing))
            del video

    frames = reference.shape[2]
    header = (
        "| norms (bf16) | decode s | × torch | peak GiB | rel. error vs fp32 | uint8 values ≠ fp32's |\n"
        "|---|---|---|---|---|---|"
    )
    lines = [
        f"| {norms} | {seconds:.3f} | {rows[0][1] / seconds:.2f} | {peak:.1f} | {error:.2e} | {differing:.2%} |"
        for norms, seconds, peak, error, differing in rows
    ]
    table = "\n".join([header, *lines])
    print(table)
    if not args.no_write:
        command = f"python benchmarks/vae.py --seconds {args.seconds} --size {height}x{width} --repeat {args.repeat}"
        title = f"CogVideoX VAE decode, {args.seconds} s {height}x{width} ({frames} frames), random weights"
        append_table(title, command, f"median of {args.repeat} after a warm-up", table)


if __name__ == "__main__":
    main()
