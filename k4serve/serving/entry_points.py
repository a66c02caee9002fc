"""The entry points clients call, each a pipeline of stage calls run by the generic Orchestrator.

  t2v, t2v_stream    PROMPT, HEIGHT, WIDTH, SECONDS, SEED? -> MP4, SEED_USED
                     text_encoder -> dit_sampler -> vae_decoder -> muxer
  t2va, t2va_stream  t2v's inputs + AUDIO_PROMPT?, NEGATIVE_PROMPT?, TIMING? -> MP4 with sound, SEED_USED
                     t2v's stages, then v2a_encoder (on t2v's frames) -> v2a_sampler -> vocoder -> muxer
  v2a, v2a_stream    VIDEO (a video file's bytes), PROMPT?, NEGATIVE_PROMPT?, SEED?, TIMING? -> MP4, SEED_USED
                     v2a_encoder (decodes and trims the upload) -> v2a_sampler -> vocoder -> muxer

(? = optional.) The pipelines are data in steps.py. The `_stream` variants run the same pipeline and send progress
EVENTs first; every entry point calls the same stage instances, so each model is loaded once. In t2va the audio
comes from the video's seed, so the one SEED_USED reproduces both; its sound prompt is AUDIO_PROMPT (absent: the
official V2A prompt "clean. clear. good quality.", as `k4serve generate --audio`), not the video's PROMPT: that
describes what to see, while the official V2A prompts describe the sound's quality and its content comes from the
frames; so t2va's sound is `generate --audio`'s for the same request.

To add an entry point: declare its steps in steps.py (and list it in ENTRY_POINTS), subclass Orchestrator with
them, point a model.py at the class, and write its config.pbtxt (inputs, outputs, `decoupled: true` for the
streaming variant, `max_queue`, the `model_name: "<stage>"` comment the launcher reads). A new stage is a
StageModel subclass in stages.py (or a module beside it, as v2a_stages.py) with its own model directory; a
streaming stage is decoupled and calls `progress.step(done, steps)` as it goes.
"""

from __future__ import annotations

from k4serve.pipelines.t2v import RequestError, validate_seed
from k4serve.serving.backend import input_bytes, input_int
from k4serve.serving.orchestrator import Orchestrator
from k4serve.serving.requests import decode_audio_prompts, decode_prompt, decode_timing
from k4serve.serving.stages import video_shape
from k4serve.serving.steps import T2V_STEPS, T2VA_STEPS, V2A_STEPS

OUTPUTS = ("MP4", "SEED_USED")


class T2VModel(Orchestrator):
    """PROMPT, HEIGHT, WIDTH, SECONDS, SEED (optional) -> MP4 + SEED_USED (`t2v`), with EVENTs before (`t2v_stream`)."""

    steps = T2V_STEPS
    outputs = OUTPUTS

    def check(self, request) -> None:
        decode_prompt(input_bytes(request, "PROMPT"))
        video_shape(request)


class T2VAModel(T2VModel):
    """t2v's inputs + AUDIO_PROMPT, NEGATIVE_PROMPT, TIMING (optional) -> MP4 with an AAC soundtrack + SEED_USED
    (`t2va`), with EVENTs before (`t2va_stream`)."""

    steps = T2VA_STEPS

    def check(self, request) -> None:
        super().check(request)
        if video_shape(request).seconds < 1:
            raise RequestError(
                "SECONDS must be from 1 to 12 for a video with sound: V2A makes sound for whole seconds of video "
                "(0 is a single image; ask t2v for it)"
            )
        decode_audio_prompts(
            input_bytes(request, "AUDIO_PROMPT", required=False),
            input_bytes(request, "NEGATIVE_PROMPT", required=False),
            prompt_name="AUDIO_PROMPT",
        )
        decode_timing(input_bytes(request, "TIMING", required=False))


class V2AModel(Orchestrator):
    """VIDEO (BYTES: a video file), PROMPT, NEGATIVE_PROMPT, SEED, TIMING (optional) -> MP4 of the video's first
    whole seconds (at most 12) with a generated soundtrack + SEED_USED (`v2a`), with EVENTs before (`v2a_stream`)."""

    steps = V2A_STEPS
    outputs = (*OUTPUTS, "NOTICE")  # what the official trim cut from the upload ("" when nothing)

    def check(self, request) -> None:
        decode_audio_prompts(
            input_bytes(request, "PROMPT", required=False), input_bytes(request, "NEGATIVE_PROMPT", required=False)
        )
        validate_seed(input_int(request, "SEED", required=False))
        decode_timing(input_bytes(request, "TIMING", required=False))
        input_bytes(request, "VIDEO")  # one element; v2a_encoder decodes it
