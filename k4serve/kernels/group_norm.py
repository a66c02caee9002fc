"""GroupNorm + CogVideoX spatial modulation + SiLU for the VAE decoder: one read for the statistics, one
read and one write for the output.

Every norm of the CogVideoX decoder is followed by a SiLU and a causal conv:
  y = silu((GroupNorm(x) · weight + bias) · scale + shift)
with scale and shift [B, C, t, h, w] on the latent grid, nearest-upsampled to x's [T, H, W] (a lone first frame
of an odd T > 1 maps to latent frame 0 only, as diffusers' `CogVideoXSpatialNorm3D` splits it off).

Why a kernel: eager torch spends ~40 % of the full-size decode in GroupNorm, because its statistics kernel
gives each of the B·32 groups (millions of elements each) one thread block, so a quarter of the H100 works;
the modulation, SiLU and the conv's time padding then make four more passes over the features. Here:
  1. statistics: each group is split in chunks, one program per chunk (sums shifted by the chunk's first
     element, so fp32 keeps the variance of large-mean features), merged with Chan's formula in float64;
  2. apply: normalize, affine, modulation and SiLU in fp32, stored once into the caller's buffer, e.g. the
     next causal conv's time-padded input, so the conv needs no concatenation.

Two memory layouts of x [B, C, T, H, W], chosen by x's strides: NCDHW (contiguous: the eager decoder) and NDHWC
(`torch.channels_last_3d`: the fast decoder, where cuDNN's 3-D convolutions are fastest). In NDHWC a program
works on a [pixels, channels] tile whose rows are contiguous channel vectors, and the statistics are partial
moments per (channel, chunk of pixels), merged per group by the same float64 kernel as NCDHW's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from k4serve.kernels import on_device

CHUNK = 8192  # NCDHW: elements per statistics program
STATS_BLOCK = 1024
APPLY_BLOCK = 1024
TILE = 4096  # NDHWC: elements of one [pixels, channels] tile
TILE_WARPS = 4  # warps per NDHWC tile program (statistics and apply)
MAX_TILE_CHANNELS = 256
# NDHWC statistics: about this many programs per tensor (a few waves on an H200's 132 SMs), each over whole tiles;
# more would only lengthen the merge, whose one program per group reads every (channel, chunk) partial.
STATS_PROGRAMS = 2048
MERGE_BLOCK = 2048
CHANNELS_LAST = torch.channels_last_3d


def is_channels_last(x: Tensor) -> bool:
    """x [B, C, T, H, W] is stored NDHWC (`torch.channels_last_3d`) and not also plain contiguous."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=CHANNELS_LAST)


def channel_tile(channels: int) -> tuple[int, int]:
    """(pixels, channels) of an NDHWC tile: whole channel vectors up to MAX_TILE_CHANNELS, TILE elements."""
    block_c = min(triton.next_power_of_2(channels), MAX_TILE_CHANNELS)
    return TILE // block_c, block_c


@triton.jit
def _chunk_moments_kernel(x_ptr, mean_ptr, m2_ptr, group_numel, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    base = x_ptr + group.to(tl.int64) * group_numel + start
    count = tl.minimum(group_numel - start, CHUNK)
    pivot = tl.load(base).to(tl.float32)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        mask = idx < count
        d = tl.where(mask, tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) - pivot, 0.0)
        s1 += d
        s2 += d * d
    t1 = tl.sum(s1, 0)
    t2 = tl.sum(s2, 0)
    out = group * tl.num_programs(1) + chunk
    tl.store(mean_ptr + out, pivot + t1 / count)
    tl.store(m2_ptr + out, t2 - t1 * t1 / count)


@triton.jit
def _add_rounded(x, y):
    """x + y in fp32, rounded to x's dtype: torch's add of two tensors (a conv's bias add, a resnet's add_)."""
    return (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)


@triton.jit
def _channels_last_moments_kernel(x_ptr, residual_ptr, conv_bias_ptr, mean_ptr, m2_ptr, C, pixels, chunk_pixels,
                                  x_batch_stride, residual_batch_stride, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                                  RESIDUAL: tl.constexpr, CONV_BIAS: tl.constexpr):  # fmt: skip
    chunk = tl.program_id(0)  # of pixels (t, h, w); axis 0 has no 65535 limit
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    cmask = channels < C
    start = chunk * chunk_pixels
    count = tl.minimum(pixels - start, chunk_pixels)
    base = x_ptr + b.to(tl.int64) * x_batch_stride
    residual_base = residual_ptr + b.to(tl.int64) * residual_batch_stride
    # per channel, sums shifted by the chunk's first pixel (as NCDHW's per-group chunk)
    pivot_offsets = start.to(tl.int64) * C + channels
    pivot = tl.load(base + pivot_offsets, mask=cmask, other=0.0)
    if CONV_BIAS:
        conv_bias = tl.load(conv_bias_ptr + channels, mask=cmask, other=0.0)
        pivot = _add_rounded(pivot, conv_bias)
    if RESIDUAL:  # x + residual rounded to x's dtype, as torch's add_ rounds it
        pivot = _add_rounded(pivot, tl.load(residual_base + pivot_offsets, mask=cmask))
    pivot = pivot.to(tl.float32)
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for offset in range(0, chunk_pixels, BLOCK_P):
        p = offset + tl.arange(0, BLOCK_P)
        mask = (p < count)[:, None] & cmask[None, :]
        offsets = (start + p).to(tl.int64)[:, None] * C + channels[None, :]
        x = tl.load(base + offsets, mask=mask, other=0.0)
        if CONV_BIAS:
            x = _add_rounded(x, conv_bias[None, :])
        if RESIDUAL:
            x = _add_rounded(x, tl.load(residual_base + offsets, mask=mask, other=0.0))
            tl.store(base + offsets, x, mask=mask)
        d = tl.where(mask, x.to(tl.float32) - pivot[None, :], 0.0)
        s1 += d
        s2 += d * d
    t1 = tl.sum(s1, 0)
    t2 = tl.sum(s2, 0)
    out = (b * C + channels) * tl.num_programs(0) + chunk  # [B, C, chunks]: a group's partials are adjacent
    tl.store(mean_ptr + out, pivot + t1 / count, mask=cmask)
    tl.store(m2_ptr + out, t2 - t1 * t1 / count, mask=cmask)


@triton.jit
def _merge_moments_kernel(mean_ptr, m2_ptr, out_mean_ptr, out_rstd_ptr, partials, series, full_count, last_count,
                          eps, BLOCK: tl.constexpr):  # fmt: skip
    # Chan et al. over one group's partials, in float64: mean = Σ n_i mean_i / N, M2 = Σ M2_i + Σ n_i (mean_i - mean)²;
    # partial i covers full_count elements, or last_count for the last chunk of its series (i % series).
    row = tl.program_id(0)
    base = row.to(tl.int64) * partials
    total = tl.zeros([BLOCK], dtype=tl.float64)
    weighted = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, partials, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < partials
        n = tl.where(mask, tl.where(idx % series == series - 1, last_count, full_count), 0).to(tl.float64)
        total += n
        weighted += n * tl.load(mean_ptr + base + idx, mask=mask, other=0.0).to(tl.float64)
    count = tl.sum(total, 0)
    mean = tl.sum(weighted, 0) / count
    spread = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, partials, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < partials
        n = tl.where(mask, tl.where(idx % series == series - 1, last_count, full_count), 0).to(tl.float64)
        d = tl.load(mean_ptr + base + idx, mask=mask, other=0.0).to(tl.float64) - mean
        spread += tl.load(m2_ptr + base + idx, mask=mask, other=0.0).to(tl.float64) + n * d * d
    var = tl.sum(spread, 0) / count
    tl.store(out_mean_ptr + row, mean.to(tl.float32))
    tl.store(out_rstd_ptr + row, (1.0 / tl.sqrt(var + eps)).to(tl.float32))


def group_norm_stats(x: Tensor, groups: int, eps: float, residual: Tensor | None = None,
                     conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """x [B, C, ...] contiguous, or [B, C, T, H, W] channels-last -> (mean, rstd) [B * groups] in fp32, biased
    variance as nn.GroupNorm. Channels-last x may be a conv's output before its bias add: `conv_bias` [C] is
    added as it is read (rounded to x's dtype, as the add it replaces). `residual` (channels-last, like x): first
    x (+ conv_bias) += residual in place (rounded to x's dtype as torch's add_), then the statistics of the sum, in
    the same pass (a resnet's output and the next norm); without one, x itself stays unbiased."""
    b, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"x [B, C, ...] needs C divisible by {groups}; got {tuple(x.shape)}")
    if residual is not None and (
        not is_channels_last(x) or residual.shape != x.shape or residual.stride() != x.stride()
    ):  # fmt: skip
        raise ValueError(f"residual {tuple(residual.shape)} must be channels-last like x {tuple(x.shape)}")
    _check_conv_bias(conv_bias, x)
    if is_channels_last(x):
        pixels = x[0, 0].numel()
        block_p, block_c = channel_tile(c)
        channel_blocks = triton.cdiv(c, block_c)
        programs = max(STATS_PROGRAMS // (channel_blocks * b), 1)  # per (channel block, sample)
        full = triton.cdiv(triton.cdiv(pixels, block_p), programs) * block_p  # pixels per (channel, chunk) partial
        series = triton.cdiv(pixels, full)
        means = torch.empty(b * c, series, device=x.device, dtype=torch.float32)
        m2s = torch.empty_like(means)
        with on_device(x.device):
            _channels_last_moments_kernel[(series, channel_blocks, b)](
                x, x if residual is None else residual, x if conv_bias is None else conv_bias, means, m2s, c, pixels,
                full, x.stride(0), x.stride(0), BLOCK_P=block_p, BLOCK_C=block_c, RESIDUAL=residual is not None,
                CONV_BIAS=conv_bias is not None, num_warps=TILE_WARPS,
            )  # fmt: skip
        last = pixels - full * (series - 1)
    elif x.is_contiguous():
        group_numel = x.numel() // (b * groups)
        full, series = CHUNK, triton.cdiv(group_numel, CHUNK)
        means = torch.empty(b * groups, series, device=x.device, dtype=torch.float32)
        m2s = torch.empty_like(means)
        with on_device(x.device):
            _chunk_moments_kernel[(b * groups, series)](
                x, means, m2s, group_numel, CHUNK=CHUNK, BLOCK=STATS_BLOCK, num_warps=4
            )
        last = group_numel - full * (series - 1)
    else:
        raise ValueError(f"x {tuple(x.shape)} must be contiguous (NCDHW) or channels-last (NDHWC)")
    mean = torch.empty(b * groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    with on_device(x.device):
        _merge_moments_kernel[(b * groups,)](
            means, m2s, mean, rstd, means.numel() // (b * groups), series, full, last, eps, BLOCK=MERGE_BLOCK,
            num_warps=8,
        )  # fmt: skip
    return mean, rstd


@triton.jit
def _spatial_norm_silu_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                              C, T, HW, W, channels_per_group, y_channel_stride,
                              t_lat, h_lat, w_lat, frame_factor, lone_first, height_factor, width_factor,
                              BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)  # (b, c, f) of x [B, C, T, H, W]
    f = row % T
    bc = row // T
    c = bc % C
    group = bc // channels_per_group  # = b · groups + c // channels_per_group
    # normalize + affine folded into one multiply-add per element: x · a + beta
    a = tl.load(rstd_ptr + group) * tl.load(w_ptr + c).to(tl.float32)
    beta = tl.load(b_ptr + c).to(tl.float32) - tl.load(mean_ptr + group) * a
    # the latent frame this frame was upsampled from (lone_first: frame 0 came from latent frame 0 alone)
    latent_frame = tl.where(f < lone_first, 0, lone_first + (f - lone_first) // frame_factor)

    pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pixels < HW
    x = tl.load(x_ptr + row.to(tl.int64) * HW + pixels, mask=mask, other=0.0).to(tl.float32)
    latent = (bc * t_lat + latent_frame) * (h_lat * w_lat) + (pixels // W) // height_factor * w_lat
    latent += (pixels % W) // width_factor
    scale = tl.load(scale_ptr + latent, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + latent, mask=mask, other=0.0).to(tl.float32)
    v = (x * a + beta) * scale + shift
    y = v / (1.0 + tl.exp(-v))  # SiLU
    out = y_ptr + bc.to(tl.int64) * y_channel_stride + f * HW + pixels
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channels_last_norm_silu_kernel(x_ptr, y_ptr, tail_ptr, conv_bias_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,
                                    scale_ptr, shift_ptr, C, T, HW, W, pixels, channels_per_group, groups,
                                    x_batch_stride, y_batch_stride, tail_batch_stride, tail_frames,
                                    t_lat, h_lat, w_lat, frame_factor, lone_first, height_factor, width_factor,
                                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                                    HAS_TAIL: tl.constexpr, CONV_BIAS: tl.constexpr):  # fmt: skip
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixel (f, y, x) of one sample
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    cmask = channels < C
    mask = (p < pixels)[:, None] & cmask[None, :]
    # normalize + affine folded into x · a + beta, per channel
    group = b * groups + channels // channels_per_group
    a = tl.load(rstd_ptr + group, mask=cmask, other=0.0) * tl.load(w_ptr + channels, mask=cmask).to(tl.float32)
    beta = tl.load(b_ptr + channels, mask=cmask).to(tl.float32) - tl.load(mean_ptr + group, mask=cmask) * a
    # the latent cell each pixel was upsampled from (lone_first: frame 0 came from latent frame 0 alone)
    f = p // HW
    in_frame = p % HW
    latent_frame = tl.where(f < lone_first, 0, lone_first + (f - lone_first) // frame_factor)
    latent = (latent_frame * h_lat + (in_frame // W) // height_factor) * w_lat + (in_frame % W) // width_factor
    latent_offsets = (b * t_lat * h_lat * w_lat + latent).to(tl.int64)[:, None] * C + channels[None, :]
    scale = tl.load(scale_ptr + latent_offsets, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + latent_offsets, mask=mask, other=0.0).to(tl.float32)

    offsets = p.to(tl.int64)[:, None] * C + channels[None, :]
    x = tl.load(x_ptr + b.to(tl.int64) * x_batch_stride + offsets, mask=mask, other=0.0)
    if CONV_BIAS:
        x = _add_rounded(x, tl.load(conv_bias_ptr + channels, mask=cmask, other=0.0)[None, :])
    x = x.to(tl.float32)
    v = (x * a[None, :] + beta[None, :]) * scale + shift
    y = (v / (1.0 + tl.exp(-v))).to(y_ptr.dtype.element_ty)  # SiLU
    tl.store(y_ptr + b.to(tl.int64) * y_batch_stride + offsets, y, mask=mask)
    if HAS_TAIL:  # the last tail_frames frames again: the next chunk's past frames of the conv this feeds
        tail_p = p - (T - tail_frames) * HW
        tail_mask = mask & (tail_p >= 0)[:, None]
        tail_offsets = tl.maximum(tail_p, 0).to(tl.int64)[:, None] * C + channels[None, :]
        tl.store(tail_ptr + b.to(tl.int64) * tail_batch_stride + tail_offsets, y, mask=tail_mask)


def time_upsampling(frames: int, latent_frames: int) -> tuple[int, int]:
    """(lone_first, factor): frame f comes from latent frame f // factor, or with lone_first = 1 from 0 for
    f = 0 and 1 + (f - 1) // factor after (an odd frame count > 1 keeps its first frame apart)."""
    lone_first = int(frames > 1 and frames % 2 == 1)
    factor, remainder = divmod(frames - lone_first, max(latent_frames - lone_first, 1))
    if remainder or factor < 1:
        raise ValueError(f"{frames} frames are not an upsampling of {latent_frames} latent frames")
    return lone_first, factor


def _frame_slice_strides(x: Tensor, batch_stride: int) -> tuple[int, ...]:
    """The strides of a frame slice [B, C, T, H, W] of a larger [B, C, T', H, W] buffer in x's layout."""
    c, t, h, w = x.shape[1:]
    if is_channels_last(x):
        return batch_stride, 1, h * w * c, w * c, c
    return batch_stride, batch_stride // c, h * w, w, 1


def _check_conv_bias(conv_bias: Tensor | None, x: Tensor) -> None:
    if conv_bias is not None and (not is_channels_last(x) or conv_bias.shape != (x.shape[1],)):
        raise ValueError(f"conv_bias {tuple(conv_bias.shape)} must be [C] of a channels-last x {tuple(x.shape)}")


def _check_frame_slice(name: str, buffer: Tensor, x: Tensor, frames: int) -> None:
    """`buffer` must be `frames` frames of x's [B, C, ·, H, W] stored in x's layout inside a larger buffer."""
    b, c, _, h, w = x.shape
    shape = (b, c, frames, h, w)
    minimum = c * frames * h * w
    stride = buffer.stride(0)
    if buffer.shape != shape or stride < minimum or stride % c or buffer.stride() != _frame_slice_strides(x, stride):
        layout = "channels-last" if is_channels_last(x) else "contiguous"
        raise ValueError(f"{name} must be a frame slice {list(shape)} of a {layout} buffer, like x")


def spatial_norm_silu(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, groups: int,
                      eps: float, out: Tensor | None = None, tail: Tensor | None = None,
                      stats: tuple[Tensor, Tensor] | None = None,
                      conv_bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """silu((GroupNorm(x) · weight + bias) · up(scale) + up(shift)) -> `out` (or a new tensor) [B, C, T, H, W].

    x [B, C, T, H, W] contiguous or channels-last; scale, shift [B, C, t, h, w] with H, W multiples of h, w;
    `out` may be a frame slice of a larger buffer in x's layout (a conv's time-padded input). `tail`
    (channels-last only): a [B, C, k, H, W] buffer that also receives the last k output frames. `stats`: x's
    (mean, rstd) from `group_norm_stats(x, groups, eps, conv_bias=conv_bias)` when they are already computed.
    `conv_bias` [C] (channels-last only): x is a conv's output before its bias add, which this adds as it reads x.
    """
    b, c, t, h, w = x.shape
    t_lat, h_lat, w_lat = scale.shape[2:]
    channels_last = is_channels_last(x)
    out = torch.empty_like(x) if out is None else out
    _check_frame_slice("out", out, x, t)
    if tail is not None:
        if not channels_last or tail.shape[2] > t:
            raise ValueError(f"tail is for channels-last x with at least its {tail.shape[2]} frames")
        _check_frame_slice("tail", tail, x, tail.shape[2])
    if scale.shape != (b, c, t_lat, h_lat, w_lat) or shift.shape != scale.shape or h % h_lat or w % w_lat:
        raise ValueError(f"scale and shift {tuple(scale.shape)} must be [B, C, t, h, w] dividing x {tuple(x.shape)}")
    _check_conv_bias(conv_bias, x)
    lone_first, frame_factor = time_upsampling(t, t_lat)
    latent_grid = (t_lat, h_lat, w_lat, frame_factor, lone_first, h // h_lat, w // w_lat)
    mean, rstd = group_norm_stats(x, groups, eps, conv_bias=conv_bias) if stats is None else stats
    if mean.shape != (b * groups,) or rstd.shape != mean.shape:
        raise ValueError(f"stats must be (mean, rstd) of {b} x {groups} groups, got {tuple(mean.shape)}")
    with on_device(x.device):
        if channels_last:
            block_p, block_c = channel_tile(c)
            scale, shift = (m.contiguous(memory_format=CHANNELS_LAST) for m in (scale, shift))
            _channels_last_norm_silu_kernel[(triton.cdiv(t * h * w, block_p), triton.cdiv(c, block_c), b)](
                x, out, tail, x if conv_bias is None else conv_bias, mean, rstd, weight, bias, scale, shift,
                c, t, h * w, w, t * h * w, c // groups, groups,
                x.stride(0), out.stride(0), 0 if tail is None else tail.stride(0), 0 if tail is None else tail.shape[2],
                *latent_grid, BLOCK_P=block_p, BLOCK_C=block_c, HAS_TAIL=tail is not None,
                CONV_BIAS=conv_bias is not None, num_warps=TILE_WARPS,
            )  # fmt: skip
        else:
            _spatial_norm_silu_kernel[(b * c * t, triton.cdiv(h * w, APPLY_BLOCK))](
                x, out, mean, rstd, weight, bias, scale.contiguous(), shift.contiguous(),
                c, t, h * w, w, c // groups, out.stride(1), *latent_grid, BLOCK=APPLY_BLOCK, num_warps=4,
            )  # fmt: skip
    return out


def spatial_norm_silu_reference(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Tensor,
                                groups: int, eps: float) -> Tensor:  # fmt: skip
    """float64, written as diffusers' `CogVideoXSpatialNorm3D` + SiLU: the lone first frame of an odd T > 1 is
    interpolated from latent frame 0 alone, the rest by nearest interpolation of the remaining latent frames.
    Layout-free: the same reference for the contiguous and the channels-last kernels."""
    x, scale, shift = x.double(), scale.double(), shift.double()
    t, hw = x.shape[2], x.shape[3:]
    # (frames of x, latent frames they come from)
    pieces = (
        [((1, *hw), slice(0, 1)), ((t - 1, *hw), slice(1, None))] if t > 1 and t % 2 else [(x.shape[2:], slice(None))]
    )
    scale, shift = (
        torch.cat([F.interpolate(m[:, :, s], size=size) for size, s in pieces], dim=2) for m in (scale, shift)
    )
    normed = F.group_norm(x, groups, weight.double(), bias.double(), eps)
    return F.silu(normed * scale + shift)
