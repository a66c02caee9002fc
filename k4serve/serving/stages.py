"""The four T2V stages as Triton models: text_encoder -> dit_sampler -> vae_decoder -> muxer (the V2A stages are in
v2a_stages.py; the muxer writes the mp4 of every entry point).

One instance of each per GPU serves every entry point (t2v, t2va, v2a and their streaming variants:
k4serve/serving/entry_points.py).
Embeddings and latents (a few MB) cross stages as float32 on the host whatever the compute dtype and device
(bf16 -> float32 -> bf16 is exact; a few MB copied costs a millisecond, and no GPU buffer has to cross processes
through BLS); frames stay on the host between vae_decoder and muxer, where the mp4 encoder needs them anyway. Each
stage checks its inputs against its contract (k4serve/serving/requests.py) before it allocates anything, and
stops a cancelled request at its next step or chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from k4serve.models.cogvideox_vae import latent_chunks
from k4serve.models.schedulers import FLASH_STEPS
from k4serve.pipelines.t2v import PipelineSettings, RequestError, T2VPipeline
from k4serve.pipelines.video_io import DEFAULT_MP4_PRESET, FPS, SAMPLE_RATE, encode_mp4, mp4_settings
from k4serve.serving.backend import (
    StageModel,
    StageProgress,
    bytes_tensor,
    dlpack_tensor,
    input_bytes,
    input_float,
    input_int,
    input_torch,
    scalar_tensor,
)
from k4serve.serving.requests import (
    VideoShape,
    check_audio,
    check_clip_seconds,
    check_embeddings,
    check_frames,
    check_latents,
    check_sample_rate,
    check_uploaded_clip,
    decode_prompt,
    decode_timing,
)
from k4serve.serving.settings import pipeline_options


def video_shape(request) -> VideoShape:
    """HEIGHT, WIDTH, SECONDS, SEED (optional) of a request, checked."""
    return VideoShape.checked(
        input_int(request, "HEIGHT"),
        input_int(request, "WIDTH"),
        input_int(request, "SECONDS"),
        input_int(request, "SEED", required=False),
    )


class PipelineStage(StageModel):
    """A stage that owns some components of an in-process pipeline (T2V or V2A), built once on the instance's
    device: subclasses set `components` and build the pipeline in `build`."""

    components: tuple[str, ...] = ()

    def setup(self) -> None:
        self.pipeline = self.build()

    def build(self):
        """The in-process pipeline holding only this stage's components."""
        raise NotImplementedError

    def finalize(self) -> None:
        self.pipeline = None
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()


class T2VStage(PipelineStage):
    """A stage holding components of the T2V pipeline (settings: pipeline_options)."""

    def build(self) -> T2VPipeline:
        settings = PipelineSettings(device=self.device, **pipeline_options(self.model_config))
        return T2VPipeline.from_settings(settings, components=self.components)

    def held_modules(self) -> list:
        encoder = self.pipeline.text_encoder
        # a fast DiT engine's 8-bit linears are its own tensors, beside what is left of the module
        engine_linears = getattr(self.pipeline.denoiser, "quantized_linears", None)
        return [encoder.encoder if encoder is not None else None, self.pipeline.dit, engine_linears, self.pipeline.vae]


class TextEncoderModel(T2VStage):
    """PROMPT (BYTES, UTF-8) -> EMBEDDINGS float32 [224, text_dim]."""

    stage = "text_encoder"
    components = ("text_encoder",)

    def run(self, request, progress: StageProgress) -> list:
        prompt = decode_prompt(input_bytes(request, "PROMPT"))
        embeddings = self.pipeline.encode_prompt(prompt).float()
        return [dlpack_tensor("EMBEDDINGS", embeddings.cpu())]


class DiTSamplerModel(T2VStage):
    """EMBEDDINGS, HEIGHT, WIDTH, SECONDS, SEED (optional) -> EVENT per Flash step, then LATENTS float32
    [T, H/8, W/8, 16] and SEED_USED."""

    stage = "dit_sampler"
    components = ("dit",)

    def run(self, request, progress: StageProgress) -> list:
        shape = video_shape(request)
        embeddings = input_torch(request, "EMBEDDINGS")
        check_embeddings(embeddings, self.pipeline.dit.config.in_text_dim)
        progress.step(0, FLASH_STEPS)
        latents = self.pipeline.sample(embeddings, shape.height, shape.width, shape.seconds, shape.seed, progress.step)
        return [dlpack_tensor("LATENTS", latents.float().cpu()), scalar_tensor("SEED_USED", shape.seed, torch.int64)]


class VaeDecoderModel(T2VStage):
    """LATENTS float32 [T, H/8, W/8, 16] -> EVENT per temporal chunk, then FRAMES uint8 [4(T-1)+1, H, W, 3]."""

    stage = "vae_decoder"
    components = ("vae",)

    def run(self, request, progress: StageProgress) -> list:
        latents = input_torch(request, "LATENTS")
        check_latents(latents)
        chunks = len(latent_chunks(latents.shape[0]))
        progress.step(0, chunks)
        frames = []
        for done, chunk in enumerate(self.pipeline.decode_chunks(latents), 1):
            frames.append(chunk)
            progress.step(done, chunks)
        return [dlpack_tensor("FRAMES", np.concatenate(frames))]


class MuxerModel(StageModel):
    """FRAMES uint8 [F, H, W, 3] (+ AUDIO float32 [N] in [-1, 1], SAMPLE_RATE) -> MP4 bytes (H.264, AAC).

    FPS (optional): the frames' rate, for an uploaded clip's frames (v2a); without it FRAMES are t2v's, at 8 fps.
    CLIP_SECONDS (optional, t2va): keep the first int(seconds x fps) frames, the whole seconds V2A made sound for,
    as the official V2A writes them (12 s of t2v's 97 frames: 96) and `k4serve generate --audio` does.
    TIMING (optional): "pad" (default: the video keeps its rate, the audio is padded or cut) or "retime" (the
    official: the frames play over the audio's length)."""

    stage = "muxer"
    uses_device = False  # ffmpeg runs on the host

    def setup(self) -> None:
        self.x264 = mp4_settings(pipeline_options(self.model_config).get("mp4_preset") or DEFAULT_MP4_PRESET)

    def run(self, request, progress: StageProgress) -> list:
        frames = input_torch(request, "FRAMES")
        fps = input_float(request, "FPS", required=False)
        if fps is None:  # t2v's frames
            check_frames(frames)
            fps = FPS
        else:
            check_uploaded_clip(frames, fps)
        seconds = input_int(request, "CLIP_SECONDS", required=False)
        if seconds is not None:
            check_clip_seconds(seconds)
            kept = int(seconds * fps)
            if kept > len(frames):
                raise RequestError(
                    f"CLIP_SECONDS {seconds} needs {kept} frames at {fps:g} fps, FRAMES holds {len(frames)}"
                )
            frames = frames[:kept]
        timing = decode_timing(input_bytes(request, "TIMING", required=False))
        audio = input_torch(request, "AUDIO", required=False)
        sample_rate = input_int(request, "SAMPLE_RATE", required=False)
        if audio is None and sample_rate is not None:
            raise RequestError("SAMPLE_RATE was sent without AUDIO: send both, or neither for a silent video")
        if audio is not None:
            sample_rate = SAMPLE_RATE if sample_rate is None else sample_rate
            check_sample_rate(sample_rate)
            check_audio(audio, sample_rate)
            audio = audio.cpu().numpy()
        progress.check()
        mp4 = encode_mp4(frames.cpu().numpy(), fps, audio, sample_rate or SAMPLE_RATE, timing, self.x264)
        return [bytes_tensor("MP4", mp4)]
