"""CogVideoX VAE decode on one GPU: eager, the fused Triton norms, the channels-last engine without and with graphs.

    python benchmarks/vae.py --seconds 12 --size 384x672

The full-size decoder (CogVideoX-5b's shape, random weights) decodes the latents of one video in bf16 on each path:
  eager            the reference module, torch norms (the official decoder's class of kernels)
  triton-norms     the reference module, its norms through the fused NCDHW Triton kernel (yesterday's `fast`)
  channels-last    k4serve.engines.vae.FastVAEDecoder without CUDA graphs (NDHWC convs and norms, no input copies)
  channels-last+graphs               the same with one CUDA graph per chunk shape, torch's convs (the `fast` engine)
  channels-last+graphs+cudnn-bench   and cuDNN timing its conv algorithms once per shape (torch.backends.cudnn)
  channels-last+graphs+cudnn-frontend  the convs by the cuDNN frontend's fastest plan per shape (convs="cudnn")
The float32 decode of the same latents (TF32 off) is the reference every path is measured against: relative error
of the video, and the share of uint8 frame values that differ from the reference's. Medians of `--repeat` decodes
after a warm-up (graph capture included there, timed apart as "first s"); peak memory allocated during the timed
decodes and the most reserved by the path (a CUDA graph's memory pool is reserved, not allocated, between replays);
both include the weights and the float32 reference video (0.3 GiB).
With `--profile`, a second table: GPU kernel time of one decode per channels-last path (without graphs, under
torch.profiler) by kernel family, to show where the time of the decode goes.
Each path runs in try/except; the tables are printed last and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch
from results import append_table
from torch.autograd import DeviceType

from k4serve.cli_options import parse_size
from k4serve.engines.vae import FastVAEDecoder
from k4serve.models.cogvideox_vae import build_cogvideox_decoder
from k4serve.pipelines.t2v import latent_shape

# name -> how to make the decoder object of that path from the bf16 module (eager paths first: the engine turns the
# module's conv weights channels-last in place)
PATHS = {
    "eager": lambda module: module,
    "triton-norms": lambda module: module,
    "channels-last": lambda module: FastVAEDecoder(module, cuda_graphs=False),
    "channels-last+graphs": lambda module: FastVAEDecoder(module),
    "channels-last+graphs+cudnn-bench": lambda module: FastVAEDecoder(module, cudnn_benchmark=True),
    "channels-last+graphs+cudnn-frontend": lambda module: FastVAEDecoder(module, convs="cudnn"),
}


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """The pipeline's float -> uint8 conversion (truncating, as the official writer)."""
    return (255.0 * ((video.float() + 1.0) / 2.0).clip(0.0, 1.0)).to(torch.uint8)


def time_decode(decoder, z: torch.Tensor, repeat: int) -> dict:
    """The video, first-call seconds, median seconds and memory of decoder.decode(z)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    decoder.decode(z)  # warm-up: cuDNN heuristics, Triton compilation, graph capture
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        video = decoder.decode(z)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "video": video,
        "first": first,
        "seconds": statistics.median(times),
        "allocated": torch.cuda.max_memory_allocated() / 2**30,
        "reserved": torch.cuda.max_memory_reserved() / 2**30,
    }


# kernel name fragments (lower case) -> family, first match wins: our Triton kernels, then the libraries' convs
FAMILIES = {
    "moments": "norm statistics",
    "norm_silu": "norm + SiLU",
    "channel_bias": "conv bias",
    "fprop": "convs",
    "conv": "convs",
    "xmma": "convs",
    "cutlass": "convs",
    "sm90": "convs",
    "gemm": "convs",
    "copy": "copies",
    "elementwise": "copies",
    "cat": "copies",
}


def kernel_families(decoder: FastVAEDecoder, z: torch.Tensor) -> dict[str, float]:
    """Seconds of GPU kernel time per family in one ungraphed decode of z."""
    plain = FastVAEDecoder(decoder.decoder, cuda_graphs=False, convs=decoder.convs)
    plain.decode(z)  # plans, Triton compilation
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        plain.decode(z)
        torch.cuda.synchronize()
    seconds = dict.fromkeys([*dict.fromkeys(FAMILIES.values()), "other"], 0.0)
    for event in profile.key_averages():
        if event.device_type == DeviceType.CUDA:
            name = event.key.lower()
            family = next((f for fragment, f in FAMILIES.items() if fragment in name), "other")
            seconds[family] += event.device_time_total / 1e6
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--size", type=parse_size, default=(384, 672))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--profile", action="store_true", help="also the kernel time by family (channels-last paths)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    height, width = args.size
    t, h, w, c = latent_shape(height, width, args.seconds)
    z = torch.randn(1, c, t, h, w, device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    with torch.no_grad():
        module, _ = build_cogvideox_decoder("cogvideox-5b", "cuda", torch.float32, seed=0)
        torch.backends.cudnn.allow_tf32 = False  # a true float32 reference (cuDNN convs default to TF32)
        reference = module.decode(z)
        torch.backends.cudnn.allow_tf32 = True
        reference_frames = to_uint8(reference)
        module = module.to(torch.bfloat16)
        rows, profiles = [], []
        for name in [p for p in PATHS if p in args.paths]:  # in PATHS' order whatever the command line's
            try:
                module.use_triton_norms(name == "triton-norms")
                torch.cuda.empty_cache()  # the previous path's graph pool and conv state
                decoder = PATHS[name](module)
                r = time_decode(decoder, z.to(torch.bfloat16), args.repeat)
                video = r.pop("video")
                r["error"] = ((video.double() - reference.double()).norm() / reference.double().norm()).item()
                r["differing"] = (to_uint8(video) != reference_frames).double().mean().item()
                rows.append((name, r))
                if args.profile and isinstance(decoder, FastVAEDecoder):
                    profiles.append((f"{name} ({decoder.convs} convs)", kernel_families(decoder, z.to(torch.bfloat16))))
                del video, decoder
            except Exception:  # one failing path must not stop the others
                traceback.print_exc()
                rows.append((name, None))
        module.use_triton_norms(False)

    frames = reference.shape[2]
    base = next((r["seconds"] for name, r in rows if name == "eager" and r), None)
    header = (
        "| path (bf16) | decode s | × eager | first s | peak alloc GiB | reserved GiB | rel. error vs fp32 "
        "| uint8 values ≠ fp32's |\n|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for name, r in rows:
        if r is None:
            lines.append(f"| {name} | failed (traceback above) | | | | | | |")
            continue
        speedup = f"{base / r['seconds']:.2f}" if base else "—"
        lines.append(
            f"| {name} | {r['seconds']:.3f} | {speedup} | {r['first']:.1f} | {r['allocated']:.1f} | "
            f"{r['reserved']:.1f} | {r['error']:.2e} | {r['differing']:.2%} |"
        )
    table = "\n".join([header, *lines])
    if profiles:
        families = list(profiles[0][1])
        table += (
            "\n\nGPU kernel time of one decode without graphs (s), by kernel family\n\n| path | "
            + " | ".join(families)
            + " | total |\n|---|"
            + "---|" * (len(families) + 1)
        )
        for name, seconds in profiles:
            cells = " | ".join(f"{seconds[f]:.3f}" for f in families)
            table += f"\n| {name} | {cells} | {sum(seconds.values()):.3f} |"
    print(table)
    if not args.no_write:
        command = f"python benchmarks/vae.py --seconds {args.seconds} --size {height}x{width} --repeat {args.repeat}"
        if args.paths != list(PATHS):
            command += " --paths " + " ".join(args.paths)
        if args.profile:
            command += " --profile"
        title = f"CogVideoX VAE decode, {args.seconds} s {height}x{width} ({frames} frames), random weights"
        append_table(title, command, f"median of {args.repeat} after a warm-up", table)


if __name__ == "__main__":
    main()
