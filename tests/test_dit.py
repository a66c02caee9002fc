"""The DiT against an independent float64 transcription of the official formulas, and checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from k4serve.models.checkpoints import CheckpointError
from k4serve.models.dit import PRESETS, build_dit, load_dit_weights

CONFIG = PRESETS["tiny"]


def official_keys(num_blocks: int) -> list[str]:
    """State-dict key names of the official checkpoint, from DESIGN.md's key pattern."""
    keys = ["time_embeddings.in_layer", "time_embeddings.out_layer", "text_embeddings.in_layer"]
    keys += [
        "visual_embeddings.in_layer",
        "out_layer.norm",
        "out_layer.out_layer",
        "out_layer.modulation_out",
    ]
    block_parts = [
        "visual_modulation.out_layer", "text_modulation.out_layer", "self_attention_norm",
        "self_attention.to_query_key_value", "self_attention.query_norm", "self_attention.key_norm",
        "self_attention.output_layer", "feed_forward_norm", "feed_forward.in_layer", "feed_forward.out_layer",
    ]  # fmt: skip
    keys += [f"transformer_blocks.{i}.{j}.{part}" for i in range(num_blocks) for j in (0, 1) for part in block_parts]
    return [f"{key}.{leaf}" for key in keys for leaf in ("weight", "bias")]


def synthetic_checkpoint(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes (tiny sizes), plus the derived RoPE buffers."""
    c = CONFIG
    d, hd, t = c.model_dim, c.head_dim, c.time_dim
    linear_shapes = {
        "time_embeddings.in_layer": (t, d), "time_embeddings.out_layer": (t, t),
        "text_embeddings.in_layer": (d, c.in_text_dim), "visual_embeddings.in_layer": (d, 4 * c.in_visual_dim),
        "out_layer.out_layer": (4 * c.out_visual_dim, d), "out_layer.modulation_out": (2 * d, t),
        "visual_modulation.out_layer": (6 * d, t), "text_modulation.out_layer": (6 * d, t),
        "self_attention.to_query_key_value": (3 * d, d), "self_attention.output_layer": (d, d),
        "feed_forward.in_layer": (c.ff_dim, d), "feed_forward.out_layer": (d, c.ff_dim),
    }  # fmt: skip
    norm_sizes = {
        "norm": d,
        "self_attention_norm": d,
        "feed_forward_norm": d,
        "query_norm": hd,
        "key_norm": hd,
    }
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in official_keys(c.num_blocks):
        module, leaf = key.rsplit(".", 1)
        suffix = next((s for s in linear_shapes if module.endswith(s)), None)
        if suffix is not None:
            out_dim, in_dim = linear_shapes[suffix]
            shape = (out_dim, in_dim) if leaf == "weight" else (out_dim,)
            state[key] = torch.randn(shape, generator=g) / (math.sqrt(in_dim) if leaf == "weight" else 10)
        else:
            size = norm_sizes[module.rsplit(".", 1)[-1]]
            state[key] = (1.0 if leaf == "weight" else 0.0) + 0.1 * torch.randn(size, generator=g)
    for i, axis_dim in enumerate(c.axes_dims):
        state[f"rope_embeddings.args_{i}"] = torch.zeros(128, axis_dim // 2)  # derived: must be ignored
    return state


# ---- independent float64 reference (one sample, streams kept separate as in the official code) ----


def ref_linear(w: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def ref_layer_norm(w: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]


def ref_freqs(dim: int) -> torch.Tensor:
    return torch.exp(-math.log(10000.0) * torch.arange(dim, dtype=torch.float64) / dim)


def reference_dit(w: dict, x: torch.Tensor, text: torch.Tensor, t: int) -> torch.Tensor:
    """x [T, H, W, 16], text [L, Dt], t int -> velocity [T, H, W, 16], all in float64."""
    c = CONFIG
    silu = torch.nn.functional.silu
    T, H, W, C = x.shape
    h, wd = H // 2, W // 2
    # time: [cos, sin] of t * freqs, MLP
    args = t * ref_freqs(c.model_dim // 2)
    temb = torch.cat([torch.cos(args), torch.sin(args)])
    temb = ref_linear(w, "time_embeddings.out_layer", silu(ref_linear(w, "time_embeddings.in_layer", temb)))
    # patchify: feature index (ph*2 + pw)*16 + c
    patches = torch.zeros(T, h, wd, 4 * C, dtype=torch.float64)
    for ph in range(2):
        for pw in range(2):
            patches[..., (ph * 2 + pw) * C : (ph * 2 + pw + 1) * C] = x[:, ph::2, pw::2, :]
    vis = ref_linear(w, "visual_embeddings.in_layer", patches.reshape(-1, 4 * C))
    txt = ref_linear(w, "text_embeddings.in_layer", text)
    # RoPE angles per token: [8 t | 12 h | 12 w] for the tiny axes (4, 6, 6) -> [2 | 3 | 3]
    pos = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(h), torch.arange(wd), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).double()
    angles = torch.cat([pos[:, a : a + 1] * ref_freqs(d // 2)[None] for a, d in enumerate(c.axes_dims)], dim=1)

    def rope(q: torch.Tensor) -> torch.Tensor:  # q [N, heads, hd]; pairs (2i, 2i+1)
        cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
        x0, x1 = q[..., 0::2], q[..., 1::2]
        out = torch.empty_like(q)
        out[..., 0::2], out[..., 1::2] = cos * x0 - sin * x1, sin * x0 + cos * x1
        return out

    heads, hd = c.num_heads, c.head_dim
    n = vis.shape[0]
    for i in range(c.num_blocks):
        for j in range(2):
            p = f"transformer_blocks.{i}.{j}"
            vm = ref_linear(w, f"{p}.visual_modulation.out_layer", silu(temb)).chunk(6)
            tm = ref_linear(w, f"{p}.text_modulation.out_layer", silu(temb)).chunk(6)
            # attention over [visual ; text]
            v_in = ref_layer_norm(w, f"{p}.self_attention_norm", vis) * (1 + vm[1]) + vm[0]
            t_in = ref_layer_norm(w, f"{p}.self_attention_norm", txt) * (1 + tm[1]) + tm[0]
            qkv = [
                ref_linear(w, f"{p}.self_attention.to_query_key_value", s).view(-1, 3, heads, hd) for s in (v_in, t_in)
            ]
            q = [ref_layer_norm(w, f"{p}.self_attention.query_norm", s[:, 0]) for s in qkv]
            k = [ref_layer_norm(w, f"{p}.self_attention.key_norm", s[:, 1]) for s in qkv]
            q = torch.cat([rope(q[0]), q[1]])
            k = torch.cat([rope(k[0]), k[1]])
            v = torch.cat([qkv[0][:, 2], qkv[1][:, 2]])
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(-1, heads * hd)
            out = ref_linear(w, f"{p}.self_attention.output_layer", out)
            vis, txt = vis + vm[2] * out[:n], txt + tm[2] * out[n:]
            # feed-forward, exact GELU
            for stream, m in ((0, vm), (1, tm)):
                s = vis if stream == 0 else txt
                y = ref_layer_norm(w, f"{p}.feed_forward_norm", s) * (1 + m[4]) + m[3]
                y = torch.nn.functional.gelu(ref_linear(w, f"{p}.feed_forward.in_layer", y))
                s = s + m[5] * ref_linear(w, f"{p}.feed_forward.out_layer", y)
                vis, txt = (s, txt) if stream == 0 else (vis, s)
    shift, scale = ref_linear(w, "out_layer.modulation_out", silu(temb)).chunk(2)
    out = ref_linear(w, "out_layer.out_layer", ref_layer_norm(w, "out_layer.norm", vis) * (1 + scale) + shift)
    # unpatchify: feature index c*4 + ph*2 + pw
    out = out.view(T, h, wd, C, 2, 2)
    result = torch.zeros(T, H, W, C, dtype=torch.float64)
    for ph in range(2):
        for pw in range(2):
            result[:, ph::2, pw::2, :] = out[..., ph, pw]
    return result


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("grid", [(3, 8, 12), (1, 6, 4)])
def test_tiny_dit_equals_float64_reference(grid):
    g = torch.Generator().manual_seed(7)
    model = build_dit("tiny", dtype=torch.float64, seed=3)
    weights = {k: v.double() for k, v in model.state_dict().items()}
    x = torch.randn(2, *grid, 16, generator=g, dtype=torch.float64)
    text = torch.randn(2, 9, CONFIG.in_text_dim, generator=g, dtype=torch.float64)
    time = torch.tensor([999, 249])
    out = model(x, text, time)
    for b in range(2):
        expected = reference_dit(weights, x[b], text[b], int(time[b]))
        assert out[b].shape == expected.shape
        assert rel_error(out[b], expected) <= 1e-6


def test_float32_model_close_to_float64_reference():
    g = torch.Generator().manual_seed(8)
    model = build_dit("tiny", seed=4)
    weights = {k: v.double() for k, v in model.state_dict().items()}
    x, text = torch.randn(1, 3, 8, 8, 16, generator=g), torch.randn(1, 5, 32, generator=g)
    out = model(x, text, torch.tensor([499]))
    assert rel_error(out[0].double(), reference_dit(weights, x[0].double(), text[0].double(), 499)) < 1e-5


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_official_checkpoint_loads_by_name(tmp_path, suffix):
    state = synthetic_checkpoint()
    path = tmp_path / f"kandinsky4_distil_512{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    model = build_dit("tiny", dtype=torch.float64, weights=path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key].double(), rtol=0, atol=0)
    # the recomputed RoPE tables, not the stored zeros, are used: output equals the reference
    g = torch.Generator().manual_seed(9)
    x, text = (
        torch.randn(1, 2, 4, 6, 16, generator=g, dtype=torch.float64),
        torch.randn(1, 4, 32, dtype=torch.float64),
    )
    weights = {k: v.double() for k, v in state.items()}
    assert rel_error(model(x, text, torch.tensor([749]))[0], reference_dit(weights, x[0], text[0], 749)) <= 1e-6


def test_renamed_key_fails_with_its_name(tmp_path):
    state = synthetic_checkpoint()
    state["transformer_blocks.0.1.self_attention.qkv.weight"] = state.pop(
        "transformer_blocks.0.1.self_attention.to_query_key_value.weight"
    )
    path = tmp_path / "renamed.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_dit_weights(build_dit("tiny"), path)
    assert "transformer_blocks.0.1.self_attention.to_query_key_value.weight" in str(error.value)
    assert "transformer_blocks.0.1.self_attention.qkv.weight" in str(error.value)


def test_wrong_shape_and_wrong_model_fail(tmp_path):
    state = synthetic_checkpoint()
    state["out_layer.out_layer.weight"] = torch.zeros(32, CONFIG.model_dim)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"out_layer\.out_layer\.weight \(32, 32\) != \(64, 32\)"):
        load_dit_weights(build_dit("tiny"), tmp_path / "shape.pt")
    torch.save({"decoder.conv_in.conv.weight": torch.zeros(8, 16, 3, 3, 3)}, tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match="missing keys: .*unexpected keys: decoder.conv_in"):
        load_dit_weights(build_dit("tiny"), tmp_path / "vae.pt")


def test_full_size_config_matches_official_parameter_count():
    with torch.device("meta"):
        from k4serve.models.dit import DiffusionTransformer3D

        model = DiffusionTransformer3D(PRESETS["flash-512"])
    assert sum(p.numel() for p in model.parameters()) == 5_570_276_928
    assert sorted(model.state_dict()) == sorted(official_keys(21))
