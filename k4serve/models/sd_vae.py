"""The SD VAE decoder of Kandinsky 4.0 V2A (diffusers' `AutoencoderKL`: post_quant_conv + decoder): latents
[B, 4, 64, w] -> spectrogram image [B, 3, 512, 8w] in about [-1, 1].

Our own implementation, weight-compatible with diffusers: parameter names equal the `vae/` checkpoint keys
(`post_quant_conv.*`, `decoder.*`; the encoder half is never read), and old checkpoints' attention names
(`query`, `key`, `value`, `proj_attn`, as riffusion's VAE stores them) are renamed at load time as diffusers does.
The official pipeline runs it in fp16, `decode(latents)` dividing by the scaling factor (0.18215: the V2A
`vae/config.json` has no `scaling_factor`, so diffusers' default applies) in the decoder's dtype.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k4serve.models.checkpoints import CheckpointError, diffusers_folder, load_state_dict_strict, read_safetensors
from k4serve.models.dit import AttentionFn, init_random_weights, sdpa_attention
from k4serve.models.unet_blocks import ResnetBlock2D, Upsample2D

NORM_EPS = 1e-6  # diffusers' Decoder hard-codes it for every norm


@dataclass(frozen=True)
class SDVAEConfig:
    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_post_quant_conv: bool = True

    @property
    def upscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_json(cls, path: str | Path) -> SDVAEConfig:
        """The decoder's fields from a diffusers `vae/config.json`; a layout this decoder lacks fails naming it."""
        raw = json.loads(Path(path).read_text())
        if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{path} describes a {raw['_class_name']}, not an AutoencoderKL")
        n = len(raw.get("block_out_channels", cls.block_out_channels))
        fixed = {"act_fn": "silu", "mid_block_add_attention": True, "up_block_types": ["UpDecoderBlock2D"] * n}
        for key, expected in fixed.items():
            if raw.get(key, expected) != expected:
                raise CheckpointError(f"{path}: {key} = {raw[key]!r} is not supported (the SD VAE has {expected!r})")
        values = {f.name: raw[f.name] for f in fields(cls) if raw.get(f.name) is not None}
        values["block_out_channels"] = tuple(values.get("block_out_channels", cls.block_out_channels))
        return cls(**values)


PRESETS: dict[str, SDVAEConfig] = {
    "kandinsky4-v2a": SDVAEConfig(),  # 49 490 199 parameters (post_quant_conv + decoder)
    # CPU tests and the demo: the same blocks (x8 up, a shortcut where widths change) at widths 8..32.
    "tiny": SDVAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
}


class MidAttention(nn.Module):
    """The mid block's single-head self-attention over all pixels, GroupNorm first, residual inside."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # `to_out.0`, as diffusers' list
        self.attention_fn: AttentionFn = sdpa_attention

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, C, H, W]."""
        b, c, h, w = x.shape
        y = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(y).unsqueeze(2) for proj in (self.to_q, self.to_k, self.to_v))  # one head of width C
        y = self.to_out[0](self.attention_fn(q, k, v).flatten(2))
        return y.transpose(1, 2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, NORM_EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class UpDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, NORM_EPS)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class Decoder(nn.Module):
    def __init__(self, config: SDVAEConfig):
        super().__init__()
        ch, groups = config.block_out_channels[::-1], config.norm_num_groups  # e.g. 512, 512, 256, 128
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class SDVAEDecoder(nn.Module):
    def __init__(self, config: SDVAEConfig):
        super().__init__()
        self.config = config
        lc = config.latent_channels
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None
        self.decoder = Decoder(config)

    def forward(self, z: Tensor) -> Tensor:
        """z [B, 4, h, w] (already divided by the scaling factor) -> image [B, 3, 8h, 8w]; diffusers' `decode`."""
        # 1. post-quant 1x1 conv
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        # 2. conv in, mid block (single-head attention), up blocks x8, norm, SiLU, conv out
        return self.decoder(z)

    def decode(self, latents: Tensor) -> Tensor:
        """The sampler's latents [B, 4, 64, w] -> spectrogram image [B, 3, 512, 8w] in about [-1, 1], as the
        official: cast to the decoder's dtype, then divided by the scaling factor (in that dtype)."""
        return self(latents.to(self.decoder.conv_in.weight.dtype) / self.config.scaling_factor)


def to_uint8_image(image: Tensor) -> Tensor:
    """[B, 3, H, W] decoded image -> uint8 [B, H, W, 3], exactly diffusers' VaeImageProcessor.postprocess to PIL:
    x * 0.5 + 0.5 clamped to [0, 1] in the image's dtype, then fp32 x * 255 rounded half-to-even (numpy's round)."""
    x = (image * 0.5 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)


VAE_LAYOUT = (
    "expected a diffusers AutoencoderKL folder (ai-forever/kandinsky-4-v2a's `vae/`): config.json plus "
    "diffusion_pytorch_model.safetensors, or diffusion_pytorch_model.safetensors.index.json and its shards"
)
UNUSED_PREFIXES = ("encoder.", "quant_conv.")  # the encoder half: never read
# Attention names of checkpoints saved before diffusers 0.14 (diffusers renames them on load as well).
DEPRECATED_ATTENTION = re.compile(r"^(decoder\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.")
RENAMED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def renamed_attention_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict with deprecated mid-block attention names mapped to today's."""
    return {DEPRECATED_ATTENTION.sub(lambda m: f"{m[1]}.{RENAMED[m[2]]}.", k): v for k, v in state_dict.items()}


def empty_decoder(config: SDVAEConfig, device: str | torch.device, dtype: torch.dtype) -> SDVAEDecoder:
    with torch.device("meta"):
        decoder = SDVAEDecoder(config).to(dtype)
    return decoder.to_empty(device=device)


def load_sd_vae_decoder(
    vae_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SDVAEDecoder:
    """The decoder of a diffusers AutoencoderKL `vae/` folder, strictly loaded (encoder skipped); see `.config`."""
    config_path, files = diffusers_folder(vae_dir, "SD VAE", VAE_LAYOUT)
    decoder = empty_decoder(SDVAEConfig.from_json(config_path), device, dtype)
    state_dict = renamed_attention_keys(read_safetensors(files, skip=lambda key: key.startswith(UNUSED_PREFIXES)))
    load_state_dict_strict(decoder, state_dict, f"SD VAE in {vae_dir}")
    return decoder.eval().requires_grad_(False)


def build_sd_vae_decoder(
    preset: str | SDVAEConfig = "kandinsky4-v2a",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> SDVAEDecoder:
    """A decoder with seeded random weights, built on `device` (tests, benchmarks, the demo)."""
    config = PRESETS[preset] if isinstance(preset, str) else preset
    return init_random_weights(empty_decoder(config, device, dtype), seed).eval().requires_grad_(False)
