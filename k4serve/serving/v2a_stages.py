"""The three V2A stages as Triton models: v2a_encoder -> v2a_sampler -> vocoder (then the muxer of stages.py).

Each holds one component of the in-process V2APipeline (k4serve/pipelines/v2a.py) and calls its stage method:
`encode` (CogVLM2-Video), `sample` (the UNet's 51 PLMS calls), `vocode` (SD VAE + Griffin-Lim). One instance of
each per GPU serves t2va, v2a and their streaming variants. As for the T2V stages (stages.py), the features and the
latents cross stages as float32 on the host; the uploaded clip's frames reach the muxer on the host too. Each stage
checks its inputs against its contract (requests.py) before it runs a model.
"""

from __future__ import annotations

import torch

from k4serve.pipelines.t2v import RequestError, resolve_seed, validate_seed
from k4serve.pipelines.v2a import V2APipeline, V2ASettings, load_clip, unet_feature_dim
from k4serve.pipelines.video_io import FPS
from k4serve.serving.backend import (
    StageProgress,
    bytes_tensor,
    dlpack_tensor,
    input_bytes,
    input_int,
    input_torch,
    scalar_tensor,
)
from k4serve.serving.requests import (
    check_audio_latents,
    check_clip_seconds,
    check_t2v_clip,
    check_v2a_features,
    decode_audio_prompts,
)
from k4serve.serving.settings import v2a_options
from k4serve.serving.stages import PipelineStage


class V2AStage(PipelineStage):
    """A stage holding one component of the V2A pipeline (settings: v2a_options)."""

    def build(self) -> V2APipeline:
        settings = V2ASettings(device=self.device, **v2a_options(self.model_config))
        return V2APipeline.from_settings(settings, components=self.components)

    def held_modules(self) -> list:
        encoder = self.pipeline.encoder
        return [encoder.model if encoder is not None else None, self.pipeline.unet, self.pipeline.vae]


class V2AEncoderModel(V2AStage):
    """VIDEO (BYTES: a video file) or FRAMES (uint8 [F, H, W, 3], t2v's at 8 fps), PROMPT and NEGATIVE_PROMPT
    (optional; the official V2A prompts) -> PROMPT_FEATURES float32 [2, 100, D], VIDEO_FEATURES float32 [2, 96, D]
    ([uncond; cond]) and CLIP_SECONDS int32 [1]; for VIDEO also the trimmed clip's FRAMES, FPS float64 [1] and
    NOTICE (BYTES: what the trim cut, "" when nothing).

    A video is cut to its first whole seconds (at most 12) once, here, as the official `load_video` does; the muxer
    gets those frames. t2v's frames stay with the entry point, which hands them to the muxer itself.

    Decoupled (an EVENT before and after the encoding), though it answers once: this is the stage that refuses an
    upload, and Triton 2.51 resets the code of an error a BLS caller receives to INTERNAL (server issue #7804),
    while a decoupled stage's error reaches the entry point as an EVENT that keeps INVALID_ARGUMENT."""

    stage = "v2a_encoder"
    components = ("encoder",)

    def run(self, request, progress: StageProgress) -> list:
        prompt, negative_prompt = decode_audio_prompts(
            input_bytes(request, "PROMPT", required=False), input_bytes(request, "NEGATIVE_PROMPT", required=False)
        )
        video = input_bytes(request, "VIDEO", required=False)
        frames = input_torch(request, "FRAMES", required=False)
        if (video is None) == (frames is None):
            raise RequestError("send exactly one of VIDEO (a video file's bytes) and FRAMES (t2v's frames at 8 fps)")
        if video is not None:
            clip = load_clip(video)  # probes the upload against the limits before decoding it
        else:
            check_t2v_clip(frames)
            clip = load_clip(frames.cpu().numpy(), FPS)
        progress.step(0, 1)
        conditioning = self.pipeline.encode(clip.frames, clip.fps, prompt, negative_prompt)
        progress.step(1, 1)
        outputs = [
            dlpack_tensor("PROMPT_FEATURES", conditioning.prompt.float().cpu()),
            dlpack_tensor("VIDEO_FEATURES", conditioning.video.float().cpu()),
            scalar_tensor("CLIP_SECONDS", clip.seconds, torch.int32),
        ]
        if video is not None:
            # float64: the rate ffmpeg printed (29.97) reaches the muxer as it is; float32 would make it 29.969999.
            outputs += [dlpack_tensor("FRAMES", clip.frames), scalar_tensor("FPS", clip.fps, torch.float64)]
            outputs.append(bytes_tensor("NOTICE", clip.notice or ""))  # the client learns what was cut
        return outputs


class V2ASamplerModel(V2AStage):
    """PROMPT_FEATURES, VIDEO_FEATURES, CLIP_SECONDS, SEED (optional) -> an EVENT per UNet call (51: 50 PLMS steps),
    then AUDIO_LATENTS float32 [4, n_mels / 8, W / 8] and SEED_USED int64 [1]."""

    stage = "v2a_sampler"
    components = ("unet",)

    def setup(self) -> None:
        super().setup()
        self.pipeline.prepare()  # the fast engine's CUDA graph of every duration, before the first request

    def run(self, request, progress: StageProgress) -> list:
        seconds = input_int(request, "CLIP_SECONDS")
        check_clip_seconds(seconds)
        seed = input_int(request, "SEED", required=False)
        validate_seed(seed)
        seed = resolve_seed(seed)
        prompt, video = input_torch(request, "PROMPT_FEATURES"), input_torch(request, "VIDEO_FEATURES")
        check_v2a_features(prompt, video, unet_feature_dim(self.pipeline.unet))
        progress.step(0, self.pipeline.sampler.num_calls)
        latents = self.pipeline.sample((prompt, video), seconds, seed, progress.step)
        return [dlpack_tensor("AUDIO_LATENTS", latents.float().cpu()), scalar_tensor("SEED_USED", seed, torch.int64)]


class VocoderModel(V2AStage):
    """AUDIO_LATENTS float32 [4, n_mels / 8, w], SEED (the sampler's) -> AUDIO float32 [441 (8w - 1)] in [-1, 1)
    and SAMPLE_RATE int32 [1] (44100): the SD VAE's spectrogram image, then mel inverse + Griffin-Lim."""

    stage = "vocoder"
    components = ("vocoder",)

    def run(self, request, progress: StageProgress) -> list:
        latents = input_torch(request, "AUDIO_LATENTS")
        channels, rows, _ = self.pipeline.latent_shape(1)
        check_audio_latents(latents, channels, rows)
        seed = input_int(request, "SEED")
        validate_seed(seed)
        progress.check()
        waveform = self.pipeline.vocode(latents, seed)
        sample_rate = self.pipeline.spectrogram.sample_rate
        return [dlpack_tensor("AUDIO", waveform), scalar_tensor("SAMPLE_RATE", sample_rate, torch.int32)]
