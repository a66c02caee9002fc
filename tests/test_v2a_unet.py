"""Our V2A UNet against diffusers' UNet2DConditionModel (base path), the official processors' math (additions),
and float64 formulas; the strict loader and the full-size configuration."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from k4serve.models.checkpoints import DIFFUSERS_WEIGHTS, CheckpointError
from k4serve.models.v2a_unet import (
    PRESETS,
    V2AUNet,
    V2AUNetConfig,
    build_v2a_unet,
    frame_positions,
    latent_shape,
    load_v2a_unet,
)

diffusers = pytest.importorskip("diffusers")
from official_v2a import diffusers_unet  # noqa: E402

TINY = PRESETS["tiny"]
PROMPT_LEN, NUM_FRAMES = 100, 96


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def inputs(config: V2AUNetConfig, width: int, height: int = 16, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, config.in_channels, height, width, generator=g, dtype=dtype)
    prompt = torch.randn(2, PROMPT_LEN, config.feature_dim, generator=g, dtype=dtype)
    video = torch.randn(2, NUM_FRAMES, config.feature_dim, generator=g, dtype=dtype)
    return sample, torch.tensor([981, 961]), prompt, video


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official model (diffusers UNet + the official processors, random weights) saved as a `unet/` folder."""
    unet = diffusers_unet(TINY, official=True, seed=0)
    unet_dir = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(unet_dir)
    return unet, unet_dir


# 37: not a multiple of 8 (37 -> 19 -> 10 -> 5 and back through exact sizes, as 148 at 12 s); 24: a multiple.
@pytest.mark.parametrize("width", [37, 24])
def test_official_checkpoint_loads_and_matches_the_official_model(official, width):
    reference, unet_dir = official
    unet = load_v2a_unet(unet_dir)
    assert unet.config == TINY
    sample, t, prompt, video = inputs(TINY, width)
    expected = reference(sample, t, prompt, cross_attention_kwargs={"image_embeds": video}).sample
    out = unet(sample, t, prompt, video)
    assert out.shape == sample.shape
    assert relative_error(out, expected) <= 1e-4
    # the additions matter: without the video the output moves far beyond the tolerance
    assert relative_error(unet(sample, t, prompt, torch.zeros_like(video)), expected) > 1e-2


@pytest.mark.parametrize("width", [37, 24])
def test_base_path_equals_diffusers_unet(width):
    """video_out zero (as initialised) and one shared text projection: exactly the plain SD UNet on projected text."""
    config = TINY
    reference = diffusers_unet(config, official=False, seed=1)
    unet = build_v2a_unet(config, seed=2)
    unet.load_state_dict(reference.state_dict(), strict=False)  # every base key; the additions stay ours
    projection = torch.nn.Linear(config.feature_dim, config.cross_attention_dim)
    for name, module in unet.named_modules():
        if name.endswith("attn1.processor"):
            torch.nn.init.zeros_(module.video_out.weight)
            torch.nn.init.zeros_(module.video_out.bias)
        elif name.endswith("attn2.processor"):
            module.text_projection.load_state_dict(projection.state_dict())
    sample, t, prompt, video = inputs(config, width, seed=3)
    with torch.no_grad():
        expected = reference(sample, t, projection(prompt)).sample
    assert relative_error(unet(sample, t, prompt, video), expected) <= 1e-4


def test_video_attention_equals_the_official_formula_in_float64():
    attn1 = build_v2a_unet("tiny", dtype=torch.float64, seed=4).up_blocks[1].attentions[0].transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, 32, generator=g, dtype=torch.float64)
    frames = torch.randn(2, NUM_FRAMES, TINY.feature_dim, generator=g, dtype=torch.float64)
    heads, d = 2, 16

    def split(y):  # [B, L, H*d] -> [B, H, L, d]
        return y.unflatten(-1, (heads, d)).transpose(1, 2)

    def attention(q, k, v):  # softmax(q kᵀ / √d) v per head, merged back to [B, L, H*d]
        w = torch.softmax(torch.einsum("bhld,bhsd->bhls", q, k) / math.sqrt(d), dim=-1)
        return torch.einsum("bhls,bhsd->bhld", w, v).transpose(1, 2).flatten(2)

    def linear(y, layer):
        return y @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    # the official formula: h = self-attention(x) after to_out; q from h; k, v from the frames + positions
    h = linear(attention(split(linear(x, attn1.to_q)), split(linear(x, attn1.to_k)), split(linear(x, attn1.to_v))),
               attn1.to_out[0])  # fmt: skip
    p = attn1.processor
    f = torch.arange(NUM_FRAMES, dtype=torch.float64)[:, None]
    freqs = torch.exp(-math.log(10000) * torch.arange(d // 2, dtype=torch.float64) / (d // 2 - 1))
    pos = torch.cat([torch.sin(f * freqs), torch.cos(f * freqs)], dim=-1)  # [F, d], the same for every head
    k, v = split(linear(frames, p.video_k)) + pos, split(linear(frames, p.video_v)) + pos
    expected = h + linear(attention(split(linear(h, p.video_q)), k, v), p.video_out)
    torch.testing.assert_close(attn1(x, frames), expected, rtol=1e-12, atol=1e-12)


def test_prompt_projection_equals_the_official_formula_in_float64():
    attn2 = build_v2a_unet("tiny", dtype=torch.float64, seed=6).mid_block.attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 32, generator=g, dtype=torch.float64)
    prompt = torch.randn(2, PROMPT_LEN, TINY.feature_dim, generator=g, dtype=torch.float64)
    text = prompt @ attn2.processor.text_projection.weight.T + attn2.processor.text_projection.bias  # 4096 -> 768
    q = (x @ attn2.to_q.weight.T).unflatten(-1, (2, 16)).transpose(1, 2)
    k = (text @ attn2.to_k.weight.T).unflatten(-1, (2, 16)).transpose(1, 2)
    v = (text @ attn2.to_v.weight.T).unflatten(-1, (2, 16)).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # no mask: the zero-padded slots are attended too
    expected = (w @ v).transpose(1, 2).flatten(2) @ attn2.to_out[0].weight.T + attn2.to_out[0].bias
    torch.testing.assert_close(attn2(x, prompt), expected, rtol=1e-12, atol=1e-12)


def test_frame_positions_are_the_official_sinusoids():
    pos = frame_positions(NUM_FRAMES, 40, torch.device("cpu"), torch.float64).numpy()
    f, k = np.arange(96)[:, None], np.arange(20)[None]
    angles = f * np.exp(-np.log(10000.0) * k / 19)  # half = 20, divided by half - 1
    np.testing.assert_allclose(pos, np.concatenate([np.sin(angles), np.cos(angles)], axis=1), rtol=0, atol=1e-12)
    fp32 = frame_positions(NUM_FRAMES, 40, torch.device("cpu"), torch.float32)
    assert fp32.dtype == torch.float32 and np.abs(fp32.double().numpy() - pos).max() < 1e-4


def test_scalar_timestep_and_batch_rows_are_independent():
    unet = build_v2a_unet("tiny", seed=8)
    sample, _, prompt, video = inputs(TINY, 12, height=8)
    batch = unet(sample, torch.tensor(961), prompt, video)
    torch.testing.assert_close(batch, unet(sample, 961, prompt, video), rtol=0, atol=0)
    torch.testing.assert_close(batch[1:], unet(sample[1:], torch.tensor([961]), prompt[1:], video[1:]))


def test_renamed_key_is_named(official, tmp_path):
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.video_k.weight"
    (tmp_path / "unet").mkdir()
    shutil.copy(official[1] / "config.json", tmp_path / "unet" / "config.json")
    state = load_file(official[1] / DIFFUSERS_WEIGHTS)
    state[key.replace("video_k", "video_key")] = state.pop(key)
    save_file(state, tmp_path / "unet" / DIFFUSERS_WEIGHTS)
    with pytest.raises(CheckpointError) as error:
        load_v2a_unet(tmp_path / "unet")
    assert f"missing keys: {key}" in str(error.value)
    assert "unexpected keys: " + key.replace("video_k", "video_key") in str(error.value)


def test_sharded_folder_and_missing_files(official, tmp_path):
    official[0].save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_v2a_unet(tmp_path / "sharded").state_dict()
    expected = official[0].state_dict()
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(CheckpointError, match="V2A UNet folder not found.*config.json"):
        load_v2a_unet(tmp_path / "nowhere")


def test_full_size_config_json_and_parameter_counts(tmp_path):
    """riffusion / SD1.5's `unet/config.json` (cross_attention_dim 768) reads as the full-size preset."""
    raw = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.31.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = V2AUNetConfig.from_json(tmp_path / "config.json")
    assert config == PRESETS["kandinsky4-v2a"] and config.heads == (8, 8, 8, 8)
    with torch.device("meta"):
        unet = V2AUNet(config)
        base = diffusers.UNet2DConditionModel(**{k: v for k, v in raw.items() if not k.startswith("_")})
    shapes = {k: v.shape for k, v in unet.state_dict().items() if ".processor." not in k}
    assert shapes == {k: v.shape for k, v in base.state_dict().items()}  # every SD1.5 key, named and shaped alike
    counts = {"total": 0, "added": 0}
    for name, param in unet.named_parameters():
        counts["total"] += param.numel()
        counts["added"] += param.numel() if ".processor." in name else 0
    assert counts == {"total": 1_036_931_780, "added": 177_410_816}  # SD1.5's 859 520 964 + the additions
    assert sum(".attn1.processor.video_q.weight" in name for name, _ in unet.named_parameters()) == 16
    assert latent_shape(12) == (4, 64, 148) and latent_shape(1) == (4, 64, 12)


@pytest.mark.parametrize("key, value", [("act_fn", "gelu"), ("down_block_types", ["DownBlock2D"] * 4)])
def test_unsupported_config_is_named(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps({key: value}))
    with pytest.raises(CheckpointError, match=f"{key} = .* is not supported"):
        V2AUNetConfig.from_json(tmp_path / "config.json")


def test_keys_outside_the_official_constructor_are_ignored_as_diffusers_does(tmp_path):
    """The official subclass's signature has no use_linear_projection / num_attention_heads: diffusers drops them."""
    raw = {"use_linear_projection": True, "num_attention_heads": 4, "upcast_attention": True, "sample_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert V2AUNetConfig.from_json(tmp_path / "config.json") == PRESETS["kandinsky4-v2a"]


def test_bf16_stays_close_to_float32():
    unet = build_v2a_unet("tiny", seed=9)
    sample, t, prompt, video = inputs(TINY, 9, height=8)
    expected = unet(sample, t, prompt, video)
    out = unet.to(torch.bfloat16)(sample.bfloat16(), t, prompt.bfloat16(), video.bfloat16())
    assert out.dtype == torch.bfloat16 and relative_error(out, expected) < 3e-2
    assert F.cosine_similarity(out.double().flatten(), expected.double().flatten(), dim=0) > 0.999
