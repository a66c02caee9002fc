"""The entry points and stages against three faults of Triton 2.51's Python stub (python_backend r24.10).

A metric's observe() and increment() release the GIL and then rebuild the metric's shared-memory message with no
lock: two threads on one metric make tritonserver abort (backend.SerialMetric). The probe is `text_encoder`, whose
every request also observes one series from four threads at once.

The other two free numpy arrays without the GIL. Under Python 3.12 that ends the stub process (`segfault at 10 ...
libpython3.12`: seen on the H200, and here when these probes run under 3.12); under 3.11 the free runs silently.
- A finished streaming stage call (decoupled BLS) is held by its Python iterator and by the stub's map of calls,
  whose hold the stub's stub-to-parent thread (C++, no GIL) drops; if Python let go first, that thread frees the
  call's responses (Orchestrator._after_cleanup).
- A response sent through a response sender loses the outputs its caller did not ask for with the GIL released
  (backend.requested_only).
The probes are `t2v_stream` and `dit_sampler` with a finalizer on each numpy array of interest that counts whether
it was freed holding the GIL; the entry point's also queues 1 MiB log lines on the stub-to-parent thread before a
stage call's last response is read, so the call's cleanup waits behind them, as on a loaded GPU host.
"""

from __future__ import annotations

import dataclasses
import queue
import re
import shutil
from typing import ClassVar

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="tritonserver comes with the serve extra: pip install 'k4serve[serve]'")
pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
from serving_helpers import PROMPT, SIZE, grpc_inputs, metric, metrics, wait_for  # noqa: E402

from k4serve.client.client import T2VClient, Video, VideoRequest, text_tensor  # noqa: E402
from k4serve.serving.launcher import REPO_MODEL_REPOSITORY, ServerOptions, TritonServer  # noqa: E402

FREED = '''
import ctypes
import threading
import time
import weakref

import triton_python_backend_utils as pb_utils


class FreedArrays:
    """Counts the watched arrays, and those freed holding the GIL or not; logs the counts when they change."""

    def __init__(self, name):
        self.name = name
        self.counts = {"seen": 0, "gil": 0, "no_gil": 0}
        self.reported = dict(self.counts)
        threading.Thread(target=self._report, daemon=True).start()

    def watch(self, array):
        self.counts["seen"] += 1
        weakref.finalize(array, self._freed)

    def _freed(self):
        self.counts["gil" if ctypes.pythonapi.PyGILState_Check() else "no_gil"] += 1

    def _report(self):
        while True:
            time.sleep(0.2)
            if self.counts != self.reported:
                self.reported = dict(self.counts)
                line = " ".join(f"{key}={value}" for key, value in self.reported.items())
                pb_utils.Logger.log_info(f"probe {self.name} freed: {line}")
'''

ENTRY_POINT_PROBE = """
import json

from k4serve.serving.entry_points import T2VModel

LAG = "x" * 2**20


class TritonPythonModel(T2VModel):
    def setup(self):
        super().setup()
        self.freed = FreedArrays("t2v_probe")

    def _outputs(self, step, response, flight):
        event = pb_utils.get_output_tensor_by_name(response, "EVENT")
        if event is not None:
            self.freed.watch(event.as_numpy())
            progress = json.loads(event.as_numpy().reshape(-1)[0])
            if progress.get("step") == progress.get("steps"):  # the stage's outputs come next, and its last response
                for _ in range(10):
                    pb_utils.Logger.log_info("lag " + LAG)
        return super()._outputs(step, response, flight)
"""

STAGE_PROBE = """
from k4serve.serving.stages import DiTSamplerModel


class TritonPythonModel(DiTSamplerModel):
    def setup(self):
        super().setup()
        self.freed = FreedArrays("dit_sampler")

    def run(self, request, progress):
        outputs = super().run(request, progress)
        for tensor in outputs:
            self.freed.watch(tensor.as_numpy())
        return outputs
"""


METRICS_PROBE = """
import threading

from k4serve.serving.stages import TextEncoderModel

THREADS, OBSERVATIONS = 4, 300


class TritonPythonModel(TextEncoderModel):
    def run(self, request, progress):
        threads = [threading.Thread(target=self._observe) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return super().run(request, progress)

    def _observe(self):
        for _ in range(OBSERVATIONS):
            self.metrics.observe("metrics_probe", 0.5)
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
    for model, probe in (("t2v_probe", ENTRY_POINT_PROBE), ("dit_sampler", STAGE_PROBE)):
        (repository / model / "1" / "model.py").write_text(FREED + probe)
    (repository / "text_encoder" / "1" / "model.py").write_text(METRICS_PROBE)
    env = {"K4SERVE_PRESET": "tiny", "K4SERVE_WEIGHTS": "", "K4SERVE_ENGINE": "eager", "K4SERVE_DEVICE": ""}
    options = ServerOptions(model_repository=repository, env=env, log=root / "server.log", models=["t2v_probe"])
    with TritonServer(options) as server:
        yield server


def freed_counts(server, probe: str) -> dict[str, int]:
    """A probe's last counts: arrays watched, freed holding the GIL, freed without it."""
    pattern = rf"probe {probe} freed: seen=(\d+) gil=(\d+) no_gil=(\d+)"
    reports = re.findall(pattern, server.options.log.read_text("utf-8"))
    return dict(zip(("seen", "gil", "no_gil"), map(int, reports[-1]), strict=True)) if reports else {}


def wait_all_freed(server, probe: str) -> dict[str, int]:
    def all_freed() -> bool:
        counts = freed_counts(server, probe)
        return bool(counts) and counts["gil"] + counts["no_gil"] == counts["seen"]

    wait_for(all_freed, f"the arrays {probe} watched to be freed", 30)
    return freed_counts(server, probe)


def test_finished_stage_calls_are_freed_holding_the_gil(probe_server):
    client = T2VClient(f"127.0.0.1:{probe_server.options.grpc_port}", timeout_s=120)
    for seed in range(2):
        items = list(client.stream(ProbeRequest(PROMPT, *SIZE, seconds=0, seed=seed)))
        assert isinstance(items[-1], Video) and items[-1].mp4[4:8] == b"ftyp"
    counts = wait_all_freed(probe_server, "t2v_probe")  # the EVENTs of dit_sampler and vae_decoder, both requests
    assert counts["seen"] >= 2 * 2 and counts["no_gil"] == 0, counts


def test_outputs_a_stage_caller_did_not_ask_for_are_freed_holding_the_gil(probe_server):
    """A client of dit_sampler itself asking for LATENTS only: no EVENTs, no SEED_USED, the stub lives on."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{probe_server.options.grpc_port}")
    embeddings = client.infer("text_encoder", grpc_inputs({"PROMPT": text_tensor(PROMPT)})).as_numpy("EMBEDDINGS")
    values = {
        "EMBEDDINGS": embeddings,
        "HEIGHT": np.array([SIZE[0]], np.int32),
        "WIDTH": np.array([SIZE[1]], np.int32),
        "SECONDS": np.array([0], np.int32),
        "SEED": np.array([7], np.int64),
    }
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for _ in range(2):
            outputs = [grpcclient.InferRequestedOutput("LATENTS")]
            client.async_stream_infer("dit_sampler", grpc_inputs(values), outputs=outputs)
            result, error = responses.get(timeout=120)
            assert error is None, error
            assert result.as_numpy("LATENTS") is not None and result.as_numpy("EVENT") is None
            assert result.as_numpy("SEED_USED") is None
    finally:
        client.stop_stream()
    counts = wait_all_freed(probe_server, "dit_sampler")
    assert counts["seen"] >= 2 * 2 and counts["no_gil"] == 0, counts


def test_metrics_observed_from_many_threads_at_once_all_count_and_the_server_lives(probe_server):
    """Four threads observe one series 300 times each per text_encoder request; without SerialMetric's lock this
    test failed (tritonserver died; a standalone model observing so aborted it with std::bad_alloc, lock_exception)."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{probe_server.options.grpc_port}")
    for _ in range(3):
        embeddings = client.infer("text_encoder", grpc_inputs({"PROMPT": text_tensor(PROMPT)})).as_numpy("EMBEDDINGS")
        assert embeddings is not None and np.isfinite(embeddings).all()
    samples = metrics(probe_server)
    count = "k4serve_stage_duration_seconds_count"
    served = metric(samples, count, model="text_encoder", stage="text_encoder")
    assert served >= 3  # this test's requests, and those of the tests before it
    assert metric(samples, count, model="text_encoder", stage="metrics_probe") == served * 4 * 300
