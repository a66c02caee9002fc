"""V2A UNet on one GPU: the 51 guided UNet calls of one request, eager against the fast engine.

    python benchmarks/unet.py --seconds 12 --repeat 3
    python benchmarks/unet.py --preset tiny --device cpu --seconds 1 --repeat 1 --no-write   # a CPU smoke run

The full-size UNet (1.04 B parameters, random weights, every addition active) runs the PNDM sampler (50 steps,
51 calls at batch 2 under guidance 8) on a latent of --seconds (12 s: (2, 4, 64, 148)) with random CogVLM2-shaped
conditioning, in each variant:
  eager-fp32   the module in fp32 (cuDNN TF32 off: a true fp32 reference)
  eager-bf16   the module in bf16, torch's SDPA choice: the official numerics, and the reference of every ratio
  fast-bf16    FastUNet: CUDA graph per bucket, SDPA pinned to FlashAttention
  fast-nhwc    the same with channels_last activations and conv weights
  fast-compile fast-bf16 with the forward through torch.compile (its compile time is in the warm-up column)
  fast-fp8     the same (NCHW) with the transformer linears in fp8 (fp32 accumulation); fast-fp8-fast: fast accumulation
Per variant: the 51 calls' median seconds over --repeat runs after a warm-up run (which captures the graphs, timed
separately), ms per call, speed-up over eager-bf16, peak GiB (weights included), and the relative error against
eager-bf16 of one call (t = 981) and of the final latents. Each variant runs in its own try block; the table is
printed last and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch
from results import append_table

from k4serve.engines.unet import NUM_FRAMES, PROMPT_LEN, FastUNet
from k4serve.models.pndm import PNDMSampler, unet_denoiser
from k4serve.models.v2a_unet import PRESETS, build_v2a_unet, latent_shape

VARIANTS = ("eager-fp32", "eager-bf16", "fast-bf16", "fast-nhwc", "fast-compile", "fast-fp8", "fast-fp8-fast")
SEED = 0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_unet_fn(variant: str, unet):
    """The UNet callable of a variant, built over `unet` (a bf16 module is shared by the bf16 variants)."""
    if variant.startswith("eager"):
        return unet
    linear = {"fast-fp8": "fp8", "fast-fp8-fast": "fp8-fast"}.get(variant, "bf16")
    return FastUNet(unet, linear=linear, channels_last=variant == "fast-nhwc", torch_compile=variant == "fast-compile")


def run(unet_fn, conditioning, shape, device: str, dtype, repeat: int) -> dict:
    """Warm-up run, then `repeat` timed runs of the 51-call sampler; the last latents and one call's output."""
    prompt, video = (c.to(dtype) for c in conditioning)
    sampler = PNDMSampler()
    denoiser = unet_denoiser(unet_fn, prompt, video)
    gpu = device.startswith("cuda")
    sync(device)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    latents = sampler(denoiser, shape, [SEED], device, dtype)
    sync(device)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        latents = sampler(denoiser, shape, [SEED], device, dtype)
        sync(device)
        times.append(time.perf_counter() - start)
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(SEED)).to(device, dtype)
    one_call = unet_fn(x, 981, prompt, video)
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    return dict(seconds=statistics.median(times), warmup=warmup, peak=peak, latents=latents, call=one_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=12, help="audio duration (latent width ⌊100 s / 32⌋·4)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--preset", default="kandinsky4-v2a", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    shape = latent_shape(args.seconds)
    g = torch.Generator().manual_seed(1)
    feature_dim = PRESETS[args.preset].feature_dim
    conditioning = tuple(torch.randn(2, n, feature_dim, generator=g).to(args.device) for n in (PROMPT_LEN, NUM_FRAMES))
    results: dict[str, dict | str] = {}
    bf16_unet = None
    with torch.no_grad():
        for variant in ["eager-bf16"] + [v for v in args.variants if v != "eager-bf16"]:  # the reference first
            try:
                if variant == "eager-fp32":
                    unet = build_v2a_unet(args.preset, args.device, torch.float32, seed=SEED)
                    torch.backends.cudnn.allow_tf32 = False
                    try:
                        results[variant] = run(unet, conditioning, shape, args.device, torch.float32, args.repeat)
                    finally:
                        torch.backends.cudnn.allow_tf32 = True
                    del unet
                else:
                    if bf16_unet is None:
                        bf16_unet = build_v2a_unet(args.preset, args.device, torch.bfloat16, seed=SEED)
                    fn = make_unet_fn(variant, bf16_unet)
                    results[variant] = run(fn, conditioning, shape, args.device, torch.bfloat16, args.repeat)
                    del fn
            except Exception as error:  # one failing variant must not stop the others
                traceback.print_exc()
                results[variant] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()

    reference = results.get("eager-bf16")
    header = (
        "| variant | 51 calls s | ms / call | × eager-bf16 | warm-up s | peak GiB | one-call rel. err | "
        "latents rel. err |\n|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for variant in [v for v in VARIANTS if v in results]:
        r = results[variant]
        if isinstance(r, str):
            lines.append(f"| {variant} | {r} | | | | | | |")
            continue
        ok = isinstance(reference, dict)
        speedup = f"{reference['seconds'] / r['seconds']:.2f}" if ok else "—"
        call_err = f"{rel_error(r['call'], reference['call']):.2e}" if ok else "—"
        latent_err = f"{rel_error(r['latents'], reference['latents']):.2e}" if ok else "—"
        lines.append(
            f"| {variant} | {r['seconds']:.3f} | {1000 * r['seconds'] / 51:.1f} | {speedup} | {r['warmup']:.2f} | "
            f"{r['peak']:.1f} | {call_err} | {latent_err} |"
        )
    table = "\n".join([header, *lines])
    print(table)
    if not args.no_write:
        command = f"python benchmarks/unet.py --seconds {args.seconds} --repeat {args.repeat} --preset {args.preset}"
        if args.variants != list(VARIANTS):
            command += " --variants " + " ".join(args.variants)
        title = f"V2A UNet ({args.preset}), {args.seconds} s: 51 guided calls at {(2, *shape)}, random weights"
        append_table(title, command, f"median of {args.repeat} after a warm-up run (graph capture)", table)


if __name__ == "__main__":
    main()
