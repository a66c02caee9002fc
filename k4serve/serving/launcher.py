"""Run tritonserver on a k4serve model repository: supervised, behind a checking HTTP front, drained on stop.

`TritonServer` runs the `tritonserver` of the nvidia-pytriton wheel (assembling a backend directory with the stub
matching this interpreter, which runs model.py in this very environment) or, with `ServerOptions.tritonserver`, the
one of a Triton install (NVIDIA's container: /opt/tritonserver/bin/tritonserver). Around it:
- every model is loaded at start in explicit model-control mode; the model-control, shared-memory, trace and
  logging APIs answer only to a key this launcher makes up (`triton_api`);
- tritonserver's HTTP endpoint listens on loopback; the public HTTP port is `front.HttpFront` (checked requests,
  honest /v2/health/ready and /v2/health/live);
- `supervisor.Supervisor` reloads a stage whose stub process died;
- `stop()` drains: readiness false, `$K4SERVE_CONTROL_DIR/draining` for the entry points, wait for the requests in
  flight, unload the entry points then the stages, then end tritonserver; the shared-memory regions named after
  this launcher are removed on every way out, and at start those of launchers that are gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from k4serve.serving.control import CONTROL_DIR_ENV, DRAINING_FILE
from k4serve.serving.front import HttpFront
from k4serve.serving.shm import SHM_DIR, region_prefix, regions, remove_regions, remove_stale_regions
from k4serve.serving.supervisor import UNLOAD_WAIT_S, Supervisor, stub_processes
from k4serve.serving.triton_api import TritonApi, TritonError, metric_sum, restriction_flags

log = logging.getLogger("k4serve.serve")

REPO_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
# Runs first in the child and execs tritonserver: SIGTERM reaches the server when the launching process dies,
# so none outlives it. (A preexec_fn would do the same, but it forces a plain fork(), which can hang in gRPC's
# fork handlers once a gRPC client runs in the launching process; Popen without one uses vfork.)
_DIE_WITH_PARENT = "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 15); os.execv(sys.argv[1], sys.argv[1:])"
# The stock instance group of a GPU-capable stage: a count and no kind (Triton then picks GPUs when present).
_AUTO_INSTANCE_GROUP = re.compile(r"instance_group\s*\[\s*\{\s*count:\s*(\d+)\s*\}\s*\]")
_ENSEMBLE_STEP = re.compile(r'model_name:\s*"([^"]+)"')  # the models an ensemble's steps call
IN_FLIGHT_METRIC = "k4serve_requests_in_flight"  # the entry points' gauge of requests they hold
PENDING_METRIC = "nv_inference_pending_request_count"  # Triton's queued (not yet executing) requests
DRAIN_REPORT_S = 10.0  # how often a drain that is still waiting says what for
# Once no request is in flight, a model Triton has not released this long after its unload will not be released
# by waiting. Seen in a full CPU test run: t2v_stream UNLOADING with nothing in flight, which then held
# tritonserver's exit for its whole --exit-timeout-secs.
RELEASE_WAIT_S = 10.0
RELEASED = (None, "UNAVAILABLE")  # a model's state in the repository index once Triton has let it go
SHM_DEFAULT_BYTES = 256 * 2**20  # each Python stub's first shared-memory region (tensors in and out)
SHM_GROWTH_BYTES = 128 * 2**20  # how much it grows when a request needs more


@dataclass(frozen=True)
class TritonDistribution:
    """The files of the wheel's Triton server that a run needs."""

    binary: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python
    libraries: Path  # the wheel's bundled shared libraries

    @classmethod
    def find(cls) -> TritonDistribution:
        """Locate the server inside the installed nvidia-pytriton wheel."""
        # Only the wheel's files are needed: locate the package without importing it (and its client deps).
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("tritonserver comes with the nvidia-pytriton wheel: pip install 'k4serve[serve]'")
        root = Path(spec.submodule_search_locations[0]) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libraries=root.parents[1] / "nvidia_pytriton.libs",
        )
        if not dist.stub.is_file():
            shipped = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
            raise FileNotFoundError(f"nvidia-pytriton ships Python-backend stubs for {shipped}, not for {version}")
        return dist

    def assemble_backends(self, directory: Path) -> Path:
        """Write `directory/python/` (backend library, utils, this Python's stub) and return `directory`."""
        python = directory / "python"
        python.mkdir(parents=True, exist_ok=True)
        for source in (
            self.python_backend / "libtriton_python.so",
            self.python_backend / "triton_python_backend_utils.py",
        ):
            shutil.copy2(source, python / source.name)
        shutil.copy2(self.stub, python / "triton_python_backend_stub")
        return directory


def stub_environment(dist: TritonDistribution, extra: dict[str, str]) -> dict[str, str]:
    """The server's environment: its libraries, and a stub that runs model.py in this very Python environment.

    The stub embeds libpython and takes its prefix (hence site-packages: torch, k4serve) from the first `python3`
    on PATH, as the interpreter of a virtual environment does; PYTHONPATH is not consulted.
    """
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not (Path(libdir) / soname).is_file() and ctypes.util.find_library(soname.split(".so")[0][3:]) is None:
        raise FileNotFoundError(
            f"the Python-backend stub links {soname}, which this Python ({sys.executable}) lacks: install the "
            f"shared library (e.g. apt install libpython{sys.version_info.major}.{sys.version_info.minor}) "
            "or use a Python built with --enable-shared"
        )
    env = {**os.environ, **extra}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    library_path = [str(dist.libraries), libdir, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in library_path if p)
    return env


def with_instance_groups(config: str, gpus: list[int] | None) -> str:
    """Pin a stage's stock instance group to `gpus` (KIND_GPU), or to the CPU when `gpus` is empty.

    Groups that already name a kind (the muxer's KIND_CPU) are left alone; `None` leaves the config unchanged.
    """
    if gpus is None:
        return config

    def pinned(match: re.Match) -> str:
        count = match.group(1)
        if not gpus:
            return f"instance_group [ {{ count: {count}, kind: KIND_CPU }} ]"
        return f"instance_group [ {{ count: {count}, kind: KIND_GPU, gpus: [ {', '.join(map(str, gpus))} ] }} ]"

    return _AUTO_INSTANCE_GROUP.sub(pinned, config)


def copy_repository(source: Path, destination: Path, gpus: list[int] | None) -> Path:
    """Copy a model repository, pinning every stage's instances to `gpus` (see `with_instance_groups`)."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
    for config in destination.glob("*/config.pbtxt"):
        config.write_text(with_instance_groups(config.read_text(), gpus))
    return destination


def _steps(repository: Path, model: str) -> list[str]:
    """The models `model`'s config names as the ones it calls (an ensemble's steps, an orchestrator's stages)."""
    return _ENSEMBLE_STEP.findall((repository / model / "config.pbtxt").read_text())


def models_to_load(repository: Path, names: list[str] | None) -> list[str]:
    """`names` (None: every model) and the models their steps call (sorted); unknown names fail here."""
    available = sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
    names = available if names is None else names
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"no model {', '.join(unknown)} in {repository}; choose from {', '.join(available)}")
    load = set(names)
    for name in names:
        load.update(_steps(repository, name))
    return sorted(load)


def entry_points(repository: Path, models: list[str]) -> list[str]:
    """The models among `models` that none of the others calls: where client requests enter."""
    called = {step for model in models for step in _steps(repository, model)}
    return [model for model in models if model not in called]


def _ephemeral_ports() -> range:
    """The ports the kernel hands to outgoing connections (and to bind(0))."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, below the ephemeral range where it can be had.

    A port from bind(0) comes from the range the kernel also gives every outgoing connection: between choosing it
    and the server binding it, a client's connection can take it (seen in CI as "Address already in use").
    """
    ephemeral = _ephemeral_ports()
    candidates = [port for port in range(20000, 32768) if port not in ephemeral]
    for port in random.sample(candidates, min(len(candidates), 50)):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServerOptions:
    """How to run tritonserver. Ports default to free ones; `env` carries K4SERVE_* settings to the stages."""

    model_repository: Path = REPO_MODEL_REPOSITORY
    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0  # the HTTP front's (tritonserver's own HTTP endpoint takes a free loopback port)
    metrics_port: int = 0
    gpus: list[int] | None = None  # None: as the configs say; []: CPU only; [0, 1]: KIND_GPU on those
    models: list[str] | None = None  # None: every model; else these (and their ensembles' steps) only
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None  # None: the server writes to this process's stdout/stderr
    log_verbose: int = 0
    tritonserver: Path | None = None  # a Triton install's binary (its backends/ beside bin/); None: the wheel's
    drain_timeout_s: float = 120.0  # how long stop() waits for requests in flight
    exit_timeout_s: int = 30  # tritonserver's own --exit-timeout-secs, once nothing is in flight
    max_body_bytes: int = 256 * 2**20  # largest HTTP request body the front accepts
    triton_args: list[str] = field(default_factory=list)  # more tritonserver options, appended as given


class TritonServer:
    """A running, supervised tritonserver; use as a context manager or call start() / wait_ready() / stop()."""

    def __init__(self, options: ServerOptions):
        self.options = options
        for name in ("grpc_port", "http_port", "metrics_port"):
            if not getattr(options, name):
                setattr(options, name, free_port(options.host))
        self.triton_http_port = free_port("127.0.0.1")
        self.key = secrets.token_hex(16)  # the restricted APIs' header value; only this process knows it
        self.region_prefix = region_prefix(os.getpid(), options.grpc_port)
        self.api = TritonApi(f"http://127.0.0.1:{self.triton_http_port}", self.key, self.metrics_url)
        self.process: subprocess.Popen | None = None
        self.supervisor: Supervisor | None = None
        self.front: HttpFront | None = None
        self.models: list[str] = []
        self.repository: Path = options.model_repository.resolve()
        self.stuck: set[str] = set()  # models the drain unloaded that Triton never released (see _unload)
        self.stop_requested = threading.Event()  # set by a signal handler: leave wait_ready, then stop()
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._log_file = None

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.options.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.options.metrics_port}/metrics"

    @property
    def control_dir(self) -> Path:
        """$K4SERVE_CONTROL_DIR of the stages: where the launcher tells the entry points to drain."""
        return Path(self._workdir.name) / "control"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host

    def binary(self) -> Path:
        """The tritonserver executable that runs."""
        return self.options.tritonserver or TritonDistribution.find().binary

    def command(self, backends: Path, repository: Path) -> list[str]:
        """The tritonserver command line."""
        o = self.options
        models = models_to_load(repository, o.models)
        return [
            str(self.binary()),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            # The configs are complete: skip the Python backend's extra per-model stub that would import
            # model.py (torch and all) only to auto-complete them. Load every model at once.
            "--disable-auto-complete-config",
            "--model-load-thread-count=8",
            # Shared-memory names that say which launcher owns them (several servers can share a host).
            f"--backend-config=python,shm-region-prefix-name={self.region_prefix}",
            # Each stub's region starts at the 1 MiB default and grows 1 MiB at a time: a 12 s video's frames (75 MB)
            # would grow it ~75 times per request, under several requests at once. Start where a few requests fit
            # (tmpfs pages cost memory only once written). `--triton-option` given later overrides these.
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            "--http-address=127.0.0.1",  # clients reach HTTP through the front only
            f"--http-port={self.triton_http_port}",
            *restriction_flags(self.key),
            "--allow-metrics=true",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            f"--exit-timeout-secs={o.exit_timeout_s}",
            f"--log-verbose={o.log_verbose}",
            # Explicit control: the supervisor reloads a stage that died; the drain unloads models in order.
            "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in models),
            *o.triton_args,
        ]

    def start(self) -> TritonServer:
        """Launch tritonserver and the HTTP front (returns at once; see wait_ready). `with TritonServer(...)` calls
        it (and wait_ready) itself."""
        if self.process is not None:
            raise RuntimeError("this TritonServer was already started: use `with TritonServer(options)` or start()")
        if not (self.repository / "t2v" / "config.pbtxt").is_file():
            raise FileNotFoundError(
                f"{self.repository} is not a k4serve model repository (no t2v/config.pbtxt): pass --model-repository "
                "with the model_repository/ directory of a k4serve checkout"
            )
        stale = remove_stale_regions()
        if stale:
            log.warning("k4serve: removed %d shared-memory regions of launchers that are gone", len(stale))
        self._check_shared_memory()
        self._workdir = tempfile.TemporaryDirectory(prefix="k4serve-triton-")
        work = Path(self._workdir.name)
        self.control_dir.mkdir()
        extra = {**self.options.env, CONTROL_DIR_ENV: str(self.control_dir)}
        if self.options.tritonserver is None:
            dist = TritonDistribution.find()
            backends, env = dist.assemble_backends(work / "backends"), stub_environment(dist, extra)
        else:  # a Triton install: its own backends and stubs, built for its Python
            backends, env = self.options.tritonserver.resolve().parents[1] / "backends", {**os.environ, **extra}
        repository = self.repository
        if self.options.gpus is not None:
            repository = copy_repository(repository, work / "model_repository", self.options.gpus)
        command = self.command(backends, repository)
        self.models = models_to_load(repository, self.options.models)
        self.repository = repository
        # The front first: a taken HTTP port fails here, before tritonserver runs. Until the supervisor exists it
        # answers not ready.
        self.front = HttpFront(
            self.options.host,
            self.options.http_port,
            ("127.0.0.1", self.triton_http_port),
            self.key,
            ready=lambda: self.supervisor is not None and self.supervisor.ready(),
            live=lambda: self.supervisor is not None and self.supervisor.live(),
            draining=lambda: self.supervisor is not None and self.supervisor.draining,
            max_body_bytes=self.options.max_body_bytes,
        ).start()
        output = None
        if self.options.log is not None:
            self._log_file = output = open(self.options.log, "ab")  # closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, *command],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,  # a terminal's Ctrl-C reaches us; we drain once
        )
        self.supervisor = Supervisor(self.process, self.api, self.models, self.region_prefix)
        return self

    def _check_shared_memory(self) -> None:
        """Warn when /dev/shm cannot hold every stage's first region: a stub whose region cannot grow dies (SIGBUS)."""
        try:
            stat = os.statvfs(SHM_DIR)
        except OSError:
            return
        free = stat.f_bavail * stat.f_frsize
        needed = len(models_to_load(self.repository, self.options.models)) * SHM_DEFAULT_BYTES
        if free < needed:
            log.warning(
                "k4serve: %s has %.0f MiB free, less than the %.0f MiB the stages' first shared-memory regions take; "
                "give it more (docker run --shm-size=8g; Kubernetes: an emptyDir with medium Memory on /dev/shm)",
                SHM_DIR,
                free / 2**20,
                needed / 2**20,
            )

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until every model is loaded, then supervise; raise with the log's tail if the server exits."""
        deadline = time.monotonic() + timeout_s
        while not self.api.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}{self._log_tail()}")
            if self.stop_requested.is_set():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver was not ready after {timeout_s:.0f} s{self._log_tail()}")
            time.sleep(0.5)
        self.supervisor.watch()

    def signal(self, signum: int) -> None:
        """Send a signal to tritonserver (SIGKILL: end it now)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def failed(self) -> bool:
        """tritonserver exited, or the supervisor gave up repairing it."""
        return self.supervisor is not None and not self.supervisor.live()

    def drain(self) -> bool:
        """Finish every request in flight and unload every model, within the drain timeout; True when done."""
        deadline = time.monotonic() + self.options.drain_timeout_s
        self.supervisor.begin_drain(deadline - time.monotonic())  # readiness false from here on
        (self.control_dir / DRAINING_FILE).touch()
        log.warning("k4serve: draining (up to %.0f s)", self.options.drain_timeout_s)
        started = reported = time.monotonic()
        entries = entry_points(self.repository, self.models)
        # 1. The entry points refuse new requests and count those they hold; Triton counts those queued in front
        # of them (a stage's queue belongs to requests an entry point holds).
        while (in_flight := self._in_flight(entries)) and time.monotonic() < deadline:
            if time.monotonic() - reported > DRAIN_REPORT_S:
                reported = time.monotonic()
                log.warning("k4serve: draining: %g request(s) in flight after %.0f s", in_flight, reported - started)
            time.sleep(0.25)
        # 2. Triton releases an unloaded model version once its last request is done: entry points first (their
        # requests still need the stages), then the stages. Without the entry points' gauge this is the wait.
        done = self._unload([m for m in self.models if m in entries], deadline)
        done = self._unload([m for m in self.models if m not in entries], deadline) and done
        if done:
            log.warning("k4serve: drained in %.1f s", time.monotonic() - started)
        else:
            log.error("k4serve: drain timeout: stopping with %s request(s) still counted in flight", in_flight)
        return done

    def _in_flight(self, entries: list[str]) -> float:
        """Requests the entry points hold plus those queued in front of them; 0 when the metrics do not answer."""
        try:
            samples = self.api.metrics()
        except OSError:
            return 0.0
        held = metric_sum(samples, IN_FLIGHT_METRIC, entries) or 0.0
        return held + (metric_sum(samples, PENDING_METRIC, entries) or 0.0)

    def _unload(self, models: list[str], deadline: float) -> bool:
        """Unload `models` and wait until Triton has released them (those it never will excepted).

        Called once nothing is in flight. A Python model whose stubs are all gone yet stays UNLOADING past
        UNLOAD_WAIT_S lost its stub under a request: Triton 2.51 will not release it (see supervisor); any model
        still not released RELEASE_WAIT_S after its unload will not be either. Neither is waited for further.
        """
        stubless_since: dict[str, float] = {}
        try:
            for model in models:
                self.api.unload(model)
            reported = asked = time.monotonic()
            while time.monotonic() < deadline:
                states = self.api.model_states()
                with_stubs = {stub.model for stub in stub_processes(self.process.pid)}
                now = time.monotonic()
                for model in models:
                    if states.get(model) in RELEASED or model in self.stuck:
                        continue
                    stubless = model in self.supervisor.python_models - with_stubs
                    if stubless and now - stubless_since.setdefault(model, now) > UNLOAD_WAIT_S:
                        self.stuck.add(model)
                    elif now - asked > RELEASE_WAIT_S:
                        log.error(
                            "k4serve: Triton has not released %s (%s, stub %s) %.0f s after its unload with nothing "
                            "in flight; not waiting for it",
                            model, states.get(model), "alive" if model in with_stubs else "gone", now - asked,
                        )  # fmt: skip
                        self.stuck.add(model)
                held = {m: states[m] for m in models if m not in self.stuck and states.get(m) not in RELEASED}
                if not held:
                    return True
                if now - reported > DRAIN_REPORT_S:
                    reported = now
                    log.warning("k4serve: draining: waiting for Triton to release %s", held)
                time.sleep(0.2)
        except (TritonError, OSError) as error:
            log.error("k4serve: unloading %s failed: %s", ", ".join(models), error)
        return False

    def stop(self) -> int | None:
        """Drain, end tritonserver, remove this launcher's shared memory and work directory; the exit code."""
        code = None
        try:
            if self.process is not None:
                code = self._end_process()
        finally:
            if self.front is not None:
                self.front.close()
                self.front = None
            if self.supervisor is not None:
                self.supervisor.close()
            removed = remove_regions(regions(self.region_prefix))
            if removed:
                log.warning("k4serve: removed %d shared-memory regions left by tritonserver", len(removed))
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None
        return code

    def _end_process(self) -> int:
        if self.process.poll() is not None:
            return self.process.returncode
        drained = self.supervisor.watching and self.drain()
        kept = self.supervisor.ghosts | self.stuck
        if drained and kept:
            # Nothing is in flight and every other model is unloaded; a version Triton keeps (a model whose stub
            # died, or one it did not release) would hold tritonserver's exit for --exit-timeout-secs and end it
            # in an error.
            log.warning(
                "k4serve: ending tritonserver (Triton 2.51 keeps the unreleased version of %s)",
                ", ".join(sorted(kept)),
            )
            self.process.kill()
            self.process.wait()
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=self.options.exit_timeout_s + 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def _log_tail(self, lines: int = 40) -> str:
        if self.options.log is None or not self.options.log.is_file():
            return ""
        tail = self.options.log.read_text(errors="replace").splitlines()[-lines:]
        return "; log tail:\n" + "\n".join(tail)

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
