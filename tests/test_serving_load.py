"""The real server (tiny preset) under load: one copy of each stage serves every entry point, 64 concurrent
requests come back complete and unmixed, and a client's deadline stops the work so the next request starts
promptly."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("tritonclient.grpc")
from serving_helpers import PROMPT, SIZE, TIMEOUT_S, in_flight, metric, metrics, wait_for  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from k4serve.client.client import AsyncT2VClient, T2VClient, Video, VideoRequest  # noqa: E402
from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline  # noqa: E402
from k4serve.pipelines.video_io import encode_mp4  # noqa: E402

pytestmark = pytest.mark.server

STAGES = ("text_encoder", "dit_sampler", "vae_decoder", "muxer")
ENTRY_POINTS = ("t2v", "t2v_stream")


@pytest.fixture(scope="module")
def reference():
    """The in-process tiny pipeline: what the server must reproduce."""
    return T2VPipeline.from_settings(PipelineSettings(preset="tiny"))


def reference_mp4(pipeline: T2VPipeline, seconds: int, seed: int) -> bytes:
    """The mp4 the in-process pipeline makes of PROMPT at SIZE (the server's must be byte-identical)."""
    return encode_mp4(pipeline(PROMPT, *SIZE, seconds, seed))


def parameter_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def test_every_entry_point_runs_on_the_one_copy_of_each_stage(triton_server, reference):
    samples = metrics(triton_server)
    held = {}
    for (name, labels), value in samples.items():
        if name == "k4serve_weights_bytes":
            held.setdefault(dict(labels)["model"], []).append(value)
    expected = {
        "text_encoder": parameter_bytes(reference.text_encoder.encoder),
        "dit_sampler": parameter_bytes(reference.dit),
        "vae_decoder": parameter_bytes(reference.vae),
        "muxer": 0,
    }
    # One instance of each stage (this host has no GPU) holding its component's weights; the entry points none.
    assert held == {**{stage: [nbytes] for stage, nbytes in expected.items()}, "t2v": [0], "t2v_stream": [0]}

    before = metrics(triton_server)
    with T2VClient(triton_server.grpc_url, timeout_s=TIMEOUT_S) as client:
        list(client.stream(VideoRequest(PROMPT, *SIZE, seconds=0, seed=11)))
        client.generate(VideoRequest(PROMPT, *SIZE, seconds=0, seed=12))
    after = metrics(triton_server)
    for stage in STAGES:  # both requests ran through the same stage models
        ran = metric(after, "nv_inference_request_success", model=stage, version="1")
        assert ran - metric(before, "nv_inference_request_success", model=stage, version="1") == 2, stage
        for entry in ENTRY_POINTS:
            timed = metric(after, "k4serve_stage_duration_seconds_count", model=entry, stage=stage)
            assert timed - metric(before, "k4serve_stage_duration_seconds_count", model=entry, stage=stage) == 1


def test_64_concurrent_requests_none_lost_none_mixed(triton_server, reference):
    seeds = [200 + i % 16 for i in range(64)]  # 16 videos, each asked for 4 times, through both entry points
    expected = {seed: reference_mp4(reference, 0, seed) for seed in set(seeds)}

    async def one(client: AsyncT2VClient, index: int, seed: int) -> Video:
        request = VideoRequest(PROMPT, *SIZE, seconds=0, seed=seed, request_id=f"load-{index}")
        if index % 4:
            return await client.generate(request)
        items = [item async for item in client.stream(request)]
        return items[-1]

    async def run_all() -> list[Video]:
        async with AsyncT2VClient(triton_server.grpc_url, timeout_s=TIMEOUT_S * 2) as client:
            return await asyncio.gather(*(one(client, i, seed) for i, seed in enumerate(seeds)))

    videos = asyncio.run(run_all())
    assert [video.request_id for video in videos] == [f"load-{i}" for i in range(64)]
    assert [video.seed for video in videos] == seeds
    mixed = [i for i, (seed, video) in enumerate(zip(seeds, videos, strict=True)) if video.mp4 != expected[seed]]
    assert mixed == []
    wait_for(lambda: in_flight(triton_server, "t2v") == in_flight(triton_server, "t2v_stream") == 0, "no requests")


def test_client_deadline_stops_the_work_and_the_next_request_starts_promptly(triton_server):
    canceled = {"model": "t2v", "reason": "CANCELED", "version": "1"}  # Triton's counter of its own cancels

    def count(name: str, **labels: str) -> float:
        return metric(metrics(triton_server), name, **labels)

    def stopped() -> float:
        """Requests of t2v stopped by t2v (k4serve's counter), or by Triton while they still queued there."""
        ours = count("k4serve_requests_cancelled_total", model="t2v")
        return ours + count("nv_inference_request_failure", **canceled)

    with T2VClient(triton_server.grpc_url, timeout_s=TIMEOUT_S) as client:
        started = time.monotonic()
        client.generate(VideoRequest(PROMPT, *SIZE, seconds=0, seed=30))
        alone_s = time.monotonic() - started
        stopped_before = stopped()
        decoded_before = count("k4serve_stage_duration_seconds_count", model="vae_decoder", stage="vae_decoder")

        async def expire(n: int) -> list:
            async with AsyncT2VClient(triton_server.grpc_url, timeout_s=2) as aio:
                requests = [aio.generate(VideoRequest(PROMPT, *SIZE, seconds=12, seed=31 + i)) for i in range(n)]
                return await asyncio.gather(*requests, return_exceptions=True)

        # Four 12 s videos, a minute or more of work each on this host, with a 2 s deadline.
        errors = asyncio.run(expire(4))
        assert [e.status() for e in errors] == ["StatusCode.DEADLINE_EXCEEDED"] * 4
        started = time.monotonic()
        video = client.generate(VideoRequest(PROMPT, *SIZE, seconds=0, seed=30))
        next_s = time.monotonic() - started
    assert video.seed == 30
    # It waited at most for the step that was running (a DiT step or a VAE chunk), not for the four videos.
    assert next_s < alone_s + 60, (next_s, alone_s)
    wait_for(lambda: stopped() == stopped_before + 4, "the four requests to be stopped")
    # None of the four reached the end of the VAE: only the last request was decoded.
    assert count("k4serve_stage_duration_seconds_count", model="vae_decoder", stage="vae_decoder") == decoded_before + 1


def test_request_timeout_stops_the_work_with_a_cancelled_error(triton_server):
    with T2VClient(triton_server.grpc_url, timeout_s=TIMEOUT_S) as client:
        request = VideoRequest(PROMPT, *SIZE, seconds=12, seed=40).with_id()
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as raised:  # the server's own deadline: `timeout` in µs
            client.client.infer("t2v", request.inputs(), timeout=1_500_000, client_timeout=TIMEOUT_S)
    assert raised.value.status() == "StatusCode.CANCELLED"
    assert "the request's timeout of 1.5 s passed; its work was stopped" in raised.value.message()
    assert time.monotonic() - started < 60
