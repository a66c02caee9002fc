"""The four T2V stages as Triton models: text_encoder -> dit_sampler -> vae_decoder -> muxer (the `t2v` ensemble).

Embeddings and latents (a few MB) cross stages as float32 whatever the compute dtype (bf16 -> float32 -> bf16
is exact); frames stay inside vae_decoder -> muxer on the host, where the mp4 encoder needs them anyway.
"""

from __future__ import annotations

import torch

from k4serve.pipelines.t2v import LATENT_CHANNELS, PipelineSettings, RequestError, T2VPipeline
from k4serve.pipelines.video_io import DEFAULT_MP4_PRESET, FPS, SAMPLE_RATE, encode_mp4, mp4_settings
from k4serve.serving.backend import (
    StageModel,
    bytes_tensor,
    dlpack_tensor,
    input_bytes,
    input_int,
    input_torch,
)
from k4serve.serving.requests import VideoShape, decode_prompt
from k4serve.serving.settings import pipeline_options


class PipelineStage(StageModel):
    """A stage that owns some components of the in-process pipeline, built once on the instance's device."""

    components: tuple[str, ...] = ()

    def setup(self) -> None:
        settings = PipelineSettings(device=self.device, **pipeline_options(self.model_config))
        self.pipeline = T2VPipeline.from_settings(settings, components=self.components)

    def finalize(self) -> None:
        self.pipeline = None
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()


class TextEncoderModel(PipelineStage):
    """PROMPT (BYTES, UTF-8) -> EMBEDDINGS float32 [224, text_dim]."""

    stage = "text_encoder"
    components = ("text_encoder",)

    def run(self, request) -> list:
        prompt = decode_prompt(input_bytes(request, "PROMPT"))
        embeddings = self.pipeline.encode_prompt(prompt).float()
        return [dlpack_tensor("EMBEDDINGS", embeddings)]


class DiTSamplerModel(PipelineStage):
    """EMBEDDINGS, HEIGHT, WIDTH, SECONDS, SEED (optional) -> LATENTS float32 [T, H/8, W/8, 16], SEED_USED."""

    stage = "dit_sampler"
    components = ("dit",)

    def run(self, request) -> list:
        shape = VideoShape.checked(
            input_int(request, "HEIGHT"),
            input_int(request, "WIDTH"),
            input_int(request, "SECONDS"),
            input_int(request, "SEED", required=False),
        )
        embeddings = input_torch(request, "EMBEDDINGS")
        text_dim = self.pipeline.dit.config.in_text_dim
        if embeddings.dim() != 2 or embeddings.shape[1] != text_dim:
            raise RequestError(f"EMBEDDINGS must be [tokens, {text_dim}], got {list(embeddings.shape)}")
        latents = self.pipeline.sample(embeddings, shape.height, shape.width, shape.seconds, shape.seed)
        seed = torch.tensor([shape.seed], dtype=torch.int64)
        return [dlpack_tensor("LATENTS", latents.float()), dlpack_tensor("SEED_USED", seed)]


class VaeDecoderModel(PipelineStage):
    """LATENTS float32 [T, H/8, W/8, 16] -> FRAMES uint8 [4(T-1)+1, H, W, 3] on the host."""

    stage = "vae_decoder"
    components = ("vae",)

    def run(self, request) -> list:
        latents = input_torch(request, "LATENTS")
        if latents.dim() != 4 or latents.shape[-1] != LATENT_CHANNELS:
            raise RequestError(f"LATENTS must be [T, H/8, W/8, {LATENT_CHANNELS}], got {list(latents.shape)}")
        return [dlpack_tensor("FRAMES", self.pipeline.decode(latents))]


class MuxerModel(StageModel):
    """FRAMES uint8 [F, H, W, 3] (+ AUDIO float32 [N] in [-1, 1], SAMPLE_RATE) -> MP4 bytes (H.264, AAC)."""

    stage = "muxer"
    uses_device = False  # ffmpeg runs on the host

    def setup(self) -> None:
        self.x264 = mp4_settings(pipeline_options(self.model_config).get("mp4_preset") or DEFAULT_MP4_PRESET)

    def run(self, request) -> list:
        frames = input_torch(request, "FRAMES").cpu().numpy()
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise RequestError(f"FRAMES must be uint8 [F, H, W, 3], got {list(frames.shape)}")
        audio = input_torch(request, "AUDIO", required=False)
        sample_rate = input_int(request, "SAMPLE_RATE", required=False) or SAMPLE_RATE
        mp4 = encode_mp4(frames, FPS, None if audio is None else audio.cpu().numpy(), sample_rate, self.x264)
        return [bytes_tensor("MP4", mp4)]
