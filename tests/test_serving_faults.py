"""Faults against a real `k4serve serve` (tiny preset, CPU): a crafted HTTP request, a killed stage, SIGTERM.

One server for the module, in test order: stale shared memory of a dead launcher is gone at its start; the
huge-shape HTTP request that ends Triton 2.51 is refused and the server serves on; the restricted APIs refuse
clients; a stage's stub killed (as an OOM kill) makes readiness false, then it is reloaded and serves again; last,
SIGTERM with two `t2v` and two `t2v_stream` requests in flight lets all four finish, then the server exits cleanly
and promptly with /dev/shm clean. Written against the client protocol only (gRPC, HTTP), so it holds whether
`t2v_stream` runs its own pipeline or orchestrates the stage models.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="tritonserver comes with the serve extra: pip install 'k4serve[serve]'")
pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from serving_helpers import T2V_ENTRY_POINTS  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from k4serve.client.client import T2VClient, Video, VideoRequest  # noqa: E402
from k4serve.pipelines.t2v import num_frames  # noqa: E402
from k4serve.pipelines.video_io import decode_mp4  # noqa: E402
from k4serve.serving.launcher import free_port  # noqa: E402
from k4serve.serving.shm import SHM_DIR, region_prefix, regions  # noqa: E402
from k4serve.serving.supervisor import stub_processes  # noqa: E402
from k4serve.serving.triton_api import parse_metrics  # noqa: E402

pytestmark = pytest.mark.server

SIZE = (384, 672)
TIMEOUT_S = 600  # bounds every wait; on 2 loaded cores a tiny request takes seconds to a minute
ENV = {"K4SERVE_PRESET": "tiny", "K4SERVE_WEIGHTS": "", "K4SERVE_ENGINE": "eager", "K4SERVE_DEVICE": ""}
DETECT_S = 5.0  # a dead stub makes readiness false within this
STOP_AFTER_LAST_REQUEST_S = 30.0  # the server is gone this long after the last request in flight finished


class Serve:
    """A `k4serve serve` subprocess and its addresses."""

    def __init__(self, tmp: Path, *extra: str):
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log, self.stderr = tmp / "tritonserver.log", tmp / "serve.stderr"
        command = [sys.executable, "-m", "k4serve.cli", "serve", "--grpc-port", str(self.grpc_port)]
        command += ["--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port)]
        command += ["--log-file", str(self.log), "--drain-timeout", str(TIMEOUT_S), *extra]
        with open(self.stderr, "wb") as stderr:
            self.process = subprocess.Popen(command, env={**os.environ, **ENV}, stdout=stderr, stderr=stderr)
        self.prefix = region_prefix(self.process.pid, self.grpc_port)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def http(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", body, headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        return status, json.loads(payload) if payload.startswith(b"{") else {}

    def ready(self) -> bool:
        try:
            return self.http("GET", "/v2/health/ready")[0] == 200
        except OSError:
            return False

    def tritonserver_pid(self) -> int:
        """The launcher's tritonserver child."""
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == (
                    self.process.pid
                ):
                    if b"tritonserver" in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                        return int(entry.name)
            except OSError:
                continue
        raise AssertionError("the launcher has no tritonserver child")

    def output(self) -> str:
        return self.stderr.read_text(errors="replace") + self.log.read_text(errors="replace")

    def stopped_within(self, seconds: float) -> int:
        """The exit code once the server has stopped; fails with its output (and kills it) past `seconds`."""
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the server was still running {seconds:g} s on; `k4serve serve` said:\n"
                f"{self.stderr.read_text(errors='replace')[-4000:]}\ntritonserver's log:\n"
                f"{self.log.read_text(errors='replace')[-4000:]}"
            ) from None


def wait_for(condition, what: str, timeout_s: float = TIMEOUT_S, every_s: float = 0.05) -> float:
    """Poll `condition` until true; the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"gave up waiting for {what}"
        time.sleep(every_s)
    return time.monotonic() - started


def dead_pid() -> int:
    """The pid of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


@pytest.fixture(scope="module")
def stale_regions():
    """Regions named after a dead launcher and after this live process, made before the server starts."""
    dead, live = SHM_DIR / (region_prefix(dead_pid(), 1) + "test"), SHM_DIR / (region_prefix(os.getpid(), 1) + "test")
    for path in (dead, live):
        path.write_bytes(b"\0" * 4096)
    yield dead, live
    for path in (dead, live):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def running(server: Serve):
    """`server`, once ready; stopped (SIGTERM) on the way out if still running."""
    try:
        wait_for(lambda: server.ready() or server.process.poll() is not None, "the server to be ready", every_s=0.5)
        assert server.process.poll() is None, server.output()[-3000:]
        yield server
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            server.stopped_within(TIMEOUT_S)


@pytest.fixture(scope="module")
def serve(stale_regions, tmp_path_factory):
    with running(Serve(tmp_path_factory.mktemp("serve"), "--models", *T2V_ENTRY_POINTS)) as server:
        yield server


def huge_shape_request(dimension: int) -> bytes:
    """A t2v request whose HEIGHT declares `dimension` elements and carries one: a few hundred bytes."""
    inputs = [
        {"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": ["a red fox"]},
        {"name": "HEIGHT", "shape": [dimension], "datatype": "INT32", "data": [SIZE[0]]},
        {"name": "WIDTH", "shape": [1], "datatype": "INT32", "data": [SIZE[1]]},
        {"name": "SECONDS", "shape": [1], "datatype": "INT32", "data": [0]},
    ]
    return json.dumps({"inputs": inputs}).encode()


def http_t2v(serve: Serve, seed: int) -> bytes:
    """One t2v request over HTTP (binary tensors, as tritonclient.http sends them): the mp4."""
    client = httpclient.InferenceServerClient(f"127.0.0.1:{serve.http_port}", network_timeout=TIMEOUT_S)
    values = {
        "PROMPT": (np.array([b"a red fox"], dtype=np.object_), "BYTES"),
        "HEIGHT": (np.array([SIZE[0]], np.int32), "INT32"),
        "WIDTH": (np.array([SIZE[1]], np.int32), "INT32"),
        "SECONDS": (np.array([0], np.int32), "INT32"),
        "SEED": (np.array([seed], np.int64), "INT64"),
    }
    inputs = []
    for name, (value, datatype) in values.items():
        inputs.append(httpclient.InferInput(name, list(value.shape), datatype))
        inputs[-1].set_data_from_numpy(value)
    result = client.infer("t2v", inputs, outputs=[httpclient.InferRequestedOutput("MP4")])
    return result.as_numpy("MP4")[0]


def assert_video(mp4: bytes, seconds: int) -> None:
    frames, _ = decode_mp4(mp4)
    assert frames.shape == (num_frames(seconds), *SIZE, 3)


def test_stale_shared_memory_of_a_dead_launcher_is_removed_at_start(serve, stale_regions):
    dead, live = stale_regions
    assert not dead.exists()
    assert live.exists()  # this process is alive: its regions are not the server's to remove


@pytest.mark.parametrize("dimension", [2**40, 2**62])
def test_huge_shape_http_request_is_refused_and_the_server_serves_on(serve, dimension):
    status, answer = serve.http("POST", "/v2/models/t2v/infer", huge_shape_request(dimension))
    assert status == 400
    assert answer["error"] == f"input 'HEIGHT': shape [{dimension}] declares {dimension} elements, 'data' holds 1"
    assert serve.process.poll() is None and serve.ready()
    assert_video(http_t2v(serve, seed=dimension % 1000), 0)
    with T2VClient(serve.grpc_url, timeout_s=TIMEOUT_S) as client:
        assert_video(client.generate(VideoRequest("a red fox", *SIZE, seconds=0, seed=2)).mp4, 0)


def test_malformed_http_json_is_a_400(serve):
    status, answer = serve.http("POST", "/v2/models/t2v/infer", b'{"inputs": [{"name": "PROMPT", "shape": [1],')
    assert status == 400 and answer["error"].startswith("request body is not valid JSON")
    status, answer = serve.http("POST", "/v2/models/t2v/infer", b"{}", {"Transfer-Encoding": "chunked"})
    assert status == 411


def test_shared_memory_and_model_control_are_closed_to_clients(serve):
    for path in ("/v2/repository/index", "/v2/repository/models/muxer/unload", "/v2/systemsharedmemory/register"):
        status, answer = serve.http("POST", path, b"{}")
        assert status == 403 and "is not served on this port" in answer["error"], path
    client = grpcclient.InferenceServerClient(serve.grpc_url)
    for call in (
        lambda: client.register_system_shared_memory("probe", "/k4serve_probe", 64),
        lambda: client.unload_model("muxer"),
        lambda: client.update_log_settings({"log_file": "/tmp/k4serve-probe.log"}),
    ):
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            call()
    assert client.is_model_ready("muxer")


@pytest.mark.parametrize("ending", ["tritonserver killed", "Ctrl-C"])
def test_shared_memory_is_removed_however_the_server_ends(tmp_path, ending):
    with running(Serve(tmp_path, "--models", "muxer")) as server:  # one small model: a quick start
        assert len(regions(server.prefix)) == 1
        if ending == "Ctrl-C":
            server.process.send_signal(signal.SIGINT)
        else:
            os.kill(server.tritonserver_pid(), signal.SIGKILL)
        code = server.stopped_within(2 * STOP_AFTER_LAST_REQUEST_S)
    assert (code == 0) == (ending == "Ctrl-C"), server.output()[-3000:]
    assert regions(server.prefix) == []


def has_children(pid: int) -> bool:
    """Whether process `pid` has started a child (the muxer's ffmpeg)."""
    return any(path.read_text().strip() for path in Path(f"/proc/{pid}/task").glob("*/children"))


def muxer_inputs(frames: np.ndarray) -> list:
    tensor = grpcclient.InferInput("FRAMES", list(frames.shape), "UINT8")
    tensor.set_data_from_numpy(frames)
    return [tensor]


def test_stage_killed_under_a_request_is_reloaded_and_the_server_still_stops_clean(tmp_path):
    """Triton 2.51 never releases a model version whose stub died mid-request; the stop must not wait for it."""
    with running(Serve(tmp_path, "--models", "muxer")) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        frames = np.random.default_rng(0).integers(0, 256, (num_frames(12), *SIZE, 3), dtype=np.uint8)
        outcome: list = []

        def encode() -> None:
            try:
                outcome.append(client.infer("muxer", muxer_inputs(frames), client_timeout=TIMEOUT_S))
            except InferenceServerException as error:
                outcome.append(error)

        request = threading.Thread(target=encode)
        request.start()
        (stub,) = stub_processes(server.tritonserver_pid())
        # Executing: the stub's ffmpeg encodes the 97 noise frames (seconds on this host).
        wait_for(lambda: has_children(stub.pid), "the muxer to start encoding")
        os.kill(stub.pid, signal.SIGKILL)
        request.join(timeout=TIMEOUT_S)
        assert isinstance(outcome[0], InferenceServerException)  # that request is lost with its process
        wait_for(lambda: not server.ready(), "readiness to turn false", timeout_s=DETECT_S)
        wait_for(server.ready, "the muxer to be reloaded", every_s=0.2)
        result = client.infer("muxer", muxer_inputs(frames[:1]), client_timeout=TIMEOUT_S)
        assert decode_mp4(result.as_numpy("MP4")[0])[0].shape == (1, *SIZE, 3)
        server.process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        code = server.stopped_within(STOP_AFTER_LAST_REQUEST_S)
    output = server.output()
    assert code == 0 and time.monotonic() - interrupted < STOP_AFTER_LAST_REQUEST_S, output[-3000:]
    assert "Exit timeout expired" not in output and regions(server.prefix) == []


def test_killed_stage_makes_readiness_false_then_is_reloaded_and_serves(serve):
    server_pid = serve.tritonserver_pid()
    (stub,) = [s for s in stub_processes(server_pid) if s.model == "dit_sampler"]
    os.kill(stub.pid, signal.SIGKILL)  # as the OOM killer would
    detected_s = wait_for(lambda: not serve.ready(), "readiness to turn false", timeout_s=DETECT_S)
    recovered_s = wait_for(serve.ready, "the stage to be reloaded", every_s=0.2)
    with T2VClient(serve.grpc_url, timeout_s=TIMEOUT_S) as client:
        assert_video(client.generate(VideoRequest("a red fox", *SIZE, seconds=0, seed=3)).mp4, 0)
        assert_video(list(client.stream(VideoRequest("a red fox", *SIZE, seconds=0, seed=4)))[-1].mp4, 0)
    stubs = stub_processes(server_pid)
    assert [s.model for s in stubs].count("dit_sampler") == 1 and stub.pid not in {s.pid for s in stubs}
    assert {p.name for p in regions(serve.prefix)} == {s.region for s in stubs}  # the dead one's region is gone
    print(f"\nkilled dit_sampler stub: not ready after {detected_s:.2f} s, serving again after {recovered_s:.1f} s")


def test_sigterm_finishes_requests_in_flight_then_stops_clean(serve):
    results: dict[str, object] = {}
    started = {"t2v_stream-1": threading.Event(), "t2v_stream-2": threading.Event()}

    def run(name: str, seed: int) -> None:
        try:
            with T2VClient(serve.grpc_url, timeout_s=TIMEOUT_S) as client:
                request = VideoRequest("a red fox", *SIZE, seconds=1, seed=seed, request_id=name)
                if name.startswith("t2v_stream"):
                    for item in client.stream(request):
                        started[name].set()
                        results[name] = item
                else:
                    results[name] = client.generate(request)
        except Exception as error:  # noqa: BLE001 - recorded and asserted below
            results[name] = error
        results[name + " done"] = time.monotonic()

    def text_encoder_count() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{serve.metrics_port}/metrics", timeout=10).read().decode()
        labels = frozenset({("model", "text_encoder"), ("version", "1")})
        return parse_metrics(text).get(("nv_inference_count", labels), 0)

    encoded = text_encoder_count()
    names = ["t2v-1", "t2v-2", "t2v_stream-1", "t2v_stream-2"]
    threads = [threading.Thread(target=run, args=(name, seed)) for seed, name in enumerate(names, 10)]
    for thread in threads[:2]:
        thread.start()
    # In flight: past the text encoder (both t2v requests), streaming progress (both t2v_stream requests).
    wait_for(lambda: text_encoder_count() >= encoded + 2, "both t2v requests to pass the text encoder", every_s=0.2)
    for thread in threads[2:]:
        thread.start()
    wait_for(lambda: all(event.is_set() for event in started.values()), "both streams to report progress")

    serve.process.send_signal(signal.SIGTERM)
    sigterm = time.monotonic()
    wait_for(lambda: not serve.ready(), "readiness to turn false on SIGTERM", timeout_s=DETECT_S)
    status, answer = serve.http("POST", "/v2/models/t2v/infer", huge_shape_request(1))
    assert status == 503 and "draining" in answer["error"]  # admitted no more

    for thread in threads:
        thread.join(timeout=TIMEOUT_S)
    for name in names:
        assert isinstance(results[name], Video), f"{name}: {results[name]!r}"
        assert results[name].request_id == name
        assert_video(results[name].mp4, 1)
    last_finished = max(results[name + " done"] for name in names)
    code = serve.stopped_within(max(1.0, last_finished + STOP_AFTER_LAST_REQUEST_S - time.monotonic()))
    stopped = time.monotonic()
    output = serve.output()
    assert code == 0, output[-3000:]
    assert stopped - last_finished < STOP_AFTER_LAST_REQUEST_S, output[-3000:]
    for failure in ("Exit timeout expired", "terminate called", "Signal (6)", "Signal (11)", "Traceback"):
        assert failure not in output, failure
    assert regions(region_prefix(serve.process.pid, serve.grpc_port)) == []
    print(
        f"\nSIGTERM with 4 requests in flight: last one done {last_finished - sigterm:.1f} s after SIGTERM, "
        f"server gone {stopped - last_finished:.1f} s after that"
    )
