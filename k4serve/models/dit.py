"""Kandinsky 4.0 T2V Flash diffusion transformer (the official `DiffusionTransformer3D`).

A single-stream DiT over the joint sequence [visual tokens ; text tokens]: both streams share the
LayerNorms, the attention and the feed-forward weights; only the adaLN modulations are per stream.
Parameter names equal the official state-dict keys, so `kandinsky4_distil_512.pt` loads directly.

Numerics follow the official run: bf16 weights under `torch.autocast(bfloat16)` on the GPU (LayerNorm
outputs and the modulation arithmetic in fp32, RoPE in fp32, matmuls in bf16); plain fp32 on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k4serve.models.checkpoints import load_state_dict_strict, read_state_dict

# q, k, v: [B, L, heads, head_dim] -> out [B, L, heads, head_dim]; full (non-causal) attention, scale 1/sqrt(d).
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class DiTConfig:
    in_visual_dim: int = 16
    in_text_dim: int = 4096
    out_visual_dim: int = 16
    time_dim: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_dim: int = 3072
    ff_dim: int = 12288
    num_blocks: int = 21
    axes_dims: tuple[int, int, int] = (16, 24, 24)
    max_positions: int = 128  # rows of the official RoPE angle tables, per axis

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def patch_numel(self) -> int:
        return math.prod(self.patch_size)


PRESETS: dict[str, DiTConfig] = {
    "flash-512": DiTConfig(),
    # CPU tests and the out-of-the-box demo: the same structure (one local/global pair; 4 heads, so 2- and
    # 4-way head splits work) at a width that keeps a 1 s 384x672 video near a second per step on 2 cores.
    "tiny": DiTConfig(in_text_dim=32, time_dim=32, model_dim=32, ff_dim=64, num_blocks=1, axes_dims=(4, 2, 2)),
}


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Joint full attention through torch SDPA (flash / cuDNN / math backend as torch picks)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def sinusoidal_freqs(dim: int, device: torch.device | str | None = None, dtype=torch.float32) -> Tensor:
    """exp(-ln(10000) * i / dim) for i < dim, in the official `get_freqs` operation order (fp32 there)."""
    return torch.exp(-math.log(10000.0) * torch.arange(dim, dtype=dtype, device=device) / dim)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head in fp32. x [B, N, heads, d]; cos/sin [N, 1, d/2]."""
    x_ = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x_[..., 0], x_[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).type_as(x)


class TimeEmbeddings(nn.Module):
    def __init__(self, model_dim: int, time_dim: int):
        super().__init__()
        self.half_dim = model_dim // 2
        self.in_layer = nn.Linear(model_dim, time_dim)
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, time_dim)

    def forward(self, time: Tensor) -> Tensor:
        # fp32 frequencies whatever the module dtype (official: a plain attribute, untouched by .to(bf16)).
        # fp32 angles as official (float64 only when the whole module is float64, for verification)
        dtype = torch.promote_types(torch.float32, self.in_layer.weight.dtype)
        args = time.to(dtype)[:, None] * sinusoidal_freqs(self.half_dim, time.device, dtype)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, model_dim], cos first
        return self.out_layer(self.activation(self.in_layer(emb.to(self.in_layer.weight.dtype))))


class TextEmbeddings(nn.Module):
    def __init__(self, text_dim: int, model_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(text_dim, model_dim)

    def forward(self, text_embed: Tensor) -> Tensor:
        return self.in_layer(text_embed)


class VisualEmbeddings(nn.Module):
    def __init__(self, visual_dim: int, model_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.in_layer = nn.Linear(math.prod(patch_size) * visual_dim, model_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, H, W, C] -> tokens [B, T/pt * H/ph * W/pw, model_dim] in (t, h, w) raster order."""
        b, t, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, pt * ph * pw * c)  # patch features (pt, ph, pw, c)
        return self.in_layer(x)


class RoPE3D(nn.Module):
    """Angle tables per axis (t, h, w); the official buffers `args_{0,1,2}`, recomputed, never loaded.

    They are buffers on purpose: the official `dit.to(bfloat16)` casts them, so on the GPU the angles (and
    their cos/sin) are bf16 values, and matching the official video means doing the same.
    """

    def __init__(self, axes_dims: tuple[int, int, int], max_positions: int, dtype=torch.float32):
        super().__init__()
        for i, axis_dim in enumerate(axes_dims):
            positions = torch.arange(max_positions, dtype=dtype)
            table = torch.outer(positions, sinusoidal_freqs(axis_dim // 2, dtype=dtype))
            self.register_buffer(f"args_{i}", table, persistent=False)

    def forward(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """cos, sin [N, 1, head_dim/2] for the token grid (t, h, w) in raster order."""
        t, h, w = grid
        args = torch.cat(
            [
                self.args_0[:t].view(t, 1, 1, -1).expand(t, h, w, -1),
                self.args_1[:h].view(1, h, 1, -1).expand(t, h, w, -1),
                self.args_2[:w].view(1, 1, w, -1).expand(t, h, w, -1),
            ],
            dim=-1,
        ).reshape(t * h * w, 1, -1)
        return torch.cos(args), torch.sin(args)


class Modulation(nn.Module):
    def __init__(self, time_dim: int, model_dim: int):
        super().__init__()
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, 6 * model_dim)

    def forward(self, time_embed: Tensor) -> tuple[Tensor, ...]:
        """[B, time_dim] -> attn (shift, scale, gate), ff (shift, scale, gate), each [B, 1, model_dim]."""
        return self.out_layer(self.activation(time_embed))[:, None].chunk(6, dim=-1)


def modulate(x: Tensor, n_visual: int, visual: tuple[Tensor, Tensor], text: tuple[Tensor, Tensor]) -> Tensor:
    """x * (1 + scale) + shift with each stream's (shift, scale); x [B, N+L, D]."""
    (v_shift, v_scale), (t_shift, t_scale) = visual, text
    return torch.cat([x[:, :n_visual] * (v_scale + 1.0) + v_shift, x[:, n_visual:] * (t_scale + 1.0) + t_shift], dim=1)


def gated_add(x: Tensor, out: Tensor, n_visual: int, visual_gate: Tensor, text_gate: Tensor) -> Tensor:
    """x + gate * out with each stream's gate (plain gate, no tanh)."""
    return torch.cat(
        [x[:, :n_visual] + visual_gate * out[:, :n_visual], x[:, n_visual:] + text_gate * out[:, n_visual:]],
        dim=1,
    )


class MultiheadSelfAttention(nn.Module):
    def __init__(self, model_dim: int, head_dim: int):
        super().__init__()
        self.num_heads = model_dim // head_dim
        self.to_query_key_value = nn.Linear(model_dim, 3 * model_dim)  # rows [q; k; v], head-major
        self.query_norm = nn.LayerNorm(head_dim)
        self.key_norm = nn.LayerNorm(head_dim)
        self.output_layer = nn.Linear(model_dim, model_dim)
        self.attention_fn: AttentionFn = sdpa_attention

    def forward(self, x: Tensor, n_visual: int, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x [B, N+L, D] joint sequence -> [B, N+L, D]; RoPE on the N visual tokens only."""
        b, seq, _ = x.shape
        q, k, v = self.to_query_key_value(x).view(b, seq, 3, self.num_heads, -1).unbind(2)
        q = self.query_norm(q).type_as(v)  # LayerNorm runs (and outputs) fp32 under autocast
        k = self.key_norm(k).type_as(v)
        q = torch.cat([apply_rope(q[:, :n_visual], *rope), q[:, n_visual:]], dim=1)
        k = torch.cat([apply_rope(k[:, :n_visual], *rope), k[:, n_visual:]], dim=1)
        out = self.attention_fn(q, k, v)
        return self.output_layer(out.reshape(b, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, model_dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(model_dim, ff_dim)
        self.activation = nn.GELU()  # exact erf form
        self.out_layer = nn.Linear(ff_dim, model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.activation(self.in_layer(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.visual_modulation = Modulation(config.time_dim, config.model_dim)
        self.text_modulation = Modulation(config.time_dim, config.model_dim)
        self.self_attention_norm = nn.LayerNorm(config.model_dim)
        self.self_attention = MultiheadSelfAttention(config.model_dim, config.head_dim)
        self.feed_forward_norm = nn.LayerNorm(config.model_dim)
        self.feed_forward = FeedForward(config.model_dim, config.ff_dim)

    def forward(self, x: Tensor, n_visual: int, time_embed: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        v_shift, v_scale, v_gate, v_ff_shift, v_ff_scale, v_ff_gate = self.visual_modulation(time_embed)
        t_shift, t_scale, t_gate, t_ff_shift, t_ff_scale, t_ff_gate = self.text_modulation(time_embed)
        y = modulate(self.self_attention_norm(x), n_visual, (v_shift, v_scale), (t_shift, t_scale))
        x = gated_add(x, self.self_attention(y, n_visual, rope), n_visual, v_gate, t_gate)
        y = modulate(self.feed_forward_norm(x), n_visual, (v_ff_shift, v_ff_scale), (t_ff_shift, t_ff_scale))
        return gated_add(x, self.feed_forward(y), n_visual, v_ff_gate, t_ff_gate)


class OutLayer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.norm = nn.LayerNorm(config.model_dim)
        self.out_layer = nn.Linear(config.model_dim, config.patch_numel * config.out_visual_dim)
        self.modulation_activation = nn.SiLU()
        self.modulation_out = nn.Linear(config.time_dim, 2 * config.model_dim)

    def forward(self, visual: Tensor, time_embed: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """visual tokens [B, N, D] -> [B, T, H, W, C_out]; output features are ordered (c, pt, ph, pw)."""
        shift, scale = self.modulation_out(self.modulation_activation(time_embed))[:, None].chunk(2, dim=-1)
        return unpatchify(self.out_layer(self.norm(visual) * (scale + 1.0) + shift), grid, self.patch_size)


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> Tensor:
    """Output tokens [B, t·h·w, C·pt·ph·pw], features ordered (c, pt, ph, pw) -> [B, t·pt, h·ph, w·pw, C]."""
    (t, h, w), (pt, ph, pw) = grid, patch_size
    x = x.view(x.shape[0], t, h, w, -1, pt, ph, pw)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(x.shape[0], t * pt, h * ph, w * pw, -1)


class DiffusionTransformer3D(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.time_embeddings = TimeEmbeddings(config.model_dim, config.time_dim)
        self.text_embeddings = TextEmbeddings(config.in_text_dim, config.model_dim)
        self.visual_embeddings = VisualEmbeddings(config.in_visual_dim, config.model_dim, config.patch_size)
        self.rope_embeddings = RoPE3D(config.axes_dims, config.max_positions)
        # Pairs (local, global): both are full attention in the 512 family; the pairing only names the keys.
        self.transformer_blocks = nn.ModuleList(
            nn.ModuleList([TransformerBlock(config), TransformerBlock(config)]) for _ in range(config.num_blocks)
        )
        self.out_layer = OutLayer(config)

    def blocks(self) -> list[TransformerBlock]:
        """The 2 * num_blocks transformer blocks in execution order."""
        return [block for pair in self.transformer_blocks for block in pair]

    def set_attention(self, attention_fn: AttentionFn) -> None:
        """Swap the joint-attention kernel in every block (SDPA, a Triton kernel, ...)."""
        for block in self.blocks():
            block.self_attention.attention_fn = attention_fn

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(t, h, w) token grid of a latent [.., T, H, W, C]."""
        t, h, w = latent_shape[-4:-1]
        pt, ph, pw = self.config.patch_size
        return t // pt, h // ph, w // pw

    def forward(self, x: Tensor, text_embed: Tensor, time: Tensor) -> Tensor:
        """x [B, T, H/8, W/8, 16] noisy latents, text_embed [B, L, in_text_dim], time [B] (raw 0..999)
        -> velocity [B, T, H/8, W/8, 16]."""
        grid = self.token_grid(x.shape)
        n_visual = math.prod(grid)
        # 1. time embedding                                          [B, time_dim]
        time_embed = self.time_embeddings(time)
        # 2. joint token sequence [visual (t, h, w) raster ; text]   [B, N + L, D]
        x = torch.cat([self.visual_embeddings(x), self.text_embeddings(text_embed)], dim=1)
        # 3. RoPE angles for the visual tokens                       cos, sin [N, 1, head_dim/2]
        rope = self.rope_embeddings(grid)
        # 4. transformer blocks
        for block in self.blocks():
            x = block(x, n_visual, time_embed, rope)
        # 5. out layer on the visual tokens, unpatchify              [B, T, H/8, W/8, C_out]
        return self.out_layer(x[:, :n_visual], time_embed, grid)


ROPE_BUFFER_KEYS = ("rope_embeddings.args_0", "rope_embeddings.args_1", "rope_embeddings.args_2")


def load_dit_weights(model: DiffusionTransformer3D, path: str | Path) -> None:
    """Load an official checkpoint (torch state dict or safetensors) into `model`, strictly by key name."""
    state_dict = read_state_dict(path)
    for key in ROPE_BUFFER_KEYS:  # derived tables: recomputed, so a stored copy is dropped
        state_dict.pop(key, None)
    load_state_dict_strict(model, state_dict, what=f"Kandinsky 4 DiT checkpoint {path}")


def init_random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter in place with seeded, well-scaled random values (benchmarks, tests).

    Linear weights ~ N(0, 1/fan_in), biases and norm offsets ~ N(0, 0.02^2), norm scales ~ 1 + N(0, 0.1^2).
    Unlike the official zero-initialised modulations, this keeps every block's contribution non-trivial.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
            if name.endswith("weight") and param.dim() >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.02 * noise)
    return model


def build_dit(
    preset: str | DiTConfig = "flash-512",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str | Path | None = None,
    seed: int = 0,
) -> DiffusionTransformer3D:
    """Build the DiT directly on `device` (no CPU round trip): official weights if given, else seeded random."""
    config = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device("meta"):
        model = DiffusionTransformer3D(config)
    model = model.to_empty(device=device)
    # to_empty leaves the derived buffers uninitialised: rebuild them on the device, in fp32 as official (the
    # cast below then rounds them like the official `.to(bfloat16)`); float64 throughout for verification.
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    model.rope_embeddings = RoPE3D(config.axes_dims, config.max_positions, table_dtype).to(device)
    if weights is not None:
        load_dit_weights(model, weights)
    else:
        init_random_weights(model, seed)
    return model.to(dtype).eval().requires_grad_(False)


def with_overrides(preset: str, **overrides) -> DiTConfig:
    """A preset with some fields changed (e.g. fewer blocks for a quick benchmark)."""
    return replace(PRESETS[preset], **overrides)
