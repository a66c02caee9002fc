"""The fast V2A pipeline on the GPU (tiny preset): the dtypes the official runs in, CUDA graphs, replayable seeds.

Apart from test_v2a_pipeline.py, whose references need diffusers (absent on the GPU host)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from k4serve.pipelines.v2a import V2APipeline, V2ASettings


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_pipeline_on_the_gpu_runs_the_official_dtypes_and_a_seed_reproduces_it():
    """engine fast on the GPU: the UNet as CUDA graph replays, bf16 conditioning and latents, the fp16 VAE, the
    initial phase drawn on the device; a replayed request gives the same audio bit for bit."""
    fast = V2APipeline.from_settings(V2ASettings(preset="tiny", device="cuda", engine="fast"))
    assert fast.vae.decoder.conv_in.weight.dtype == torch.float16 and fast.unet.conv_in.weight.dtype == torch.bfloat16
    frames = np.random.default_rng(0).integers(0, 256, (16, 48, 64, 3), dtype=np.uint8)
    conditioning = fast.encode(frames, 8)
    assert conditioning.prompt.dtype == torch.bfloat16 and conditioning.prompt.device.type == "cuda"
    latents = fast.sample(conditioning, 2, 5)
    assert latents.dtype == torch.bfloat16 and latents.shape == (4, 8, 24) and torch.isfinite(latents).all()
    assert fast.denoiser.shapes == ((2, 4, 8, 24),)  # one captured bucket
    audio = fast(frames, seed=5, fps=8)
    assert audio.waveform.shape == (441 * 191,) and np.abs(audio.waveform).max() > 0.01
    np.testing.assert_array_equal(fast(frames, seed=5, fps=8).waveform, audio.waveform)
    np.testing.assert_array_equal(fast.vocode(latents, 5), audio.waveform)
