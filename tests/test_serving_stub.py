"""The entry points against a fault of Triton 2.51's Python stub (python_backend r24.10), on a real server.

A finished streaming stage call (decoupled BLS) is held by its Python iterator and by the stub's map of calls; the
map's hold is dropped by the stub's stub-to-parent thread, a C++ thread without the GIL. If Python lets go first,
that thread frees the call's responses and their numpy arrays. Under Python 3.12 that ends the stub (`segfault at
10 ... libpython3.12`, seen on the H200, and here when the probe below runs on 3.12); under 3.11 the free runs
silently off the GIL. The probe is `t2v_stream` with two changes: a finalizer on the numpy array of every EVENT
its stage calls return, which records whether the array was freed on one of the stub's Python threads, and 1 MiB
log lines queued on that C++ thread before each stage call's last response is read, so the call's cleanup waits
behind them (as it does on a loaded GPU host). Every array must be freed on a Python thread.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from typing import ClassVar

import pytest

pytest.importorskip("pytriton", reason="tritonserver comes with the serve extra: pip install 'k4serve[serve]'")
pytest.importorskip("tritonclient.grpc")
from serving_helpers import PROMPT, SIZE, wait_for  # noqa: E402

from k4serve.client.client import T2VClient, Video, VideoRequest  # noqa: E402
from k4serve.serving.launcher import REPO_MODEL_REPOSITORY, ServerOptions, TritonServer  # noqa: E402

PROBE = """
import json
import threading
import weakref

import triton_python_backend_utils as pb_utils

from k4serve.serving.entry_points import T2VModel

LAG = "x" * 2**20


class TritonPythonModel(T2VModel):
    def setup(self):
        super().setup()
        self.freed = {"seen": 0, "python": 0, "other": 0}
        self.reported = dict(self.freed)
        threading.Thread(target=self._report, daemon=True).start()

    def _outputs(self, step, response, flight):
        event = pb_utils.get_output_tensor_by_name(response, "EVENT")
        if event is not None:
            self.freed["seen"] += 1
            weakref.finalize(event.as_numpy(), self._freed)
            progress = json.loads(event.as_numpy().reshape(-1)[0])
            if progress.get("step") == progress.get("steps"):  # the stage's outputs come next, and its last response
                for _ in range(10):
                    pb_utils.Logger.log_info("lag " + LAG)
        return super()._outputs(step, response, flight)

    def _freed(self):
        python = threading.get_native_id() in {thread.native_id for thread in threading.enumerate()}
        self.freed["python" if python else "other"] += 1

    def _report(self):
        while not self.stop_watching.wait(0.2):
            if self.freed != self.reported:
                self.reported = dict(self.freed)
                pb_utils.Logger.log_info("probe freed: " + " ".join(f"{k}={v}" for k, v in self.reported.items()))
"""


@dataclasses.dataclass(frozen=True)
class ProbeRequest(VideoRequest):
    stream_model: ClassVar[str] = "t2v_probe"


@pytest.fixture(scope="module")
def probe_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("stub")
    repository = root / "model_repository"
    shutil.copytree(REPO_MODEL_REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repository / "t2v_stream", repository / "t2v_probe")
    (repository / "t2v_probe" / "1" / "model.py").write_text(PROBE)
    env = {"K4SERVE_PRESET": "tiny", "K4SERVE_WEIGHTS": "", "K4SERVE_ENGINE": "eager", "K4SERVE_DEVICE": ""}
    options = ServerOptions(model_repository=repository, env=env, log=root / "server.log", models=["t2v_probe"])
    with TritonServer(options) as server:
        yield server


def freed_counts(server) -> dict[str, int]:
    """The probe's last count: EVENT arrays seen, freed on a Python thread, freed on another."""
    reports = re.findall(r"probe freed: seen=(\d+) python=(\d+) other=(\d+)", server.options.log.read_text("utf-8"))
    return dict(zip(("seen", "python", "other"), map(int, reports[-1]), strict=True)) if reports else {}


def test_finished_stage_calls_are_freed_on_python_threads(probe_server):
    client = T2VClient(f"127.0.0.1:{probe_server.options.grpc_port}", timeout_s=120)
    for seed in range(2):
        items = list(client.stream(ProbeRequest(PROMPT, *SIZE, seconds=0, seed=seed)))
        assert isinstance(items[-1], Video) and items[-1].mp4[4:8] == b"ftyp"

    def all_freed() -> bool:
        counts = freed_counts(probe_server)
        return bool(counts) and counts["python"] + counts["other"] == counts["seen"]

    wait_for(all_freed, "the EVENT arrays of both requests' stage calls to be freed", 30)
    counts = freed_counts(probe_server)
    assert counts["seen"] >= 2 * 2 and counts["other"] == 0, counts
