"""CogVLM2-Video feature extraction on one GPU: float32 reference, the official per-request work in bf16, fast path.

    python benchmarks/cogvlm2.py --frames 96 --size 384x672 --repeat 3

Full size (THUDM/cogvlm2-video-llama3-chat's shape, 12 B parameters, 31 of 32 decoder layers built), random
weights (seed 0), one uploaded video of `--frames` sampled frames and the default prompt. Rows:
  * fp32 reference: the same model in float32 (TF32 off), built first and freed: the error reference;
  * official per request (bf16): what video2audio_pipe.py computes for every request, both CFG branches: video
    features of the frames and of the black video, prompt and negative-prompt features;
  * fast (bf16): the unconditional branch computed once and kept, so a request is one video and one prompt pass;
  * fast + torch.compile: the same with every vision and decoder layer compiled.
Each variant runs in try/except so one failure leaves the others; medians of `--repeat` runs after a warm-up;
the table is printed last and appended to benchmarks/RESULTS.md. The bf16 model is built on the meta device and
allocated on the GPU in bf16 (no fp32 copy): its build peak is reported.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback

import numpy as np
import torch
from results import append_table

from k4serve.cli_options import parse_size
from k4serve.models.cogvlm2_video import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, CogVLM2VideoEncoder, Conditioning


def timed(fn, repeat: int) -> tuple[object, float, float]:
    """(last result, median seconds, peak GiB) of fn() after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cogvlm2-video-llama3-chat", help="tiny: a quick check of the script")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--size", type=parse_size, default=(384, 672), help="HxW of the uploaded frames")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    height, width = args.size
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, height, width, 3), dtype=np.uint8)
    black = np.zeros_like(frames)
    rows, reference = [], None

    def official_request(encoder: CogVLM2VideoEncoder) -> Conditioning:
        encoder.text_features(DEFAULT_NEGATIVE_PROMPT)  # the official recomputes the unconditional branch
        encoder.video_features(black)
        return encoder.condition(frames, DEFAULT_PROMPT)

    def measure(name: str, encoder: CogVLM2VideoEncoder, request) -> Conditioning | None:
        """Time one variant into `rows`; its last conditional branch (None if it failed)."""
        try:
            _, video_s, _ = timed(lambda: encoder.video_features(frames), args.repeat)
            _, text_s, _ = timed(lambda: encoder.text_features(DEFAULT_PROMPT), args.repeat)
            cond, request_s, peak = timed(lambda: request(encoder), args.repeat)
            errors = (
                [rel_error(cond.video, reference.video), rel_error(cond.prompt, reference.prompt)] if reference else []
            )
            rows.append((name, video_s, text_s, request_s, peak, errors))
            return cond
        except Exception:  # one failing variant must not stop the others
            traceback.print_exc()
            rows.append((name, None, None, None, None, []))
            return None

    with torch.no_grad():
        try:  # the float32 reference (about 47 GiB of weights), freed before the bf16 model is built
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            encoder = CogVLM2VideoEncoder.from_preset(args.preset, "cuda", torch.float32, seed=0)
            cond = measure("fp32 reference", encoder, lambda e: e.condition(frames, DEFAULT_PROMPT))
            reference = Conditioning(*(t.cpu() for t in cond)) if cond is not None else None
            del encoder, cond
        except Exception:
            traceback.print_exc()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            free_gpu()

        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        encoder = CogVLM2VideoEncoder.from_preset(args.preset, "cuda", torch.bfloat16, seed=0)
        torch.cuda.synchronize()
        build_s, build_peak = time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30
        weights_gib = sum(p.numel() * p.element_size() for p in encoder.model.parameters()) / 2**30

        measure("official per request (bf16)", encoder, official_request)
        encoder.unconditional(num_frames=args.frames)  # computed once, kept: not part of a request
        measure("fast: uncond cached (bf16)", encoder, lambda e: e.condition(frames, DEFAULT_PROMPT))
        if not args.no_compile:
            try:
                for layer in [*encoder.model.model.vision.transformer.layers, *encoder.model.model.layers]:
                    layer.compile()
            except Exception:
                traceback.print_exc()
            measure("fast + torch.compile (bf16)", encoder, lambda e: e.condition(frames, DEFAULT_PROMPT))

    official_s = next((r[3] for r in rows if r[0].startswith("official") and r[3]), None)
    header = (
        "| path | video features s | prompt features s | per request s | × official | peak GiB "
        "| video rel. err vs fp32 | prompt rel. err vs fp32 |\n|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for name, video_s, text_s, request_s, peak, errors in rows:
        if request_s is None:
            lines.append(f"| {name} | failed (traceback above) | | | | | | |")
            continue
        speedup = f"{official_s / request_s:.2f}" if official_s else "—"
        err = [f"{e:.2e}" for e in errors] or ["—", "—"]
        timings = f"{video_s:.3f} | {text_s:.4f} | {request_s:.3f} | {speedup} | {peak:.1f}"
        lines.append(f"| {name} | {timings} | {err[0]} | {err[1]} |")
    table = "\n".join([header, *lines])
    method = (
        f"median of {args.repeat} after a warm-up; {args.frames} frames {height}x{width}, prompt {DEFAULT_PROMPT!r}; "
        f"bf16 weights {weights_gib:.1f} GiB, built on the GPU in {build_s:.1f} s with peak {build_peak:.1f} GiB"
    )
    print(method)
    print(table)
    if not args.no_write:
        command = f"python benchmarks/cogvlm2.py --preset {args.preset} --frames {args.frames} --size {height}x{width}"
        command += f" --repeat {args.repeat}"
        command += " --no-compile" * args.no_compile
        append_table(
            f"CogVLM2-Video features (V2A conditioning), {args.preset}, random weights", command, method, table
        )


if __name__ == "__main__":
    main()
