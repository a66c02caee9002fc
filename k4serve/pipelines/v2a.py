"""Video -> audio in process (Kandinsky 4.0 V2A): CogVLM2-Video features -> UNet spectrogram sampler (PNDM, 50 steps,
CFG 8) -> SD VAE decoder -> spectrogram image -> mel inverse + Griffin-Lim -> 44.1 kHz mono audio -> mp4 with sound.

Every numeric step mirrors the official `Video2AudioPipeline.__call__` and `create_video`
(kandinsky4_video2audio/): `load_video`'s trim and 96 evenly spread frames, the [uncond; cond] batch whose
unconditional half is the negative prompt with an all-black video, CogVLM2 and the UNet in bf16 on the GPU (the
scheduler's arithmetic in the UNet's dtype), `latents.to(vae dtype) / scaling_factor` with the VAE in fp16, the
image processor's uint8 rounding, riffusion's image -> audio and the -30 dBFS levels. Deliberate differences:
the noise and Griffin-Lim's initial phase come from `seed` (the official draws both unseeded), the unconditional
branch is computed once and kept (it does not depend on the request), the mel inverse is a cached
pseudo-inverse (k4serve.models.audio), and the mp4 keeps the video's timing (README "Video to audio: timing").

The stage methods are self-contained, so the serving stages can call them directly:
  encode  (v2a_encoder): a trimmed clip's frames + prompts -> conditioning, prompt [2, 100, D] + video [2, 96, D];
  sample  (v2a_sampler): conditioning + seconds + seed -> latents [4, n_mels / 8, W / 8]; progress after each of
          the 51 UNet calls, and an exception raised by the progress callback cancels between two of them;
  vocode  (vocoder): latents + seed -> float32 audio [441 (W - 1)] at 44.1 kHz.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from k4serve.engines.base import EXPORTED_ENGINES
from k4serve.engines.options import LINEAR_OPTIONS
from k4serve.models.audio import PRESETS as AUDIO_PRESETS
from k4serve.models.audio import audio_width, spectrogram_image_to_audio
from k4serve.models.checkpoints import diffusers_folder
from k4serve.models.cogvlm2_video import (
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PROMPT,
    PROMPT_TOKENS,
    CogVLM2VideoEncoder,
    Conditioning,
)
from k4serve.models.cogvlm2_video import PRESETS as ENCODER_PRESETS
from k4serve.models.frame_sampling import NUM_FRAMES as CONDITIONING_FRAMES
from k4serve.models.frame_sampling import conditioning_frame_indices
from k4serve.models.pndm import PNDMConfig, PNDMSampler, unet_denoiser
from k4serve.models.sd_vae import PRESETS as VAE_PRESETS
from k4serve.models.sd_vae import SDVAEConfig, SDVAEDecoder, build_sd_vae_decoder, load_sd_vae_decoder, to_uint8_image
from k4serve.models.v2a_unet import PRESETS as UNET_PRESETS
from k4serve.models.v2a_unet import UNET_LAYOUT, V2AUNet, build_v2a_unet, load_v2a_unet
from k4serve.pipelines.exported import ExportedUNet
from k4serve.pipelines.media import (
    MAX_SECONDS,
    MediaError,
    TrimmedVideo,
    UploadLimits,
    check_frames,
    clip_seconds,
    decode_video,
    trim_video,
)
from k4serve.pipelines.t2v import RequestError, component_devices, resolve_seed, run_dtype, validate_seed
from k4serve.pipelines.video_io import DEFAULT_MP4_PRESET, encode_mp4, mp4_settings

# Which model preset each pipeline preset uses, per part. "tiny" fits together at toy widths: the UNet is built
# with the encoder's feature width, and its 64 mel rows give an 8-row latent through the 8x VAE.
PIPELINE_PRESETS: dict[str, dict[str, str]] = {
    "tiny": {"encoder": "tiny", "unet": "tiny", "vae": "tiny", "audio": "tiny"},
    "kandinsky4-v2a": {
        "encoder": "cogvlm2-video-llama3-chat",
        "unet": "kandinsky4-v2a",
        "vae": "kandinsky4-v2a",
        "audio": "v2a",
    },
}
COMPONENTS = ("encoder", "unet", "vocoder")  # the three stages' parts; "vocoder" is the SD VAE + Griffin-Lim
# fast: the UNet under CUDA graphs (FastUNet; the same eager forward on the CPU); aoti | tensorrt | onnxruntime:
# the UNet from the engine `k4serve export ... --model v2a-unet` wrote into engine_dir (the encoder and vocoder eager)
V2A_ENGINES = ("eager", "fast", *EXPORTED_ENGINES)
TIMINGS = ("pad", "retime")  # video_io.AudioTiming
# CogVLM2 keeps the first 100 tokens (BOS + 99, about 400 characters of English); far longer is a client mistake.
MAX_PROMPT_CHARS = 1000
UPLOAD_LIMITS = UploadLimits()  # what an uploaded or given video may be (media.UploadLimits)
ENCODER_FOLDER = "cogvlm2-video-llama3-chat"
WEIGHTS_LAYOUT = (
    "expected the ai-forever/kandinsky-4-v2a snapshot (unet/ and vae/: diffusers folders with config.json and "
    "diffusion_pytorch_model.safetensors; scheduler/scheduler_config.json, optional) with the "
    f"THUDM/cogvlm2-video-llama3-chat snapshot in {ENCODER_FOLDER}/ or given as encoder_weights "
    "(README: 'Video to audio: weights')"
)

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class V2ASettings:
    """Where and how the V2A pipeline runs. `device` is one device or a map naming each of COMPONENTS."""

    preset: str = "tiny"  # PIPELINE_PRESETS: the shapes of random weights (weights given: only the audio settings)
    weights: str | None = None  # the official snapshot directory (WEIGHTS_LAYOUT); None: seeded random weights
    encoder_weights: str | None = None  # the CogVLM2-Video snapshot, if not in weights/cogvlm2-video-llama3-chat
    device: str | dict[str, str] = "cpu"
    engine: str = "eager"  # V2A_ENGINES
    engine_dir: str | None = None  # aoti | tensorrt | onnxruntime: the folder `k4serve export` wrote
    linear: str = "bf16"  # the fast engine's UNet linears: bf16 | fp8 | fp8-fast | int8 (GPU; fp8: benchmarks/v2a.py)
    mp4_preset: str = DEFAULT_MP4_PRESET  # H.264 settings of add_audio (video_io.MP4_PRESETS)
    seed: int = 0  # random-weight seed when no weights are given

    def device_map(self) -> dict[str, str]:
        """The device of each component."""
        return component_devices(self.device, COMPONENTS)


@dataclass(frozen=True)
class V2AAudio:
    """The generated soundtrack of one clip."""

    waveform: np.ndarray  # float32 [N] in [-1, 1), mono, N = 441 (W - 1)
    sample_rate: int
    seed: int  # the seed used (drawn when the request had none): the same seed gives the same audio
    seconds: int  # the clip's whole seconds that the audio was generated for
    notice: str | None = None  # set when the video was trimmed (V2A takes at most 12 whole seconds)

    @property
    def duration_s(self) -> float:
        return len(self.waveform) / self.sample_rate


def validate_prompts(prompt: str, negative_prompt: str) -> None:
    """RequestError naming the fix for a prompt that is not text or is far longer than CogVLM2 reads."""
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if not isinstance(text, str):
            raise RequestError(f"the {name} must be text, got {type(text).__name__}")
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError(
                f"the {name} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted "
                f"(CogVLM2 keeps only its first {PROMPT_TOKENS} tokens, about 400 characters): shorten it"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(
                f"the {name} is not valid Unicode (it has unpaired surrogates): send UTF-8 text"
            ) from None


def validate_seconds(seconds: int) -> None:
    """RequestError unless `seconds` is a whole number of seconds V2A generates audio for (1..12)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= MAX_SECONDS:
        raise RequestError(
            f"seconds must be a whole number from 1 to {MAX_SECONDS} (the trimmed clip's), got {seconds!r}"
        )


def load_clip(
    video: bytes | TrimmedVideo | np.ndarray, fps: float | None = None, limits: UploadLimits = UPLOAD_LIMITS
) -> TrimmedVideo:
    """A video file's bytes, uint8 frames [F, H, W, 3] at `fps`, or an already trimmed clip -> the clip V2A works on:
    its first whole seconds, at most 12, trimmed once as the official `load_video`. MediaError naming the fix."""
    if isinstance(video, TrimmedVideo):
        return video
    if isinstance(video, bytes | bytearray | memoryview):
        return decode_video(bytes(video), limits)
    if fps is None:
        raise MediaError("frames need their frame rate: pass fps (or send the video file's bytes)")
    check_frames(video, fps, limits)
    return trim_video(video, fps)


def _weights_paths(settings: V2ASettings, components: Sequence[str]) -> dict[str, Path]:
    """The snapshot's folders the components need, checked before anything is loaded (None: not needed)."""
    root = Path(settings.weights)
    if not root.is_dir():
        raise FileNotFoundError(f"V2A weights directory not found: {root}; {WEIGHTS_LAYOUT}")
    paths = {"unet": root / "unet", "vae": root / "vae", "scheduler": root / "scheduler" / "scheduler_config.json"}
    paths["encoder"] = Path(settings.encoder_weights) if settings.encoder_weights else root / ENCODER_FOLDER
    needed = {"encoder": ["encoder"], "unet": ["unet"], "vocoder": ["vae"]}
    # vae/config.json always: the sampler's latent shape depends on the VAE's scale factor
    for name in ["vae", *(part for c in components for part in needed[c])]:
        if not (paths[name] / "config.json").is_file():
            raise FileNotFoundError(f"missing {paths[name] / 'config.json'}: {WEIGHTS_LAYOUT}")
    return paths


def unet_weight_files(settings: V2ASettings) -> list[Path] | None:
    """The UNet's checkpoint files in the snapshot (None: seeded random weights)."""
    if settings.weights is None:
        return None
    return diffusers_folder(_weights_paths(settings, ("unet",))["unet"], "V2A UNet", UNET_LAYOUT)[1]


def exported_unet(settings: V2ASettings) -> ExportedUNet:
    """The UNet's exported engine (settings.engine in EXPORTED_ENGINES), checked against the preset and weights."""
    if not settings.engine_dir:
        raise ValueError(
            f"V2A engine {settings.engine} runs an exported UNet: give engine_dir (--engine-dir, K4SERVE_ENGINE_DIR "
            "or the engine_dir parameter), a folder written by `k4serve export ... --model v2a-unet -o DIR`"
        )
    device = settings.device_map()["unet"]
    preset = PIPELINE_PRESETS[settings.preset]["unet"]
    with torch.no_grad():
        return ExportedUNet(settings, device, run_dtype(device), preset, unet_weight_files(settings))


def unet_feature_dim(unet: V2AUNet | ExportedUNet) -> int:
    """The width of the conditioning features the UNet (or its exported engine) takes."""
    return unet.feature_dim if isinstance(unet, ExportedUNet) else unet.config.feature_dim


def unet_latent_channels(unet: V2AUNet | ExportedUNet) -> tuple[int, int]:
    """(in, out) latent channels of the UNet (or its exported engine)."""
    if isinstance(unet, ExportedUNet):
        return unet.latent_channels, unet.latent_channels
    return unet.config.in_channels, unet.config.out_channels


class V2APipeline:
    def __init__(
        self,
        encoder: CogVLM2VideoEncoder | None,
        unet: V2AUNet | ExportedUNet | None,
        vae: SDVAEDecoder | None,
        vae_config: SDVAEConfig,
        settings: V2ASettings,
        scheduler: PNDMConfig | None = None,
    ):
        self.encoder = encoder
        self.unet = unet
        self.vae = vae
        self.vae_config = vae_config
        self.settings = settings
        self.devices = settings.device_map()
        self.spectrogram = AUDIO_PRESETS[PIPELINE_PRESETS[settings.preset]["audio"]]
        if self.spectrogram.n_mels % vae_config.upscale:
            raise ValueError(f"{self.spectrogram.n_mels} mel rows do not divide into the VAE's x{vae_config.upscale}")
        self.sampler = PNDMSampler(scheduler or PNDMConfig())
        self.denoiser = self._make_denoiser()
        self.x264 = mp4_settings(settings.mp4_preset)

    @classmethod
    def from_settings(cls, settings: V2ASettings, components: tuple[str, ...] = COMPONENTS) -> V2APipeline:
        """Build `components` (default: all) on their devices: the official weights from `settings.weights`, else
        seeded random ones built directly on the device. A serving stage builds only its own; the others stay None."""
        if settings.preset not in PIPELINE_PRESETS:
            raise ValueError(f"unknown V2A preset {settings.preset!r}; choose one of {sorted(PIPELINE_PRESETS)}")
        if settings.engine not in V2A_ENGINES:
            raise ValueError(f"V2A runs the engines {V2A_ENGINES}, got {settings.engine!r}")
        if settings.linear not in LINEAR_OPTIONS:
            raise ValueError(f"unknown linear {settings.linear!r}; choose one of {sorted(LINEAR_OPTIONS)}")
        if unknown := set(components) - set(COMPONENTS):
            raise ValueError(f"unknown V2A components {sorted(unknown)}; choose from {COMPONENTS}")
        mp4_settings(settings.mp4_preset)  # a wrong name fails before any weights load
        presets, devices = PIPELINE_PRESETS[settings.preset], settings.device_map()
        paths = _weights_paths(settings, components) if settings.weights is not None else None
        vae_config = SDVAEConfig.from_json(paths["vae"] / "config.json") if paths else VAE_PRESETS[presets["vae"]]
        scheduler = PNDMConfig.from_json(paths["scheduler"]) if paths and paths["scheduler"].is_file() else PNDMConfig()
        encoder = unet = vae = None
        # The UNet first: its strict key check is the cheapest way to catch a wrong or mixed-up weights directory
        # before the 25 GB encoder loads.
        if "unet" in components and settings.engine in EXPORTED_ENGINES:
            unet = exported_unet(settings)
        elif "unet" in components:
            device, dtype = devices["unet"], run_dtype(devices["unet"])
            if paths:
                unet = load_v2a_unet(paths["unet"], device, dtype)
            else:
                feature_dim = ENCODER_PRESETS[presets["encoder"]].hidden_size
                config = replace(UNET_PRESETS[presets["unet"]], feature_dim=feature_dim)
                unet = build_v2a_unet(config, device, dtype, settings.seed)
        if "vocoder" in components:
            device, dtype = devices["vocoder"], vae_dtype(devices["vocoder"])
            vae = (
                load_sd_vae_decoder(paths["vae"], device, dtype)
                if paths
                else build_sd_vae_decoder(vae_config, device, dtype, settings.seed)
            )
        if "encoder" in components:
            device, dtype = devices["encoder"], run_dtype(devices["encoder"])
            encoder = (
                CogVLM2VideoEncoder.from_pretrained(paths["encoder"], device, dtype)
                if paths
                else CogVLM2VideoEncoder.from_preset(presets["encoder"], device, dtype, settings.seed)
            )
        if encoder is not None and unet is not None and encoder.dim != unet_feature_dim(unet):
            raise ValueError(
                f"CogVLM2 width {encoder.dim} != the UNet's feature_dim {unet_feature_dim(unet)}: the weights "
                "mix models of different sizes"
            )
        if unet is not None and unet_latent_channels(unet) != (vae_config.latent_channels,) * 2:
            raise ValueError(f"the UNet's channels do not match the VAE's {vae_config.latent_channels} latent channels")
        return cls(encoder, unet, vae, vae_config, settings, scheduler)

    def _make_denoiser(self) -> Callable[..., Tensor] | None:
        """(sample, timestep, prompt, video) -> eps through the configured engine (None without a UNet)."""
        if self.unet is None or isinstance(self.unet, ExportedUNet):
            return self.unet
        if self.settings.engine == "fast":
            from k4serve.engines.unet import FastUNet

            return FastUNet(self.unet, linear=self.settings.linear)
        return self.unet  # the official UNet runs in bf16 without autocast, as the module does

    def latent_shape(self, seconds: int) -> tuple[int, int, int]:
        """(4, n_mels / 8, W / 8) for `seconds` of audio, W = (100 s) // 32 * 32 columns (official)."""
        up = self.vae_config.upscale
        return self.vae_config.latent_channels, self.spectrogram.n_mels // up, audio_width(seconds) // up

    def prepare(self, seconds: Sequence[int] = range(1, MAX_SECONDS + 1)) -> None:
        """Capture the fast UNet's CUDA graph of each duration before the first request (nothing on the CPU or
        with the eager engine). Each graph shares one memory pool; a duration not prepared is captured on first use."""
        if self.settings.engine == "fast" and self.denoiser is not None:
            self.denoiser.load([(2, *self.latent_shape(s)) for s in seconds])

    # ---- the three stages ----

    @torch.no_grad()
    def encode(
        self,
        frames: np.ndarray,
        fps: float,
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    ) -> Conditioning:
        """A trimmed clip (uint8 [F, H, W, 3] at fps, as load_clip / trim_video / decode_video return it) and the
        prompts -> [uncond; cond] conditioning: prompt [2, 100, D], video [2, 96, D] in the encoder's dtype.

        The conditional half is CogVLM2 on the clip's 96 evenly spread frames and the prompt; the unconditional
        half (an all-black video and the negative prompt) is computed once per negative prompt and kept."""
        validate_prompts(prompt, negative_prompt)
        check_frames(frames, fps, UPLOAD_LIMITS)
        clip_seconds(len(frames), fps)  # untrimmed frames would be sampled over the wrong span
        sampled = frames[conditioning_frame_indices(len(frames))]
        cond = self.encoder.condition(sampled, prompt)
        uncond = self.encoder.unconditional(negative_prompt, CONDITIONING_FRAMES)
        return Conditioning(torch.stack([uncond.prompt, cond.prompt]), torch.stack([uncond.video, cond.video]))

    @torch.no_grad()
    def sample(
        self,
        conditioning: Conditioning,
        seconds: int,
        seed: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """[uncond; cond] conditioning -> latents [4, n_mels / 8, W / 8] in the UNet's dtype on its device: 50 PLMS
        steps at guidance 8, one batched UNet call on [uncond; cond] each (51 calls), the noise drawn from `seed`.

        progress(i, 51) after each call; an exception it raises stops the sampling there (cancellation)."""
        validate_seconds(seconds)
        validate_seed(seed)
        if seed is None:
            raise RequestError("sample needs a seed: draw one with resolve_seed")
        if isinstance(self.unet, ExportedUNet):
            device, dtype = self.unet.engine.device, self.unet.dtype
            self.unet.require_seconds(seconds, (2, *self.latent_shape(seconds)))
        else:
            device, dtype = self.unet.conv_in.weight.device, self.unet.conv_in.weight.dtype
        d = unet_feature_dim(self.unet)
        prompt, video = conditioning
        if tuple(prompt.shape) != (2, PROMPT_TOKENS, d) or tuple(video.shape) != (2, CONDITIONING_FRAMES, d):
            raise RequestError(
                f"conditioning must be prompt [2, {PROMPT_TOKENS}, {d}] and video [2, {CONDITIONING_FRAMES}, {d}] "
                f"([uncond; cond], as encode returns), got {list(prompt.shape)} and {list(video.shape)}"
            )
        prompt, video = (t.to(device=device, dtype=dtype) for t in (prompt, video))
        denoiser = unet_denoiser(self.denoiser, prompt, video)
        return self.sampler(denoiser, self.latent_shape(seconds), [seed], device, dtype, progress)[0]

    @torch.no_grad()
    def vocode(self, latents: Tensor, seed: int) -> np.ndarray:
        """Latents [4, n_mels / 8, w] -> float32 mono audio [hop (8w - 1)] in [-1, 1) at 44.1 kHz: the SD VAE's
        spectrogram image (fp16 on the GPU), its uint8 pixels, mel inverse + Griffin-Lim with the initial phase
        from a generator seeded with `seed` on the vocoder's device, then the official levels (on the host)."""
        validate_seed(seed)
        if seed is None:
            raise RequestError("vocode needs a seed (the sampler's): draw one with resolve_seed")
        rows = self.spectrogram.n_mels // self.vae_config.upscale
        if latents.dim() != 3 or tuple(latents.shape[:2]) != (self.vae_config.latent_channels, rows):
            raise RequestError(
                f"latents must be [{self.vae_config.latent_channels}, {rows}, width] (as sample returns), "
                f"got {list(latents.shape)}"
            )
        device = torch.device(self.devices["vocoder"])
        image = to_uint8_image(self.vae.decode(latents[None].to(device)))[0]  # [n_mels, W, 3] uint8
        generator = torch.Generator(device).manual_seed(seed)
        return spectrogram_image_to_audio(image, self.spectrogram, generator)

    # ---- whole requests ----

    def __call__(
        self,
        video: bytes | TrimmedVideo | np.ndarray,
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        seed: int | None = None,
        fps: float | None = None,
        progress: ProgressFn | None = None,
    ) -> V2AAudio:
        """A video (file bytes, frames at `fps`, or a trimmed clip) -> its soundtrack; progress(stage, done, total)
        after each stage step (v2a_encoder, v2a_sampler x 51, vocoder). Every check runs before any model does."""
        validate_prompts(prompt, negative_prompt)
        validate_seed(seed)
        seed = resolve_seed(seed)
        clip = load_clip(video, fps)
        report = progress or (lambda stage, done, total: None)
        conditioning = self.encode(clip.frames, clip.fps, prompt, negative_prompt)
        report("v2a_encoder", 1, 1)
        latents = self.sample(conditioning, clip.seconds, seed, lambda done, total: report("v2a_sampler", done, total))
        waveform = self.vocode(latents, seed)
        report("vocoder", 1, 1)
        return V2AAudio(waveform, self.spectrogram.sample_rate, seed, clip.seconds, clip.notice)

    def add_audio(
        self,
        video: bytes | TrimmedVideo | np.ndarray,
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        seed: int | None = None,
        fps: float | None = None,
        timing: str = "pad",
        progress: ProgressFn | None = None,
    ) -> tuple[bytes, V2AAudio]:
        """A video -> (mp4 bytes of its kept frames with the generated sound: H.264 + AAC 44.1 kHz mono, the streams
        ending together; timing "pad" keeps the video's frame rate, "retime" the official's; the audio)."""
        if timing not in TIMINGS:
            raise RequestError(f"timing must be one of {TIMINGS}, got {timing!r}")
        validate_prompts(prompt, negative_prompt)
        validate_seed(seed)
        clip = load_clip(video, fps)
        audio = self(clip, prompt, negative_prompt, seed, progress=progress)
        mp4 = encode_mp4(clip.frames, clip.fps, audio.waveform, audio.sample_rate, timing, self.x264)
        if progress is not None:
            progress("muxer", 1, 1)
        return mp4, audio


def vae_dtype(device: torch.device | str) -> torch.dtype:
    """The SD VAE's dtype: fp16 on the GPU, as the official loads it; float32 on the CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
