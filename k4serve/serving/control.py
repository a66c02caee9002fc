"""What the launcher, the entry points and the stages tell each other outside Triton: files in one directory.

`$K4SERVE_CONTROL_DIR` (the launcher sets it per server; else `<tmp>/k4serve-control`) holds
  draining            while present, entry points refuse new requests (UNAVAILABLE) and finish those in flight;
                      the launcher creates it on SIGTERM, polls `k4serve_requests_in_flight` down to 0, then stops
                      tritonserver
  cancelled/<token>   the entry point whose client cancelled (or whose deadline passed) a request creates it; every
                      stage stops the request carrying that token at its next step or chunk

Triton 2.51 does not pass a cancellation on to the requests a BLS model sends (nor to an ensemble's steps), so
the token travels as the request parameter `k4serve_cancel_token` and the flag as a file.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

CONTROL_DIR_ENV = "K4SERVE_CONTROL_DIR"
MAX_QUEUE_ENV = "K4SERVE_MAX_QUEUE"
MAX_STAGE_CALLS_ENV = "K4SERVE_MAX_STAGE_CALLS"
# Stage calls one entry point's process has in flight at once. Two keep the DiT of one request running beside the
# VAE and muxer of the one before (the overlap that throughput needs); the others wait in the entry point. (The
# bound was first set against tritonserver aborts under 4 requests on the H200, which came from the stub's unlocked
# metric calls: backend.SerialMetric. With that fix, 4 ran clean on the H200 at about the same throughput, 10.03
# videos/min at concurrency 4 against 9.95 with 2 (a run the day before, every model loaded), and an earlier first
# event: benchmarks/RESULTS.md, 2026-12-03.)
DEFAULT_MAX_STAGE_CALLS = 2
DRAINING_FILE = "draining"
CANCEL_PARAMETER = "k4serve_cancel_token"
DRAINING_MESSAGE = "server is draining; retry on another replica"


def control_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The server's control directory: $K4SERVE_CONTROL_DIR, else one under the temp directory."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(CONTROL_DIR_ENV) or Path(tempfile.gettempdir()) / "k4serve-control")


def is_draining(directory: Path) -> bool:
    """Whether the launcher asked the server to drain."""
    return (directory / DRAINING_FILE).exists()


def max_queue(parameters: Mapping[str, str], environ: Mapping[str, str] | None = None) -> int:
    """An entry point's bound on requests held at once: $K4SERVE_MAX_QUEUE, else its `max_queue` parameter."""
    environ = os.environ if environ is None else environ
    raw = environ.get(MAX_QUEUE_ENV) or parameters.get("max_queue", "")
    return _whole_number(raw, "max_queue", f"config parameter max_queue or {MAX_QUEUE_ENV}")


def max_stage_calls(environ: Mapping[str, str] | None = None) -> int:
    """Stage calls an entry point makes at once: $K4SERVE_MAX_STAGE_CALLS, else DEFAULT_MAX_STAGE_CALLS."""
    environ = os.environ if environ is None else environ
    raw = environ.get(MAX_STAGE_CALLS_ENV) or str(DEFAULT_MAX_STAGE_CALLS)
    return _whole_number(raw, "max_stage_calls", MAX_STAGE_CALLS_ENV)


def _whole_number(raw: str, name: str, source: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a whole number >= 1 ({source}), got {raw!r}")
    return value


class CancelFlags:
    """Cancellation flags shared by every process of one server, one empty file per cancelled request."""

    def __init__(self, directory: Path):
        self.directory = directory / "cancelled"
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_token() -> str:
        """A token naming one request's flag."""
        return uuid.uuid4().hex

    def set(self, token: str) -> None:
        """Ask every stage to stop the request of `token`."""
        (self.directory / token).touch()

    def is_set(self, token: str | None) -> bool:
        """Whether the request of `token` was cancelled (no token: never)."""
        # A token is ours (hex) or a client's parameter; only a plain name may become a path.
        return bool(token) and token.isalnum() and (self.directory / token).exists()

    def clear(self, token: str) -> None:
        """Forget the flag of a finished request."""
        (self.directory / token).unlink(missing_ok=True)


class Refusal(NamedTuple):
    """Why an entry point turned a request away: `reason` ("bound" or "draining", a metric label) and the message."""

    reason: str
    message: str


class Admission:
    """The bound and the drain state of one entry point: `admit()` says why not, or counts the request in."""

    def __init__(self, model: str, bound: int, directory: Path, gauge: Callable[[int], None] = lambda count: None):
        self.model = model
        self.bound = bound
        self.directory = directory
        self.in_flight = 0
        self._typical_s: float | None = None  # moving average of finished requests, for the retry hint
        self._gauge = gauge  # told every new count under the lock: a reader and a writer never cross
        self._lock = threading.Lock()

    def admit(self) -> Refusal | None:
        """None when the request is admitted (count it out with `release`), else why not."""
        if is_draining(self.directory):
            return Refusal("draining", DRAINING_MESSAGE)
        with self._lock:
            if self.in_flight >= self.bound:
                wait = max(1, math.ceil(self._typical_s or 1.0))
                return Refusal(
                    "bound",
                    f"{self.model} already holds {self.in_flight} requests, its bound (config parameter max_queue "
                    f"or {MAX_QUEUE_ENV}); retry in about {wait} s, or on another replica",
                )
            self.in_flight += 1
            self._gauge(self.in_flight)
            return None

    def release(self, seconds: float | None = None) -> None:
        """One admitted request left; `seconds` (when it finished its work) refines the retry hint."""
        with self._lock:
            self.in_flight -= 1
            self._gauge(self.in_flight)
            if seconds is not None:
                self._typical_s = seconds if self._typical_s is None else 0.8 * self._typical_s + 0.2 * seconds
