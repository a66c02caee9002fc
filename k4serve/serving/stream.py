"""`t2v_stream`: a decoupled model that streams progress events, then the mp4, over gRPC bidirectional streaming.

One instance runs the whole pipeline in process, so it can report every DiT step and stop between steps when
the client cancels (the instance is then free for the next request at once). The price is a second copy of the
weights beside the ensemble's stages; give it its own GPU with `k4serve serve --gpus` when memory is short.
"""

from __future__ import annotations

import json
import time

import torch
import triton_python_backend_utils as pb_utils

from k4serve.models.cogvideox_vae import latent_chunks
from k4serve.models.schedulers import FLASH_STEPS
from k4serve.pipelines.t2v import COMPONENTS
from k4serve.pipelines.video_io import FPS, Mp4Encoder
from k4serve.serving.backend import StageMetrics, bytes_tensor, dlpack_tensor, error_response, input_bytes, input_int
from k4serve.serving.requests import VideoShape, decode_prompt
from k4serve.serving.stages import PipelineStage


class Cancelled(Exception):
    """The client cancelled the request."""


class Progress:
    """Sends one EVENT response per finished step and times each stage; raises Cancelled once the client left."""

    def __init__(self, sender, metrics: StageMetrics):
        self.sender = sender
        self.metrics = metrics
        self.started = self.stage_started = time.perf_counter()

    def begin(self, stage: str, steps: int) -> None:
        """Report `stage` started (step 0 of `steps`) and time it; stop here if the client cancelled."""
        self.check()
        self.stage_started = time.perf_counter()
        self.send(stage, 0, steps)

    def step(self, stage: str, step: int, steps: int) -> None:
        """Report `step` of `steps` done in `stage`; stop here if the client cancelled."""
        if step == steps:
            self.metrics.observe(stage, time.perf_counter() - self.stage_started)
        self.send(stage, step, steps)
        self.check()

    def send(self, stage: str, step: int, steps: int) -> None:
        elapsed = time.perf_counter() - self.started
        event = {"stage": stage, "step": step, "steps": steps, "fraction": step / steps, "elapsed": elapsed}
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[bytes_tensor("EVENT", json.dumps(event))]))

    def check(self) -> None:
        if self.sender.is_cancelled():
            raise Cancelled


class T2VStreamModel(PipelineStage):
    """PROMPT, HEIGHT, WIDTH, SECONDS, SEED (optional) -> EVENT* (JSON), then MP4 + SEED_USED."""

    stage = "t2v_stream"
    components = COMPONENTS

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            try:
                outputs = self.generate(request, Progress(sender, self.metrics))
            except Cancelled:
                self.metrics.count_cancelled()
                sender.send(flags=final)
            except Exception as error:  # the stream ends with the error; the instance serves the next request
                sender.send(error_response(error), flags=final)
            else:
                sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=final)

    def generate(self, request, progress: Progress) -> list:
        """Run the four stages for one request, reporting as they go."""
        prompt = decode_prompt(input_bytes(request, "PROMPT"))
        shape = VideoShape.checked(
            input_int(request, "HEIGHT"),
            input_int(request, "WIDTH"),
            input_int(request, "SECONDS"),
            input_int(request, "SEED", required=False),
        )
        progress.begin("text_encoder", 1)
        embeddings = self.pipeline.encode_prompt(prompt)
        progress.step("text_encoder", 1, 1)
        progress.begin("dit_sampler", FLASH_STEPS)
        latents = self.pipeline.sample(
            embeddings,
            shape.height,
            shape.width,
            shape.seconds,
            shape.seed,
            lambda done, total: progress.step("dit_sampler", done, total),
        )
        # The H.264 encode runs on the CPU while the VAE decodes the next chunk; "muxer" is then only its tail.
        chunks = len(latent_chunks(latents.shape[0]))
        progress.begin("vae_decoder", chunks)
        # closed (ffmpeg stopped) on a cancel too
        with Mp4Encoder(shape.height, shape.width, FPS, x264=self.pipeline.x264) as encoder:
            for done, frames in enumerate(self.pipeline.decode_chunks(latents), 1):
                encoder.write(frames)
                progress.step("vae_decoder", done, chunks)
            progress.begin("muxer", 1)
            mp4 = encoder.finish()
        progress.step("muxer", 1, 1)
        return [bytes_tensor("MP4", mp4), dlpack_tensor("SEED_USED", torch.tensor([shape.seed], dtype=torch.int64))]
