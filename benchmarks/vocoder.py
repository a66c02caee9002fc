"""V2A vocoder on one GPU: spectrogram image -> 44.1 kHz waveform, ours against the official's per-call solve.

    python benchmarks/vocoder.py --seconds 12

Rows (each timed alone; a failing row is reported and the others still run):
- `official solve`: the official's InverseMelScale, a float32 `torch.linalg.lstsq(fb.T, mel)` on every call
  (what torchaudio runs), then our Griffin-Lim; the eager reference;
- `cached pinv`: ours, the float64 pseudo-inverse computed once per device, then Griffin-Lim;
- `+ CUDA generator`: the same with the initial phase drawn on the GPU instead of on the host.
Each row: median seconds of image -> mel -> linear -> Griffin-Lim (32 iterations) -> official levels on the host,
and the waveform's relative error against the same computation on the CPU from the same initial phase
(float32 rounding, amplified by Griffin-Lim's momentum: ~1e-4 is expected).
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch
from results import append_table

from k4serve.models.audio import (
    PRESETS,
    SpectrogramParams,
    audio_width,
    griffin_lim,
    mel_filterbank,
    mel_to_linear,
    official_loudness,
    spectrogram_image_to_mel,
)

PARAMS = PRESETS["v2a"]


def official_solve(mel: torch.Tensor, params: SpectrogramParams = PARAMS) -> torch.Tensor:
    """torchaudio's InverseMelScale forward: relu(lstsq(fb.T, mel)) in float32 on the mel's device."""
    fb = mel_filterbank(params).to(mel.device)
    return torch.linalg.lstsq(fb.T[None], mel[None], driver="gels").solution[0].relu()


def vocode(
    image: torch.Tensor, solve, generator: torch.Generator, params: SpectrogramParams = PARAMS
) -> tuple[torch.Tensor, object]:
    """(Griffin-Lim waveform, official-level audio) for one spectrogram image; solve(mel, params) -> linear."""
    mel = spectrogram_image_to_mel(image, params)
    waveform = griffin_lim(solve(mel, params), params, generator)
    return waveform, official_loudness(waveform)


def timed(fn, repeat: int) -> tuple[object, float]:
    """(last result, median seconds) after one warm-up call."""
    result = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    width = audio_width(args.seconds)
    image = torch.randint(0, 256, (PARAMS.n_mels, width, 3), generator=torch.Generator().manual_seed(0))
    image = image.to(torch.uint8)
    # The same computation on the CPU from the same CPU-drawn phase (seed 1).
    reference = griffin_lim(
        mel_to_linear(spectrogram_image_to_mel(image, PARAMS)), PARAMS, torch.Generator().manual_seed(1)
    )
    reference = reference.double()
    gpu_image = image.cuda()
    variants = {
        "official solve (lstsq per call)": (official_solve, lambda: torch.Generator().manual_seed(1), True),
        "cached pinv": (mel_to_linear, lambda: torch.Generator().manual_seed(1), True),
        "cached pinv + CUDA generator": (mel_to_linear, lambda: torch.Generator("cuda").manual_seed(1), False),
    }
    rows = []
    for name, (solve, generator, comparable) in variants.items():
        try:
            (waveform, _), seconds = timed(lambda s=solve, g=generator: vocode(gpu_image, s, g()), args.repeat)
            error = ((waveform.cpu().double() - reference).norm() / reference.norm()).item() if comparable else None
            rows.append((name, seconds, error))
        except Exception as failure:  # one failing variant must not stop the others
            traceback.print_exc()
            rows.append((name, None, f"failed: {type(failure).__name__}: {failure}"[:120]))

    base = rows[0][1]
    header = "| vocoder | seconds | × official solve | waveform rel. error vs the CPU |\n|---|---|---|---|"
    lines = []
    for name, seconds, error in rows:
        speed = f"{base / seconds:.2f}" if base and seconds else "—"
        shown = f"{error:.2e}" if isinstance(error, float) else (error or "— (another phase)")
        lines.append(f"| {name} | {f'{seconds:.3f}' if seconds else '—'} | {speed} | {shown} |")
    table = "\n".join([header, *lines])
    print(table)
    if not args.no_write:
        command = f"python benchmarks/vocoder.py --seconds {args.seconds} --repeat {args.repeat}"
        title = f"V2A vocoder, {args.seconds} s (W = {width}, {PARAMS.griffin_lim_iters} Griffin-Lim iterations)"
        append_table(title, command, f"median of {args.repeat} after a warm-up, levels on the host included", table)


if __name__ == "__main__":
    main()
