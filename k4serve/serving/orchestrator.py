"""Entry points as orchestrators over the stage models (Triton BLS): one copy of each stage serves them all.

An entry point declares its pipeline as a tuple of `Step`s (steps.py); `Orchestrator` runs it for every request:
admission (a bound per entry point, refusal while the server drains), each step as a BLS request to its stage,
progress EVENTs when the entry point is decoupled (config `decoupled: true`), cancellation, timings. The
same class serves the one-response entry point (`t2v`) and the streaming one (`t2v_stream`): only the config's
transaction policy differs. A stage input fed from a tensor of another name (Step.sources) is renamed on the way.

Requests run on threads of the orchestrator's one (CPU) instance, so consecutive requests overlap across the
stages (the DiT of request i+1 while the VAE and the muxer of request i run); each stage instance still takes
one request at a time, and Triton queues the rest in front of it.

A finished streaming stage call is let go of only after the stub has cleaned it up (`_after_cleanup`): Triton
2.51's stub (python_backend r24.10) otherwise frees the call's responses on a thread without the GIL, and under
Python 3.12 that ends the process.
"""

from __future__ import annotations

import json
import threading
import time
import traceback

import triton_python_backend_utils as pb_utils

from k4serve.serving.backend import (
    Cancelled,
    Refused,
    SerialMetric,
    StageFailure,
    TritonModel,
    error_response,
    event_response,
    requested_only,
    wants,
)
from k4serve.serving.control import (
    CANCEL_PARAMETER,
    Admission,
    CancelFlags,
    control_dir,
    max_queue,
    max_stage_calls,
)
from k4serve.serving.settings import config_parameters
from k4serve.serving.steps import Step

WATCH_INTERVAL_S = 0.2  # how often the cancellations and deadlines of requests in flight are looked at


def stage_failure(code, message: str) -> Exception:
    """A stage's error (a pb_utils.TritonError code, or its name) as the exception that ends the request."""
    if isinstance(code, str):
        code = getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL)
    return Cancelled() if code == pb_utils.TritonError.CANCELLED else StageFailure(code, message)


def named(tensor: pb_utils.Tensor, name: str) -> pb_utils.Tensor:
    """`tensor` under the stage input's `name` (Step.sources); a copy, so only small tensors (seeds, prompts) are
    renamed: the large ones keep one name through the pipeline."""
    return tensor if tensor.name() == name else pb_utils.Tensor(name, tensor.as_numpy())


class Flight:
    """One admitted request: its cancel token, its clock, and the EVENTs it streams to its client."""

    def __init__(self, request, sender, streams: bool, flags: CancelFlags):
        self.request = request
        self.sender = sender
        self.streams = streams and wants(request, "EVENT")  # EVENTs only to a client that takes them
        self.flags = flags
        self.token = flags.new_token()
        self.flagged = False
        self.started = time.monotonic()
        self.timeout_s = request.timeout() / 1e6  # the request's own `timeout` field (microseconds), 0 when none
        self.late = False
        self.cancelled = False
        self._asking = threading.Lock()  # one question to Triton at a time (the request's thread, the watcher)

    def overdue(self) -> bool:
        """Whether the request's own timeout has passed."""
        self.late = self.late or (self.timeout_s > 0 and time.monotonic() - self.started > self.timeout_s)
        return self.late

    def ask(self) -> bool:
        """Ask Triton whether the client cancelled (a gRPC deadline counts). True when the question went through
        the stub's queue to the parent process (see Orchestrator._after_cleanup); False when the stub answered from
        its cache: once a request is found cancelled, the stub answers so at once."""
        with self._asking:
            if self.cancelled:
                return False
            self.cancelled = self.request.is_cancelled()
            return True

    def stopped(self) -> bool:
        """Whether the client cancelled the request or its timeout passed."""
        if not self.overdue():
            self.ask()
        return self.late or self.cancelled

    def cancellation(self) -> Cancelled:
        """Why the request was stopped, for its response."""
        if self.late:
            return Cancelled(f"the request's timeout of {self.timeout_s:g} s passed; its work was stopped")
        return Cancelled()

    def check(self) -> None:
        """Raise Cancelled once the request is stopped."""
        if self.flagged or self.stopped():
            self.flag()
            raise Cancelled

    def flag(self) -> None:
        """Tell every stage to stop this request at its next step."""
        if not self.flagged:
            self.flags.set(self.token)
            self.flagged = True

    def event(self, stage: str, step: int, steps: int) -> None:
        """Send one progress EVENT to a streaming client."""
        if self.streams and not self.flagged:  # a cancelled stream's client has left
            elapsed = time.monotonic() - self.started
            event = {"stage": stage, "step": step, "steps": steps, "fraction": step / steps, "elapsed": elapsed}
            self.sender.send(event_response(event))


class Orchestrator(TritonModel):
    """A generic entry point: subclasses set `steps` (the pipeline) and `outputs` (what the client gets back),
    and may override `check(request)` to refuse bad input before any stage runs.

    Config parameters: `max_queue` (requests held at once, admitted and waiting; K4SERVE_MAX_QUEUE overrides).
    """

    uses_device = False  # the stages hold the models; this instance only routes tensors
    steps: tuple[Step, ...] = ()
    outputs: tuple[str, ...] = ()

    def setup(self) -> None:
        family = pb_utils.MetricFamily
        self.in_flight_family = family(
            name="k4serve_requests_in_flight",
            description="Requests an entry point holds (admitted, not finished); the launcher drains to 0",
            kind=family.GAUGE,
        )
        self.rejected_family = family(
            name="k4serve_requests_rejected_total",
            description="Requests an entry point refused with UNAVAILABLE (reason: bound or draining)",
            kind=family.COUNTER,
        )
        self.in_flight = SerialMetric(self.in_flight_family, {"model": self.name})
        self.rejected = {
            reason: SerialMetric(self.rejected_family, {"model": self.name, "reason": reason})
            for reason in ("bound", "draining")
        }
        bound = max_queue(config_parameters(self.model_config))
        self.admission = Admission(self.name, bound, control_dir(), gauge=self.in_flight.set)
        self.stage_calls = threading.BoundedSemaphore(max_stage_calls())  # see control.DEFAULT_MAX_STAGE_CALLS
        self.flights: set[Flight] = set()
        self.lock = threading.Lock()
        self.stop_watching = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name=f"{self.name}-watch", daemon=True)
        self.watcher.start()

    def check(self, request) -> None:
        """Refuse bad input (raise RequestError) before any stage runs; the stages check their parts again."""

    def execute(self, requests: list) -> None:
        for request in requests:
            refusal = self.admission.admit()
            if refusal is not None:
                self.rejected[refusal.reason].increment(1)
                self._send_final(request.get_response_sender(), error_response(Refused(refusal.message)))
                continue
            threading.Thread(target=self._serve, args=(request,), name=f"{self.name}-request", daemon=True).start()
        return None

    def _serve(self, request) -> None:
        """Serve one admitted request on a thread of its own; its place is given back however it ends."""
        finished = None
        try:
            finished = self._run(request)
        finally:
            self.admission.release(finished)

    def _run(self, request) -> float | None:
        """Run the pipeline and send the final response; the seconds it took when it succeeded."""
        sender = request.get_response_sender()
        flight = Flight(request, sender, self.decoupled, self.cancel_flags)
        with self.lock:
            self.flights.add(flight)
        finished = None
        try:
            self.check(request)
            tensors = {tensor.name(): tensor for tensor in request.inputs()}
            for step in self.steps:
                tensors.update(self._call(step, tensors, flight))
            outputs = requested_only(request, [tensors[name] for name in self.outputs])
            response = pb_utils.InferenceResponse(output_tensors=outputs)
            finished = time.monotonic() - flight.started
        except Cancelled:
            self.metrics.count_cancelled()
            response = error_response(flight.cancellation())
        except Exception as error:  # the request ends with its error; the entry point serves the next
            response = error_response(error)
        finally:
            with self.lock:  # before the final response: Triton must not be asked about it afterwards
                self.flights.discard(flight)
            self.cancel_flags.clear(flight.token)
        self._send_final(sender, response)
        return finished

    def _send_final(self, sender, response: pb_utils.InferenceResponse) -> None:
        if self.decoupled and response.has_error() and response.error().code() == pb_utils.TritonError.CANCELLED:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)  # the stream's client has left
            return
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _call(self, step: Step, tensors: dict, flight: Flight) -> dict:
        """One stage call, once a place among this entry point's stage calls is free (a cancelled request stops
        waiting): its outputs by name; its error is raised as StageFailure (code and message kept)."""
        while not self.stage_calls.acquire(timeout=WATCH_INTERVAL_S):
            flight.check()
        try:
            return self._call_stage(step, tensors, flight)
        finally:
            self.stage_calls.release()

    def _call_stage(self, step: Step, tensors: dict, flight: Flight) -> dict:
        flight.check()
        started = time.monotonic()
        inference = pb_utils.InferenceRequest(
            model_name=step.model,
            inputs=[named(tensors[step.source(name)], name) for name in step.inputs if step.source(name) in tensors],
            requested_output_names=[*step.outputs, *(["EVENT"] if step.streams else [])],
            request_id=flight.request.request_id(),
            parameters={CANCEL_PARAMETER: flight.token},
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        if step.streams:
            outputs, failure = {}, None
            call = inference.exec(decoupled=True)
            for response in call:  # read to the end, even past an error
                try:
                    outputs.update(self._outputs(step, response, flight) if failure is None else {})
                except Exception as error:
                    failure = error
            self._after_cleanup(flight)  # before `call` goes: see _after_cleanup
            if failure is not None:
                raise failure
        else:
            flight.event(step.model, 0, 1)
            outputs = self._outputs(step, inference.exec(), flight)
            flight.event(step.model, 1, 1)
        flight.check()  # a stage stopped by the flag may also have answered with nothing
        missing = [name for name in step.outputs if name not in outputs]
        if missing:
            raise RuntimeError(f"{step.model} returned no {', '.join(missing)}")
        self.metrics.observe(step.model, time.monotonic() - started)
        return outputs

    def _outputs(self, step: Step, response, flight: Flight) -> dict:
        """The named outputs of one stage response (none for an EVENT, which is forwarded); a stage's error is
        raised as Cancelled or StageFailure (its code and message kept)."""
        if response.has_error():
            raise stage_failure(response.error().code(), response.error().message())
        event = pb_utils.get_output_tensor_by_name(response, "EVENT")
        if event is not None:
            progress = json.loads(event.as_numpy().reshape(-1)[0])
            if "error" in progress:  # a streaming stage's error (see StageModel.execute)
                raise stage_failure(progress["code"], progress["error"])
            flight.event(step.model, progress["step"], progress["steps"])
            return {}
        found = {name: pb_utils.get_output_tensor_by_name(response, name) for name in step.outputs}
        return {name: tensor for name, tensor in found.items() if tensor is not None}

    def _after_cleanup(self, flight: Flight) -> None:
        """Return once the stub has cleaned up the streaming stage call this thread just finished reading.

        In Triton 2.51's stub (python_backend r24.10) a decoupled BLS call is held twice: by its Python iterator and
        by the stub's map of calls. Reading its last response queues the call's cleanup on the stub's stub-to-parent
        thread (a C++ thread, one queue in order: cleanups, log lines, is_cancelled questions), which drops the
        map's hold. If Python let go first, that thread frees the responses, and with them their tensors' numpy
        arrays, without the GIL. Under Python 3.12 the free dereferences a NULL thread state: `segfault at 10 ...
        libpython3.12`, seen on the H200 and, under 3.12, on the CPU (tests/test_serving_stub.py says how); under
        3.11, whose allocator is process-wide, the free runs silently off the GIL. Fixed upstream in r24.12 (Triton
        2.53: PbTensor's destructor takes the GIL). A fresh is_cancelled question is answered only after everything
        queued before it, the call's cleanup included, so the caller lets go of the call after this returns. Once a
        request is found cancelled the stub answers from its cache, so another request in flight is asked; with
        none, the call goes unguarded. (Holding such calls for the watcher to let go of later, past their request's
        end, made tritonserver abort at client deadlines in every run of tests/test_serving_load.py: lock_exception,
        length_error, as from corrupted shared memory; the requests cancelled together there also counted their
        cancellation at once, the unlocked metric race that backend.SerialMetric closes.)
        """
        if flight.ask():
            return
        with self.lock:  # a request leaves `flights` (under the lock) before its final response
            for other in self.flights:
                if other is not flight and other.ask():
                    return

    def _watch(self) -> None:
        """Flag the requests whose client left or whose deadline passed, so the stages stop them at once."""
        while not self.stop_watching.wait(WATCH_INTERVAL_S):
            with self.lock:  # a request leaves `flights` (under the lock) before its final response
                for flight in self.flights:
                    try:
                        if not flight.flagged and flight.stopped():
                            flight.flag()
                    except Exception:  # one request's trouble must not stop the watch over the others
                        pb_utils.Logger.log_error(traceback.format_exc())

    def finalize(self) -> None:
        self.stop_watching.set()
        self.watcher.join()
