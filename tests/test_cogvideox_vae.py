"""Our CogVideoX VAE decoder against diffusers' AutoencoderKLCogVideoX (a test-only reference); the loader."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from k4serve.models.checkpoints import DIFFUSERS_WEIGHTS as WEIGHTS_FILE
from k4serve.models.checkpoints import CheckpointError
from k4serve.models.cogvideox_vae import (
    PRESETS,
    CogVideoXVAEConfig,
    build_cogvideox_decoder,
    load_cogvideox_decoder,
)

diffusers = pytest.importorskip("diffusers")
from official_reference import randomize_weights  # noqa: E402

TINY = PRESETS["tiny"]
LATENT_HW = (4, 6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' VAE with the tiny preset's shape and random weights, saved as a `vae/` folder."""
    vae = diffusers.AutoencoderKLCogVideoX(
        latent_channels=TINY.latent_channels,
        out_channels=TINY.out_channels,
        block_out_channels=TINY.block_out_channels,
        layers_per_block=TINY.layers_per_block,
        temporal_compression_ratio=TINY.temporal_compression_ratio,
        norm_num_groups=TINY.norm_num_groups,
        scaling_factor=TINY.scaling_factor,
    )
    randomize_weights(vae, seed=0)
    vae.eval().requires_grad_(False)
    # Exactly the official decode: temporal chunks of 2 latent frames, no tiling, no slicing.
    vae.num_latent_frames_batch_size = 2
    vae.disable_tiling()
    vae.disable_slicing()
    vae_dir = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(vae_dir)
    return vae, vae_dir


def diffusers_decode(vae, z: torch.Tensor) -> torch.Tensor:
    if hasattr(vae, "_clear_fake_context_parallel_cache"):  # diffusers < 0.31 keeps the conv cache in modules
        vae._clear_fake_context_parallel_cache()
    return vae.decode(z).sample


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


# The Triton norms once (odd T: two chunks, a lone first frame, the cache), on one video of the batch: the
# interpreter takes ~20 s per video. With CUDA, Triton cannot run on CPU tensors; test_bf16_cuda covers the kernel.
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter check; CUDA: test_bf16_cuda")


@pytest.mark.parametrize("num_latent_frames, norms", [(1, "torch"), (3, "torch"), (4, "torch"), (5, "torch"),
                                                      pytest.param(5, "triton", marks=interpreted)])  # fmt: skip
def test_decode_matches_diffusers(reference, num_latent_frames, norms):
    vae, vae_dir = reference
    decoder, config = load_cogvideox_decoder(vae_dir)
    assert config == TINY
    decoder.use_triton_norms(norms == "triton")  # without CUDA: Triton's interpreter, float32
    batch = 1 if norms == "triton" else 2
    generator = torch.Generator().manual_seed(num_latent_frames)
    z = torch.randn(batch, 16, num_latent_frames, *LATENT_HW, generator=generator)
    expected = diffusers_decode(vae, z)
    video = decoder.decode(z)
    t = num_latent_frames
    frames = 4 * (t - 1) + 1 if t % 2 == 1 else 4 * t  # first chunk of an odd T keeps its first frame single
    assert video.shape == expected.shape == (batch, 3, frames, 8 * LATENT_HW[0], 8 * LATENT_HW[1])
    assert relative_error(video, expected) <= 1e-4


def test_sharded_folder_loads_the_same_weights(reference, tmp_path):
    vae, _ = reference
    vae.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    decoder, _ = load_cogvideox_decoder(tmp_path)
    expected = vae.decoder.state_dict()
    loaded = decoder.state_dict()
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def copy_with_weights(vae_dir, dest, edit) -> None:
    """A copy of the `vae/` folder whose state dict went through `edit`."""
    dest.mkdir()
    shutil.copy(vae_dir / "config.json", dest / "config.json")
    state = load_file(vae_dir / WEIGHTS_FILE)
    edit(state)
    save_file(state, dest / WEIGHTS_FILE)


def test_renamed_decoder_key_is_named(reference, tmp_path):
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    copy_with_weights(reference[1], tmp_path / "vae", lambda s: s.update({key + "_renamed": s.pop(key)}))
    with pytest.raises(CheckpointError) as error:
        load_cogvideox_decoder(tmp_path / "vae")
    assert f"missing keys: {key}" in str(error.value)
    assert f"unexpected keys: {key}_renamed" in str(error.value)


def test_unexpected_top_level_key_is_named(reference, tmp_path):
    copy_with_weights(reference[1], tmp_path / "vae", lambda s: s.update({"post_quant_conv.weight": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: post_quant_conv\.weight"):
        load_cogvideox_decoder(tmp_path / "vae")


def test_encoder_keys_are_not_needed(reference, tmp_path):
    copy_with_weights(reference[1], tmp_path / "vae", lambda s: [s.pop(k) for k in list(s) if k.startswith("encoder.")])
    decoder, _ = load_cogvideox_decoder(tmp_path / "vae")
    assert torch.equal(decoder.conv_out.conv.weight, reference[0].decoder.conv_out.conv.weight)


def test_missing_folder_and_files_name_the_layout(reference, tmp_path):
    with pytest.raises(CheckpointError, match="not found.*config.json.*diffusion_pytorch_model.safetensors"):
        load_cogvideox_decoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing .*config.json"):
        load_cogvideox_decoder(tmp_path / "empty")
    (tmp_path / "no_weights").mkdir()
    shutil.copy(reference[1] / "config.json", tmp_path / "no_weights" / "config.json")
    with pytest.raises(CheckpointError, match=r"missing .*diffusion_pytorch_model\.safetensors"):
        load_cogvideox_decoder(tmp_path / "no_weights")


def test_cogvideox_5b_config_json(tmp_path):
    """CogVideoX-5b's `vae/config.json` (values per kandinsky4-facts.md 3.1) reads as the full-size preset."""
    raw = {
        "_class_name": "AutoencoderKLCogVideoX",
        "_diffusers_version": "0.31.0.dev0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 256, 512],
        "down_block_types": ["CogVideoXDownBlock3D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 3,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_height": 480,
        "sample_width": 720,
        "scaling_factor": 0.7,
        "shift_factor": None,
        "temporal_compression_ratio": 4,
        "up_block_types": ["CogVideoXUpBlock3D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
        "invert_scale_latents": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = CogVideoXVAEConfig.from_json(tmp_path / "config.json")
    assert config == PRESETS["cogvideox-5b"]
    assert (config.spatial_compression, config.temporal_upsample_levels) == (8, 2)


def test_random_build_is_seeded_and_named_like_diffusers(reference):
    decoder, _ = build_cogvideox_decoder("tiny", seed=3)
    again, _ = build_cogvideox_decoder("tiny", seed=3)
    other, _ = build_cogvideox_decoder("tiny", seed=4)
    state, expected = decoder.state_dict(), reference[0].decoder.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
    assert all(torch.equal(state[k], again.state_dict()[k]) for k in state)
    assert not torch.equal(state["conv_in.conv.weight"], other.state_dict()["conv_in.conv.weight"])


def bf16_vs_fp32(vae_dir, device: str, triton_norms: bool = False) -> None:
    """bf16 decode on `device` stays close to the fp32 CPU decode (odd T: two chunks, the cache in bf16)."""
    z = torch.randn(1, 16, 5, 2, 3, generator=torch.Generator().manual_seed(7))
    reference_video = load_cogvideox_decoder(vae_dir)[0].decode(z)
    decoder, _ = load_cogvideox_decoder(vae_dir, device, torch.bfloat16)
    decoder.use_triton_norms(triton_norms)
    video = decoder.decode(z.to(device, torch.bfloat16))
    assert video.dtype == torch.bfloat16 and video.device.type == torch.device(device).type
    assert relative_error(video.float().cpu(), reference_video) < 3e-2


def test_bf16_cpu(reference):
    bf16_vs_fp32(reference[1], "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("triton_norms", [False, True])
def test_bf16_cuda(reference, triton_norms):
    bf16_vs_fp32(reference[1], "cuda", triton_norms)
