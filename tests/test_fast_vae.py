"""The channels-last, CUDA-graphed VAE decoder (k4serve.engines.vae) against the eager reference decoder.

On the CPU it runs in float32 with the norms in Triton's interpreter and must equal the eager float32 decode up to
float32 rounding; with CUDA it runs in bf16 with graphs, at the full-size widths too.
"""

from __future__ import annotations

import pytest
import torch

from k4serve.engines.vae import FastVAEDecoder
from k4serve.models.cogvideox_vae import build_cogvideox_decoder

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bf16, cuDNN channels-last convs, CUDA graphs)")
interpreted = pytest.mark.skipif(CUDA, reason="CPU interpreter check in float32; CUDA: the bf16 tests below")


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def latents(shape: tuple[int, ...], seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# T = 7: a first chunk of 3 latent frames, then two of 2 (the carried past frames, reused state); 4: a first chunk
# of 2; 1: an image (no past frames to keep). Batch 2: the kernels' batch strides.
@interpreted
@pytest.mark.parametrize("num_latent_frames", [7, 4, 1])
def test_float32_equals_the_eager_decoder(num_latent_frames):
    decoder, _ = build_cogvideox_decoder("tiny", seed=1)
    z = latents((2, 16, num_latent_frames, 2, 3), seed=num_latent_frames)
    expected = decoder.decode(z)
    fast = FastVAEDecoder(decoder)
    chunks = list(fast.decode_chunks(z))
    assert [c.shape[2] for c in chunks] == [c.shape[2] for c in decoder.decode_chunks(z)]
    video = torch.cat(chunks, dim=2)
    assert video.shape == expected.shape and video.is_contiguous(memory_format=torch.channels_last_3d)
    assert relative_error(video, expected) < 1e-5
    # the eager decoder still works on the weights the engine took over (now channels-last)
    assert relative_error(decoder.decode(z), expected) < 1e-5


def test_a_second_decode_stops_the_first(monkeypatch):
    fast = FastVAEDecoder(build_cogvideox_decoder("tiny")[0])
    monkeypatch.setattr(fast, "_run", lambda key, z: z)  # the chunk bookkeeping only
    z = latents((1, 16, 5, 2, 3), seed=0)
    first = fast.decode_chunks(z)
    next(first)
    assert len(list(fast.decode_chunks(z))) == 2
    with pytest.raises(RuntimeError, match="decode one video at a time"):
        next(first)


@gpu
@pytest.mark.gpu
def test_bf16_graphs_match_the_eager_decoders_and_replay_exactly():
    decoder, _ = build_cogvideox_decoder("tiny", "cuda", torch.float32, seed=2)
    z = latents((1, 16, 7, 4, 6), seed=3, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    try:
        reference = decoder.decode(z)  # float32 on the GPU
    finally:
        torch.backends.cudnn.allow_tf32 = True
    decoder = decoder.to(torch.bfloat16)
    decoder.use_triton_norms()
    eager = decoder.decode(z.bfloat16())
    fast = FastVAEDecoder(decoder)
    graphed = fast.decode(z.bfloat16())
    assert fast.shapes == ((1, 16, 3, 4, 6), (1, 16, 2, 4, 6))
    eager_error = relative_error(eager, reference)
    assert relative_error(graphed, reference) < max(1.2 * eager_error, 1e-2), eager_error
    # a second video through the same graphs starts afresh; the graphs replay what the ungraphed forward computes
    assert torch.equal(fast.decode(z.bfloat16()), graphed)
    assert torch.equal(FastVAEDecoder(decoder, cuda_graphs=False).decode(z.bfloat16()), graphed)


@gpu
@pytest.mark.gpu
def test_full_size_widths_match_the_eager_bf16_decoder():
    # CogVideoX-5b's channels (512/256/128: several channel tiles, groups of 16/8/4) on a small latent grid
    decoder, _ = build_cogvideox_decoder("cogvideox-5b", "cuda", torch.bfloat16, seed=4)
    decoder.use_triton_norms()
    z = latents((1, 16, 5, 6, 8), seed=5, device="cuda", dtype=torch.bfloat16)
    eager = decoder.decode(z)
    video = FastVAEDecoder(decoder).decode(z)
    assert video.shape == eager.shape == (1, 3, 17, 48, 64)
    assert relative_error(video, eager) < 2e-2  # two bf16 decodes: different conv algorithms and roundings


@gpu
@pytest.mark.gpu
def test_a_larger_video_size_regrows_the_state_and_recaptures():
    decoder, _ = build_cogvideox_decoder("tiny", "cuda", torch.bfloat16, seed=6)
    fast, plain = FastVAEDecoder(decoder), FastVAEDecoder(decoder, cuda_graphs=False)
    small, large = (latents((1, 16, 5, hw[0], hw[1]), seed=7, device="cuda", dtype=torch.bfloat16)
                    for hw in ((4, 6), (6, 8)))  # fmt: skip
    for z in (small, large, small):
        assert torch.equal(fast.decode(z), plain.decode(z))


@gpu
@pytest.mark.gpu
def test_fast_pipeline_decodes_through_the_engine_and_writes_the_mp4():
    from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline, num_frames
    from k4serve.pipelines.video_io import decode_mp4

    fast = T2VPipeline.from_settings(PipelineSettings(preset="tiny", device="cuda", engine="fast"))
    eager = T2VPipeline.from_settings(PipelineSettings(preset="tiny", device="cuda"))
    assert isinstance(fast.vae_decoder, FastVAEDecoder) and eager.vae_decoder is eager.vae
    latents = eager.latents("a red fox", 384, 672, seconds=2, seed=3)
    frames, expected = fast.decode(latents), eager.decode(latents)
    assert frames.shape == expected.shape == (num_frames(2), 384, 672, 3)
    assert relative_error(torch.from_numpy(frames), torch.from_numpy(expected)) < 2e-2
    decoded, _ = decode_mp4(fast.encode_video(latents))
    assert decoded.shape == frames.shape
