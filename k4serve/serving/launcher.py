"""Run the `tritonserver` binary shipped in the nvidia-pytriton wheel on a k4serve model repository.

The wheel carries the server, the Python backend, one Python-backend stub per Python version and the libraries
they link. `TritonServer` assembles a backend directory with the stub matching this interpreter, points the stub
at this environment's packages, starts the server on the given address and ports, waits until every model is
ready, and stops it (SIGTERM: Triton drains in-flight requests) when asked or when this process dies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
# Runs first in the child and execs tritonserver: SIGTERM reaches the server when the launching process dies,
# so none outlives it. (A preexec_fn would do the same, but it forces a plain fork(), which can hang in gRPC's
# fork handlers once a gRPC client runs in the launching process; Popen without one uses vfork.)
_DIE_WITH_PARENT = "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 15); os.execv(sys.argv[1], sys.argv[1:])"
# The stock instance group of a GPU-capable stage: a count and no kind (Triton then picks GPUs when present).
_AUTO_INSTANCE_GROUP = re.compile(r"instance_group\s*\[\s*\{\s*count:\s*(\d+)\s*\}\s*\]")
_ENSEMBLE_STEP = re.compile(r'model_name:\s*"([^"]+)"')  # the models an ensemble's steps call


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


def models_to_load(repository: Path, names: list[str]) -> list[str]:
    """`names` and, for an ensemble among them, the models its steps call (sorted); unknown names fail here."""
    available = sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"no model {', '.join(unknown)} in {repository}; choose from {', '.join(available)}")
    load = set(names)
    for name in names:
        load.update(_ENSEMBLE_STEP.findall((repository / name / "config.pbtxt").read_text()))
    return sorted(load)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServerOptions:
    """How to run tritonserver. Ports default to free ones; `env` carries K4SERVE_* settings to the stages."""

    model_repository: Path = REPO_MODEL_REPOSITORY
    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    gpus: list[int] | None = None  # None: as the configs say; []: CPU only; [0, 1]: KIND_GPU on those
    models: list[str] | None = None  # None: every model; else these (and their ensembles' steps) only
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None  # None: the server writes to this process's stdout/stderr
    log_verbose: int = 0
    exit_timeout_s: int = 30


class TritonServer:
    """A running tritonserver; use as a context manager or call start() / stop()."""

    def __init__(self, options: ServerOptions):
        self.options = options
        for name in ("grpc_port", "http_port", "metrics_port"):
            if not getattr(options, name):
                setattr(options, name, free_port(options.host))
        self.process: subprocess.Popen | None = None
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
    def _client_host(self) -> str:
        return "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host

    def command(self, backends: Path, repository: Path) -> list[str]:
        """The tritonserver command line."""
        o = self.options
        # Explicit model control loads only the models asked for (one GPU cannot hold both t2v's stages and
        # t2v_stream's own copy of the three models at full size).
        selection = (
            []
            if o.models is None
            else ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models_to_load(repository, o.models))]
        )
        return [
            str(TritonDistribution.find().binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            # The configs are complete: skip the Python backend's extra per-model stub that would import
            # model.py (torch and all) only to auto-complete them. Load every model at once.
            "--disable-auto-complete-config",
            "--model-load-thread-count=8",
            # Unique shared-memory names, so several servers can run on one host (parallel test runs).
            f"--backend-config=python,shm-region-prefix-name=k4serve_{os.getpid()}_{o.grpc_port}_",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            "--allow-metrics=true",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            f"--exit-timeout-secs={o.exit_timeout_s}",
            f"--log-verbose={o.log_verbose}",
            *selection,
        ]

    def start(self) -> TritonServer:
        """Launch tritonserver (returns at once; see wait_ready)."""
        dist = TritonDistribution.find()
        self._workdir = tempfile.TemporaryDirectory(prefix="k4serve-triton-")
        work = Path(self._workdir.name)
        backends = dist.assemble_backends(work / "backends")
        repository = self.options.model_repository.resolve()
        if not (repository / "t2v" / "config.pbtxt").is_file():
            raise FileNotFoundError(
                f"{repository} is not a k4serve model repository (no t2v/config.pbtxt): pass --model-repository "
                "with the model_repository/ directory of a k4serve checkout"
            )
        if self.options.gpus is not None:
            repository = copy_repository(repository, work / "model_repository", self.options.gpus)
        output = None
        if self.options.log is not None:
            self._log_file = output = open(self.options.log, "ab")  # closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, *self.command(backends, repository)],
            env=stub_environment(dist, self.options.env),
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,  # a terminal's Ctrl-C reaches us; we forward it once
        )
        return self

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until every model is loaded; raise with the log's tail if the server exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver was not ready after {timeout_s:.0f} s{self._log_tail()}")

    def signal(self, signum: int) -> None:
        """Forward a signal to the server (SIGINT / SIGTERM: graceful shutdown)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self) -> int:
        """Wait for the server to exit; its exit code."""
        return self.process.wait()

    def stop(self) -> int | None:
        """Shut down gracefully (SIGKILL after the exit timeout) and remove the work directory."""
        code = None
        if self.process is not None:
            self.signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=self.options.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
        if self._workdir is not None:
            self._workdir.cleanup()
        return code

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
