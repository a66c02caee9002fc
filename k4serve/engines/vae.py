"""The fast CogVideoX VAE decoder: the reference module's weights in channels-last memory, fused NDHWC norms, the
causal convs' past frames carried without copying their inputs, one CUDA graph per chunk shape.

`FastVAEDecoder(decoder)` takes a `CogVideoXDecoder` over (its conv weights are stored channels-last in place:
same values, same names; the module's own forward still runs on them) and decodes with the same contract as
`CogVideoXDecoder.decode_chunks` and `decode`, chunk for chunk in diffusers' temporal chunks. Why channels-last:
on an H200, cuDNN's bf16 conv3d at the decoder's widest shapes runs 746-785 TFLOP/s with NDHWC operands against
505-648 with NCDHW ones, and the NCDHW path adds layout transposes around each conv.

The upsamplers convolve before doubling time (a frame and its copy give the same output). Per causal 3x3x3 conv
of a chunk of T frames (the reference: `CausalConv3d`, `norm_silu_conv`):
  1. a time-padded input [B, C, 2 + T, H, W] (NDHWC) from the allocator (the CUDA graph's pool);
  2. its first 2 frames: copies of frame 0 at the start of a video, else this conv's persistent `past` buffer;
  3. the fused norm + SiLU writes frames 2.. and stores its last 2 frames into `past` for the next chunk;
  4. cuDNN's conv3d, without its bias: the next pass over the output adds it as it reads it (a resnet's first conv:
     both passes of the next norm; its second: the pass that adds the skip connection, inside the next norm's
     statistics where one follows). Elsewhere `kernels/conv_bias.py` adds it (torch's broadcast add is slow).
     `convs="cudnn"` runs the cuDNN frontend's fastest plan per shape instead (`kernels/library_conv.py`): 4.9 %
     off a 12 s decode on an H100, for a plan search of minutes at the first decode on a machine; the choices
     are recorded in the cache folder, so later processes build only the chosen plans (benchmarks/RESULTS.md).
The reference instead copies the past frames in and clones the cache out; only step 2's copy is left here.
`past` holds 2 frames of every causal conv's input (by count 2 x 524 M values, 2.1 GB at 384x672 in bf16; the
eager decode holds the same cache while it runs): one flat buffer per conv, grown to the largest video seen and
shared by every size's graphs. So one decode runs at a time per engine; a second one started while the first is
still read stops the first.

CUDA graphs: one per (latent chunk shape, first chunk of a video or not), i.e. two per video size (first chunk 3
latent frames, then 2), captured before the decode's first chunk (the warm-up runs write `past`) into one shared
memory pool: only one replays at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from k4serve.engines.base import Shape
from k4serve.kernels import library_conv, on_device
from k4serve.kernels.conv_bias import CONV_BACKENDS, add_channel_bias_, conv3d_channels_last
from k4serve.kernels.group_norm import CHANNELS_LAST, group_norm_stats, spatial_norm_silu
from k4serve.models.cogvideox_vae import (
    NORM_EPS,
    CausalConv3d,
    CogVideoXDecoder,
    ResnetBlock3D,
    SpatialNorm3D,
    Upsample3D,
    blocks,
    cells,
    decoded_frames,
    empty_in_layout,
    latent_chunks,
    time_segments,
)

ChunkKey = tuple[Shape, bool]  # (latent chunk shape [B, 16, t, h, w], first chunk of a video)
Stats = tuple[Tensor, Tensor]  # (mean, rstd) of a norm's input, per (sample, group)


def channels_last(x: Tensor) -> Tensor:
    """x [B, C, T, H, W] in NDHWC memory (no copy when it is already; the CPU's conv3d returns NCDHW)."""
    return x.contiguous(memory_format=CHANNELS_LAST)


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """torch.backends.cudnn.benchmark = enabled for the block (cuDNN times its algorithms once per shape)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@dataclass
class _ChunkGraph:
    graph: torch.cuda.CUDAGraph
    z: Tensor  # static input [B, 16, t, h, w]
    video: Tensor  # static output [B, 3, F, 8h, 8w]


class FastVAEDecoder:
    """Channels-last, CUDA-graphed decode over a CogVideoXDecoder's weights; see the module docstring."""

    def __init__(self, decoder: CogVideoXDecoder, cuda_graphs: bool = True, cudnn_benchmark: bool = False,
                 convs: str = "torch"):  # fmt: skip
        """`convs`: what runs the convs: "torch" (torch's cuDNN path; `cudnn_benchmark` times its algorithms) or
        "cudnn" (the cuDNN frontend's fastest plan per shape, searched at the first decode of each video size on
        a machine, recorded in $K4SERVE_CACHE for the processes after it)."""
        for parameter in decoder.parameters():  # 3-D conv weights NDHWC, the upsamplers' 2-D ones NHWC
            if parameter.dim() in (4, 5):
                layout = CHANNELS_LAST if parameter.dim() == 5 else torch.channels_last
                parameter.data = parameter.data.contiguous(memory_format=layout)
        self.decoder = decoder
        self.config = decoder.config
        self.device = next(decoder.parameters()).device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.cudnn_benchmark = cudnn_benchmark
        if convs not in CONV_BACKENDS:
            raise ValueError(f"convs={convs!r}: choose one of {CONV_BACKENDS}")
        if convs == "cudnn" and (reason := library_conv.unavailable_reason(self.device)):
            raise ValueError(f"convs='cudnn': {reason}")
        self.convs = convs
        self._past: dict[CausalConv3d, Tensor] = {}  # flat, grown to the largest [B, C, 2, H, W] seen
        self._graphs: dict[ChunkKey, _ChunkGraph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._decodes = 0  # decodes started: a generator that is no longer the latest stops

    # ---- the Engine interface ----

    @property
    def shapes(self) -> tuple[Shape, ...]:
        """The latent chunk shapes whose graphs are captured."""
        return tuple(dict.fromkeys(shape for shape, _ in self._graphs))

    def load(self, shapes: Sequence[Shape]) -> None:
        """Capture the graphs of each video's latents [B, 16, T, h, w] before the first request."""
        for shape in shapes:
            self._prepare(self._chunk_keys(tuple(shape)))

    def __call__(self, z: Tensor) -> Tensor:
        return self.decode(z)

    # ---- decoding ----

    def decode_chunks(self, z: Tensor) -> Iterator[Tensor]:
        """z [B, 16, T, h, w] (already divided by scaling_factor) -> the video [B, 3, F_i, 8h, 8w] of each of
        diffusers' temporal chunks in turn (NDHWC memory, a tensor of its own), as CogVideoXDecoder's."""
        self._decodes += 1
        decode = self._decodes
        keys = self._chunk_keys(tuple(z.shape))
        self._prepare(keys)
        for chunk, key in zip(latent_chunks(z.shape[2]), keys, strict=True):
            if self._decodes != decode:
                raise RuntimeError(
                    "another decode started on this FastVAEDecoder while this one was being read: the engine "
                    "carries one video's conv state, so decode one video at a time (or use one engine each)"
                )
            yield self._run(key, z[:, :, chunk])

    def decode(self, z: Tensor) -> Tensor:
        """z [B, 16, T, h, w] (already divided by scaling_factor) -> video [B, 3, F, 8h, 8w] in about [-1, 1]."""
        return torch.cat(list(self.decode_chunks(z)), dim=2)

    def _chunk_keys(self, shape: Shape) -> list[ChunkKey]:
        b, c, t, h, w = shape
        return [((b, c, chunk.stop - chunk.start, h, w), i == 0) for i, chunk in enumerate(latent_chunks(t))]

    @torch.no_grad()
    def _run(self, key: ChunkKey, z: Tensor) -> Tensor:
        with on_device(self.device):  # kernels and graphs on the decoder's GPU, not the current one
            if not self.cuda_graphs:
                with cudnn_benchmark(self.cudnn_benchmark):
                    return self.forward(z, first=key[1])
            chunk = self._graphs[key]
            chunk.z.copy_(z)
            chunk.graph.replay()
            return chunk.video.clone()  # the static output is overwritten by the next chunk

    @torch.no_grad()
    def _prepare(self, keys: list[ChunkKey]) -> None:
        """Warm up (cuDNN algorithms, Triton compilation, `past`) and capture each missing chunk graph."""
        if not self.cuda_graphs:
            return
        with on_device(self.device), cudnn_benchmark(self.cudnn_benchmark):
            for key in dict.fromkeys(keys):
                if key in self._graphs:
                    continue
                shape, first = key
                z = torch.randn(shape, device=self.device, dtype=next(self.decoder.parameters()).dtype)
                stream = torch.cuda.Stream()  # warm-up off the default stream, as graph capture requires
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self.forward(z, first)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._graph_pool):
                    video = self.forward(z, first)
                self._graphs[key] = _ChunkGraph(graph, z, video)

    # ---- the forward of one chunk (CogVideoXDecoder.forward's recipe) ----

    def forward(self, z: Tensor, first: bool) -> Tensor:
        """One latent chunk z [B, 16, t, h, w] -> video [B, 3, F, 8h, 8w] (NDHWC); `first`: a video's first chunk
        (past frames are copies of frame 0), else the past frames are the previous chunk's, kept in `past`."""
        decoder = self.decoder
        z = channels_last(z)
        # 1. latent -> widest features                 [B, C0, t, h, w]
        conv_in, tp = decoder.conv_in, decoder.conv_in.time_pad
        padded = conv_in.padded_input(z)
        padded[:, :, tp:] = z
        past = self._past_frames(conv_in, padded)
        padded[:, :, :tp] = _first_frame_copies(padded, tp) if first else past
        if z.shape[2] >= tp:
            past.copy_(z[:, :, -tp:])
        x = conv(conv_in.conv, padded, self.convs)
        # 2. mid block, then up blocks (x2 in space for all but the last, x2 in time for the first ones); a resnet
        #    whose output goes to a norm adds its residual in that norm's statistics pass
        stats = None
        for block in (decoder.mid_block, *decoder.up_blocks):
            for i, resnet in enumerate(block.resnets):
                to_norm = i + 1 < len(block.resnets) or not block.upsamplers
                x, stats = self._resnet(resnet, x, z, first, stats, to_norm)
            for upsampler in block.upsamplers:
                x = upsample(upsampler, x, self.convs)
        # 3. out norm, SiLU, conv to RGB               [B, 3, T', 8h, 8w]
        rgb = self._norm_silu_conv(decoder.norm_out, decoder.conv_out, x, z, first, stats)
        return add_channel_bias_(rgb, decoder.conv_out.conv.bias)

    def _resnet(self, resnet: ResnetBlock3D, x: Tensor, z: Tensor, first: bool, stats: Stats | None,
                to_norm: bool) -> tuple[Tensor, Stats | None]:  # fmt: skip
        """(h + shortcut(x), and with `to_norm` the next norm's statistics of it); `stats`: those of x, if known.
        Each conv's bias is added by the pass that reads its output next."""
        h = self._norm_silu_conv(resnet.norm1, resnet.conv1, x, z, first, stats)
        h = self._norm_silu_conv(resnet.norm2, resnet.conv2, h, z, first, conv_bias=resnet.conv1.conv.bias)
        if resnet.conv_shortcut is not None:
            x = conv(resnet.conv_shortcut, x, self.convs)
        bias = resnet.conv2.conv.bias
        if not to_norm:
            return add_channel_bias_(h, bias, residual=x), None
        # every norm of the decoder has the config's groups and eps (SpatialNorm3D, NORM_EPS)
        return h, group_norm_stats(h, self.config.norm_num_groups, NORM_EPS, residual=x, conv_bias=bias)

    def _norm_silu_conv(self, norm: SpatialNorm3D, causal: CausalConv3d, x: Tensor, z: Tensor, first: bool,
                        stats: Stats | None = None, conv_bias: Tensor | None = None) -> Tensor:  # fmt: skip
        """conv(silu(norm(x, z))) without the conv's bias (the caller's next pass adds it): the norm writes the
        padded input's frames and this conv's next past frames. `conv_bias`: x's own, not yet added."""
        tp = causal.time_pad
        padded = causal.padded_input(x)  # NDHWC as x
        past = self._past_frames(causal, padded)
        if not first:
            padded[:, :, :tp] = past  # before the norm overwrites it
        scale, shift = norm.conv_y(z), norm.conv_b(z)  # [B, C, t, h, w] on the latent grid
        layer = norm.norm_layer
        tail = past if x.shape[2] >= tp else None  # a lone image chunk has no next chunk
        spatial_norm_silu(x, scale, shift, layer.weight, layer.bias, layer.num_groups, layer.eps,
                          out=padded[:, :, tp:], tail=tail, stats=stats, conv_bias=conv_bias)  # fmt: skip
        if first:
            padded[:, :, :tp] = _first_frame_copies(padded, tp)
        return conv3d_channels_last(padded, causal.conv.weight, None, causal.conv.padding, self.convs)

    def _past_frames(self, conv: CausalConv3d, padded: Tensor) -> Tensor:
        """This conv's persistent buffer [B, C, tp, H, W] (NDHWC) of past frames for a padded input like `padded`."""
        b, c, _, h, w = padded.shape
        tp = conv.time_pad
        numel = b * c * tp * h * w
        if conv not in self._past or self._past[conv].numel() < numel:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the conv state must be allocated by the warm-up, before the graph capture")
            self._graphs.clear()  # captured graphs point into the buffer replaced here
            self._past[conv] = padded.new_empty(numel)
        return self._past[conv][:numel].view(b, tp, h, w, c).permute(0, 4, 1, 2, 3)


def conv(module: nn.Conv3d, x: Tensor, backend: str) -> Tensor:
    """module(x) (stride 1) with an NDHWC output, its bias added by our kernel (torch's broadcast add is slow)."""
    return conv3d_channels_last(x, module.weight, module.bias, module.padding, backend)


def nearest(x: Tensor, time_levels: int, space: int) -> Tensor:
    """x [B, C, T, H, W] nearest-upsampled x2 in time `time_levels` times (a lone first frame of an odd T > 1 kept
    single, as `Upsample3D`) and x`space` in H and W, into one NDHWC tensor; each piece is written in place."""
    b, c, t, h, w = x.shape
    out = empty_in_layout(x, (b, c, decoded_frames(t, time_levels), space * h, space * w))
    for seg in time_segments(t):
        dst = out[:, :, decoded_frames(seg.start, time_levels) : decoded_frames(seg.stop, time_levels)]
        blocks(dst, x[:, :, seg].shape[2:]).copy_(cells(x[:, :, seg]))
    return out


def upsample(upsampler: Upsample3D, x: Tensor, backend: str) -> Tensor:
    """`Upsample3D`'s nearest x2 and per-frame 3x3 conv, with the conv before the time doubling: a frame and its
    copy convolve to the same output, so the conv sees each distinct frame once (the same values, half the work
    where the block doubles time)."""
    weight = upsampler.conv.weight.unsqueeze(2)  # the per-frame Conv2d as a (1, 3, 3) Conv3d
    y = conv3d_channels_last(nearest(x, 0, 2), weight, upsampler.conv.bias, (0, 1, 1), backend)
    return nearest(y, 1, 1) if upsampler.compress_time else y


def _first_frame_copies(padded: Tensor, tp: int) -> Tensor:
    """A video's first chunk: its past frames are copies of its first frame (padded's frame tp)."""
    return padded[:, :, tp : tp + 1].expand_as(padded[:, :, :tp])
