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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from k4serve.kernels import on_device

CHUNK = 8192  # elements per statistics program
STATS_BLOCK = 1024
APPLY_BLOCK = 1024


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


def group_norm_stats(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """x [B, C, ...] contiguous -> (mean, rstd) [B * groups] in fp32, biased variance as nn.GroupNorm."""
    if not x.is_contiguous() or x.shape[1] % groups:
        raise ValueError(f"x must be contiguous [B, C, ...] with C divisible by {groups}; got {tuple(x.shape)}")
    rows = x.shape[0] * groups
    group_numel = x.numel() // rows
    chunks = triton.cdiv(group_numel, CHUNK)
    means = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    with on_device(x.device):
        _chunk_moments_kernel[(rows, chunks)](x, means, m2s, group_numel, CHUNK=CHUNK, BLOCK=STATS_BLOCK, num_warps=4)
    # Chan et al.: M2 = Σ M2_i + Σ n_i (mean_i - mean)²; float64 so the merge itself adds no error.
    counts = torch.full((chunks,), float(CHUNK), device=x.device, dtype=torch.float64)
    counts[-1] = group_numel - CHUNK * (chunks - 1)
    means, m2s = means.double(), m2s.double()
    mean = (means * counts).sum(1) / group_numel
    m2 = m2s.sum(1) + ((means - mean[:, None]) ** 2 * counts).sum(1)
    return mean.float(), (m2 / group_numel + eps).rsqrt().float()


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


def time_upsampling(frames: int, latent_frames: int) -> tuple[int, int]:
    """(lone_first, factor): frame f comes from latent frame f // factor, or with lone_first = 1 from 0 for
    f = 0 and 1 + (f - 1) // factor after (an odd frame count > 1 keeps its first frame apart)."""
    lone_first = int(frames > 1 and frames % 2 == 1)
    factor, remainder = divmod(frames - lone_first, max(latent_frames - lone_first, 1))
    if remainder or factor < 1:
        raise ValueError(f"{frames} frames are not an upsampling of {latent_frames} latent frames")
    return lone_first, factor


def spatial_norm_silu(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, groups: int,
                      eps: float, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """silu((GroupNorm(x) · weight + bias) · up(scale) + up(shift)) -> `out` (or a new tensor) [B, C, T, H, W].

    x contiguous [B, C, T, H, W]; scale, shift contiguous [B, C, t, h, w] with H, W multiples of h, w;
    `out` may be a frame slice of a larger contiguous [B, C, T', H, W] buffer (a conv's padded input).
    """
    b, c, t, h, w = x.shape
    t_lat, h_lat, w_lat = scale.shape[2:]
    out = torch.empty_like(x) if out is None else out
    expected_strides = (c * out.stride(1), out.stride(1), h * w, w, 1)
    if out.shape != x.shape or out.stride() != expected_strides or out.stride(1) < t * h * w:
        raise ValueError(f"out must be a frame slice of a contiguous buffer shaped like x {tuple(x.shape)}")
    if scale.shape != (b, c, t_lat, h_lat, w_lat) or shift.shape != scale.shape or h % h_lat or w % w_lat:
        raise ValueError(f"scale and shift {tuple(scale.shape)} must be [B, C, t, h, w] dividing x {tuple(x.shape)}")
    lone_first, frame_factor = time_upsampling(t, t_lat)
    mean, rstd = group_norm_stats(x, groups, eps)
    with on_device(x.device):
        _spatial_norm_silu_kernel[(b * c * t, triton.cdiv(h * w, APPLY_BLOCK))](
            x, out, mean, rstd, weight, bias, scale.contiguous(), shift.contiguous(),
            c, t, h * w, w, c // groups, out.stride(1),
            t_lat, h_lat, w_lat, frame_factor, lone_first, h // h_lat, w // w_lat,
            BLOCK=APPLY_BLOCK, num_warps=4,
        )  # fmt: skip
    return out


def spatial_norm_silu_reference(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Tensor,
                                groups: int, eps: float) -> Tensor:  # fmt: skip
    """float64, written as diffusers' `CogVideoXSpatialNorm3D` + SiLU: the lone first frame of an odd T > 1 is
    interpolated from latent frame 0 alone, the rest by nearest interpolation of the remaining latent frames."""
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
