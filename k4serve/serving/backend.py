"""Triton Python-backend plumbing shared by every k4serve model: tensors in and out, errors, metrics, the stage
loop with its progress events and cancellation checks.

Importable only inside Triton's Python stub (it provides `triton_python_backend_utils`). Numeric tensors move by
DLPack (zero-copy, on whatever device Triton hands them over); BYTES tensors have no DLPack form and go through
numpy object arrays.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from collections.abc import Mapping

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from k4serve.pipelines.t2v import RequestError
from k4serve.serving.control import CANCEL_PARAMETER, CancelFlags, control_dir
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


def _input_scalar(request, name: str, required: bool) -> torch.Tensor | None:
    """The one element of a one-element numeric input (None if an optional input is absent)."""
    values = input_torch(request, name, required)
    if values is None:
        return None
    if values.numel() != 1:
        raise RequestError(f"{name} must hold exactly one value, got shape {list(values.shape)}")
    return values.reshape(-1)[0]


def input_int(request, name: str, required: bool = True) -> int | None:
    """The single integer of a one-element numeric input."""
    value = _input_scalar(request, name, required)
    return None if value is None else int(value)


def input_float(request, name: str, required: bool = True) -> float | None:
    """The single number of a one-element floating-point input."""
    value = _input_scalar(request, name, required)
    return None if value is None else float(value)


def input_bytes(request, name: str, required: bool = True) -> bytes | None:
    """The one element of a BYTES input (None if an optional input is absent)."""
    tensor = input_tensor(request, name, required)
    if tensor is None:
        return None
    values = tensor.as_numpy()
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got shape {list(values.shape)}")
    return values.reshape(-1)[0]


def wants(request, name: str) -> bool:
    """Whether the request's caller asked for the output `name` (asking for none means every output)."""
    requested = request.requested_output_names()
    return not requested or name in requested


def requested_only(request, tensors: list) -> list:
    """The output `tensors` the request's caller asked for.

    Triton 2.51's stub drops the others itself as it sends a response through a response sender, with the GIL
    released (ResponseSender::Send -> PruneOutputTensors); freeing their numpy arrays there ends the stub under
    Python 3.12, as in Orchestrator._after_cleanup. Dropped here, Python frees them.
    """
    return [tensor for tensor in tensors if wants(request, tensor.name())]


def bytes_tensor(name: str, data: bytes | str) -> pb_utils.Tensor:
    """A one-element BYTES output."""
    return pb_utils.Tensor(name, np.array([data], dtype=np.object_))


def dlpack_tensor(name: str, value: torch.Tensor | np.ndarray) -> pb_utils.Tensor:
    """A numeric output from a torch tensor (any device) or a numpy array, made C-contiguous as Triton needs."""
    # numpy's DLPack capsules crash the 24.10 stub's from_dlpack; torch's work (and share numpy's memory).
    value = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value.contiguous()
    return pb_utils.Tensor.from_dlpack(name, value)


def scalar_tensor(name: str, value: float, dtype: torch.dtype) -> pb_utils.Tensor:
    """A one-element numeric output of `dtype` (seeds, durations, rates)."""
    return dlpack_tensor(name, torch.tensor([value], dtype=dtype))


class Cancelled(Exception):
    """The client cancelled the request, its deadline passed, or its entry point flagged it."""


class StageFailure(Exception):
    """A stage answered a request with an error: its Triton code and message travel on unchanged."""

    def __init__(self, code, message: str):  # code: a pb_utils.TritonError code
        super().__init__(message)
        self.code = code


class Refused(Exception):
    """An entry point cannot take the request now (bound reached, draining): UNAVAILABLE, the message says when."""


def error_response(error: Exception) -> pb_utils.InferenceResponse:
    """The response for a failed request: INVALID_ARGUMENT for bad input (the message says what is allowed),
    UNAVAILABLE for a refusal, CANCELLED, a stage's own code, else INTERNAL (logged with its traceback)."""
    if isinstance(error, RequestError):
        code = pb_utils.TritonError.INVALID_ARG
    elif isinstance(error, Refused):
        code = pb_utils.TritonError.UNAVAILABLE
    elif isinstance(error, Cancelled):
        code, error = pb_utils.TritonError.CANCELLED, str(error) or "request cancelled by its client (or its deadline)"
    elif isinstance(error, StageFailure):
        code = error.code
    else:
        pb_utils.Logger.log_error(traceback.format_exc())
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(error).__name__}: {error}"))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), code))


def cancel_token(request) -> str | None:
    """The token an entry point gave this request (None when a client called the stage itself)."""
    token = json.loads(request.parameters() or "{}").get(CANCEL_PARAMETER)
    return None if token is None else str(token)


def weights_bytes(modules) -> int:
    """Bytes of the parameters and buffers of the torch modules among `modules`. None entries and exported engines
    (onnxruntime, TensorRT, AOTInductor: their weights live in the runtime, not in torch) are not counted."""
    torch_modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    tensors = [t for m in torch_modules for t in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors)


# Triton 2.51's stub (python_backend r24.10) releases the GIL in a metric's observe() and increment(), then
# rebuilds that metric's shared-memory message with no lock of its own: two threads on one metric free each
# other's message, and tritonserver, reading it, aborts (boost lock_exception, std::bad_alloc: reproduced on the CPU
# with four threads on one histogram; the random test-server deaths under concurrent requests showed the same
# errors). Every metric call of a stub process goes through this one lock (SerialMetric).
METRIC_LOCK = threading.Lock()


class SerialMetric:
    """A custom Prometheus series (a pb_utils Metric of `family`) whose calls hold METRIC_LOCK."""

    def __init__(self, family, labels: dict[str, str], buckets: list[float] | None = None):
        with METRIC_LOCK:
            self._metric = family.Metric(labels=labels, **({} if buckets is None else {"buckets": buckets}))

    def set(self, value: float) -> None:
        with METRIC_LOCK:
            self._metric.set(value)

    def increment(self, value: float) -> None:
        with METRIC_LOCK:
            self._metric.increment(value)

    def observe(self, value: float) -> None:
        with METRIC_LOCK:
            self._metric.observe(value)


class ModelMetrics:
    """Prometheus series of one model instance, served on Triton's metrics endpoint beside nv_inference_*.

    A series lives as long as its Python family object, so the families are kept on the instance.
    """

    def __init__(self, model: str, instance: str, device: str):
        self.model = model
        family = pb_utils.MetricFamily
        self.durations = family(
            name="k4serve_stage_duration_seconds",
            description="Wall time of one request in one k4serve stage (as an entry point sees it: with queueing)",
            kind=family.HISTOGRAM,
        )
        self.cancelled = family(
            name="k4serve_requests_cancelled_total",
            description="Requests stopped because the client cancelled them or their deadline passed",
            kind=family.COUNTER,
        )
        self.placement = family(
            name="k4serve_instance_info",
            description="1 per model instance, labelled with the torch device it runs on",
            kind=family.GAUGE,
        )
        self.weights = family(
            name="k4serve_weights_bytes",
            description="Bytes of torch model weights (parameters and buffers) one model instance holds; "
            "an exported engine's are not counted",
            kind=family.GAUGE,
        )
        labels = {"model": model, "instance": instance, "device": device}
        self.info = SerialMetric(self.placement, labels)
        self.info.set(1)
        self._weights = SerialMetric(self.weights, {"model": model, "instance": instance})
        self._stages: dict[str, SerialMetric] = {}
        self._stages_lock = threading.Lock()  # request threads of an entry point observe at once
        self._cancelled = SerialMetric(self.cancelled, {"model": model})

    def observe(self, stage: str, seconds: float) -> None:
        """Record one request's time in `stage`."""
        with self._stages_lock:
            if stage not in self._stages:
                labels = {"model": self.model, "stage": stage}
                self._stages[stage] = SerialMetric(self.durations, labels, DURATION_BUCKETS)
            series = self._stages[stage]
        series.observe(seconds)

    def count_cancelled(self) -> None:
        """Record one request stopped before it finished."""
        self._cancelled.increment(1)

    def set_weights(self, nbytes: int) -> None:
        """Record the bytes of weights this instance holds."""
        self._weights.set(nbytes)


class TritonModel:
    """What every k4serve model does at load: parse the config, pick the device, start its metrics, `setup`."""

    uses_device = True  # False: a host-only model (muxer, entry points) that ignores the instance's device

    def initialize(self, args: Mapping[str, str]) -> None:
        check_numpy()
        self.model_config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.model_config)
        self.device = stage_device(args) if self.uses_device else "cpu"
        if torch.device(self.device).index is not None:  # cuda:N ("cuda" alone already means the current GPU)
            # The stub process works on this instance's GPU alone: make it current, or torch's DLPack export of an
            # output (and Triton kernels, CUDA graphs) would look for it on GPU 0.
            torch.cuda.set_device(self.device)
        self.metrics = ModelMetrics(self.name, args["model_instance_name"], self.device)
        self.cancel_flags = CancelFlags(control_dir())
        self.setup()
        self.metrics.set_weights(weights_bytes(self.held_modules()))
        pb_utils.Logger.log_info(f"k4serve {args['model_instance_name']}: {self.name} ready on {self.device}")

    def setup(self) -> None:
        """Build what the model needs, once per instance (self.model_config and self.device are set)."""

    def held_modules(self) -> list:
        """The torch modules whose weights this instance holds (for k4serve_weights_bytes)."""
        return []


class StageProgress:
    """One stage request's steps: a progress EVENT per step (decoupled stages) and a cancellation check."""

    def __init__(self, request, sender, flags: CancelFlags):
        self.request = request
        self.sender = sender if sender is not None and wants(request, "EVENT") else None  # None: no EVENTs
        self.flags = flags
        self.token = cancel_token(request)

    def check(self) -> None:
        """Raise Cancelled if the client cancelled this request or its entry point flagged it."""
        if self.flags.is_set(self.token) or self.request.is_cancelled():
            raise Cancelled

    def step(self, done: int, steps: int) -> None:
        """Stop here if cancelled, else report `done` of `steps` (0: the stage starts)."""
        self.check()
        if self.sender is not None:
            self.sender.send(event_response({"step": done, "steps": steps}))


def event_response(event: dict) -> pb_utils.InferenceResponse:
    """A response carrying one EVENT (JSON)."""
    return pb_utils.InferenceResponse(output_tensors=[bytes_tensor("EVENT", json.dumps(event))])


class StageModel(TritonModel):
    """A Triton model around one stage: `setup` builds it once, `run` turns one request into its outputs.

    Subclasses set `stage`, implement `run(request, progress) -> list[pb_utils.Tensor]` (calling progress.step at
    each step or chunk) and, if they hold models, `setup`. A decoupled stage (config: decoupled: true) sends an
    EVENT response {"step", "steps"} per step, then its outputs; either kind stops at the next step once cancelled.
    """

    stage = ""

    def run(self, request, progress: StageProgress) -> list:
        raise NotImplementedError

    def execute(self, requests: list) -> list | None:
        responses = []
        for request in requests:
            sender = request.get_response_sender() if self.decoupled else None
            progress = StageProgress(request, sender, self.cancel_flags)
            response = self._respond(request, progress)
            if sender is None:
                responses.append(response)
            elif response.has_error() and progress.token is not None:
                # Called by an entry point (BLS). Triton 2.51 loses a decoupled model's error response on its way
                # to a BLS caller: with the final flag the caller hangs, without it the lost response keeps the
                # caller's model from ever unloading. So the error travels as the last EVENT {"error", "code"}.
                error = response.error()
                event = event_response({"error": error.message(), "code": error.code().name})
                sender.send(event, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:  # a gRPC client of the stage itself gets the error response
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return responses if not self.decoupled else None

    def _respond(self, request, progress: StageProgress) -> pb_utils.InferenceResponse:
        started = time.perf_counter()
        try:  # one bad request must not fail the others of the batch
            progress.check()  # a request cancelled while it queued costs nothing
            outputs = requested_only(request, self.run(request, progress))
        except Cancelled as error:
            self.metrics.count_cancelled()
            return error_response(error)
        except Exception as error:
            return error_response(error)
        self.metrics.observe(self.stage, time.perf_counter() - started)
        return pb_utils.InferenceResponse(output_tensors=outputs)
