"""The Python backend's shared-memory regions of a k4serve server: named after their launcher, removed when it goes.

Every stub instance gets a region `/dev/shm/<prefix><uuid>` (the backend's `shm-region-prefix-name`); Triton
unlinks it when the instance unloads cleanly, but not when tritonserver crashes or a stub dies mid-request. The
prefix `k4serve_<launcher pid>_<port>_` names the launcher that owns the regions, so the launcher removes its
own on every exit path and, at start, those of launchers that are gone (another live server's are kept).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_OWNED_REGION = re.compile(r"k4serve_(\d+)_\d+_")


def region_prefix(launcher_pid: int, port: int) -> str:
    """The region-name prefix of the server a launcher (`launcher_pid`) runs with gRPC on `port`."""
    return f"k4serve_{launcher_pid}_{port}_"


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def regions(prefix: str, directory: Path = SHM_DIR) -> list[Path]:
    """The regions named with `prefix`."""
    return sorted(directory.glob(f"{prefix}*")) if directory.is_dir() else []


def remove_regions(paths: list[Path]) -> list[str]:
    """Unlink `paths` (already gone is fine); the names removed."""
    removed = []
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path.name)
    return removed


def remove_stale_regions(directory: Path = SHM_DIR) -> list[str]:
    """Remove the k4serve regions whose launcher process no longer exists; the names removed."""
    stale = []
    for path in regions("k4serve_", directory):
        owner = _OWNED_REGION.match(path.name)
        if owner and not process_alive(int(owner.group(1))):
            stale.append(path)
    return remove_regions(stale)
