"""Watch tritonserver's Python-backend stubs; a dead one makes readiness false and its model is reloaded.

Triton 2.51 keeps a model READY after its stub process dies (an OOM kill): every request then fails with "Stub
process '<instance>' is not healthy" while every health endpoint says ready. The supervisor scans tritonserver's
child processes a few times a second; when a stub it saw is gone it reports not ready, unloads the model and loads
it again through the model-control API (explicit mode), reloads whatever the unload took along (an ensemble over
that stage), and reports ready once Triton and every stub are back.

Triton 2.51 never releases the old version of a model whose stub died under a request (its unload stays
UNLOADING): the new version serves, but the old one would keep tritonserver's shutdown waiting out
--exit-timeout-secs. Those models are in `ghosts` (the repository index shows only the new version); the
launcher's stop accounts for them.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NamedTuple

from k4serve.serving.shm import regions, remove_regions
from k4serve.serving.triton_api import TritonApi, TritonError

log = logging.getLogger("k4serve.serve")

STUB_BINARY = "triton_python_backend_stub"
UNLOAD_WAIT_S = 5.0  # a stub-less unload that takes longer is a version Triton will not release (clean: ~1 s)
REPAIR_ATTEMPTS = 3


class Phase(Enum):
    STARTING = "starting"
    SERVING = "serving"
    REPAIRING = "repairing"
    DRAINING = "draining"
    FAILED = "failed"


class StubProcess(NamedTuple):
    """One Python-backend stub: its process, the model and instance it runs, its shared-memory region."""

    pid: int
    model: str
    instance: str
    region: str


def _stub(pid: int, args: list[str]) -> StubProcess | None:
    """A stub's command line (2.51: stub, model.py path, region, sizes, parent pid, lib dir, ipc, instance, ...)."""
    if len(args) < 3 or not args[0].endswith(STUB_BINARY):
        return None
    model = Path(args[1]).parent.parent.name  # <repository>/<model>/<version>/model.py
    instance = args[8] if len(args) > 8 else model
    return StubProcess(pid, model, instance, args[2])


def stub_processes(server_pid: int, proc: Path = Path("/proc")) -> list[StubProcess]:
    """The living (not zombie) stub processes that tritonserver `server_pid` started."""
    stubs = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone while we looked
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]  # the command name may hold spaces and parentheses
        if int(parent) != server_pid or state == "Z":
            continue
        stub = _stub(int(entry.name), args)
        if stub is not None:
            stubs.append(stub)
    return stubs


@dataclass(frozen=True)
class Repair:
    """A stage the supervisor brought back: which models, and seconds from detection to ready again."""

    models: tuple[str, ...]
    seconds: float


class Supervisor:
    """Readiness and self-repair of one tritonserver; `watch()` once it is ready, `begin_drain()` on stop."""

    def __init__(
        self,
        process: subprocess.Popen,
        api: TritonApi,
        models: list[str],
        region_prefix: str,
        load_timeout_s: float = 1800.0,
        poll_s: float = 0.25,
    ):
        self.process = process
        self.api = api
        self.models = models
        self.region_prefix = region_prefix
        self.load_timeout_s = load_timeout_s
        self.poll_s = poll_s
        self.repairs: list[Repair] = []
        self.ghosts: set[str] = set()  # models with a dead version Triton keeps beside the new one (module doc)
        self._phase = Phase.STARTING
        self._draining = False
        self._triton_ready = False
        self._expected: dict[int, StubProcess] = {}
        self._lock = threading.Lock()  # held while repairing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="k4serve-supervisor", daemon=True)

    @property
    def phase(self) -> Phase:
        if self._phase is Phase.FAILED or self.process.poll() is not None:
            return Phase.FAILED
        return Phase.DRAINING if self._draining else self._phase

    @property
    def watching(self) -> bool:
        """Whether watch() ran (the server got ready)."""
        return self._phase is not Phase.STARTING

    @property
    def draining(self) -> bool:
        """Whether begin_drain() ran."""
        return self._draining

    @property
    def python_models(self) -> set[str]:
        """The models that run in stub processes (not ensembles)."""
        return {stub.model for stub in self._expected.values()}

    def ready(self) -> bool:
        """Serving: every stub alive, Triton ready, not draining."""
        return self.phase is Phase.SERVING and self._triton_ready

    def live(self) -> bool:
        """tritonserver runs and the supervisor has not given up on it."""
        return self.phase is not Phase.FAILED

    def watch(self) -> None:
        """Start watching: the stubs alive now are the ones to keep alive."""
        self._expected = {stub.pid: stub for stub in stub_processes(self.process.pid)}
        self._triton_ready = True
        self._phase = Phase.SERVING
        self._thread.start()

    def begin_drain(self, timeout_s: float) -> None:
        """Readiness false and no new repairs; waits (up to `timeout_s`) for a repair under way to finish."""
        self._draining = True
        if self._lock.acquire(timeout=max(timeout_s, 0.0)):
            self._lock.release()

    def close(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.process.poll() is not None:
                log.error("k4serve: tritonserver exited with code %s", self.process.returncode)
                self._phase = Phase.FAILED
                return
            if self._draining:  # the drain unloads every model: stubs end by design now
                continue
            dead = self._dead_models()
            if dead:
                self._repair(sorted(dead))
            else:
                self._triton_ready = self.api.ready()

    def _dead_models(self) -> set[str]:
        alive = {stub.pid for stub in stub_processes(self.process.pid)}
        return {stub.model for pid, stub in self._expected.items() if pid not in alive}

    def _repair(self, models: list[str]) -> None:
        """Unload and load `models` again (and what their unload took along) until Triton serves them."""
        with self._lock:
            self._phase = Phase.REPAIRING
            started = time.monotonic()
            log.error("k4serve: the stub process of %s died; reloading it", ", ".join(models))
            for attempt in range(1, REPAIR_ATTEMPTS + 1):
                try:
                    self._reload(models)
                except (TritonError, OSError, TimeoutError) as error:
                    log.error("k4serve: reloading %s failed (attempt %d): %s", ", ".join(models), attempt, error)
                    if self._stop.wait(2.0 * attempt):
                        return
                    continue
                seconds = time.monotonic() - started
                self.repairs.append(Repair(tuple(models), seconds))
                log.warning("k4serve: %s reloaded; serving again after %.1f s", ", ".join(models), seconds)
                self._phase = Phase.SERVING
                return
            log.error("k4serve: giving up on %s after %d attempts", ", ".join(models), REPAIR_ATTEMPTS)
            self._phase = Phase.FAILED

    def _reload(self, models: list[str]) -> None:
        for model in models:
            self.api.unload(model)
        self._triton_ready = False
        deadline = time.monotonic() + UNLOAD_WAIT_S
        while time.monotonic() < deadline:
            states = self.api.model_states()
            if all(states.get(model) != "UNLOADING" for model in models):
                break
            self._stop.wait(0.1)
        else:
            stuck = [model for model in models if self.api.model_states().get(model) == "UNLOADING"]
            log.warning("k4serve: Triton keeps the dead version of %s; loading a new one beside it", stuck)
            self.ghosts.update(stuck)
        for model in models:
            self.api.load(model, self.load_timeout_s)
        states = self.api.model_states()  # an ensemble unloaded along with its step comes back here
        for model in self.models:
            if states.get(model) != "READY":
                self.api.load(model, self.load_timeout_s)
        deadline = time.monotonic() + 60.0
        while not self.api.ready():
            if time.monotonic() > deadline:
                raise TimeoutError("Triton did not report ready after the reload")
            self._stop.wait(0.2)
        stubs = stub_processes(self.process.pid)
        self._expected = {stub.pid: stub for stub in stubs}
        # The dead instances' regions: no live stub names them (nothing else loads while we hold the lock).
        in_use = {stub.region for stub in stubs}
        orphans = [path for path in regions(self.region_prefix) if path.name not in in_use]
        if orphans:
            log.info("k4serve: removed shared memory of the dead instance(s): %s", remove_regions(orphans))
        self._triton_ready = True
