"""Appending a measured table to benchmarks/RESULTS.md: heading, date · device · torch · command · method, table."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def device_name() -> str:
    """The GPU's name, or (a CPU-only run) the processor and the cores this process may use."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "CPU")  # fmt: skip
    return f"CPU only, {len(os.sched_getaffinity(0))} cores ({model})"


def append_table(title: str, command: str, method: str, table: str, device: str | None = None) -> None:
    """Append `table` under `## title` with the date, the device (default: this GPU, or the CPU), torch's version
    and the command that measured it."""
    device = device or device_name()
    meta = f"{datetime.date.today()} · {device} · torch {torch.__version__} · `{command}` · {method}"
    with RESULTS.open("a") as out:
        out.write(f"\n## {title}\n{meta}\n\n{table}\n")
