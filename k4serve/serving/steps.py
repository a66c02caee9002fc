"""The pipelines of the entry points, as data: which stage models each calls, in order, with which tensors.

Plain Python (no Triton import), so the launcher and the tests can read what an entry point needs loaded; the
Orchestrator (orchestrator.py) runs them inside Triton.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One stage call of a pipeline: the tensors it takes and gives, by name (a name means the same tensor in every
    stage that uses it). An input the request left out (an optional one) is left out of the call too.

    `streams`: the stage is decoupled and sends EVENT responses {"step", "steps"} before its outputs; the entry
    point forwards them. A stage that answers once is reported as step 0 of 1 before the call and 1 of 1 after.
    """

    model: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    streams: bool = False


T2V_STEPS = (
    Step("text_encoder", inputs=("PROMPT",), outputs=("EMBEDDINGS",)),
    Step(
        "dit_sampler",
        inputs=("EMBEDDINGS", "HEIGHT", "WIDTH", "SECONDS", "SEED"),
        outputs=("LATENTS", "SEED_USED"),
        streams=True,
    ),
    Step("vae_decoder", inputs=("LATENTS",), outputs=("FRAMES",), streams=True),
    Step("muxer", inputs=("FRAMES",), outputs=("MP4",)),
)

# Entry point (model directory) -> its pipeline.
ENTRY_POINTS = {"t2v": T2V_STEPS, "t2v_stream": T2V_STEPS}


def stage_models(entry_point: str) -> list[str]:
    """The stage models an entry point calls, in pipeline order (each once)."""
    return list(dict.fromkeys(step.model for step in ENTRY_POINTS[entry_point]))
