"""The V2A PNDM sampler against diffusers' PNDMScheduler driven by the official pipeline's loop."""

from __future__ import annotations

import json

import pytest
import torch

from k4serve.models.pndm import PNDMConfig, PNDMSampler, plms_timesteps, pndm_alphas_cumprod

diffusers = pytest.importorskip("diffusers")
from official_v2a import SD1_PNDM, official_sampling_loop  # noqa: E402

SHAPE = (4, 8, 6)


def toy_unet(x, t, prompt, video):
    """A deterministic stand-in whose cond and uncond halves differ (through the conditioning) and depend on t."""
    t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]).to(x.dtype)
    return torch.tanh(x * prompt[:, None, None, None] + video[:, None, None, None]) * (
        1 + t[:, None, None, None] / 1000
    )


def conditioning(batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scalars [uncond rows; cond rows], the way prompt/video embeddings are batched."""
    prompt = torch.tensor([0.5] * batch + [1.5] * batch, dtype=dtype)
    video = torch.tensor([-0.1] * batch + [0.3] * batch, dtype=dtype)
    return prompt, video


def test_timesteps_and_alphas_equal_diffusers():
    reference = diffusers.PNDMScheduler(**SD1_PNDM)
    reference.set_timesteps(50)
    steps = plms_timesteps(PNDMConfig())
    assert steps == reference.timesteps.tolist()
    assert len(steps) == 51 and steps[:4] == [981, 961, 961, 941] and steps[-1] == 1
    torch.testing.assert_close(pndm_alphas_cumprod(PNDMConfig()), reference.alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_other_spacings_equal_diffusers(spacing):
    reference = diffusers.PNDMScheduler(**{**SD1_PNDM, "timestep_spacing": spacing})
    reference.set_timesteps(50)
    assert plms_timesteps(PNDMConfig(timestep_spacing=spacing)) == reference.timesteps.tolist()


@pytest.mark.parametrize("dtype, prediction", [(torch.float32, "epsilon"), (torch.bfloat16, "epsilon"),
                                               (torch.float32, "v_prediction")])  # fmt: skip
def test_51_guided_steps_equal_the_official_loop(dtype, prediction):
    """Same noise, same denoiser: our sampler equals the official loop on diffusers' scheduler (bf16 bit for bit)."""
    config = PNDMConfig(prediction_type=prediction)
    prompt, video = conditioning(2, dtype)
    calls = []

    def denoiser(x, t):
        assert x.shape == (4, *SHAPE) and x.dtype == dtype and t.tolist() == [t[0].item()] * 4
        calls.append(t[0].item())
        return toy_unet(x, t, prompt, video)

    ours = PNDMSampler(config)(denoiser, SHAPE, [7, 8], "cpu", dtype)
    noise = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in (7, 8)]).to(dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(SD1_PNDM, "prediction_type", prediction)
        expected = official_sampling_loop(toy_unet, noise, prompt, video)
    assert calls == plms_timesteps(config)
    assert ours.dtype == expected.dtype == dtype
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_guidance_combines_uncond_and_cond_halves():
    sampler = PNDMSampler(guidance_scale=8.0)
    x = torch.randn(1, *SHAPE)
    eps = sampler.guided_eps(lambda x_in, t: torch.cat([x_in[:1] * 2.0, x_in[1:] * 3.0]), x, 981)
    torch.testing.assert_close(eps, 2.0 * x + 8.0 * (3.0 * x - 2.0 * x))  # ε_u + 8 (ε_c − ε_u)
    unguided = PNDMSampler(guidance_scale=1.0).guided_eps(lambda x_in, t: x_in * 5.0, x, 981)
    torch.testing.assert_close(unguided, 5.0 * x)  # the official: no CFG at a scale <= 1, batch of B


def test_batch_equals_solo_runs_and_progress_is_per_call():
    def denoiser(x, t):
        return torch.sin(x) + t.float()[:, None, None, None] / 999

    progress = []
    batch = PNDMSampler()(denoiser, SHAPE, [1, 2], "cpu", torch.float32, lambda i, n: progress.append((i, n)))
    assert progress == [(i, 51) for i in range(1, 52)]
    for b, seed in enumerate([1, 2]):
        torch.testing.assert_close(batch[b], PNDMSampler()(denoiser, SHAPE, [seed], "cpu", torch.float32)[0])
    assert not torch.equal(batch[0], batch[1])


def test_config_json(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "PNDMScheduler", "_diffusers_version": "0.31.0", **SD1_PNDM,
                                "trained_betas": None, "clip_sample": False}))  # fmt: skip
    assert PNDMConfig.from_json(path) == PNDMConfig()
    path.write_text(json.dumps({**SD1_PNDM, "skip_prk_steps": False}))
    with pytest.raises(ValueError, match="skip_prk_steps"):
        PNDMConfig.from_json(path)
    path.write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(ValueError, match="not the PNDMScheduler"):
        PNDMConfig.from_json(path)
