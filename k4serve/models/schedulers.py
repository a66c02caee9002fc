"""The Flash sampler: CogVideoX-5b's DDIM noise table and the official 4-step "renoise" loop.

Only `alphas_cumprod`, the trailing timesteps and `add_noise` of diffusers' `CogVideoXDDIMScheduler` are used by
the official pipeline; they are rebuilt here (float64, as diffusers does) and checked against diffusers in tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

FLASH_STEPS = 4  # the distilled model is trained for exactly these 4 steps


@dataclass(frozen=True)
class ScheduleConfig:
    """CogVideoX-5b `scheduler/scheduler_config.json` fields that shape the table (defaults = that file)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    rescale_betas_zero_snr: bool = True
    snr_shift_scale: float = 1.0
    timestep_spacing: str = "trailing"
    steps_offset: int = 0
    prediction_type: str = "v_prediction"

    @classmethod
    def from_json(cls, path: str | Path) -> ScheduleConfig:
        """Read a diffusers scheduler_config.json; unknown keys are ignored."""
        raw = json.loads(Path(path).read_text())
        config = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        if config.beta_schedule != "scaled_linear" or config.prediction_type != "v_prediction":
            raise ValueError(
                f"{path}: expected beta_schedule 'scaled_linear' and prediction_type 'v_prediction' "
                "(CogVideoX-5b's scheduler); point --weights at a CogVideoX-5b-style snapshot"
            )
        return config


def alphas_cumprod(config: ScheduleConfig) -> Tensor:
    """ᾱ_t for t < num_train_timesteps, float64: scaled-linear betas, SNR shift, zero-terminal-SNR rescale."""
    n = config.num_train_timesteps
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    s = config.snr_shift_scale
    alpha_bar = alpha_bar / (s + (1 - s) * alpha_bar)
    if config.rescale_betas_zero_snr:
        # Shift sqrt(ᾱ) so its last value is 0, rescale so its first keeps its value (no clamp: ᾱ_999 = 0).
        root = alpha_bar.sqrt()
        root_first, root_last = root[0].clone(), root[-1].clone()
        root = (root - root_last) * (root_first / (root_first - root_last))
        alpha_bar = root**2
    return alpha_bar


class TimestepSpacing(Protocol):
    """The scheduler-config fields that place the inference timesteps (CogVideoX DDIM's, SD's PNDM)."""

    num_train_timesteps: int
    timestep_spacing: str
    steps_offset: int


def timesteps(config: TimestepSpacing, num_steps: int = FLASH_STEPS) -> list[int]:
    """The integer timesteps of diffusers' `set_timesteps(num_steps)`, descending (trailing: 999, 749, 499, 249)."""
    n = config.num_train_timesteps
    if config.timestep_spacing == "trailing":
        steps = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    elif config.timestep_spacing == "linspace":
        steps = np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    elif config.timestep_spacing == "leading":
        steps = (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(np.int64) + config.steps_offset
    else:
        raise ValueError(f"timestep_spacing {config.timestep_spacing!r}: expected trailing, linspace or leading")
    return [int(t) for t in steps]


# The denoiser contract: (x_t [B, T, h, w, C] in the model dtype, time [B] int64) -> velocity, same shape.
Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class FlashSampler:
    """The official "renoise, then predict x0" loop over the 4 distilled timesteps."""

    config: ScheduleConfig = ScheduleConfig()

    def __call__(
        self,
        denoiser: Denoiser,
        shape: tuple[int, ...],
        seeds: list[int],
        device: torch.device | str,
        dtype: torch.dtype,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """x0 latents [len(seeds), *shape] in float64 on `device`; `shape` is one sample's latent shape.

        Sample b's noise comes from a CPU generator seeded with seeds[b], in the official order (one draw for the
        initial x, then one per step; fp32 draws cast to the model dtype), so a batch equals its solo runs. The
        update arithmetic is float64, as the official code's float64 ᾱ makes it by type promotion; the denoiser
        always sees its own dtype.
        """
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        alpha_bar = alphas_cumprod(self.config).to(device)
        steps = timesteps(self.config)

        def draw() -> Tensor:
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
            return noise.to(dtype).to(device)

        x = draw().double()  # multiplied by sqrt(ᾱ_999) = 0, but it advances the generators: keep the draw
        for i, t in enumerate(steps):
            noise = draw()
            # a, s are 0-dim: they would not promote noise/velocity, so cast those to float64 explicitly
            # (the official [1, 1, 1, 1]-shaped ᾱ promotes them).
            a, s = alpha_bar[t] ** 0.5, (1 - alpha_bar[t]) ** 0.5
            x_t = a * x + s * noise.double()  # renoise to level t
            time = torch.full((len(seeds),), t, dtype=torch.int64, device=device)
            velocity = denoiser(x_t.to(dtype), time)
            x = a * x_t - s * velocity.double()  # x0 from the v-prediction
            if progress is not None:
                progress(i + 1, len(steps))
        return x
