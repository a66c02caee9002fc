"""Triton Python-backend plumbing shared by every k4serve model: tensors in and out, errors, metrics.

Importable only inside Triton's Python stub (it provides `triton_python_backend_utils`). Numeric tensors move by
DLPack (zero-copy, on whatever device Triton hands them over); BYTES tensors have no DLPack form and go through
numpy object arrays.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Mapping

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from k4serve.pipelines.t2v import RequestError
from k4serve.serving.settings import stage_device

# Seconds; spans a tiny-preset CPU stage (tens of ms) to a 12 s video's DiT on one GPU.
DURATION_BUCKETS = [0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]


def check_numpy() -> None:
    """Refuse to start under numpy 2: the Triton 24.10 stub crashes reading BYTES tensors with it."""
    if int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {np.__version__} is installed where tritonserver runs its Python stub; the 24.10 stub cannot "
            "read BYTES tensors with numpy 2 (the stub process dies). Install numpy<2 there: pip install 'numpy<2'"
        )


def input_tensor(request, name: str, required: bool = True):
    """The pb_utils.Tensor `name` of `request` (None if an optional input is absent)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None and required:
        raise RequestError(f"input {name} is missing")
    return tensor


def input_torch(request, name: str, required: bool = True) -> torch.Tensor | None:
    """A numeric input as a torch tensor sharing Triton's buffer (CPU or GPU) through DLPack."""
    tensor = input_tensor(request, name, required)
    return None if tensor is None else torch.from_dlpack(tensor.to_dlpack())


def input_int(request, name: str, required: bool = True) -> int | None:
    """The single integer of a one-element numeric input."""
    values = input_torch(request, name, required)
    if values is None:
        return None
    if values.numel() != 1:
        raise RequestError(f"{name} must hold exactly one value, got shape {list(values.shape)}")
    return int(values.reshape(-1)[0])


def input_bytes(request, name: str) -> bytes:
    """The one element of a BYTES input."""
    values = input_tensor(request, name).as_numpy()
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got shape {list(values.shape)}")
    return values.reshape(-1)[0]


def bytes_tensor(name: str, data: bytes | str) -> pb_utils.Tensor:
    """A one-element BYTES output."""
    return pb_utils.Tensor(name, np.array([data], dtype=np.object_))


def dlpack_tensor(name: str, value: torch.Tensor | np.ndarray) -> pb_utils.Tensor:
    """A numeric output from a torch tensor (any device) or a numpy array, made C-contiguous as Triton needs."""
    # numpy's DLPack capsules crash the 24.10 stub's from_dlpack; torch's work (and share numpy's memory).
    value = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value.contiguous()
    return pb_utils.Tensor.from_dlpack(name, value)


def error_response(error: Exception) -> pb_utils.InferenceResponse:
    """INVALID_ARGUMENT for bad input (the message says what is allowed), INTERNAL otherwise."""
    if isinstance(error, RequestError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
    pb_utils.Logger.log_error(traceback.format_exc())
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(error).__name__}: {error}"))


class StageMetrics:
    """Prometheus series of one model instance, served on Triton's metrics endpoint beside nv_inference_*.

    A series lives as long as its Python family object, so the families are kept on the instance.
    """

    def __init__(self, model: str, instance: str, device: str):
        self.model = model
        self.durations = pb_utils.MetricFamily(
            name="k4serve_stage_duration_seconds",
            description="Wall time of one request in one k4serve stage",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        self.cancelled = pb_utils.MetricFamily(
            name="k4serve_requests_cancelled_total",
            description="Requests stopped because the client cancelled them",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.placement = pb_utils.MetricFamily(
            name="k4serve_instance_info",
            description="1 per model instance, labelled with the torch device it runs on",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.info = self.placement.Metric(labels={"model": model, "instance": instance, "device": device})
        self.info.set(1)
        self._stages: dict[str, object] = {}
        self._cancelled = self.cancelled.Metric(labels={"model": model})

    def observe(self, stage: str, seconds: float) -> None:
        """Record one request's time in `stage`."""
        if stage not in self._stages:
            labels = {"model": self.model, "stage": stage}
            self._stages[stage] = self.durations.Metric(labels=labels, buckets=DURATION_BUCKETS)
        self._stages[stage].observe(seconds)

    def count_cancelled(self) -> None:
        """Record one request stopped by its client."""
        self._cancelled.increment(1)


class StageModel:
    """A Triton model around one stage: `setup` builds it once, `run` turns one request into its outputs.

    Subclasses set `stage`, implement `run(request) -> list[pb_utils.Tensor]` and, if they hold models, `setup`.
    """

    stage = ""
    uses_device = True  # False: a host-only stage (the muxer) that ignores the instance's device

    def initialize(self, args: Mapping[str, str]) -> None:
        check_numpy()
        self.model_config = json.loads(args["model_config"])
        self.device = stage_device(args) if self.uses_device else "cpu"
        if torch.device(self.device).index is not None:  # cuda:N ("cuda" alone already means the current GPU)
            # The stub process works on this instance's GPU alone: make it current, or torch's DLPack export of an
            # output (and Triton kernels, CUDA graphs) would look for it on GPU 0.
            torch.cuda.set_device(self.device)
        self.metrics = StageMetrics(args["model_name"], args["model_instance_name"], self.device)
        self.setup()
        pb_utils.Logger.log_info(f"k4serve {args['model_instance_name']}: {self.stage} ready on {self.device}")

    def setup(self) -> None:
        """Build what the stage needs, once per instance (self.model_config and self.device are set)."""

    def run(self, request) -> list:
        raise NotImplementedError

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            started = time.perf_counter()
            try:
                outputs = self.run(request)
            except Exception as error:  # one bad request must not fail the others of the batch
                responses.append(error_response(error))
                continue
            self.metrics.observe(self.stage, time.perf_counter() - started)
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
