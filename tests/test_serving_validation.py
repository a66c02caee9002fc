"""Malformed input to every model of the real server (tiny preset), over gRPC and over HTTP (KServe v2 JSON):
each is refused with INVALID_ARGUMENT (HTTP 400) and a message that names the fix, before any stage computes.

HTTP reaches only the models that answer once (t2v, text_encoder, muxer): Triton's HTTP endpoint refuses
decoupled models (t2v_stream, dit_sampler, vae_decoder) with 501, so those are checked over gRPC streaming.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc as grpcclient  # noqa: E402
from serving_helpers import grpc_inputs, stream_error  # noqa: E402
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

pytestmark = pytest.mark.server

TIMEOUT_S = 60
TEXT_DIM = 32  # the tiny preset's T5 width
DECOUPLED = {"t2v_stream", "dit_sampler", "vae_decoder"}
SIZES = "512x512, 352x736, 736x352, 384x672, 672x384, 480x544, 544x480"
LATENT_SIZES = "64x64, 44x92, 92x44, 48x84, 84x48, 60x68, 68x60"


def i32(value: int) -> np.ndarray:
    return np.array([value], np.int32)


def text(value: bytes) -> np.ndarray:
    return np.array([value], np.object_)


def video(**overrides) -> dict[str, np.ndarray]:
    """A valid t2v request (0 s at 384x672, seed 1) with `overrides` (None drops an input)."""
    values = {"PROMPT": text(b"a red fox"), "HEIGHT": i32(384), "WIDTH": i32(672), "SECONDS": i32(0)}
    values["SEED"] = np.array([1], np.int64)
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def sampler(embeddings: np.ndarray | None = None, **overrides) -> dict[str, np.ndarray]:
    """A valid dit_sampler request with `overrides`."""
    values = video(PROMPT=None, **overrides)
    values["EMBEDDINGS"] = np.zeros((224, TEXT_DIM), np.float32) if embeddings is None else embeddings
    return values


def filled(shape: tuple, value: float) -> np.ndarray:
    array = np.zeros(shape, np.float32)
    array.reshape(-1)[::7] = value
    return array


def frames(count: int, height: int = 384, width: int = 672, channels: int = 3) -> np.ndarray:
    return np.zeros((count, height, width, channels), np.uint8)


@dataclass(frozen=True)
class Case:
    model: str
    inputs: dict
    message: str  # part of the refusal: it names what is allowed


CASES = {
    # The entry points: PROMPT, HEIGHT, WIDTH, SECONDS, SEED.
    "unsupported size": Case(
        "t2v", video(HEIGHT=i32(400)), f"400x672 (height x width) is not supported; use one of: {SIZES}"
    ),  # noqa: E501
    "zero size": Case("t2v", video(HEIGHT=i32(0), WIDTH=i32(0)), "use one of: 512x512"),
    "seconds 13": Case("t2v", video(SECONDS=i32(13)), "seconds must be a whole number from 0 to 12"),
    "seconds -1": Case("t2v", video(SECONDS=i32(-1)), "seconds must be a whole number from 0 to 12"),
    "seed -5": Case("t2v", video(SEED=np.array([-5], np.int64)), "seed must be from 0 to 2**63-1"),
    "blank prompt": Case("t2v", video(PROMPT=text(b"   ")), "prompt is empty: give a text description"),
    "prompt of 10,000 characters": Case("t2v", video(PROMPT=text(b"a" * 10_000)), "at most 2000 are accepted"),
    "non-UTF-8 prompt": Case("t2v", video(PROMPT=text(b"fox \xff")), "PROMPT must be UTF-8 text"),
    "PROMPT missing": Case("t2v", video(PROMPT=None), "input PROMPT is missing"),
    "HEIGHT missing": Case("t2v", video(HEIGHT=None), "input HEIGHT is missing"),
    "HEIGHT as FP32": Case("t2v", video(HEIGHT=np.array([384.0], np.float32)), "'HEIGHT' data-type is 'FP32'"),
    "two prompts": Case("t2v", video(PROMPT=np.array([b"a", b"b"], np.object_)), "unexpected shape for input"),
    "stream: unsupported size": Case("t2v_stream", video(WIDTH=i32(9999)), "is not supported; use one of"),
    "stream: seconds 99": Case("t2v_stream", video(SECONDS=i32(99)), "from 0 to 12"),
    "stream: blank prompt": Case("t2v_stream", video(PROMPT=text(b"")), "prompt is empty"),
    # text_encoder
    "text_encoder: blank prompt": Case("text_encoder", {"PROMPT": text(b"\n\t")}, "prompt is empty"),
    "text_encoder: long prompt": Case("text_encoder", {"PROMPT": text("ё".encode() * 3000)}, "3000 characters"),
    # dit_sampler: EMBEDDINGS [224, D] finite, plus the video's shape
    "dit_sampler: NaN embeddings": Case("dit_sampler", sampler(filled((224, TEXT_DIM), np.nan)), "NaN or infinite"),
    "dit_sampler: inf embeddings": Case("dit_sampler", sampler(filled((224, TEXT_DIM), np.inf)), "send finite numbers"),
    "dit_sampler: embeddings too wide": Case(
        "dit_sampler", sampler(np.zeros((224, TEXT_DIM + 1), np.float32)), f"EMBEDDINGS must be [224, {TEXT_DIM}]"
    ),
    "dit_sampler: 223 tokens": Case("dit_sampler", sampler(np.zeros((223, TEXT_DIM), np.float32)), "unexpected shape"),
    "dit_sampler: unsupported size": Case("dit_sampler", sampler(HEIGHT=i32(8192)), "use one of: 512x512"),
    "dit_sampler: seconds 13": Case("dit_sampler", sampler(SECONDS=i32(13)), "from 0 to 12"),
    # vae_decoder: LATENTS [T, H/8, W/8, 16] of a bucket, finite
    "vae_decoder: 256x256 latents": Case(
        "vae_decoder", {"LATENTS": np.zeros((1, 256, 256, 16), np.float32)}, f"H/8 x W/8 one of {LATENT_SIZES}"
    ),
    "vae_decoder: T=0": Case("vae_decoder", {"LATENTS": np.zeros((0, 48, 84, 16), np.float32)}, "T one of 1, 3, 5"),
    "vae_decoder: even T": Case("vae_decoder", {"LATENTS": np.zeros((4, 48, 84, 16), np.float32)}, "(2 x seconds + 1"),
    "vae_decoder: T past 12 s": Case("vae_decoder", {"LATENTS": np.zeros((27, 48, 84, 16), np.float32)}, "..., 25"),
    "vae_decoder: NaN latents": Case("vae_decoder", {"LATENTS": filled((3, 48, 84, 16), np.nan)}, "NaN or infinite"),
    "vae_decoder: -inf latents": Case("vae_decoder", {"LATENTS": filled((1, 64, 64, 16), -np.inf)}, "NaN or infinite"),
    "vae_decoder: 15 channels": Case("vae_decoder", {"LATENTS": np.zeros((1, 48, 84, 15), np.float32)}, "unexpected"),
    # muxer: FRAMES uint8 [F, H, W, 3] of a bucket; AUDIO [N] with an allowed SAMPLE_RATE
    "muxer: 0 frames": Case("muxer", {"FRAMES": frames(0)}, "F one of 1, 9, 17, ..., 97"),
    "muxer: 8 frames": Case("muxer", {"FRAMES": frames(8, 16, 16)}, "(8 x seconds + 1 at 8 fps, or 1)"),
    "muxer: 1024x1024 frames": Case("muxer", {"FRAMES": frames(1, 1024, 1024)}, f"H x W one of {SIZES}"),
    "muxer: odd frame size": Case("muxer", {"FRAMES": frames(1, 385, 671)}, "got [1, 385, 671, 3]"),
    "muxer: RGBA frames": Case("muxer", {"FRAMES": frames(1, channels=4)}, "unexpected shape for input 'FRAMES'"),
    "muxer: SAMPLE_RATE -1": Case(
        "muxer",
        {"FRAMES": frames(1), "AUDIO": np.zeros(800, np.float32), "SAMPLE_RATE": i32(-1)},
        "SAMPLE_RATE must be one of 16000, 22050, 24000, 32000, 44100, 48000 Hz, got -1",
    ),  # fmt: skip
    "muxer: SAMPLE_RATE alone": Case("muxer", {"FRAMES": frames(1), "SAMPLE_RATE": i32(44100)}, "without AUDIO"),
    "muxer: empty AUDIO": Case("muxer", {"FRAMES": frames(1), "AUDIO": np.zeros(0, np.float32)}, "1 <= N <= 573300"),
    "muxer: AUDIO of 20 s": Case(
        "muxer",
        {"FRAMES": frames(1), "AUDIO": np.zeros(20 * 16000, np.float32), "SAMPLE_RATE": i32(16000)},
        "1 <= N <= 208000 (13 s at 16000 Hz)",
    ),  # fmt: skip
    "muxer: NaN AUDIO": Case("muxer", {"FRAMES": frames(1), "AUDIO": filled((800,), np.nan)}, "NaN or infinite"),
}


@pytest.fixture(scope="module")
def grpc(triton_server):
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        yield client


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_grpc_request_is_invalid_argument_naming_the_fix(grpc, case):
    model, values, message = CASES[case].model, CASES[case].inputs, CASES[case].message
    if model in DECOUPLED:
        error, events = stream_error(grpc, model, values, TIMEOUT_S)
        assert message in error
        assert events == []  # refused before the first step
        return
    with pytest.raises(InferenceServerException) as raised:
        grpc.infer(model, grpc_inputs(values), client_timeout=TIMEOUT_S)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in raised.value.message()


def http_body(values: dict[str, np.ndarray], binary: bool) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 request: tensors as JSON `data`, or (binary) in the binary-tensor extension after the JSON."""
    header, blobs = {"inputs": []}, []
    for name, value in values.items():
        spec = {"name": name, "shape": list(value.shape), "datatype": np_to_triton_dtype(value.dtype)}
        if binary:
            raw = (
                b"".join(struct.pack("<I", len(item)) + item for item in value.reshape(-1))
                if value.dtype == np.object_
                else value.tobytes()
            )
            spec["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            flat = value.reshape(-1)
            spec["data"] = [item.decode() for item in flat] if value.dtype == np.object_ else flat.tolist()
        header["inputs"].append(spec)
    body = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(body))}
    return (body + b"".join(blobs), headers) if binary else (body, {"Content-Type": "application/json"})


def json_safe(values: dict[str, np.ndarray]) -> bool:
    """Whether plain JSON can carry these values (UTF-8 text, finite numbers, a small body)."""
    for value in values.values():
        if value.dtype == np.object_:
            if any(not isinstance(item, bytes) or not _utf8(item) for item in value.reshape(-1)):
                return False
        elif value.size > 100_000 or (value.dtype.kind == "f" and not np.isfinite(value).all()):
            return False
    return True


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


HTTP_CASES = [name for name, case in CASES.items() if case.model not in DECOUPLED]


@pytest.mark.parametrize("case", HTTP_CASES)
def test_malformed_http_request_is_400_naming_the_fix(triton_server, case):
    model, values, message = CASES[case].model, CASES[case].inputs, CASES[case].message
    for binary in (True, False) if json_safe(values) else (True,):
        body, headers = http_body(values, binary)
        request = urllib.request.Request(f"{triton_server.http_url}/v2/models/{model}/infer", body, headers)
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=TIMEOUT_S)
        assert raised.value.code == 400, (binary, raised.value.read())
        assert message in json.loads(raised.value.read())["error"], binary


def test_decoupled_models_are_refused_over_http_and_the_server_serves_on(triton_server, grpc):
    body, headers = http_body(CASES["vae_decoder: T=0"].inputs, binary=True)
    request = urllib.request.Request(f"{triton_server.http_url}/v2/models/vae_decoder/infer", body, headers)
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=TIMEOUT_S)
    assert raised.value.code == 501 and "decoupled" in raised.value.read().decode()
    result = grpc.infer("t2v", grpc_inputs(video()), client_timeout=240)
    assert result.as_numpy("MP4")[0][4:8] == b"ftyp" and result.as_numpy("SEED_USED")[0] == 1
