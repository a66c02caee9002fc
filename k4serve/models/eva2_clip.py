"""The EVA2-CLIP-E vision tower of CogVLM2-Video and its adapter to the LLM width (the remote code's `visual.py`).

Per frame: 14x14 patches + CLS -> 63 post-norm ("sandwich") transformer layers -> drop CLS -> 2x2 stride-2 conv
(16x16 -> 8x8 patches, width kept at 1792) -> GLU adapter to 4096 -> [BOI ; 64 tokens ; EOI] = 66 LLM inputs.
Parameter names equal the snapshot's keys under `model.vision.`.

Numerics follow the official bf16 run: every op in the weights' dtype (LayerNorm computes in fp32 internally and
returns the input dtype), attention through one swappable full-attention function (SDPA by default; the remote
code calls xformers' memory-efficient attention, the same softmax(q kᵀ / √d) v).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k4serve.models.dit import AttentionFn, sdpa_attention


@dataclass(frozen=True)
class EVA2CLIPConfig:
    """The snapshot's `vision_config` (defaults = THUDM/cogvlm2-video-llama3-chat)."""

    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    image_size: int = 224
    patch_size: int = 14
    in_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        """Patches per side (16 at 224 px)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patches + CLS (257 at 224 px)."""
        return self.grid**2 + 1

    @property
    def tokens_per_frame(self) -> int:
        """LLM tokens per frame: the 2x2-downsampled grid plus BOI and EOI (66 at 224 px)."""
        return (self.grid // 2) ** 2 + 2

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> EVA2CLIPConfig:
        """From a config.json `vision_config` dict; the activation must be the exact GELU the code assumes."""
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("dropout_prob", 0.0) != 0.0:
            raise ValueError(f"{source}: vision_config must have hidden_act 'gelu' and dropout_prob 0 (EVA2-CLIP-E)")
        config = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        if raw.get("num_positions", config.num_positions) != config.num_positions:
            raise ValueError(f"{source}: vision_config num_positions {raw['num_positions']} != {config.num_positions}")
        return config


class PatchEmbedding(nn.Module):
    def __init__(self, config: EVA2CLIPConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.cls_embedding = nn.Parameter(torch.empty(1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> [B, 1 + patches, D]: CLS first, patches in raster order, plus positions."""
        x = self.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, config: EVA2CLIPConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # rows [q; k; v], head-major
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_fn: AttentionFn = sdpa_attention

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, D] -> [B, L, D]; full attention, scale 1/sqrt(head_dim)."""
        b, n, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, n, 3, self.num_heads, -1).unbind(2)
        return self.dense(self.attention_fn(q, k, v).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, config: EVA2CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU: ACT2FN["gelu"]


class TransformerLayer(nn.Module):
    """Post-norm residual: x + LN(attn(x)), then + LN(mlp(.)); the norms act on the branch outputs only."""

    def __init__(self, config: EVA2CLIPConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, config: EVA2CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """The adapter: Linear(vision -> LLM width) -> LayerNorm -> GELU -> SwiGLU MLP at the LLM's widths."""

    def __init__(self, in_features: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(hidden_size)  # default eps 1e-5, as the remote code
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.dense_h_to_4h = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, config: EVA2CLIPConfig, llm_hidden_size: int, llm_intermediate_size: int):
        super().__init__()
        self.config = config
        self.patch_embedding = PatchEmbedding(config)
        self.transformer = Transformer(config)
        self.linear_proj = GLU(config.hidden_size, llm_hidden_size, llm_intermediate_size)
        self.conv = nn.Conv2d(config.hidden_size, config.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.empty(1, 1, llm_hidden_size))
        self.eoi = nn.Parameter(torch.empty(1, 1, llm_hidden_size))

    def set_attention(self, attention_fn: AttentionFn) -> None:
        """Swap the full-attention kernel of every layer."""
        for layer in self.transformer.layers:
            layer.attention.attention_fn = attention_fn

    def forward(self, images: Tensor) -> Tensor:
        """images [F, 3, 224, 224] (normalised) -> per-frame LLM inputs [F, 66, llm_hidden]."""
        # 1. patches + CLS through the transformer                  [F, 257, 1792]
        x = self.transformer(self.patch_embedding(images))
        # 2. drop CLS, back to the patch grid, 2x2 stride-2 conv      [F, 1792, 8, 8]
        f, _, d = x.shape
        grid = self.config.grid
        x = self.conv(x[:, 1:].reshape(f, grid, grid, d).permute(0, 3, 1, 2))
        # 3. raster order, adapter to the LLM width                   [F, 64, 4096]
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        # 4. [BOI ; tokens ; EOI]                                     [F, 66, 4096]
        return torch.cat([self.boi.expand(f, 1, -1), x, self.eoi.expand(f, 1, -1)], dim=1)
