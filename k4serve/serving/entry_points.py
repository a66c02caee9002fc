"""The entry points clients call, each a pipeline of stage calls run by the generic Orchestrator.

To add one (t2va, v2a, ...): declare its steps in steps.py (and list it in ENTRY_POINTS), subclass Orchestrator
with them, point a model.py at the class, and write its config.pbtxt (inputs, outputs, `decoupled: true` for the
streaming variant, `max_queue`, the `model_name: "<stage>"` comment the launcher reads). A new stage is a
StageModel subclass in stages.py (or a module beside it) with its own model directory; a streaming stage is
decoupled and calls `progress.step(done, steps)` as it goes.
"""

from __future__ import annotations

from k4serve.serving.backend import input_bytes
from k4serve.serving.orchestrator import Orchestrator
from k4serve.serving.requests import decode_prompt
from k4serve.serving.stages import video_shape
from k4serve.serving.steps import T2V_STEPS


class T2VModel(Orchestrator):
    """PROMPT, HEIGHT, WIDTH, SECONDS, SEED (optional) -> MP4 + SEED_USED (`t2v`), with EVENTs before (`t2v_stream`)."""

    steps = T2V_STEPS
    outputs = ("MP4", "SEED_USED")

    def check(self, request) -> None:
        decode_prompt(input_bytes(request, "PROMPT"))
        video_shape(request)
