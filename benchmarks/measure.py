"""Timing, memory and error helpers for benchmarks that run on the GPU or, to check the script itself, on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Measured:
    result: object  # of the last timed run
    seconds: float  # median of the timed runs
    peak_gib: float  # peak allocated on the device during the timed runs, resident weights included (NaN on a CPU)
    stage_gib: float  # that peak less what was allocated before: the stage's own working memory


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], repeat: int, device: torch.device | str, warmup: int = 1) -> Measured:
    """Run fn() `warmup` times (compilation, graph capture, caches), then time `repeat` runs with the device drained
    before and after each."""
    gpu = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
    stage = peak - before / 2**30 if gpu else float("nan")
    return Measured(result, statistics.median(times), peak, stage)


def relative_error(x: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """||x - ref|| / ||ref|| in float64 on the host."""
    x, ref = (_float64(a) for a in (x, ref))
    return ((x - ref).norm() / ref.norm()).item()


def _float64(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().double().cpu()
    return torch.from_numpy(np.asarray(a, dtype=np.float64))
