"""Kandinsky 4.0 V2A UNet: the SD1.5 / riffusion `UNet2DConditionModel` plus the official video and prompt inputs.

The official model (`kandinsky4_video2audio/model/unet.py`, `attention_processors.py`) keeps diffusers' UNet and
swaps every attention processor for one that carries weights, so the checkpoint holds, per transformer block:
  - `attn1.processor.{video_q,video_k,video_v,video_out}`: after the self-attention, its output attends to the
    96 CogVLM2 frame features (k, v = Linear(4096 -> C) plus sinusoidal frame positions on both, per head), and
    `video_out` of that is added to the self-attention output (the block's own residual comes after);
  - `attn2.processor.text_projection`: Linear(4096 -> 768) of the CogVLM2 prompt features, the normal text
    cross-attention's keys and values then read from it.
Here both are real submodules under those names, so the diffusers `unet/` folder loads strictly.

Numerics follow the official bf16 run: every op in the model dtype, the timestep features in fp32 (cast to the
model dtype, as diffusers does), the frame positions in fp32 added in fp32 then rounded (the official in-place
`key += pos_emb` on a bf16 key); float64 throughout when the module is float64 (verification).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k4serve.models.checkpoints import CheckpointError, diffusers_folder, load_state_dict_strict, read_safetensors
from k4serve.models.dit import AttentionFn, init_random_weights, sdpa_attention
from k4serve.models.unet_blocks import Downsample2D, ResnetBlock2D, Upsample2D, memory_format_of

SPECTROGRAM_HEIGHT = 512  # mel bins: the VAE's image height, 64 latent rows
PIXELS_PER_SECOND = 100  # one spectrogram column per 10 ms hop


@dataclass(frozen=True)
class V2AUNetConfig:
    """The diffusers `unet/config.json` fields that shape the model, plus the CogVLM2 feature width."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8  # diffusers' misnomer: the number of heads per level
    cross_attention_dim: int = 768  # the text cross-attention's key/value width (text_projection's output)
    feature_dim: int = 4096  # CogVLM2's hidden size, hard-coded by the official processors
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    def __post_init__(self):
        if isinstance(self.attention_head_dim, list):
            object.__setattr__(self, "attention_head_dim", tuple(self.attention_head_dim))
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for width, heads in zip(self.block_out_channels, self.heads, strict=True):
            head_dim = width // heads
            # the frame positions divide by head_dim / 2 - 1
            if width % heads or width % self.norm_num_groups or head_dim % 2 or head_dim < 4:
                raise ValueError(
                    f"block width {width} needs {heads} heads of an even width >= 4 and {self.norm_num_groups} "
                    "norm groups that divide it"
                )

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers reads an int `attention_head_dim` as that count everywhere)."""
        h = self.attention_head_dim
        return h if isinstance(h, tuple) else (h,) * len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1

    @classmethod
    def from_json(cls, path: str | Path, feature_dim: int = 4096) -> V2AUNetConfig:
        """Read a diffusers `unet/config.json` as the official model does.

        The official subclass's constructor takes only the SD1.5 arguments, and diffusers drops every config key
        its signature lacks (with a warning), so other keys are ignored here too; of those it takes, a value
        this layout does not implement fails naming it."""
        raw = json.loads(Path(path).read_text())
        if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise CheckpointError(f"{path} describes a {raw['_class_name']}, not a UNet2DConditionModel")
        n = len(raw.get("block_out_channels", cls.block_out_channels))
        fixed = {
            "act_fn": "silu",
            "center_input_sample": False,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        }
        for key, expected in fixed.items():
            if list_or_value(raw.get(key, expected)) != expected:
                raise CheckpointError(
                    f"{path}: {key} = {raw[key]!r} is not supported (the SD1.5 UNet has {expected!r})"
                )
        values = {f.name: list_or_value(raw[f.name]) for f in fields(cls) if f.name in raw}
        return cls(**values, feature_dim=feature_dim)


def list_or_value(value):
    """JSON arrays as lists (a tuple in the config compares equal), anything else unchanged."""
    return list(value) if isinstance(value, (list, tuple)) else value


PRESETS: dict[str, V2AUNetConfig] = {
    "kandinsky4-v2a": V2AUNetConfig(),  # 1 036 931 780 parameters: SD1.5's 859 520 964 + 177 410 816 added
    # CPU tests and the demo: the same levels, block types and additions at widths 16..32 (2 heads of 8 and 16),
    # one layer per down block (two per up block). Self-attention over all 64 x w latent pixels is what costs
    # on the CPU: about 0.3 s per call at 1 s of audio (w = 12), seconds at 12 s (w = 148).
    "tiny": V2AUNetConfig(
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        attention_head_dim=2,
        cross_attention_dim=16,
        feature_dim=32,
        norm_num_groups=8,
    ),
}


def latent_shape(duration_s: int) -> tuple[int, int, int]:
    """(4, 64, W/8): the latent of `duration_s` seconds of audio, W = ⌊100·d / 32⌋·32 columns (official)."""
    width = duration_s * PIXELS_PER_SECOND // 32 * 32
    if width == 0:
        raise ValueError(f"duration {duration_s} s gives no spectrogram column; V2A needs at least 1 s")
    return 4, SPECTROGRAM_HEIGHT // 8, width // 8


def timestep_features(timesteps: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Tensor:
    """diffusers' `get_timestep_embedding` in fp32: [B] -> [B, dim], [cos, sin] when flipped."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - freq_shift)
    args = timesteps[:, None].float() * torch.exp(exponent)[None]
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


def frame_positions(num_frames: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The official `get_posemb`: [F, head_dim] = [sin, cos] of f * exp(-ln(1e4) * k / (head_dim/2 - 1))."""
    half = head_dim // 2
    freqs = torch.exp(torch.arange(half, device=device, dtype=dtype) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_frames, device=device, dtype=dtype)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class Attention(nn.Module):
    """diffusers' `Attention` as the SD UNet uses it: bias-free q/k/v, a biased out projection, `heads` heads."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # `to_out.0`, as diffusers' list (its dropout: no weights)
        self.attention_fn: AttentionFn = sdpa_attention

    def attend(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, L, dim] queries, context [B, S, context_dim] -> [B, L, dim]."""
        heads = (self.heads, -1)
        q, k, v = self.to_q(x).unflatten(-1, heads), self.to_k(context).unflatten(-1, heads), self.to_v(context)
        v = v.unflatten(-1, heads)
        return self.to_out[0](self.attention_fn(q, k, v).flatten(2))


class VideoCrossAttention(nn.Module):
    """The official `VideoAttnProcessor2_0`'s weights and math: the self-attention output h attends to the frames."""

    def __init__(self, dim: int, feature_dim: int):
        super().__init__()
        self.video_q = nn.Linear(dim, dim)
        self.video_k = nn.Linear(feature_dim, dim)
        self.video_v = nn.Linear(feature_dim, dim)
        self.video_out = nn.Linear(dim, dim)  # zero-initialised for training: then the block is SD's

    def forward(self, h: Tensor, video_embeds: Tensor, heads: int, attention_fn: AttentionFn) -> Tensor:
        """h [B, L, dim] (after to_out), video_embeds [B, F, feature_dim] -> h + video_out(attention) [B, L, dim]."""
        d = h.shape[-1] // heads
        q = self.video_q(h).unflatten(-1, (heads, d))
        k = self.video_k(video_embeds).unflatten(-1, (heads, d))
        v = self.video_v(video_embeds).unflatten(-1, (heads, d))
        # The same positions for every head, on keys and values; added in fp32 and rounded to the model dtype.
        pos = frame_positions(k.shape[1], d, k.device, torch.promote_types(k.dtype, torch.float32))[:, None]
        k, v = (k + pos).to(h.dtype), (v + pos).to(h.dtype)
        return h + self.video_out(attention_fn(q, k, v).flatten(2))


class PromptProjection(nn.Module):
    """The official `PromptAttnProcessor2_0`'s weight: CogVLM2 prompt features -> the cross-attention width."""

    def __init__(self, feature_dim: int, cross_attention_dim: int):
        super().__init__()
        self.text_projection = nn.Linear(feature_dim, cross_attention_dim)


class VideoSelfAttention(Attention):
    """`attn1`: self-attention, then the video cross-attention on its output."""

    def __init__(self, dim: int, heads: int, feature_dim: int):
        super().__init__(dim, dim, heads)
        self.processor = VideoCrossAttention(dim, feature_dim)

    def forward(self, x: Tensor, video_embeds: Tensor) -> Tensor:
        return self.processor(self.attend(x, x), video_embeds, self.heads, self.attention_fn)


class PromptCrossAttention(Attention):
    """`attn2`: cross-attention to the projected prompt features (no mask: zero-padded slots are attended)."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int, feature_dim: int):
        super().__init__(dim, cross_attention_dim, heads)
        self.processor = PromptProjection(feature_dim, cross_attention_dim)

    def forward(self, x: Tensor, prompt_embeds: Tensor) -> Tensor:
        return self.attend(x, self.processor.text_projection(prompt_embeds))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)  # exact erf GELU


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # `net.0.proj`, `net.2` as diffusers; index 1 is its dropout (no weights), kept so the keys line up.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: pre-LayerNorm self-attention (+ video), text cross-attention, GEGLU FF."""

    def __init__(self, dim: int, heads: int, config: V2AUNetConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = VideoSelfAttention(dim, heads, config.feature_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = PromptCrossAttention(dim, heads, config.cross_attention_dim, config.feature_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, prompt_embeds: Tensor, video_embeds: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x), video_embeds) + x
        x = self.attn2(self.norm2(x), prompt_embeds) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel with one block: GroupNorm, 1x1 conv in, tokens (h, w raster), 1x1 conv out,
    residual (the official constructor takes no use_linear_projection: the SD1.x convs always)."""

    def __init__(self, dim: int, heads: int, config: V2AUNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_num_groups, dim, eps=1e-6)  # diffusers hard-codes 1e-6 here
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, config)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, prompt_embeds: Tensor, video_embeds: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, prompt_embeds, video_embeds)
        # back to x's memory format (NCHW, or NHWC in the fast engine) before the conv
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(x))
        return self.proj_out(y) + x


def resnet(in_channels: int, out_channels: int, config: V2AUNetConfig) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels, out_channels, config.time_embed_dim, config.norm_num_groups, config.norm_eps)


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with transformers) or DownBlock2D: (resnet, transformer) pairs, a stride-2 conv."""

    def __init__(self, in_ch: int, out_ch: int, heads: int, config: V2AUNetConfig, cross_attention: bool,
                 downsample: bool):  # fmt: skip
        super().__init__()
        n = config.layers_per_block
        self.resnets = nn.ModuleList(resnet(in_ch if i == 0 else out_ch, out_ch, config) for i in range(n))
        self.attentions = nn.ModuleList(SpatialTransformer(out_ch, heads, config) for _ in range(n * cross_attention))
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if downsample else [])

    def forward(self, x: Tensor, temb: Tensor, prompt_embeds: Tensor, video_embeds: Tensor) -> tuple[Tensor, list]:
        """-> (x, the skip tensors for the up path: each layer's output, then the downsampled x)."""
        skips = []
        for i, block in enumerate(self.resnets):
            x = block(x, temb)
            if self.attentions:
                x = self.attentions[i](x, prompt_embeds, video_embeds)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, ch: int, heads: int, config: V2AUNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([resnet(ch, ch, config), resnet(ch, ch, config)])
        self.attentions = nn.ModuleList([SpatialTransformer(ch, heads, config)])

    def forward(self, x: Tensor, temb: Tensor, prompt_embeds: Tensor, video_embeds: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, prompt_embeds, video_embeds)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """UpBlock2D or CrossAttnUpBlock2D: each resnet reads [x ; the next skip], then an upsampler."""

    def __init__(self, in_ch: int, prev_ch: int, out_ch: int, heads: int, config: V2AUNetConfig,
                 cross_attention: bool, upsample: bool):  # fmt: skip
        super().__init__()
        n = config.layers_per_block + 1
        self.resnets = nn.ModuleList(
            resnet((prev_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch), out_ch, config)
            for i in range(n)
        )
        self.attentions = nn.ModuleList(SpatialTransformer(out_ch, heads, config) for _ in range(n * cross_attention))
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, prompt_embeds: Tensor, video_embeds: Tensor,
                upsample_size: tuple[int, int] | None) -> Tensor:  # fmt: skip
        """Consumes len(resnets) skips from the end of `skips`."""
        for i, block in enumerate(self.resnets):
            x = block(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, prompt_embeds, video_embeds)
        for upsampler in self.upsamplers:
            x = upsampler(x, upsample_size)
        return x


class V2AUNet(nn.Module):
    def __init__(self, config: V2AUNetConfig):
        super().__init__()
        self.config = config
        ch, heads, n = config.block_out_channels, config.heads, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], heads[i], config, cross_attention=i < n - 1, downsample=i < n - 1)
            for i in range(n)
        )
        self.mid_block = MidBlock(ch[-1], heads[-1], config)
        rch, rheads = ch[::-1], heads[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], rheads[i], config, i > 0, i < n - 1)
            for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def set_attention(self, attention_fn: AttentionFn) -> None:
        """Swap the attention kernel of every self-, video and text attention (SDPA, a Triton kernel, ...)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.attention_fn = attention_fn

    def forward(self, sample: Tensor, timestep: Tensor | int, prompt_embeds: Tensor, video_embeds: Tensor) -> Tensor:
        """sample [B, 4, 64, w] noisy latents, timestep [B] or a scalar (0..999), prompt_embeds [B, 100, 4096],
        video_embeds [B, 96, 4096] (model dtype) -> noise prediction [B, 4, 64, w]."""
        c = self.config
        # 1. time embedding (fp32 features, then the model dtype)                  [B, 4 * C0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        features = timestep_features(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = self.time_embedding(features.to(sample.dtype))
        # 2. down path, keeping every skip                                        [B, C3, 64/8, w/8 rounded up]
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, prompt_embeds, video_embeds)
            skips += block_skips
        # 3. mid block
        x = self.mid_block(x, temb, prompt_embeds, video_embeds)
        # 4. up path; a side not divisible by 2^levels upsamples to each skip's exact size (diffusers'
        #    forward_upsample_size: 148 -> 74 -> 37 -> 19 comes back 19 -> 37 -> 74 -> 148)
        exact = any(side % 2**c.num_upsamplers for side in sample.shape[-2:])
        for i, block in enumerate(self.up_blocks):
            last = i == len(self.up_blocks) - 1
            size = tuple(skips[-len(block.resnets) - 1].shape[-2:]) if exact and not last else None
            x = block(x, skips, temb, prompt_embeds, video_embeds, size)
        # 5. out                                                                  [B, 4, 64, w]
        return self.conv_out(F.silu(self.conv_norm_out(x)))


UNET_LAYOUT = (
    "expected a diffusers UNet2DConditionModel folder (ai-forever/kandinsky-4-v2a's `unet/`): config.json plus "
    "diffusion_pytorch_model.safetensors, or diffusion_pytorch_model.safetensors.index.json and its shards"
)


def empty_unet(config: V2AUNetConfig, device: str | torch.device, dtype: torch.dtype) -> V2AUNet:
    """The UNet with uninitialised parameters of `dtype`, allocated directly on `device`."""
    with torch.device("meta"):
        unet = V2AUNet(config).to(dtype)
    return unet.to_empty(device=device)


def load_v2a_unet(
    unet_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> V2AUNet:
    """The official V2A UNet from a diffusers `unet/` folder, strictly loaded (its config as `.config`)."""
    config_path, files = diffusers_folder(unet_dir, "V2A UNet", UNET_LAYOUT)
    state_dict = read_safetensors(files)
    # config.json does not say the feature width (the official processors hard-code 4096): the weights do.
    video_k = [v for k, v in state_dict.items() if k.endswith("attn1.processor.video_k.weight")]
    config = V2AUNetConfig.from_json(config_path, feature_dim=video_k[0].shape[1] if video_k else 4096)
    unet = empty_unet(config, device, dtype)
    load_state_dict_strict(unet, state_dict, f"V2A UNet in {unet_dir}")
    return unet.eval().requires_grad_(False)


def build_v2a_unet(
    preset: str | V2AUNetConfig = "kandinsky4-v2a",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> V2AUNet:
    """The UNet with seeded random weights (video_out included, so every addition contributes), on `device`."""
    config = PRESETS[preset] if isinstance(preset, str) else preset
    return init_random_weights(empty_unet(config, device, dtype), seed).eval().requires_grad_(False)
