"""The V2A sampler: diffusers' PNDMScheduler in its PLMS mode (skip_prk_steps) with classifier-free guidance.

The official pipeline (`video2audio_pipe.py`) runs 50 steps at guidance 8 with the cond/uncond pair in one batch
of 2 ([uncond, cond]). PLMS takes 51 UNet calls for 50 steps: [981, 961, 961, 941, ..., 1] with SD1's leading
spacing, the second call at 961 re-taking the first step from its start with the mean of the two predictions.
Each step is diffusers' formula (9) of the PNDM paper with the same operations on the same operand types
(0-dim fp32 coefficients, the latents and predictions in the model dtype: bf16 in the official run), so
a step here rounds exactly as diffusers'. The official draws its noise unseeded; here it comes from a
seeded CPU generator in fp32, so that a seed reproduces the audio.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from k4serve.models.schedulers import Denoiser, timesteps

V2A_STEPS = 50
V2A_GUIDANCE = 8.0


@dataclass(frozen=True)
class PNDMConfig:
    """A diffusers PNDMScheduler `scheduler_config.json` (defaults: SD1 / riffusion's, which V2A inherits)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    set_alpha_to_one: bool = False
    skip_prk_steps: bool = True
    steps_offset: int = 1
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"

    def __post_init__(self):
        if not self.skip_prk_steps:
            raise ValueError("skip_prk_steps false (PNDM's Runge-Kutta warm-up) is not implemented: V2A uses PLMS")
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"beta_schedule {self.beta_schedule!r}: expected 'linear' or 'scaled_linear'")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r}: expected 'epsilon' or 'v_prediction'")

    @classmethod
    def from_json(cls, path: str | Path) -> PNDMConfig:
        """Read a diffusers scheduler_config.json; unknown keys are ignored, unsupported values fail naming them."""
        raw = json.loads(Path(path).read_text())
        if raw.get("_class_name", "PNDMScheduler") != "PNDMScheduler":
            raise ValueError(f"{path} configures a {raw['_class_name']}, not the PNDMScheduler V2A samples with")
        if raw.get("trained_betas") is not None:
            raise ValueError(f"{path}: trained_betas are not supported (V2A uses the scaled-linear schedule)")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def pndm_alphas_cumprod(config: PNDMConfig) -> Tensor:
    """ᾱ_t for t < num_train_timesteps in fp32, as diffusers' PNDMScheduler builds it (a CPU tensor)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def plms_timesteps(config: PNDMConfig, num_steps: int = V2A_STEPS) -> list[int]:
    """The num_steps + 1 UNet-call timesteps of PLMS: the spaced ones with the second repeated (981, 961, 961, ...)."""
    spaced = timesteps(config, num_steps)
    return spaced[:2] + spaced[1:]


# A V2A UNet call: (sample, timestep, prompt_embeds, video_embeds) -> eps; V2AUNet or an engine (FastUNet).
UNetFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def unet_denoiser(unet: UNetFn, prompt_embeds: Tensor, video_embeds: Tensor) -> Denoiser:
    """The sampler's denoiser: `unet` with the batched conditioning bound ([uncond; cond] rows under guidance)."""
    return lambda x, t: unet(x, t, prompt_embeds, video_embeds)


def adams_bashforth(history: list[Tensor]) -> Tensor:
    """PLMS's combination of the last 1..4 noise predictions (oldest first), in diffusers' operation order."""
    if len(history) == 1:
        return history[-1]
    if len(history) == 2:
        return (3 * history[-1] - history[-2]) / 2
    if len(history) == 3:
        return (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
    return (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])


@dataclass(frozen=True)
class PNDMSampler:
    """50 PLMS steps with classifier-free guidance: what `Video2AudioPipeline.__call__` does around the UNet."""

    config: PNDMConfig = PNDMConfig()
    num_steps: int = V2A_STEPS
    guidance_scale: float = V2A_GUIDANCE

    @property
    def num_calls(self) -> int:
        """Denoiser calls per sample (51 for 50 steps)."""
        return self.num_steps + 1

    def __call__(
        self,
        denoiser: Denoiser,
        shape: tuple[int, ...],
        seeds: list[int],
        device: torch.device | str,
        dtype: torch.dtype,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Latents [len(seeds), *shape] in `dtype` on `device`; `shape` is one sample's latent (4, 64, w).

        The denoiser contract: (x [2B, *shape] in `dtype`, t [2B] int64) -> eps [2B, *shape], where the rows are
        [x; x] and the caller's conditioning is [uncond; cond] in that order (B rows each); with guidance_scale
        <= 1 there is no unconditional half and x is [B, *shape]. Sample b's noise is torch.randn(shape) from a
        CPU generator seeded with seeds[b], in fp32, cast to `dtype`, so a batch equals its solo runs.
        `progress(i, num_calls)` is called after each denoiser call.
        """
        alphas = pndm_alphas_cumprod(self.config)
        final_alpha = torch.tensor(1.0) if self.config.set_alpha_to_one else alphas[0]
        stride = self.config.num_train_timesteps // self.num_steps
        steps = plms_timesteps(self.config, self.num_steps)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        x = x.to(device=device, dtype=dtype)  # times init_noise_sigma = 1
        history: list[Tensor] = []
        start = x  # step 0's start, which the warm-up's second call steps from again
        for i, t in enumerate(steps):
            eps = self.guided_eps(denoiser, x, t)
            if i == 1:  # the warm-up's second call: step 0 again, from its start, with the mean prediction
                x = self.step(alphas, final_alpha, start, (eps + history[-1]) / 2, t + stride, t)
            else:
                history = history[-3:] + [eps]
                x = self.step(alphas, final_alpha, x, adams_bashforth(history), t, t - stride)
            if progress is not None:
                progress(i + 1, len(steps))
        return x

    def guided_eps(self, denoiser: Denoiser, x: Tensor, t: int) -> Tensor:
        """ε = ε_u + g (ε_c − ε_u) from one batched call on [x; x] (just ε(x) when g <= 1, as the official)."""
        cfg = self.guidance_scale > 1.0
        x_in = torch.cat([x, x]) if cfg else x
        eps = denoiser(x_in, torch.full((x_in.shape[0],), t, dtype=torch.int64, device=x.device))
        if not cfg:
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    def step(self, alphas: Tensor, final_alpha: Tensor, x: Tensor, eps: Tensor, t: int, t_prev: int) -> Tensor:
        """x_t -> x_{t_prev} by PNDM's formula (9), on 0-dim fp32 coefficients as diffusers' `_get_prev_sample`."""
        alpha_t = alphas[t]
        alpha_prev = alphas[t_prev] if t_prev >= 0 else final_alpha
        beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
        if self.config.prediction_type == "v_prediction":
            eps = (alpha_t**0.5) * eps + (beta_t**0.5) * x
        sample_coeff = (alpha_prev / alpha_t) ** 0.5
        eps_coeff = alpha_t * beta_prev**0.5 + (alpha_t * beta_t * alpha_prev) ** 0.5
        return sample_coeff * x - (alpha_prev - alpha_t) * eps / eps_coeff
