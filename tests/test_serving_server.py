"""A real tritonserver on loopback (tiny preset): videos equal the in-process pipeline's, bad input is refused
with INVALID_ARGUMENT, cancelled streams free their instance, metrics count requests, instances sit where the
config puts them."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
from serving_helpers import PROMPT, SIZE, TIMEOUT_S, grpc_inputs, metric, metrics, wait_for  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from k4serve.client.client import AsyncT2VClient, T2VClient, Video, VideoRequest  # noqa: E402
from k4serve.pipelines.t2v import MAX_SEED, PipelineSettings, T2VPipeline, num_frames  # noqa: E402
from k4serve.pipelines.video_io import FPS, decode_mp4, encode_mp4  # noqa: E402

pytestmark = pytest.mark.server

STAGES = ("text_encoder", "dit_sampler", "vae_decoder", "muxer")


@pytest.fixture(scope="module")
def reference():
    """The in-process tiny pipeline: what the server must reproduce."""
    return T2VPipeline.from_settings(PipelineSettings(preset="tiny"))


@pytest.fixture(scope="module")
def client(triton_server):
    with T2VClient(triton_server.grpc_url, timeout_s=TIMEOUT_S) as client:
        yield client


def expected_frames(pipeline: T2VPipeline, seconds: int, seed: int, prompt: str = PROMPT) -> np.ndarray:
    """The in-process frames after the same mp4 round trip the server's output takes."""
    frames, _ = decode_mp4(encode_mp4(pipeline(prompt, *SIZE, seconds, seed)))
    return frames


def assert_video(video: Video, seconds: int) -> np.ndarray:
    frames, fps = decode_mp4(video.mp4)
    assert frames.shape == (num_frames(seconds), *SIZE, 3)
    assert fps == FPS
    return frames


def good_inputs(**overrides: np.ndarray) -> dict[str, np.ndarray]:
    values = {
        "PROMPT": np.array([PROMPT.encode()], dtype=np.object_),
        "HEIGHT": np.array([SIZE[0]], dtype=np.int32),
        "WIDTH": np.array([SIZE[1]], dtype=np.int32),
        "SECONDS": np.array([0], dtype=np.int32),
        "SEED": np.array([1], dtype=np.int64),
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def test_t2v_equals_in_process_pipeline(client, reference):
    video = client.generate(VideoRequest(PROMPT, *SIZE, seconds=1, seed=7, request_id="fox-7"))
    assert video.seed == 7 and video.request_id == "fox-7"
    np.testing.assert_array_equal(assert_video(video, 1), expected_frames(reference, 1, 7))


def test_t2v_stream_reports_progress_then_equals_in_process_pipeline(client, reference):
    items = list(client.stream(VideoRequest(PROMPT, *SIZE, seconds=1, seed=8, request_id="fox-8")))
    video, events = items[-1], items[:-1]
    assert isinstance(video, Video) and video.seed == 8 and video.request_id == "fox-8"
    np.testing.assert_array_equal(assert_video(video, 1), expected_frames(reference, 1, 8))
    assert [(e.stage, e.step, e.steps) for e in events] == [
        ("text_encoder", 0, 1),
        ("text_encoder", 1, 1),
        *[("dit_sampler", step, 4) for step in range(5)],
        ("vae_decoder", 0, 1),
        ("vae_decoder", 1, 1),
        ("muxer", 0, 1),
        ("muxer", 1, 1),
    ]
    assert [e.fraction for e in events if e.stage == "dit_sampler"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    elapsed = [e.elapsed for e in events]
    assert elapsed == sorted(elapsed)


def test_absent_seed_is_drawn_and_returned(client):
    first = client.generate(VideoRequest(PROMPT, *SIZE, seconds=0))
    assert 0 <= first.seed <= MAX_SEED
    again = client.generate(VideoRequest(PROMPT, *SIZE, seconds=0, seed=first.seed))
    np.testing.assert_array_equal(decode_mp4(again.mp4)[0], decode_mp4(first.mp4)[0])


def test_async_stream_yields_progress_then_the_same_video(triton_server, client):
    async def stream() -> list:
        async with AsyncT2VClient(triton_server.grpc_url, timeout_s=TIMEOUT_S) as aio:
            return [item async for item in aio.stream(VideoRequest(PROMPT, *SIZE, seconds=0, seed=9))]

    items = asyncio.run(stream())
    assert list(dict.fromkeys(item.stage for item in items[:-1])) == list(STAGES) and isinstance(items[-1], Video)
    np.testing.assert_array_equal(
        assert_video(items[-1], 0), decode_mp4(client.generate(VideoRequest(PROMPT, *SIZE, seconds=0, seed=9)).mp4)[0]
    )


BAD_INPUTS = {
    "unknown size": (good_inputs(HEIGHT=np.array([400], np.int32)), "400x672 (height x width) is not supported"),
    "seconds above 12": (good_inputs(SECONDS=np.array([13], np.int32)), "seconds must be a whole number from 0 to 12"),
    "negative seconds": (good_inputs(SECONDS=np.array([-1], np.int32)), "seconds must be a whole number from 0 to 12"),
    "empty prompt": (good_inputs(PROMPT=np.array([b"  "], np.object_)), "prompt is empty"),
    "10,000-character prompt": (good_inputs(PROMPT=np.array([b"a" * 10_000], np.object_)), "10000 characters"),
    "non-UTF-8 prompt": (good_inputs(PROMPT=np.array([b"fox \xff\xfe"], np.object_)), "must be UTF-8"),
    "negative seed": (good_inputs(SEED=np.array([-5], np.int64)), "seed must be from 0"),
    "wrong dtype": (good_inputs(HEIGHT=np.array([384.0], np.float32)), "'HEIGHT' data-type is 'FP32'"),
    "wrong shape": (good_inputs(PROMPT=np.array([b"a", b"b"], np.object_)), "unexpected shape for input 'PROMPT'"),
    "missing input": (good_inputs(PROMPT=None), "input PROMPT is missing"),
    "missing input beside the optional SEED": (good_inputs(HEIGHT=None), "input HEIGHT is missing"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument_and_server_keeps_serving(client, case):
    inputs, message = BAD_INPUTS[case]
    with pytest.raises(InferenceServerException) as raised:
        client.client.infer("t2v", grpc_inputs(inputs), client_timeout=TIMEOUT_S)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in raised.value.message()


def test_server_keeps_serving_after_bad_inputs(client):
    for inputs, _ in BAD_INPUTS.values():
        with pytest.raises(InferenceServerException):
            client.client.infer("t2v", grpc_inputs(inputs), client_timeout=TIMEOUT_S)
    assert_video(client.generate(VideoRequest(PROMPT, *SIZE, seconds=0, seed=1)), 0)


def test_stream_bad_input_ends_the_stream_with_the_reason(client):
    with pytest.raises(InferenceServerException, match="is not supported; use one of: 512x512"):
        list(client.stream(VideoRequest(PROMPT, 400, 400, seconds=0, seed=1)))


def test_cancelled_stream_stops_the_work_and_frees_the_instance(triton_server, client):
    def cancelled() -> float:
        return metric(metrics(triton_server), "k4serve_requests_cancelled_total", model="t2v_stream")

    def decoded() -> float:
        labels = {"model": "t2v_stream", "stage": "vae_decoder"}
        return metric(metrics(triton_server), "k4serve_stage_duration_seconds_count", **labels)

    cancelled_before, decoded_before = cancelled(), decoded()
    stream = client.stream(VideoRequest(PROMPT, *SIZE, seconds=12, seed=3))  # 97 frames: long on this host
    for event in stream:
        if event.stage == "dit_sampler" and event.step == 1:
            break
    stream.close()  # leaving the loop cancels the gRPC call

    wait_for(lambda: cancelled() == cancelled_before + 1, "the server to stop the cancelled request")
    assert decoded() == decoded_before  # the cancelled request never reached the VAE
    assert_video(list(client.stream(VideoRequest(PROMPT, *SIZE, seconds=0, seed=4)))[-1], 0)


def test_metrics_count_requests_per_model_and_stage_durations(triton_server, client):
    before = metrics(triton_server)
    for seed in (21, 22):
        client.generate(VideoRequest(PROMPT, *SIZE, seconds=0, seed=seed))
    with pytest.raises(InferenceServerException):  # refused by t2v itself, before any stage runs
        client.generate(VideoRequest(PROMPT, *SIZE, seconds=99, seed=1))
    after = metrics(triton_server)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    # Triton counts a Python model's error response as an executed request (t2v: 3). k4serve's stage timings count
    # finished work only, in the stage (model=stage) and as the entry point saw it (model=t2v, queueing included).
    executed = {"t2v": 3, "text_encoder": 2, "dit_sampler": 2, "vae_decoder": 2, "muxer": 2}
    for model, count in executed.items():
        assert delta("nv_inference_request_success", model=model, version="1") == count, model
    for stage in STAGES:
        assert delta("k4serve_stage_duration_seconds_count", model=stage, stage=stage) == 2, stage
        assert delta("k4serve_stage_duration_seconds_count", model="t2v", stage=stage) == 2, stage
        waited = delta("k4serve_stage_duration_seconds_sum", model="t2v", stage=stage)
        assert waited >= delta("k4serve_stage_duration_seconds_sum", model=stage, stage=stage) > 0, stage


def test_each_instance_runs_where_its_config_places_it(triton_server, client):
    placed: dict[str, list[str]] = {}
    for (name, labels), value in metrics(triton_server).items():
        if name == "k4serve_instance_info" and value == 1:
            placed.setdefault(dict(labels)["model"], []).append(dict(labels)["device"])
    for model in (*STAGES, "t2v_stream"):
        expected = []
        for group in client.client.get_model_config(model, as_json=True)["config"]["instance_group"]:
            count = int(group["count"])
            if group["kind"] == "KIND_GPU":
                expected += [f"cuda:{gpu}" for gpu in group["gpus"] for _ in range(count)]
            else:
                expected += ["cpu"] * count
        assert sorted(placed[model]) == sorted(expected), model


def test_request_command_streams_and_writes_the_mp4(triton_server, tmp_path, capsys):
    from k4serve.cli import main

    output = tmp_path / "fox.mp4"
    argv = ["request", PROMPT, "-o", str(output), "--url", triton_server.grpc_url, "--seconds", "1", "--stream"]
    assert main([*argv, "--seed", "5", "--size", "384x672"]) == 0
    assert "seed 5" in capsys.readouterr().out
    assert_video(Video(output.read_bytes(), 5, ""), 1)
    assert main([*argv, "--size", "400x400"]) == 2
    assert "is not supported; use one of" in capsys.readouterr().err


def test_serve_once_serves_one_request_then_shuts_down(tmp_path):
    output = tmp_path / "once.mp4"
    command = [sys.executable, "-m", "k4serve.cli", "serve", "--once", PROMPT, "-o", str(output), "--seconds", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_video(Video(output.read_bytes(), 0, ""), 0)
    grpc_address = re.search(r"gRPC (\S+):(\d+)", result.stdout)
    with socket.socket() as sock:  # the server is gone with the command
        assert sock.connect_ex((grpc_address.group(1), int(grpc_address.group(2)))) != 0
