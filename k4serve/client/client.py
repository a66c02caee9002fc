"""gRPC client of a k4serve Triton server: one call (`t2v`, `t2va`, `v2a`), asyncio, and progress streaming (their
`_stream` variants). The request's type picks the entry point: VideoRequest, AudioRequest, V2ARequest."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import ClassVar, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import np_to_triton_dtype

from k4serve.client import DEFAULT_URL

MODEL = "t2v"
STREAM_MODEL = "t2v_stream"


RequestT = TypeVar("RequestT", bound="EntryPointRequest")


def text_tensor(text: str) -> np.ndarray:
    """A one-element BYTES value holding `text` as UTF-8."""
    return np.array([text.encode("utf-8")], dtype=np.object_)


class EntryPointRequest:
    """What every request type shares: the entry points it goes to, its Triton inputs, its request id.

    Subclasses are frozen dataclasses with a `request_id` field; they set `model` and `stream_model` and say in
    `values()` which tensors they send (an optional input left out of it is left out of the request)."""

    model: ClassVar[str]
    stream_model: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]] = ("MP4", "SEED_USED")
    request_id: str

    def values(self) -> dict[str, np.ndarray]:
        """The input tensors by name."""
        raise NotImplementedError

    def inputs(self, module=grpcclient) -> list:
        """The Triton input tensors (of `module`: the sync or the asyncio tritonclient)."""
        tensors = []
        for name, value in self.values().items():
            tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return tensors

    def with_id(self: RequestT) -> RequestT:
        """This request with a fresh request id if it has none."""
        return self if self.request_id else replace(self, request_id=uuid.uuid4().hex)


@dataclass(frozen=True)
class VideoRequest(EntryPointRequest):
    """One text -> video request (`t2v`). seed None: the server draws one and returns it."""

    model: ClassVar[str] = MODEL
    stream_model: ClassVar[str] = STREAM_MODEL

    prompt: str
    height: int = 384
    width: int = 672
    seconds: int = 12
    seed: int | None = None
    request_id: str = ""

    def values(self) -> dict[str, np.ndarray]:
        values = {
            "PROMPT": text_tensor(self.prompt),
            "HEIGHT": np.array([self.height], dtype=np.int32),
            "WIDTH": np.array([self.width], dtype=np.int32),
            "SECONDS": np.array([self.seconds], dtype=np.int32),
        }
        if self.seed is not None:
            values["SEED"] = np.array([self.seed], dtype=np.int64)
        return values


@dataclass(frozen=True)
class AudioRequest(VideoRequest):
    """One text -> video with sound request (`t2va`): the video of VideoRequest, then V2A on its frames with the
    same seed. audio_prompt / negative_prompt: the sound's prompts (None: the official V2A ones); timing "pad" or
    "retime" (None: pad, the video keeps its 8 fps)."""

    model: ClassVar[str] = "t2va"
    stream_model: ClassVar[str] = "t2va_stream"

    audio_prompt: str | None = None
    negative_prompt: str | None = None
    timing: str | None = None

    def values(self) -> dict[str, np.ndarray]:
        texts = {"AUDIO_PROMPT": self.audio_prompt, "NEGATIVE_PROMPT": self.negative_prompt, "TIMING": self.timing}
        return {**super().values(), **{name: text_tensor(t) for name, t in texts.items() if t is not None}}


@dataclass(frozen=True)
class V2ARequest(EntryPointRequest):
    """One video -> video with sound request (`v2a`): `video` is a video file's bytes (mp4, webm, mkv, ...); the
    server keeps its first whole seconds (at most 12). prompt / negative_prompt: the sound's prompts (None: the
    official V2A ones); timing "pad" or "retime" (None: pad); seed None: the server draws one and returns it."""

    model: ClassVar[str] = "v2a"
    stream_model: ClassVar[str] = "v2a_stream"
    outputs: ClassVar[tuple[str, ...]] = ("MP4", "SEED_USED", "NOTICE")

    video: bytes
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    timing: str | None = None
    request_id: str = ""

    def values(self) -> dict[str, np.ndarray]:
        values = {"VIDEO": np.array([self.video], dtype=np.object_)}
        texts = {"PROMPT": self.prompt, "NEGATIVE_PROMPT": self.negative_prompt, "TIMING": self.timing}
        values.update({name: text_tensor(text) for name, text in texts.items() if text is not None})
        if self.seed is not None:
            values["SEED"] = np.array([self.seed], dtype=np.int64)
        return values


@dataclass(frozen=True)
class Video:
    """A finished request: the mp4, the seed it used, its request id, and what the server cut from an uploaded video
    to its first whole seconds (v2a; "" when nothing)."""

    mp4: bytes
    seed: int
    request_id: str
    notice: str = ""


@dataclass(frozen=True)
class Progress:
    """One progress event of a streamed request."""

    stage: str  # text_encoder | dit_sampler | vae_decoder | v2a_encoder | v2a_sampler | vocoder | muxer
    step: int
    steps: int
    fraction: float  # of this stage
    elapsed: float  # seconds since the server started the request


def _outputs(module, request: EntryPointRequest) -> list:
    return [module.InferRequestedOutput(name) for name in request.outputs]


def _video(result) -> Video:
    """The final response -> Video; the request id is the server's echo of the one sent."""
    notice = result.as_numpy("NOTICE")
    mp4, seed = bytes(result.as_numpy("MP4")[0]), int(result.as_numpy("SEED_USED")[0])
    return Video(mp4, seed, result.get_response().id, "" if notice is None else notice[0].decode())


class T2VClient:
    """Blocking client of every entry point (the request's type picks it). Errors raise tritonclient's
    InferenceServerException (status() says which gRPC code)."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float | None = None):
        self.client = grpcclient.InferenceServerClient(url)
        self.timeout_s = timeout_s

    def generate(self, request: EntryPointRequest) -> Video:
        """Run the request's entry point (`t2v`, `t2va`, `v2a`) and return the finished video."""
        request = request.with_id()
        result = self.client.infer(
            request.model,
            request.inputs(),
            outputs=_outputs(grpcclient, request),
            request_id=request.request_id,
            client_timeout=self.timeout_s,
        )
        return _video(result)

    def stream(self, request: EntryPointRequest) -> Iterator[Progress | Video]:
        """Run the request's streaming entry point (`t2v_stream`, ...): yield Progress events, then the Video.
        Leaving the loop early cancels the request."""
        request = request.with_id()
        responses: queue.Queue = queue.Queue()
        # The deadline is the stream's (gRPC ends it with DEADLINE_EXCEEDED), not a limit on the gap between events.
        self.client.start_stream(lambda result, error: responses.put((result, error)), stream_timeout=self.timeout_s)
        try:
            self.client.async_stream_infer(request.stream_model, request.inputs(), request_id=request.request_id)
            while True:
                item = _stream_item(*responses.get())
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
    """asyncio client of every entry point: many requests in flight from one event loop."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float | None = None):
        self.client = grpcclient_aio.InferenceServerClient(url)
        self.timeout_s = timeout_s

    async def generate(self, request: EntryPointRequest) -> Video:
        """Run the request's entry point and return the finished video."""
        request = request.with_id()
        result = await self.client.infer(
            request.model,
            request.inputs(grpcclient_aio),
            outputs=_outputs(grpcclient_aio, request),
            request_id=request.request_id,
            client_timeout=self.timeout_s,
        )
        return _video(result)

    async def stream(self, request: EntryPointRequest) -> AsyncIterator[Progress | Video]:
        """Run the request's streaming entry point: yield Progress events, then the Video."""
        request = request.with_id()

        async def requests():
            yield {
                "model_name": request.stream_model,
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
