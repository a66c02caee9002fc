"""The Flash schedule and sampler against diffusers' CogVideoXDDIMScheduler and the official loop."""

from __future__ import annotations

import json

import pytest
import torch

from k4serve.models.schedulers import FlashSampler, ScheduleConfig, alphas_cumprod, timesteps

diffusers = pytest.importorskip("diffusers")  # the reference scheduler (test extra)
from diffusers import CogVideoXDDIMScheduler  # noqa: E402
from official_reference import COGVIDEOX_5B_SCHEDULER as COGVIDEOX_5B  # noqa: E402
from official_reference import official_renoise_loop  # noqa: E402


def test_alpha_table_and_timesteps_equal_diffusers():
    reference = CogVideoXDDIMScheduler(**COGVIDEOX_5B)
    ours = alphas_cumprod(ScheduleConfig())
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference.alphas_cumprod.double(), rtol=0, atol=1e-15)
    assert ours[999] == 0.0  # zero terminal SNR, not clamped
    reference.set_timesteps(4)
    assert timesteps(ScheduleConfig()) == reference.timesteps.tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_other_spacings_equal_diffusers(spacing):
    reference = CogVideoXDDIMScheduler(**{**COGVIDEOX_5B, "timestep_spacing": spacing})
    reference.set_timesteps(4)
    assert timesteps(ScheduleConfig(timestep_spacing=spacing)) == reference.timesteps.tolist()


def test_config_is_read_from_the_snapshot(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(
        json.dumps({**COGVIDEOX_5B, "_class_name": "CogVideoXDDIMScheduler", "timestep_spacing": "linspace"})
    )
    assert timesteps(ScheduleConfig.from_json(path)) == [999, 666, 333, 0]
    path.write_text(json.dumps({**COGVIDEOX_5B, "prediction_type": "epsilon"}))
    with pytest.raises(ValueError, match="v_prediction"):
        ScheduleConfig.from_json(path)


def test_sampler_reproduces_the_official_loop():
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) / 4

    def denoiser(x, time):  # any deterministic function of (x, t) exercises the order of draws and updates
        return torch.tanh(x @ weight) * (1 + time.float()[:, None, None, None, None] / 1000)

    shape = (3, 4, 6, 16)
    ours = FlashSampler()(denoiser, shape, [42], "cpu", torch.float32)
    expected = official_renoise_loop(denoiser, shape, 42, torch.float32)
    assert ours.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(ours[0], expected, rtol=0, atol=0)


def test_batch_equals_solo_runs_and_reports_progress():
    def denoiser(x, time):
        return torch.sin(x) + time.float()[:, None, None, None, None] / 999

    steps = []
    batch = FlashSampler()(denoiser, (2, 2, 2, 16), [1, 2], "cpu", torch.float32, lambda d, n: steps.append((d, n)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for b, seed in enumerate([1, 2]):
        solo = FlashSampler()(denoiser, (2, 2, 2, 16), [seed], "cpu", torch.float32)
        torch.testing.assert_close(batch[b], solo[0], rtol=0, atol=0)
    assert not torch.equal(batch[0], batch[1])
