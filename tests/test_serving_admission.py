"""Admission on a real server (tiny preset, K4SERVE_MAX_QUEUE=2): past the bound an
entry point answers UNAVAILABLE with a retry hint while the admitted requests complete; while the drain file
exists it refuses new requests and finishes those in flight, and k4serve_requests_in_flight falls to 0."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("tritonclient.grpc")
from serving_helpers import PROMPT, SIZE, T2V_ENTRY_POINTS, TIMEOUT_S, in_flight, metric, metrics, wait_for  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from k4serve.client.client import AsyncT2VClient, Video, VideoRequest  # noqa: E402
from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline  # noqa: E402
from k4serve.pipelines.video_io import encode_mp4  # noqa: E402

pytestmark = pytest.mark.server

BOUND = 2
DRAINING = "server is draining; retry on another replica"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of its own: a bound of 2 requests per entry point (its control directory: server.control_dir)."""
    pytest.importorskip("pytriton", reason="tritonserver comes with the serve extra: pip install 'k4serve[serve]'")
    from k4serve.serving.launcher import ServerOptions, TritonServer

    env = {"K4SERVE_PRESET": "tiny", "K4SERVE_WEIGHTS": "", "K4SERVE_ENGINE": "eager", "K4SERVE_DEVICE": ""}
    env |= {"K4SERVE_MAX_QUEUE": str(BOUND)}
    log = tmp_path_factory.mktemp("tritonserver-admission") / "server.log"
    with TritonServer(ServerOptions(host="127.0.0.1", env=env, log=log, models=T2V_ENTRY_POINTS)) as server:
        yield server


@pytest.fixture(scope="module")
def expected():
    """mp4 of the in-process pipeline for (seconds, seed)."""
    pipeline = T2VPipeline.from_settings(PipelineSettings(preset="tiny"))
    return lambda seconds, seed: encode_mp4(pipeline(PROMPT, *SIZE, seconds, seed))


async def generate(client: AsyncT2VClient, seconds: int, seed: int, stream: bool = False) -> Video:
    request = VideoRequest(PROMPT, *SIZE, seconds=seconds, seed=seed)
    if not stream:
        return await client.generate(request)
    return [item async for item in client.stream(request)][-1]


async def until(condition, what: str) -> None:
    """wait_for without blocking the event loop that carries the requests in flight."""
    await asyncio.to_thread(wait_for, condition, what, TIMEOUT_S, 0.05)


def refusal(error: BaseException) -> str:
    assert isinstance(error, InferenceServerException), error
    return error.message()


def test_past_the_bound_requests_are_unavailable_with_a_retry_hint_while_admitted_ones_complete(server, expected):
    rejected_before = metric(metrics(server), "k4serve_requests_rejected_total", model="t2v", reason="bound")

    async def scenario():
        async with AsyncT2VClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
            admitted = [asyncio.create_task(generate(client, 1, seed)) for seed in (50, 51)]
            await until(lambda: in_flight(server, "t2v") == BOUND, "both requests admitted")
            extra = await asyncio.gather(*(generate(client, 0, 52 + i) for i in range(3)), return_exceptions=True)
            other_entry = await generate(client, 0, 55, stream=True)  # t2v_stream has a bound of its own
            return await asyncio.gather(*admitted), extra, other_entry

    (first, second), extra, other_entry = asyncio.run(scenario())
    for error in extra:
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert f"t2v already holds {BOUND} requests, its bound" in refusal(error)
        assert "K4SERVE_MAX_QUEUE" in refusal(error) and "retry in about" in refusal(error)
    assert (first.seed, second.seed, other_entry.seed) == (50, 51, 55)
    assert first.mp4 == expected(1, 50) and second.mp4 == expected(1, 51) and other_entry.mp4 == expected(0, 55)
    rejected = metric(metrics(server), "k4serve_requests_rejected_total", model="t2v", reason="bound")
    assert rejected == rejected_before + 3
    wait_for(lambda: in_flight(server, "t2v") == 0, "t2v to empty")


def test_drain_file_refuses_new_requests_and_finishes_those_in_flight(server, expected):
    control = server.control_dir

    async def scenario():
        async with AsyncT2VClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
            running = [asyncio.create_task(generate(client, 1, 60)), asyncio.create_task(generate(client, 1, 61, True))]
            await until(lambda: in_flight(server, "t2v") == in_flight(server, "t2v_stream") == 1, "both in flight")
            (control / "draining").touch()  # what the launcher does on SIGTERM
            refused = await asyncio.gather(
                generate(client, 0, 62), generate(client, 0, 63, stream=True), return_exceptions=True
            )
            return await asyncio.gather(*running), refused

    try:
        finished, refused = asyncio.run(scenario())
        assert [refusal(error) for error in refused] == [DRAINING, DRAINING]
        assert refused[0].status() == "StatusCode.UNAVAILABLE"
        assert [video.mp4 for video in finished] == [expected(1, 60), expected(1, 61)]
        # What the launcher polls before it stops tritonserver:
        wait_for(lambda: in_flight(server, "t2v") == in_flight(server, "t2v_stream") == 0, "the drain to finish")
        samples = metrics(server)
        for model in ("t2v", "t2v_stream"):
            assert metric(samples, "k4serve_requests_rejected_total", model=model, reason="draining") == 1
    finally:
        (control / "draining").unlink(missing_ok=True)

    async def after():
        async with AsyncT2VClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
            return await generate(client, 0, 64)

    assert asyncio.run(after()).mp4 == expected(0, 64)  # admitted again once the file is gone
