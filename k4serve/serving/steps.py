"""The pipelines of the entry points, as data: which stage models each calls, in order, with which tensors.

Plain Python (no Triton import), so the launcher and the tests can read what an entry point needs loaded; the
Orchestrator (orchestrator.py) runs them inside Triton.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Step:
    """One stage call of a pipeline: the tensors it takes and gives, by name (a name means the same tensor in every
    stage that uses it). An input the request left out (an optional one) is left out of the call too.

    `sources`: the pipeline tensor that feeds a stage input of another name, {stage input: pipeline tensor}; e.g.
    {"SEED": "SEED_USED"} gives the stage the seed an earlier stage used. Inputs not named here take their own name.

    `streams`: the stage is decoupled and sends EVENT responses {"step", "steps"} before its outputs; the entry
    point forwards them. A stage that answers once is reported as step 0 of 1 before the call and 1 of 1 after.
    """

    model: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    streams: bool = False
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)

    def source(self, name: str) -> str:
        """The pipeline tensor that feeds the stage input `name`."""
        return self.sources.get(name, name)


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

V2A_FEATURES = ("PROMPT_FEATURES", "VIDEO_FEATURES", "CLIP_SECONDS")  # v2a_encoder -> v2a_sampler
# The vocoder's Griffin-Lim phase is drawn from the seed the sampler used, so SEED_USED reproduces the audio.
VOCODER_STEP = Step(
    "vocoder", inputs=("AUDIO_LATENTS", "SEED"), outputs=("AUDIO", "SAMPLE_RATE"), sources={"SEED": "SEED_USED"}
)

# t2v, then sound for its frames. The audio is drawn from the video's seed (SEED_USED reproduces both), its prompt
# is the request's AUDIO_PROMPT (absent: the official V2A prompt, as `k4serve generate --audio`), and the muxer keeps
# the whole seconds V2A made sound for, as the official V2A writes them: 12 s of t2v's 97 frames are 96.
T2VA_STEPS = (
    *T2V_STEPS[:-1],
    Step(
        "v2a_encoder",
        inputs=("FRAMES", "PROMPT", "NEGATIVE_PROMPT"),
        outputs=V2A_FEATURES,
        streams=True,
        sources={"PROMPT": "AUDIO_PROMPT"},
    ),
    Step(
        "v2a_sampler",
        inputs=(*V2A_FEATURES, "SEED"),
        outputs=("AUDIO_LATENTS",),
        streams=True,
        sources={"SEED": "SEED_USED"},
    ),
    VOCODER_STEP,
    Step("muxer", inputs=("FRAMES", "CLIP_SECONDS", "AUDIO", "SAMPLE_RATE", "TIMING"), outputs=("MP4",)),
)

# An uploaded video gets a soundtrack: the encoder decodes and trims it, the muxer writes its kept frames.
V2A_STEPS = (
    Step(
        "v2a_encoder",
        inputs=("VIDEO", "PROMPT", "NEGATIVE_PROMPT"),
        outputs=(*V2A_FEATURES, "FRAMES", "FPS", "NOTICE"),
        streams=True,
    ),
    Step("v2a_sampler", inputs=(*V2A_FEATURES, "SEED"), outputs=("AUDIO_LATENTS", "SEED_USED"), streams=True),
    VOCODER_STEP,
    Step("muxer", inputs=("FRAMES", "FPS", "AUDIO", "SAMPLE_RATE", "TIMING"), outputs=("MP4",)),
)

# Entry point (model directory) -> its pipeline.
ENTRY_POINTS = {
    "t2v": T2V_STEPS,
    "t2v_stream": T2V_STEPS,
    "t2va": T2VA_STEPS,
    "t2va_stream": T2VA_STEPS,
    "v2a": V2A_STEPS,
    "v2a_stream": V2A_STEPS,
}


def stage_models(entry_point: str) -> list[str]:
    """The stage models an entry point calls, in pipeline order (each once)."""
    return list(dict.fromkeys(step.model for step in ENTRY_POINTS[entry_point]))
