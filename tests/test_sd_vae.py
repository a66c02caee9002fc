"""Our SD VAE decoder against diffusers' AutoencoderKL.decode (a test-only reference); the loader; the uint8 image."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from k4serve.models.checkpoints import DIFFUSERS_WEIGHTS, CheckpointError
from k4serve.models.sd_vae import (
    PRESETS,
    SDVAEConfig,
    SDVAEDecoder,
    build_sd_vae_decoder,
    load_sd_vae_decoder,
    to_uint8_image,
)

diffusers = pytest.importorskip("diffusers")
from official_reference import randomize_weights  # noqa: E402

TINY = PRESETS["tiny"]


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def diffusers_vae(config: SDVAEConfig, seed: int = 0):
    n = len(config.block_out_channels)
    vae = diffusers.AutoencoderKL(
        latent_channels=config.latent_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
    )
    randomize_weights(vae, seed)
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' VAE with the tiny preset's shape, saved as a `vae/` folder whose config has no scaling_factor."""
    vae = diffusers_vae(TINY)
    vae_dir = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(vae_dir)
    raw = json.loads((vae_dir / "config.json").read_text())
    del raw["scaling_factor"]  # as ai-forever/kandinsky-4-v2a's vae/config.json: diffusers' default applies
    (vae_dir / "config.json").write_text(json.dumps(raw))
    return vae, vae_dir


@pytest.mark.parametrize("width", [19, 16])  # odd latent widths double exactly (no size forwarding in the VAE)
def test_decode_matches_diffusers(reference, width):
    vae, vae_dir = reference
    decoder = load_sd_vae_decoder(vae_dir)
    assert decoder.config == TINY and decoder.config.scaling_factor == 0.18215
    z = torch.randn(2, 4, 8, width, generator=torch.Generator().manual_seed(width))
    expected = vae.decode(z).sample
    image = decoder(z)
    assert image.shape == expected.shape == (2, 3, 64, 8 * width)
    assert relative_error(image, expected) <= 1e-4
    # decode(latents): the official `vae.decode(latents / scaling_factor)`
    assert relative_error(decoder.decode(z), vae.decode(z / 0.18215).sample) <= 1e-4


def test_uint8_image_equals_vae_image_processor_pil():
    processor = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=8)
    g = torch.Generator().manual_seed(1)
    # values past ±1 (clamped), exact half steps of 1/255 (rounding ties), and fp16 as the official decoder gives
    image = torch.cat(
        [torch.randn(1, 3, 8, 12, generator=g) * 1.2, (torch.arange(288.0).reshape(1, 3, 8, 12) / 255 - 0.5)]
    )
    for dtype in (torch.float32, torch.float16):
        x = image.to(dtype)
        pil = processor.postprocess(x, output_type="pil", do_denormalize=[True] * x.shape[0])
        ours = to_uint8_image(x)
        assert ours.dtype == torch.uint8 and ours.shape == (2, 8, 12, 3)
        np.testing.assert_array_equal(ours.numpy(), np.stack([np.asarray(p) for p in pil]))


def copy_with_weights(vae_dir, dest, edit) -> None:
    dest.mkdir()
    shutil.copy(vae_dir / "config.json", dest / "config.json")
    state = load_file(vae_dir / DIFFUSERS_WEIGHTS)
    edit(state)
    save_file(state, dest / DIFFUSERS_WEIGHTS)


def test_renamed_key_is_named(reference, tmp_path):
    key = "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"
    copy_with_weights(reference[1], tmp_path / "vae", lambda s: s.update({key + "_renamed": s.pop(key)}))
    with pytest.raises(CheckpointError) as error:
        load_sd_vae_decoder(tmp_path / "vae")
    assert f"missing keys: {key}" in str(error.value)
    assert f"unexpected keys: {key}_renamed" in str(error.value)


def test_encoder_keys_skipped_and_deprecated_attention_names_load(reference, tmp_path):
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def edit(state):
        for key in [k for k in state if k.startswith(("encoder.", "quant_conv."))]:
            del state[key]
        for new, old in old_names.items():
            for suffix in ("weight", "bias"):
                state[f"decoder.mid_block.attentions.0.{old}.{suffix}"] = state.pop(
                    f"decoder.mid_block.attentions.0.{new}.{suffix}"
                )

    copy_with_weights(reference[1], tmp_path / "vae", edit)
    loaded = load_sd_vae_decoder(tmp_path / "vae").state_dict()
    expected = {k: v for k, v in reference[0].state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_full_size_config_json_and_parameter_count(tmp_path):
    """The V2A `vae/config.json` (SD VAE, no scaling_factor key) reads as the full-size preset."""
    raw = {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "norm_num_groups": 32, "out_channels": 3, "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert SDVAEConfig.from_json(tmp_path / "config.json") == PRESETS["kandinsky4-v2a"]
    with torch.device("meta"):
        ours = SDVAEDecoder(PRESETS["kandinsky4-v2a"])
        vae = diffusers.AutoencoderKL(**{k: v for k, v in raw.items() if not k.startswith("_")})
    expected = sum(p.numel() for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant")))
    assert sum(p.numel() for p in ours.parameters()) == expected == 49_490_199
    raw["up_block_types"] = ["AttnUpDecoderBlock2D"] * 4
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="up_block_types = .* is not supported"):
        SDVAEConfig.from_json(tmp_path / "config.json")


def test_random_build_is_seeded_and_named_like_diffusers(reference):
    decoder, again = build_sd_vae_decoder("tiny", seed=3), build_sd_vae_decoder("tiny", seed=3)
    expected = {
        k: v.shape for k, v in reference[0].state_dict().items() if not k.startswith(("encoder.", "quant_conv."))
    }
    assert {k: v.shape for k, v in decoder.state_dict().items()} == expected
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in decoder.state_dict().items())
