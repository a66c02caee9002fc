"""The VAE's memory-bound NDHWC kernels against torch, and their tilings, at the decoder's shapes.

    python benchmarks/vae_kernels.py

At the feature maps of the full-size decoder's chunks (bf16, channels-last: 128 channels at 384x672, 256 at
192x336, 512 at 96x168): the norm statistics (`group_norm_stats`: one read), the fused norm+SiLU apply (one read,
one write) and the conv-bias add (`add_channel_bias_`: one read, one write) for each tiling in the sweep, and torch's
broadcast bias add (what cuDNN's conv3d runs after every conv) as the reference. Bandwidth counts the bytes the pass
must move. Medians of triton.testing.do_bench; the table is printed and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from results import append_table
from triton.testing import do_bench

from k4serve.kernels import conv_bias, group_norm

SHAPES = [(128, 8, 384, 672), (256, 8, 192, 336), (512, 4, 96, 168)]  # (C, frames, H, W) of one chunk
# norms: (tile elements, warps, statistics programs); the bias add: (tile elements, warps)
NORM_TILINGS = [(tile, 4, 2048) for tile in (2048, 4096, 8192)] + [(4096, 8, 2048), (8192, 8, 2048), (16384, 8, 2048)]
NORM_TILINGS += [(4096, 4, 4096), (4096, 4, 8192)]
BIAS_TILINGS = list(itertools.product([4096, 8192, 16384], [4, 8]))


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=40, return_mode="median")


def measure(c: int, t: int, h: int, w: int) -> list[tuple[str, str, float, float]]:
    """(shape, kernel and tiling, ms, GB/s) rows for one feature-map shape; the module constants restored after."""
    x = torch.randn(1, c, t, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    out = torch.empty_like(x)
    scale, shift = (torch.randn(1, c, 2, h // 8, w // 8, device="cuda", dtype=torch.bfloat16) for _ in "ss")
    weight, bias = torch.ones(c, device="cuda", dtype=torch.bfloat16), torch.randn(c, device="cuda", dtype=x.dtype)
    gigabytes = x.numel() * x.element_size() / 1e9
    shape = f"{c} x {t}x{h}x{w}"
    rows = []
    saved = group_norm.TILE, group_norm.TILE_WARPS, group_norm.STATS_PROGRAMS, conv_bias.TILE, conv_bias.WARPS
    try:
        for tile, warps, programs in NORM_TILINGS:
            group_norm.TILE, group_norm.TILE_WARPS, group_norm.STATS_PROGRAMS = tile, warps, programs
            stats = group_norm.group_norm_stats(x, 32, 1e-6)
            ms = bench(lambda: group_norm.group_norm_stats(x, 32, 1e-6))
            rows.append((shape, f"norm statistics, tile {tile} w{warps} {programs} programs", ms, gigabytes / ms * 1e3))
            ms = bench(lambda stats=stats: group_norm.spatial_norm_silu(x, scale, shift, weight, bias, 32, 1e-6,
                                                                        out=out, stats=stats))  # fmt: skip
            rows.append((shape, f"norm+SiLU apply, tile {tile} w{warps}", ms, 2 * gigabytes / ms * 1e3))
        ms = bench(lambda: x.add_(bias.view(-1, 1, 1, 1)))
        rows.append((shape, "bias add, torch (broadcast add_)", ms, 2 * gigabytes / ms * 1e3))
        for tile, warps in BIAS_TILINGS:
            conv_bias.TILE, conv_bias.WARPS = tile, warps
            ms = bench(lambda: conv_bias.add_channel_bias_(x, bias))
            rows.append((shape, f"bias add, ours, tile {tile} w{warps}", ms, 2 * gigabytes / ms * 1e3))
    finally:
        group_norm.TILE, group_norm.TILE_WARPS, group_norm.STATS_PROGRAMS, conv_bias.TILE, conv_bias.WARPS = saved
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    defaults = (f"defaults: norm tile {group_norm.TILE} w{group_norm.TILE_WARPS} {group_norm.STATS_PROGRAMS} programs, "
                f"bias tile {conv_bias.TILE} w{conv_bias.WARPS}")  # fmt: skip
    rows = [row for shape in SHAPES for row in measure(*shape)]
    table = "\n".join(["| C x frames x H x W | kernel | ms | GB/s |", "|---|---|---|---|"]
                      + [f"| {s} | {k} | {ms:.3f} | {bw:.0f} |" for s, k, ms, bw in rows])  # fmt: skip
    print(table + f"\n{defaults}")
    if not args.no_write:
        append_table("VAE NDHWC kernels vs torch, tilings (bf16)", "python benchmarks/vae_kernels.py",
                     f"medians of triton.testing.do_bench; {defaults}", table)  # fmt: skip


if __name__ == "__main__":
    main()
