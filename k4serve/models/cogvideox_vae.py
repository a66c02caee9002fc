"""CogVideoX VAE decoder (diffusers' `AutoencoderKLCogVideoX.decoder`): latents [B, 16, T, h, w] -> video.

Our own implementation, weight-compatible with diffusers: parameter names equal the checkpoint's `decoder.*`
keys without the `decoder.` prefix, so a CogVideoX `vae/` folder loads strictly.

Temporal chunking (diffusers with `num_latent_frames_batch_size = 2`, no tiling, no slicing; the same rule in
diffusers 0.30.3, which the official Kandinsky 4 code uses, and in current diffusers): with r = T % 2, the
chunks are latent frames [0, 2 + r), then [2 + r, 4 + r), [4 + r, 6 + r), ... So an odd T (the pipeline's
T = 2 * seconds + 1) starts with a chunk of 3 frames, which decodes to 9 frames (the first latent frame is an
image: it is not doubled in time), and every later chunk of 2 decodes to 8, giving 4(T - 1) + 1 frames; an
even T gives 4T; T = 1 (an image) is one chunk and one frame.

Why the cache is carried: every 3x3x3 convolution is causal in time, seeing its frame and the two before.
At the start of a video those two are copies of the first frame; across a chunk boundary they are the last
two frames of the same conv's input in the previous chunk, kept in a `ConvCache`. Without it each chunk
would restart as a new video (visible seams every 8 frames). Chunked decoding is still not the same as
decoding all frames at once (GroupNorm statistics are per chunk, and the first-frame rules apply per
chunk), so the chunk boundaries are part of the model's behaviour and must match diffusers exactly.

Other diffusers details kept: the decoder's norms use eps 1e-6 whatever `norm_eps` says (diffusers hard-codes
it in `CogVideoXSpatialNorm3D`); diffusers' `CogVideoXSafeConv3d` splitting of huge conv inputs only saves
memory and is not reproduced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k4serve.models.checkpoints import CheckpointError, diffusers_folder, load_state_dict_strict, read_safetensors
from k4serve.models.dit import init_random_weights

NORM_EPS = 1e-6
LATENT_FRAMES_PER_CHUNK = 2

# The last input frames of each causal conv, carried from one temporal chunk to the next.
ConvCache = dict[nn.Module, Tensor]


@dataclass(frozen=True)
class CogVideoXVAEConfig:
    latent_channels: int = 16
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 3
    temporal_compression_ratio: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.7

    def __post_init__(self):
        levels = self.temporal_upsample_levels
        if 2**levels != self.temporal_compression_ratio or levels > len(self.block_out_channels) - 1:
            raise ValueError(
                f"temporal_compression_ratio {self.temporal_compression_ratio} must be a power of 2, at most "
                f"2^{len(self.block_out_channels) - 1} (one time doubling per upsampling block)"
            )

    @property
    def temporal_upsample_levels(self) -> int:
        return int(math.log2(self.temporal_compression_ratio))

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_json(cls, path: str | Path) -> CogVideoXVAEConfig:
        """The decoder's fields from a diffusers `vae/config.json`; other keys are ignored."""
        raw = json.loads(Path(path).read_text())
        if raw.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
            raise CheckpointError(f"{path} describes a {raw['_class_name']}, not an AutoencoderKLCogVideoX")
        if raw.get("use_post_quant_conv") or raw.get("act_fn", "silu") not in ("silu", "swish"):
            raise CheckpointError(
                f"{path}: only CogVideoX's settings are supported (use_post_quant_conv false, act_fn silu)"
            )
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        values["block_out_channels"] = tuple(values.get("block_out_channels", cls.block_out_channels))
        if "temporal_compression_ratio" in values:
            values["temporal_compression_ratio"] = int(values["temporal_compression_ratio"])
        return cls(**values)


PRESETS: dict[str, CogVideoXVAEConfig] = {
    "cogvideox-5b": CogVideoXVAEConfig(),
    # CPU tests and the demo: the full structure (x8 in space, x4 in time, shortcuts in up blocks 1 and 3).
    # One resnet per up block at widths 8..32: a 1 s 384x672 decode in a few seconds on 2 CPU cores.
    "tiny": CogVideoXVAEConfig(block_out_channels=(8, 16, 16, 32), layers_per_block=0, norm_num_groups=4),
}


def latent_chunks(num_frames: int, frames_per_chunk: int = LATENT_FRAMES_PER_CHUNK) -> list[slice]:
    """diffusers' temporal chunks: the remainder T % frames_per_chunk joins the first chunk."""
    r = num_frames % frames_per_chunk
    n = max(num_frames // frames_per_chunk, 1)
    return [
        slice(0 if i == 0 else frames_per_chunk * i + r, min(frames_per_chunk * (i + 1) + r, num_frames))
        for i in range(n)
    ]


def decoded_frames(num_latent_frames: int, temporal_upsample_levels: int) -> int:
    """Frames one chunk decodes to: each level doubles every frame but a lone first frame of an odd count."""
    n = num_latent_frames
    for _ in range(temporal_upsample_levels):
        n = 2 * n - n % 2
    return n


def time_segments(num_frames: int) -> list[slice]:
    """Frame ranges upsampled separately: an odd count > 1 splits off its first frame (an image)."""
    if num_frames > 1 and num_frames % 2 == 1:
        return [slice(0, 1), slice(1, num_frames)]
    return [slice(0, num_frames)]


def blocks(x: Tensor, grid: tuple[int, ...]) -> Tensor:
    """View x [B, C, T, H, W] as [B, C, t, T/t, h, H/h, w, W/w]: the blocks that upsampling grid fills."""
    t, h, w = grid
    return x.unflatten(4, (w, -1)).unflatten(3, (h, -1)).unflatten(2, (t, -1))


def cells(x: Tensor) -> Tensor:
    """x [B, C, t, h, w] -> [B, C, t, 1, h, 1, w, 1], broadcastable over `blocks` of a finer grid."""
    return x[:, :, :, None, :, None, :, None]


def empty_in_layout(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An empty tensor of `shape` in x's memory layout: NCDHW, or NDHWC (channels_last_3d) as the fast decoder
    runs this module's pieces."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    return x.new_empty(shape)


class CausalConv3d(nn.Module):
    """Conv3d causal in time (past: last chunk's frames or first-frame copies), zero-padded in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.time_pad = kernel_size - 1
        space_pad = kernel_size // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, space_pad, space_pad))

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        """x [B, C, T, H, W] -> [B, C_out, T, H, W]; reads and updates `cache` (None: a lone chunk)."""
        if self.time_pad == 0:
            return self.conv(x)
        padded = self.padded_input(x)
        padded[:, :, self.time_pad :] = x
        return self.forward_padded(padded, cache)

    def padded_input(self, x: Tensor) -> Tensor:
        """An empty [B, C, time_pad + T, H, W] buffer for x: the caller writes x after the first time_pad frames."""
        b, c, t, h, w = x.shape
        return empty_in_layout(x, (b, c, self.time_pad + t, h, w))

    def forward_padded(self, padded: Tensor, cache: ConvCache | None = None) -> Tensor:
        """Fill the past frames of a `padded_input` whose input frames are written, then convolve."""
        past, first = padded[:, :, : self.time_pad], padded[:, :, self.time_pad : self.time_pad + 1]
        past.copy_(cache[self] if cache is not None and self in cache else first.expand_as(past))
        if cache is not None:
            cache[self] = padded[:, :, -self.time_pad :].clone()  # a copy, so the whole chunk can be freed
        return self.conv(padded)


class SpatialNorm3D(nn.Module):
    """GroupNorm with per-pixel scale and shift (1x1x1 convs of the latent, nearest-upsampled to x's grid), then
    the SiLU that follows every use in the decoder. `kernel`: the fused Triton version (see `use_triton_norms`)."""

    def __init__(self, channels: int, latent_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.conv_y = CausalConv3d(latent_channels, channels, kernel_size=1)
        self.conv_b = CausalConv3d(latent_channels, channels, kernel_size=1)
        self.kernel: Callable[..., Tensor] | None = None

    def forward(self, x: Tensor, z: Tensor, out: Tensor) -> Tensor:
        """x [B, C, T, H, W] features, z [B, 16, t, h, w] latent chunk -> `out` [B, C, T, H, W]."""
        # Pointwise convs commute with nearest upsampling: run them on the latent grid, then broadcast the
        # result over x's blocks instead of materialising upsampled copies (diffusers upsamples z first).
        scale, shift = self.conv_y(z), self.conv_b(z)  # [B, C, t, h, w]
        norm = self.norm_layer
        if self.kernel is not None:
            return self.kernel(x, scale, shift, norm.weight, norm.bias, norm.num_groups, norm.eps, out=out)
        out.copy_(norm(x))
        for seg in time_segments(x.shape[2]):  # a lone first frame maps to z's first frame only
            s, b = scale[:, :, seg], shift[:, :, seg]
            blocks(out[:, :, seg], s.shape[2:]).mul_(cells(s)).add_(cells(b))
        return F.silu(out, inplace=True)


def norm_silu_conv(norm: SpatialNorm3D, conv: CausalConv3d, x: Tensor, z: Tensor, cache: ConvCache | None) -> Tensor:
    """conv(silu(norm(x, z))), the norm writing straight into the conv's time-padded input."""
    padded = conv.padded_input(x)
    norm(x, z, out=padded[:, :, conv.time_pad :])
    return conv.forward_padded(padded, cache)


class ResnetBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, latent_channels: int, groups: int):
        super().__init__()
        self.norm1 = SpatialNorm3D(in_channels, latent_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = SpatialNorm3D(out_channels, latent_channels, groups)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, z: Tensor, cache: ConvCache | None) -> Tensor:
        h = norm_silu_conv(self.norm1, self.conv1, x, z, cache)
        h = norm_silu_conv(self.norm2, self.conv2, h, z, cache)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x)


class Upsample3D(nn.Module):
    """Nearest x2 in space (and time if compress_time, bar a lone first frame), then a 3x3 conv per frame."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T, H, W] -> [B, C, T', 2H, 2W], T' = 2T - T % 2 with compress_time, else T."""
        b, c, t, h, w = x.shape
        levels = int(self.compress_time)
        out = empty_in_layout(x, (b, c, decoded_frames(t, levels), 2 * h, 2 * w))
        # Each segment is written in place (no pieces to concatenate); input frames [0, f) fill output
        # frames [0, decoded_frames(f)), as the count rule holds for every prefix of the segments.
        for seg in time_segments(t):
            src = x[:, :, seg]
            dst = out[:, :, decoded_frames(seg.start, levels) : decoded_frames(seg.stop, levels)]
            blocks(dst, src.shape[2:]).copy_(cells(src))
        # The per-frame Conv2d as a (1, 3, 3) Conv3d: same weights, no [B*T, C, H, W] layout round trip.
        return F.conv3d(out, self.conv.weight.unsqueeze(2), self.conv.bias, padding=(0, 1, 1))


class DecoderBlock(nn.Module):
    """ResNet blocks, then (up blocks but the last) an upsampler; also serves as the mid block."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        config: CogVideoXVAEConfig,
        upsample: bool,
        compress_time: bool = False,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, config.latent_channels,
                          config.norm_num_groups)
            for i in range(num_layers)
        )  # fmt: skip
        # A list of one (or none) so that the keys read `upsamplers.0.conv.*` as in diffusers.
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels, compress_time)] if upsample else [])

    def forward(self, x: Tensor, z: Tensor, cache: ConvCache | None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, z, cache)
        for upsampler in self.upsamplers:
            x = upsampler(x)
        return x


class CogVideoXDecoder(nn.Module):
    def __init__(self, config: CogVideoXVAEConfig):
        super().__init__()
        self.config = config
        channels = list(reversed(config.block_out_channels))  # e.g. 512, 256, 256, 128
        self.conv_in = CausalConv3d(config.latent_channels, channels[0])
        self.mid_block = DecoderBlock(channels[0], channels[0], 2, config, upsample=False)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, config,
                upsample=i < len(channels) - 1, compress_time=i < config.temporal_upsample_levels,
            )
            for i in range(len(channels))
        )  # fmt: skip
        self.norm_out = SpatialNorm3D(channels[-1], config.latent_channels, config.norm_num_groups)
        self.conv_out = CausalConv3d(channels[-1], config.out_channels)

    def forward(self, z: Tensor, cache: ConvCache | None = None) -> Tensor:
        """One temporal chunk: z [B, 16, t, h, w] -> [B, 3, decoded_frames(t), 8h, 8w]; `cache` carries on."""
        # 1. latent -> widest features                 [B, C0, t, h, w]
        x = self.conv_in(z, cache)
        # 2. mid block
        x = self.mid_block(x, z, cache)
        # 3. up blocks: x2 in space for all but the last, x2 in time for the first temporal_upsample_levels
        for block in self.up_blocks:
            x = block(x, z, cache)
        # 4. out norm, SiLU, conv to RGB               [B, 3, T', 8h, 8w]
        return norm_silu_conv(self.norm_out, self.conv_out, x, z, cache)

    def use_triton_norms(self, enabled: bool = True) -> None:
        """Run every norm + SiLU through the fused Triton kernel (k4serve.kernels.group_norm), or torch again."""
        kernel = None
        if enabled:
            from k4serve.kernels.group_norm import spatial_norm_silu as kernel  # imports triton: only when asked for
        for module in self.modules():
            if isinstance(module, SpatialNorm3D):
                module.kernel = kernel

    def decode_chunks(self, z: Tensor) -> Iterator[Tensor]:
        """z [B, 16, T, h, w] (already divided by scaling_factor) -> the video [B, 3, F_i, 8h, 8w] of each of
        diffusers' temporal chunks in turn, values about [-1, 1]; see `decode`."""
        cache: ConvCache = {}
        for chunk in latent_chunks(z.shape[2]):
            yield self(z[:, :, chunk], cache)

    def decode(self, z: Tensor) -> Tensor:
        """z [B, 16, T, h, w] (already divided by scaling_factor) -> video [B, 3, F, 8h, 8w] in about [-1, 1],
        F = 4(T - 1) + 1 for odd T (4T for even T), decoded in diffusers' temporal chunks."""
        b, _, t, h, w = z.shape
        levels, up = self.config.temporal_upsample_levels, self.config.spatial_compression
        num_frames = sum(decoded_frames(c.stop - c.start, levels) for c in latent_chunks(t))
        video = z.new_empty(b, self.config.out_channels, num_frames, up * h, up * w)  # one copy of the video
        start = 0
        for frames in self.decode_chunks(z):
            video[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
        return video


VAE_LAYOUT = (
    "expected a diffusers AutoencoderKLCogVideoX folder (CogVideoX-5b's `vae/`): config.json plus "
    "diffusion_pytorch_model.safetensors, or diffusion_pytorch_model.safetensors.index.json and its shards"
)
UNUSED_PREFIXES = ("encoder.", "quant_conv.")  # the encoder half of the VAE: never read


def empty_decoder(config: CogVideoXVAEConfig, device: str | torch.device, dtype: torch.dtype) -> CogVideoXDecoder:
    """The decoder with uninitialised parameters of `dtype`, allocated directly on `device`."""
    with torch.device("meta"):
        decoder = CogVideoXDecoder(config).to(dtype)
    return decoder.to_empty(device=device)


def load_cogvideox_decoder(
    vae_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[CogVideoXDecoder, CogVideoXVAEConfig]:
    """The decoder of a CogVideoX `vae/` folder, strictly loaded (encoder skipped), and its config."""
    config_path, files = diffusers_folder(vae_dir, "CogVideoX VAE", VAE_LAYOUT)
    config = CogVideoXVAEConfig.from_json(config_path)
    decoder = empty_decoder(config, device, dtype)
    # Under a `decoder.` prefix so that errors name the checkpoint's own keys.
    state_dict = read_safetensors(files, skip=lambda key: key.startswith(UNUSED_PREFIXES))
    what = f"CogVideoX VAE in {vae_dir}"
    load_state_dict_strict(nn.ModuleDict({"decoder": decoder}), state_dict, what)
    return decoder.eval().requires_grad_(False), config


def build_cogvideox_decoder(
    preset: str | CogVideoXVAEConfig = "cogvideox-5b",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[CogVideoXDecoder, CogVideoXVAEConfig]:
    """A decoder with seeded random weights, built on `device`, and its config (for tests and benchmarks)."""
    config = PRESETS[preset] if isinstance(preset, str) else preset
    decoder = init_random_weights(empty_decoder(config, device, dtype), seed)
    return decoder.eval().requires_grad_(False), config
