"""What several server test modules share: the request they send (and the video they upload), Triton's metrics as
numbers, waiting, raw requests and the error that ends a stream."""

from __future__ import annotations

import functools
import json
import queue
import re
import time
import urllib.request

import numpy as np

SIZE = (384, 672)
PROMPT = "a red fox runs through fresh snow"
TIMEOUT_S = 240  # per request: bounds every wait; the tiny preset needs a few seconds


@functools.cache
def upload(n_frames: int = 12, fps: int = 10) -> bytes:
    """An mp4 of smooth random frames, 48x64: 12 frames at 10 fps last 1.2 s, which V2A trims to 1 s."""
    from k4serve.pipelines.video_io import encode_mp4

    rng = np.random.default_rng(n_frames)
    frames = rng.integers(0, 256, (n_frames, 6, 8, 3)).astype(np.uint8).repeat(8, axis=1).repeat(8, axis=2)
    return encode_mp4(frames, fps)


def metrics(server) -> dict[tuple[str, frozenset], float]:
    """Triton's Prometheus endpoint as {(name, labels): value}."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def in_flight(server, model: str) -> float:
    """k4serve_requests_in_flight of an entry point now."""
    return metric(metrics(server), "k4serve_requests_in_flight", model=model)


def wait_for(condition, what: str, timeout_s: float = TIMEOUT_S, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(interval_s)


# What the T2V server tests load: the two T2V entry points and their stages (the V2A ones: test_serving_v2a.py).
# Seven more stub processes, each importing torch, would only slow every start on a 2-core machine.
T2V_ENTRY_POINTS = ["t2v", "t2v_stream"]


def grpc_inputs(values: dict[str, np.ndarray]) -> list:
    """Triton inputs exactly as given (for requests the client library would not build)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def stream_error(client, model: str, values: dict[str, np.ndarray], timeout_s: float = 60) -> tuple[str, list[dict]]:
    """The error ending a decoupled model's stream (`client`: a tritonclient.grpc client), and the EVENTs before."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, grpc_inputs(values))
        events = []
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                return error.message(), events
            events.append(json.loads(result.as_numpy("EVENT")[0]))
    finally:
        client.stop_stream()
