"""The in-process pipeline, loaded from an official-layout weights directory, against the official composition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, T5EncoderModel

from k4serve.models.cogvideox_vae import PRESETS as VAE_PRESETS
from k4serve.models.dit import build_dit
from k4serve.models.t5 import T5TextEncoder
from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline, num_frames
from k4serve.pipelines.video_io import FPS, decode_mp4, encode_mp4

diffusers = pytest.importorskip("diffusers")  # the reference VAE and scheduler (test extra)
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler  # noqa: E402
from official_reference import COGVIDEOX_5B_SCHEDULER, official_t2v_frames, randomize_weights  # noqa: E402


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A weights directory in the official layout, with tiny random models saved as their owners save them."""
    root = tmp_path_factory.mktemp("weights")
    dit = build_dit("tiny", seed=11)
    torch.save(dit.state_dict(), root / "kandinsky4_distil_512.pt")
    tiny = VAE_PRESETS["tiny"]
    vae = AutoencoderKLCogVideoX(
        latent_channels=16, block_out_channels=tiny.block_out_channels, layers_per_block=tiny.layers_per_block,
        norm_num_groups=tiny.norm_num_groups, scaling_factor=0.7,
    )  # fmt: skip
    randomize_weights(vae, seed=12)
    vae.save_pretrained(root / "vae")
    t5 = T5TextEncoder.from_preset("tiny")
    t5.encoder.save_pretrained(root / "text_encoder")
    t5.tokenizer.save_pretrained(root / "tokenizer")
    CogVideoXDDIMScheduler(**COGVIDEOX_5B_SCHEDULER).save_config(root / "scheduler")
    return root


@pytest.mark.parametrize(("size", "seconds"), [((384, 672), 1), ((512, 512), 0)])
def test_pipeline_equals_official_composition(weights_dir, size, seconds):
    pipeline = T2VPipeline.from_settings(PipelineSettings(preset="tiny", weights=str(weights_dir)))
    frames = pipeline("a red fox in the snow", *size, seconds, seed=42)
    assert frames.shape == (num_frames(seconds), *size, 3) and frames.dtype == np.uint8

    dit = build_dit("tiny", weights=weights_dir / "kandinsky4_distil_512.pt")
    expected = official_t2v_frames(
        AutoTokenizer.from_pretrained(weights_dir / "tokenizer"),
        T5EncoderModel.from_pretrained(weights_dir / "text_encoder").eval(),
        lambda x, text, t: dit(x, text, t),
        AutoencoderKLCogVideoX.from_pretrained(weights_dir / "vae").eval(),
        CogVideoXDDIMScheduler.from_pretrained(weights_dir / "scheduler"),
        "a red fox in the snow", *size, seconds, 42,
    )  # fmt: skip
    # Same noise, sampler and DiT (bit-exact); the VAE agrees with diffusers to float32 rounding, which can move a
    # value across a truncation boundary: so frames agree exactly but for rare one-level flips.
    diff = np.abs(frames.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert frames.std() > 1.0


def test_batch_of_seeds_equals_solo_runs(weights_dir):
    pipeline = T2VPipeline.from_settings(PipelineSettings(preset="tiny", weights=str(weights_dir)))
    text = pipeline.encode_prompt("a boat")
    batch = pipeline.sample(torch.stack([text, text]), 352, 736, 0, [3, 4])
    solo = [pipeline.sample(text, 352, 736, 0, seed) for seed in (3, 4)]
    for b in range(2):  # same noise per seed; batched GEMMs round differently from solo ones in float32
        torch.testing.assert_close(batch[b], solo[b], rtol=1e-4, atol=1e-5)
    assert (solo[0] - solo[1]).abs().max() > 0.1


def test_encode_video_streams_the_frames_of_call_into_the_mp4():
    pipeline = T2VPipeline.from_settings(PipelineSettings(preset="tiny"))
    latents = pipeline.latents("a red fox", 384, 672, 2, seed=5)
    events = []
    mp4 = pipeline.encode_video(latents, progress=lambda *event: events.append(event))
    frames = pipeline("a red fox", 384, 672, 2, seed=5)
    decoded, fps = decode_mp4(mp4)
    assert decoded.shape == frames.shape == (num_frames(2), 384, 672, 3) and fps == FPS
    np.testing.assert_array_equal(decoded, decode_mp4(encode_mp4(frames))[0])
    assert events == [(1, 2), (2, 2)]  # T = 5 latent frames: two VAE chunks
    assert pipeline.encode_video(pipeline.latents("a red fox", 512, 512, 0, seed=5)).startswith(b"\x89PNG")
