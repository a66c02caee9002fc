"""2D building blocks shared by the V2A UNet and the SD VAE decoder (diffusers' `resnet.py`, `upsampling.py`,
`downsampling.py` layouts): parameter names equal diffusers' keys, operations are in diffusers' order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added between (UNet only), a 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """x [B, C_in, H, W], temb [B, temb_channels] (UNet) or None (VAE) -> [B, C_out, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h  # diffusers divides by output_scale_factor = 1 here: an exact no-op


class Downsample2D(nn.Module):
    """3x3 conv with stride 2, padding 1: H -> ceil(H / 2) (odd sizes round up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to an exact `size`, for odd skip sizes), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """x [B, C, H, W] -> [B, C, *size] or [B, C, 2H, 2W] when no size is given (diffusers' two calls)."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4D tensor (the fast engine's layout), else the default NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
