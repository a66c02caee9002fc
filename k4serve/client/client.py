"""gRPC client of a k4serve Triton server: one call (`t2v`), asyncio, and progress streaming (`t2v_stream`)."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import np_to_triton_dtype

from k4serve.client import DEFAULT_URL

MODEL = "t2v"
STREAM_MODEL = "t2v_stream"


@dataclass(frozen=True)
class VideoRequest:
    """One text -> video request. seed None: the server draws one and returns it."""

    prompt: str
    height: int = 384
    width: int = 672
    seconds: int = 12
    seed: int | None = None
    request_id: str = ""

    def inputs(self, module=grpcclient) -> list:
        """The Triton input tensors (of `module`: the sync or the asyncio tritonclient)."""
        values = {
            "PROMPT": np.array([self.prompt.encode("utf-8")], dtype=np.object_),
            "HEIGHT": np.array([self.height], dtype=np.int32),
            "WIDTH": np.array([self.width], dtype=np.int32),
            "SECONDS": np.array([self.seconds], dtype=np.int32),
        }
        if self.seed is not None:
            values["SEED"] = np.array([self.seed], dtype=np.int64)
        tensors = []
        for name, value in values.items():
            tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return tensors

    def with_id(self) -> VideoRequest:
        """This request with a fresh request id if it has none."""
        return self if self.request_id else replace(self, request_id=uuid.uuid4().hex)


@dataclass(frozen=True)
class Video:
    """A finished request: the mp4, the seed it used, and its request id."""

    mp4: bytes
    seed: int
    request_id: str


@dataclass(frozen=True)
class Progress:
    """One progress event of a streamed request."""

    stage: str  # text_encoder | dit_sampler | vae_decoder | muxer
    step: int
    steps: int
    fraction: float  # of this stage
    elapsed: float  # seconds since the server started the request


def _outputs(module) -> list:
    return [module.InferRequestedOutput(name) for name in ("MP4", "SEED_USED")]


def _video(result) -> Video:
    """The final response -> Video; the request id is the server's echo of the one sent."""
    return Video(bytes(result.as_numpy("MP4")[0]), int(result.as_numpy("SEED_USED")[0]), result.get_response().id)


class T2VClient:
    """Blocking client. Errors raise tritonclient's InferenceServerException (status() says which gRPC code)."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float | None = None):
        self.client = grpcclient.InferenceServerClient(url)
        self.timeout_s = timeout_s

    def generate(self, request: VideoRequest) -> Video:
        """Run `t2v` and return the finished video."""
        request = request.with_id()
        result = self.client.infer(
            MODEL,
            request.inputs(),
            outputs=_outputs(grpcclient),
            request_id=request.request_id,
            client_timeout=self.timeout_s,
        )
        return _video(result)

    def stream(self, request: VideoRequest) -> Iterator[Progress | Video]:
        """Run `t2v_stream`: yield Progress events, then the Video. Leaving the loop early cancels the request."""
        request = request.with_id()
        responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            self.client.async_stream_infer(STREAM_MODEL, request.inputs(), request_id=request.request_id)
            while True:
                item = _stream_item(*responses.get(timeout=self.timeout_s))
                yield item
                if isinstance(item, Video):
                    return
        finally:
            self.client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> T2VClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncT2VClient:
    """asyncio client: many requests in flight from one event loop."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float | None = None):
        self.client = grpcclient_aio.InferenceServerClient(url)
        self.timeout_s = timeout_s

    async def generate(self, request: VideoRequest) -> Video:
        """Run `t2v` and return the finished video."""
        request = request.with_id()
        result = await self.client.infer(
            MODEL,
            request.inputs(grpcclient_aio),
            outputs=_outputs(grpcclient_aio),
            request_id=request.request_id,
            client_timeout=self.timeout_s,
        )
        return _video(result)

    async def stream(self, request: VideoRequest) -> AsyncIterator[Progress | Video]:
        """Run `t2v_stream`: yield Progress events, then the Video."""
        request = request.with_id()

        async def requests():
            yield {
                "model_name": STREAM_MODEL,
                "inputs": request.inputs(grpcclient_aio),
                "request_id": request.request_id,
            }

        responses = self.client.stream_infer(requests(), stream_timeout=self.timeout_s)
        async for result, error in responses:
            item = _stream_item(result, error)
            yield item
            if isinstance(item, Video):
                return

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> AsyncT2VClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _stream_item(result, error: Exception | None) -> Progress | Video:
    """A streamed (response, error) -> a Progress event, or the final Video; the error is raised."""
    if error is not None:
        raise error
    event = result.as_numpy("EVENT")
    return _video(result) if event is None else Progress(**json.loads(event[0]))
