"""Appending a measured table to benchmarks/RESULTS.md: heading, date · device · torch · command · method, table."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def append_table(title: str, command: str, method: str, table: str, device: str | None = None) -> None:
    """Append `table` under `## title` with the date, the device (default: this GPU), torch's version and the
    command that measured it."""
    device = device or torch.cuda.get_device_name()
    meta = f"{datetime.date.today()} · {device} · torch {torch.__version__} · `{command}` · {method}"
    with RESULTS.open("a") as out:
        out.write(f"\n## {title}\n{meta}\n\n{table}\n")
