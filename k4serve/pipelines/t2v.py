"""Text -> video in process: T5 encoder -> DiT (4 Flash steps) -> CogVideoX VAE decoder -> uint8 frames.

Every numeric step mirrors the official `Kandinsky4T2VPipeline`: the seeded CPU noise, the float64 sampler
arithmetic, the DiT under bf16 autocast on the GPU, `(1 / scaling_factor) * latents` in the VAE dtype, and the
truncating float -> uint8 conversion of its video writer. So a seed reproduces the official video.
"""

from __future__ import annotations

import contextlib
import numbers
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from k4serve.engines.base import ENGINES, EXPORTED_ENGINES
from k4serve.models.cogvideox_vae import build_cogvideox_decoder, latent_chunks, load_cogvideox_decoder
from k4serve.models.dit import DiffusionTransformer3D, build_dit
from k4serve.models.schedulers import FlashSampler, ScheduleConfig
from k4serve.models.t5 import T5TextEncoder
from k4serve.pipelines.video_io import DEFAULT_MP4_PRESET, Mp4Encoder, encode_png, mp4_settings

SUPPORTED_SIZES: tuple[tuple[int, int], ...] = (
    (512, 512), (352, 736), (736, 352), (384, 672), (672, 384), (480, 544), (544, 480),
)  # fmt: skip
MAX_SECONDS = 12
MAX_PROMPT_CHARS = 2000  # T5 keeps 224 tokens (~900 characters); anything far longer is a client mistake
MAX_SEED = 2**63 - 1
LATENT_CHANNELS = 16
DIT_CHECKPOINT_NAMES = ("kandinsky4_distil_512.pt", "kandinsky4_distil_512.safetensors")

# Which model preset each pipeline preset uses, per component.
PIPELINE_PRESETS: dict[str, dict[str, str]] = {
    "tiny": {"dit": "tiny", "text_encoder": "tiny", "vae": "tiny"},
    "flash-512": {"dit": "flash-512", "text_encoder": "xxl", "vae": "cogvideox-5b"},
}
COMPONENTS = ("text_encoder", "dit", "vae")


class RequestError(ValueError):
    """A request the model cannot serve; the message says what is allowed."""


def validate_request(prompt: str, height: int, width: int, seconds: int, seed: int | None = None) -> None:
    """Raise RequestError naming the fix for anything the official model does not support."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt is empty: give a text description of the video")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(
            f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted "
            "(the text encoder keeps only the first 224 tokens)"
        )
    if (height, width) not in SUPPORTED_SIZES:
        allowed = ", ".join(f"{h}x{w}" for h, w in SUPPORTED_SIZES)
        raise RequestError(f"size {height}x{width} (height x width) is not supported; use one of: {allowed}")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 <= seconds <= MAX_SECONDS:
        raise RequestError(f"seconds must be a whole number from 0 to {MAX_SECONDS} (0 gives an image), got {seconds}")
    validate_seed(seed)


def validate_seed(seed: int | None) -> None:
    """RequestError unless `seed` is None (random) or a whole number from 0 to 2**63-1."""
    whole = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
    if seed is not None and not (whole and 0 <= seed <= MAX_SEED):
        raise RequestError(f"seed must be from 0 to 2**63-1 (a whole number), got {seed!r}")


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one when none was given."""
    return secrets.randbelow(MAX_SEED + 1) if seed is None else seed


def num_latent_frames(seconds: int) -> int:
    """Latent frames: 1 for an image, else 2 * seconds + 1 (official `time_length * 8 // 4 + 1`)."""
    return 1 if seconds == 0 else seconds * 8 // 4 + 1


def num_frames(seconds: int) -> int:
    """Pixel frames at 8 fps: 1 for an image, else 8 * seconds + 1."""
    return 4 * (num_latent_frames(seconds) - 1) + 1


def latent_shape(height: int, width: int, seconds: int) -> tuple[int, int, int, int]:
    """(T, H/8, W/8, 16), channel-last as the DiT and the noise use it."""
    return num_latent_frames(seconds), height // 8, width // 8, LATENT_CHANNELS


def run_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on the GPU (as the official run), float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def check_device(device: str) -> str:
    """`device` if this host has it, else ValueError naming what is missing and what to use instead."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    if parsed.type != "cuda":
        raise ValueError(f"device {device!r}: k4serve runs on cpu or cuda[:N]")
    if not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "torch sees no GPU (check the driver and CUDA_VISIBLE_DEVICES)"
        )
        raise ValueError(f"device {device!r} is not available: {why}; use the device cpu (--device cpu)")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(
            f"device {device!r} does not exist: this host has {count} GPU{'s' if count > 1 else ''} "
            f"(cuda:0 .. cuda:{count - 1}); use one of those"
        )
    return device


@dataclass
class PipelineSettings:
    """Where and how the pipeline runs. `device` is one device or a map per component."""

    preset: str = "tiny"
    weights: str | None = None
    device: str | dict[str, str] = "cpu"
    engine: str = "eager"  # eager | fast (fused kernels + CUDA graphs: the DiT, the channels-last VAE) | exported:
    engine_dir: str | None = None  # aoti | tensorrt | onnxruntime run the engines `k4serve export` wrote here
    attention: str = "auto"  # fast engine: k4serve.engines.options.ATTENTION (auto: the bf16-level default)
    linear: str = "auto"  # fast engine: k4serve.engines.options.LINEAR
    mp4_preset: str = DEFAULT_MP4_PRESET  # H.264 settings (video_io.MP4_PRESETS): fast | official
    seed: int = 0  # random-weight seed when no weights are given
    extra: dict = field(default_factory=dict)

    def device_map(self) -> dict[str, str]:
        """The device of each component."""
        return component_devices(self.device, COMPONENTS)


def component_devices(device: str | dict[str, str], components: tuple[str, ...]) -> dict[str, str]:
    """The device of each of `components`: one device for all, or a map that names each (other keys are ignored,
    so one map can place the components of several pipelines)."""
    if isinstance(device, dict):
        missing = [c for c in components if c not in device]
        if missing:
            raise ValueError(f"device map lacks {missing}; give a device for each of {list(components)}")
        return {c: check_device(device[c]) for c in components}
    return dict.fromkeys(components, check_device(device))


def _weights_paths(weights: str | Path) -> dict[str, Path]:
    """The official files inside a weights directory, checked before anything is loaded."""
    root = Path(weights)
    if not root.is_dir():
        raise FileNotFoundError(
            f"weights directory not found: {root}. Expected {DIT_CHECKPOINT_NAMES[0]}, vae/, text_encoder/, "
            "tokenizer/ (see README: 'Official weights')"
        )
    dit = next((root / name for name in DIT_CHECKPOINT_NAMES if (root / name).is_file()), None)
    if dit is None:
        raise FileNotFoundError(f"no DiT checkpoint in {root}: expected {' or '.join(DIT_CHECKPOINT_NAMES)}")
    return {
        "dit": dit,
        "vae": root / "vae",
        "text_encoder": root / "text_encoder",
        "tokenizer": root / "tokenizer",
        "scheduler": root / "scheduler" / "scheduler_config.json",
    }


class T2VPipeline:
    def __init__(self, text_encoder: T5TextEncoder, dit: DiffusionTransformer3D, vae, vae_config, settings):
        self.text_encoder = text_encoder
        self.dit = dit
        self.vae = vae
        self.vae_config = vae_config
        self.settings = settings
        self.devices = settings.device_map()
        self.sampler = FlashSampler(self._schedule_config())
        self.denoiser = self._make_denoiser()
        self.x264 = mp4_settings(settings.mp4_preset)
        # What decodes the latents: the reference module, or with the fast engine on a GPU the channels-last,
        # CUDA-graphed engine over its weights (on the CPU its norms' interpreter would take minutes per video).
        self.vae_decoder = vae
        if vae is not None and settings.engine == "fast" and torch.device(self.devices["vae"]).type == "cuda":
            from k4serve.engines.vae import FastVAEDecoder

            self.vae_decoder = FastVAEDecoder(vae)

    def _schedule_config(self) -> ScheduleConfig:
        if self.settings.weights is not None:
            path = _weights_paths(self.settings.weights)["scheduler"]
            if path.is_file():
                return ScheduleConfig.from_json(path)
        return ScheduleConfig()

    @classmethod
    def from_settings(cls, settings: PipelineSettings, components: tuple[str, ...] = COMPONENTS) -> T2VPipeline:
        """Build `components` (default: all) on their devices: official weights from `settings.weights`, else
        random. A serving stage builds only its own component; the others stay None."""
        if settings.preset not in PIPELINE_PRESETS:
            raise ValueError(f"unknown preset {settings.preset!r}; choose one of {sorted(PIPELINE_PRESETS)}")
        mp4_settings(settings.mp4_preset)  # a wrong name fails before any weights load
        if settings.engine in EXPORTED_ENGINES:
            from k4serve.pipelines.exported import exported_components

            return cls(**exported_components(settings, components), settings=settings)
        presets, devices = PIPELINE_PRESETS[settings.preset], settings.device_map()
        dtypes = {c: run_dtype(d) for c, d in devices.items()}
        paths = _weights_paths(settings.weights) if settings.weights is not None else None
        text_encoder = dit = vae = vae_config = None
        # The DiT first: its strict key check is the cheapest way to catch a wrong or mixed-up weights directory.
        if "dit" in components:
            source = {"weights": paths["dit"]} if paths else {"seed": settings.seed}
            dit = build_dit(presets["dit"], devices["dit"], dtypes["dit"], **source)
        if "vae" in components:
            vae, vae_config = (
                load_cogvideox_decoder(paths["vae"], devices["vae"], dtypes["vae"])
                if paths
                else build_cogvideox_decoder(presets["vae"], devices["vae"], dtypes["vae"], settings.seed)
            )
        if "text_encoder" in components:
            device, dtype = devices["text_encoder"], dtypes["text_encoder"]
            text_encoder = (
                T5TextEncoder.from_pretrained(paths["text_encoder"], paths["tokenizer"], device, dtype)
                if paths
                else T5TextEncoder.from_preset(presets["text_encoder"], device, dtype)
            )
        if text_encoder is not None and dit is not None and text_encoder.dim != dit.config.in_text_dim:
            raise ValueError(
                f"text encoder width {text_encoder.dim} != DiT in_text_dim {dit.config.in_text_dim}: "
                "the weights directory mixes models of different presets"
            )
        return cls(text_encoder, dit, vae, vae_config, settings)

    def _make_denoiser(self) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        """(x_t, text_embed, time) -> velocity through the configured engine (None without a DiT)."""
        if self.dit is None:
            return None
        if self.settings.engine in EXPORTED_ENGINES:
            return self.dit  # k4serve.pipelines.exported.ExportedDiT: the engine behind the module's call
        if self.settings.engine == "fast":
            from k4serve.engines.torch import FastDiT

            # the pipeline runs only the engine: the bf16 copies of the weights it quantizes need not stay
            return FastDiT(self.dit, attention=self.settings.attention, linear=self.settings.linear,
                           keep_source_weights=False)  # fmt: skip
        if self.settings.engine != "eager":
            raise ValueError(f"unknown engine {self.settings.engine!r}; choose one of {ENGINES}")
        device = torch.device(self.devices["dit"])

        def eager(x: Tensor, text_embed: Tensor, time: Tensor) -> Tensor:
            # The official DiT runs under bf16 autocast on the GPU; float32 on the CPU needs none.
            autocast = (
                torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
            )
            with autocast:
                return self.dit(x, text_embed, time)

        return eager

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> Tensor:
        """prompt -> text embedding [224, text_dim] in the run dtype."""
        return self.text_encoder(prompt).to(run_dtype(self.devices["text_encoder"]))

    @torch.no_grad()
    def sample(
        self,
        text_embed: Tensor,
        height: int,
        width: int,
        seconds: int,
        seed: int | list[int],
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Text embeddings ([224, D] or a batch [B, 224, D]) -> x0 latents [(B,) T, H/8, W/8, 16] (run dtype).

        A batch shares one size; sample b draws its noise from its own seed, so each equals its solo run up to
        the rounding of batched matrix products.
        """
        validate_request("-", height, width, seconds)
        single = text_embed.dim() == 2
        seeds = [seed] if isinstance(seed, int) else list(seed)
        device, dtype = torch.device(self.devices["dit"]), run_dtype(self.devices["dit"])
        text = (text_embed[None] if single else text_embed).to(device=device, dtype=dtype)
        if len(seeds) != text.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {text.shape[0]} prompts")
        latents = self.sampler(
            lambda x, time: self.denoiser(x, text, time),
            latent_shape(height, width, seconds),
            seeds,
            device,
            dtype,
            progress,
        ).to(dtype)  # official: the float64 x0 is cast to bf16 before the VAE
        return latents[0] if single else latents

    @torch.no_grad()
    def decode_chunks(self, latents: Tensor) -> Iterator[np.ndarray]:
        """x0 latents [T, H/8, W/8, 16] -> uint8 frames [F_i, H, W, 3] of each VAE chunk as soon as it is decoded
        (all chunks: 4(T-1)+1 frames)."""
        device, dtype = torch.device(self.devices["vae"]), run_dtype(self.devices["vae"])
        z = latents.to(device=device, dtype=dtype)
        z = (1.0 / self.vae_config.scaling_factor) * z  # in the VAE dtype, in the official order
        for video in self.vae_decoder.decode_chunks(z.permute(3, 0, 1, 2)[None]):
            video = torch.clip((video[0].float() + 1.0) / 2.0, 0.0, 1.0)  # [3, F_i, H, W]
            # 255 * x truncated toward zero: the official writer's float -> uint8 cast (on the device: 4x less
            # to copy, and the same float32 product). The fast decoder's NDHWC output needs no transpose here.
            yield (255.0 * video).to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()

    def decode(self, latents: Tensor) -> np.ndarray:
        """x0 latents [T, H/8, W/8, 16] -> uint8 frames [4(T-1)+1, H, W, 3]."""
        return np.concatenate(list(self.decode_chunks(latents)))

    def encode_video(self, latents: Tensor, progress: Callable[[int, int], None] | None = None) -> bytes:
        """x0 latents -> mp4 bytes (PNG for a single frame); the CPU's H.264 encode of each chunk overlaps the
        VAE's decode of the next. progress(done, total) after each VAE chunk."""
        if latents.shape[0] == 1:
            return encode_png(self.decode(latents)[0])
        up = self.vae_config.spatial_compression
        chunks = len(latent_chunks(latents.shape[0]))
        with Mp4Encoder(up * latents.shape[1], up * latents.shape[2], x264=self.x264) as encoder:
            for done, frames in enumerate(self.decode_chunks(latents), 1):
                encoder.write(frames)
                if progress is not None:
                    progress(done, chunks)
            return encoder.finish()

    def latents(
        self,
        prompt: str,
        height: int,
        width: int,
        seconds: int,
        seed: int,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> Tensor:
        """prompt -> x0 latents [T, H/8, W/8, 16]; progress(stage, done, total) after each stage step."""
        validate_request(prompt, height, width, seconds, seed)
        report = progress or (lambda stage, done, total: None)
        text_embed = self.encode_prompt(prompt)
        report("text_encoder", 1, 1)
        return self.sample(text_embed, height, width, seconds, seed, lambda done, total: report("dit", done, total))

    def __call__(
        self,
        prompt: str,
        height: int = 384,
        width: int = 672,
        seconds: int = 12,
        seed: int = 0,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> np.ndarray:
        """prompt -> uint8 frames [F, H, W, 3]; progress(stage, done, total) after each stage step."""
        frames = self.decode(self.latents(prompt, height, width, seconds, seed, progress))
        if progress is not None:
            progress("vae", 1, 1)
        return frames
