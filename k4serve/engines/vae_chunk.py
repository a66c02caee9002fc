"""The CogVideoX decoder as one temporal chunk step with its causal-conv cache as explicit tensors.

`CogVideoXDecoder.decode_chunks` carries each causal conv's last two input frames from one chunk to the next in a
dict keyed by module, and writes into preallocated buffers in place: right for eager memory, but a traced graph
needs plain inputs and outputs. `VaeChunkStep` reads the same decoder modules (same weights, same arithmetic in the
same order) and computes one chunk out of place:

    (z_chunk [B, 16, t, h, w], past_0, ..., past_{n-1}) -> (video [B, 3, F, 8h, 8w], next_0, ..., next_{n-1})

where past_i is the cached input of the i-th cached conv in module order (`cached_convs`). Without the past
inputs (`with_cache=False`) it is a video's first chunk, whose convs pad with first-frame copies; a lone chunk
(an image) needs no cache out either (`emit_cache=False`). An exported
runtime (ONNX, TensorRT, AOTInductor) then loops with `ChunkedDecoder`, exactly as diffusers does: the first
chunk of 3 latent frames (1 for an image) without cache, then 2-frame chunks with the cache of the previous step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k4serve.models.cogvideox_vae import (
    CausalConv3d,
    CogVideoXDecoder,
    DecoderBlock,
    ResnetBlock3D,
    SpatialNorm3D,
    Upsample3D,
    cells,
    decoded_frames,
    latent_chunks,
    time_segments,
)

Cache = dict[nn.Module, Tensor]


def cached_convs(decoder: CogVideoXDecoder) -> list[tuple[str, CausalConv3d]]:
    """(module path, conv) of every conv that carries frames across chunks, in module (= execution) order."""
    return [(name, m) for name, m in decoder.named_modules() if isinstance(m, CausalConv3d) and m.time_pad > 0]


def _nearest(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """x [B, C, t, h, w] nearest-repeated to `shape` [B, C, T, H, W] (integer factors): the eager `cells` view,
    expanded over the `blocks` of the finer grid, out of place."""
    b, c, t, h, w = x.shape
    blocks = (b, c, t, shape[2] // t, h, shape[3] // h, w, shape[4] // w)
    return cells(x).expand(blocks).reshape(shape)


def _group_norm(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """nn.GroupNorm with the group statistics reduced one axis at a time (W, then H, then channels x frames).

    The same values as `norm(x)` up to fp32 rounding, but no single sum runs over a whole group: at 384x672 a
    group of the widest level holds 9.3 M elements, and onnxruntime's CPU reductions add them one after the
    other (1e-4 relative error in the decoded video, against 6e-7 for torch's); reduced per axis, no sum has
    more than ~700 terms. TensorRT and Inductor reduce in trees either way.
    """
    b, c, t, h, w = x.shape
    groups = x.reshape(b, norm.num_groups, c // norm.num_groups * t, h, w)
    mean = groups.mean(dim=-1, keepdim=True).mean(dim=-2, keepdim=True).mean(dim=-3, keepdim=True)
    centered = groups - mean
    var = (centered * centered).mean(dim=-1, keepdim=True).mean(dim=-2, keepdim=True).mean(dim=-3, keepdim=True)
    y = (centered * torch.rsqrt(var + norm.eps)).reshape(x.shape)
    return y * norm.weight.view(1, c, 1, 1, 1) + norm.bias.view(1, c, 1, 1, 1)


class VaeChunkStep(nn.Module):
    """One temporal chunk of a `CogVideoXDecoder`, out of place, the cache as inputs and outputs (module doc)."""

    def __init__(self, decoder: CogVideoXDecoder, with_cache: bool, emit_cache: bool = True):
        super().__init__()
        self.decoder = decoder
        self.with_cache = with_cache
        self.emit_cache = emit_cache
        self.convs = [conv for _, conv in cached_convs(decoder)]

    def forward(self, z: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        """z [B, 16, t, h, w] (divided by scaling_factor), past caches -> (video [B, 3, F, 8h, 8w], *next caches)."""
        if len(past) != (len(self.convs) if self.with_cache else 0):
            raise ValueError(f"expected {len(self.convs) if self.with_cache else 0} cache tensors, got {len(past)}")
        cache: Cache = dict(zip(self.convs, past, strict=False))
        d = self.decoder
        # 1. latent -> widest features; 2. mid block; 3. up blocks; 4. out norm, SiLU, conv to RGB (as the decoder)
        x = self._conv(d.conv_in, z, cache)
        x = self._block(d.mid_block, x, z, cache)
        for block in d.up_blocks:
            x = self._block(block, x, z, cache)
        video = self._conv(d.conv_out, self._norm(d.norm_out, x, z), cache)
        return (video, *(cache[conv] for conv in self.convs)) if self.emit_cache else (video,)

    @staticmethod
    def _conv(conv: CausalConv3d, x: Tensor, cache: Cache) -> Tensor:
        """The causal conv on [past ; x]; its last time_pad input frames replace its cache entry."""
        if conv.time_pad == 0:
            return conv.conv(x)
        past = cache.get(conv)
        if past is None:  # a video's first chunk: the past is copies of its first frame
            past = x[:, :, :1].expand(-1, -1, conv.time_pad, -1, -1)
        padded = torch.cat([past, x], dim=2)
        cache[conv] = padded[:, :, -conv.time_pad :]
        return conv.conv(padded)

    @staticmethod
    def _norm(norm: SpatialNorm3D, x: Tensor, z: Tensor) -> Tensor:
        """silu(GroupNorm(x) * scale + shift), scale and shift from z, a lone first frame mapped to z's first."""
        scale, shift = norm.conv_y(z), norm.conv_b(z)
        y = _group_norm(norm.norm_layer, x)
        parts = []
        for seg in time_segments(x.shape[2]):
            s, b, part = scale[:, :, seg], shift[:, :, seg], y[:, :, seg]
            parts.append(part * _nearest(s, part.shape) + _nearest(b, part.shape))
        return F.silu(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])

    def _resnet(self, resnet: ResnetBlock3D, x: Tensor, z: Tensor, cache: Cache) -> Tensor:
        h = self._conv(resnet.conv1, self._norm(resnet.norm1, x, z), cache)
        h = self._conv(resnet.conv2, self._norm(resnet.norm2, h, z), cache)
        return h + (x if resnet.conv_shortcut is None else resnet.conv_shortcut(x))

    @staticmethod
    def _upsample(up: Upsample3D, x: Tensor) -> Tensor:
        """Nearest x2 in space (and in time bar a lone first frame), then the per-frame 3x3 conv."""
        levels = int(up.compress_time)
        parts = []
        for seg in time_segments(x.shape[2]):
            b, c, _, h, w = x.shape
            frames = decoded_frames(seg.stop, levels) - decoded_frames(seg.start, levels)
            parts.append(_nearest(x[:, :, seg], (b, c, frames, 2 * h, 2 * w)))
        out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        return F.conv3d(out, up.conv.weight.unsqueeze(2), up.conv.bias, padding=(0, 1, 1))

    def _block(self, block: DecoderBlock, x: Tensor, z: Tensor, cache: Cache) -> Tensor:
        for resnet in block.resnets:
            x = self._resnet(resnet, x, z, cache)
        for upsampler in block.upsamplers:
            x = self._upsample(upsampler, x)
        return x


# A chunk step: (z_chunk, *past caches) -> (video chunk, *next caches), or the video chunk alone; no past for a
# video's first chunk.
ChunkStepFn = Callable[..., tuple[Tensor, ...]]


class ChunkedDecoder:
    """The decoder's `decode_chunks` over any chunk step (an exported graph, or `VaeChunkStep` itself)."""

    def __init__(self, step: ChunkStepFn):
        self.step = step

    def decode_chunks(self, z: Tensor) -> Iterator[Tensor]:
        """z [B, 16, T, h, w] (divided by scaling_factor) -> video [B, 3, F_i, 8h, 8w] of each diffusers chunk."""
        past: tuple[Tensor, ...] = ()
        for chunk in latent_chunks(z.shape[2]):
            out = self.step(z[:, :, chunk].contiguous(), *past)
            video, *caches = (out,) if isinstance(out, Tensor) else out  # an image's step hands no cache on
            past = tuple(caches)
            yield video
