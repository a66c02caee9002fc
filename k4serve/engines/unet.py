"""The fast V2A UNet engine: the 51 UNet calls of one request at one latent shape, as one CUDA graph replay each.

`FastUNet(unet, ...)` runs the reference module's own forward (no re-implementation) on a copy of its module
tree that shares every weight, changed only where an option says so:
  - attention: SDPA pinned to a backend (FlashAttention by default; head widths 40/80/160 all qualify);
  - linear "fp8" / "fp8-fast" / "int8": the transformer blocks' linears as `Fp8Linear` / `Int8Linear` (8-bit weights
    per output channel, activations per token; quantized once here). Convolutions, norms and the time embedding
    stay bf16;
  - channels_last: NHWC activations and conv weights (cuDNN's faster layout for bf16 convs);
  - torch_compile: the forward through torch.compile (Inductor fuses the norms, GEGLU and residual adds around the
    GEMMs and convs), compiled per bucket during its warm-up, then captured like the eager forward;
  - cuda_graphs: each (sample, prompt, video) shape bucket is warmed up and captured on first use, or ahead of
    time through `load`; a call copies the inputs in and replays (the UNet is hundreds of small kernels per
    call, whose launches eager mode pays every time).
On the CPU none of this applies: a call is the module's plain eager forward (8-bit linears are refused with the fix).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from k4serve.engines.base import Shape
from k4serve.engines.cuda_graphs import CapturedGraph
from k4serve.engines.options import LINEAR_OPTIONS
from k4serve.kernels import on_device
from k4serve.models.v2a_unet import SpatialTransformer, V2AUNet

PROMPT_LEN = 100  # prompt features padded/truncated to 100 tokens (official)
NUM_FRAMES = 96  # frames sampled per video (official)
UNET_ATTENTION = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "sdpa": None,  # torch's own choice, as the eager module
}


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer, so submodules and weights can be replaced in
    the copy without touching the original."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: None if m is None else shared_copy(m) for name, m in module._modules.items()}
    return clone


def quantize_linears(unet: nn.Module, linear: str) -> int:
    """Swap the transformer blocks' linears (dims multiples of 16, as the fp8 GEMM needs) for the 8-bit linears of
    option `linear` in place; returns how many."""
    from k4serve.kernels.int8_gemm import Int8Linear
    from k4serve.kernels.quantize import Fp8Linear

    def quantized(layer: nn.Linear) -> nn.Module:
        if linear == "int8":
            return Int8Linear.from_linear(layer)
        return Fp8Linear.from_linear(layer, fast_accum=linear == "fp8-fast")

    swapped = 0
    for transformer in [m for m in unet.modules() if isinstance(m, SpatialTransformer)]:
        for parent in list(transformer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                    setattr(parent, name, quantized(child))
                    swapped += 1
    return swapped


def channels_last_convs(unet: nn.Module) -> None:
    """Give every conv of the (copied) tree its own NHWC weight; the original module keeps its NCHW ones."""
    for conv in [m for m in unet.modules() if isinstance(m, nn.Conv2d)]:
        weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        conv.weight = nn.Parameter(weight, requires_grad=False)


class FastUNet:
    """V2AUNet.forward's contract for repeated calls at fixed shapes; see the module docstring."""

    def __init__(self, unet: V2AUNet, linear: str = "bf16", attention: str = "flash", channels_last: bool = False,
                 torch_compile: bool = False, cuda_graphs: bool = True):  # fmt: skip
        if linear not in LINEAR_OPTIONS or attention not in UNET_ATTENTION:
            raise ValueError(f"linear must be one of {tuple(LINEAR_OPTIONS)} and attention one of "
                             f"{tuple(UNET_ATTENTION)}; got {linear!r}, {attention!r}")  # fmt: skip
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.config = unet.config
        gpu = self.device.type == "cuda"
        if linear != "bf16" and not gpu:
            raise ValueError(f"linear={linear!r} needs a CUDA GPU (8-bit GEMMs); use linear='bf16' on the CPU")
        self.unet = unet
        self.quantized_linears = 0
        if linear != "bf16" or (channels_last and gpu):
            self.unet = shared_copy(unet)
            if linear != "bf16":
                self.quantized_linears = quantize_linears(self.unet, linear)
            if channels_last and gpu:
                channels_last_convs(self.unet)
        self.channels_last = channels_last and gpu
        # static shapes: one compiled graph per bucket (dynamic=False), Inductor's own CUDA graphs off (ours are used)
        self.module = torch.compile(self.unet, dynamic=False) if torch_compile and gpu else self.unet
        self.backends = UNET_ATTENTION[attention] if gpu else None
        self.cuda_graphs = cuda_graphs and gpu
        # (sample, prompt, video shapes) -> the bucket's captured graph, or None when running without graphs
        self._buckets: dict[tuple[Shape, Shape, Shape], CapturedGraph | None] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # ---- the Engine interface ----

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return tuple(sample_shape for sample_shape, _, _ in self._buckets)

    def load(self, shapes: Sequence[Shape], prompt_len: int = PROMPT_LEN, num_frames: int = NUM_FRAMES) -> None:
        """Prepare each sample shape [B, 4, 64, w] (prompt [B, prompt_len, F], video [B, num_frames, F])."""
        with on_device(self.device):
            for shape in shapes:
                b, f = shape[0], self.config.feature_dim
                self._prepare(tuple(shape), (b, prompt_len, f), (b, num_frames, f))

    @torch.no_grad()
    def __call__(self, sample: Tensor, timestep: Tensor | int, prompt_embeds: Tensor, video_embeds: Tensor) -> Tensor:
        """sample [B, 4, 64, w], timestep [B] or a scalar, prompt_embeds [B, 100, F], video_embeds [B, 96, F]
        -> noise prediction [B, 4, 64, w] in the model dtype, like V2AUNet.forward."""
        with on_device(self.device):
            key = (tuple(sample.shape), tuple(prompt_embeds.shape), tuple(video_embeds.shape))
            if key not in self._buckets:
                self._prepare(*key)
            t = torch.as_tensor(timestep, device=self.device).reshape(-1).expand(sample.shape[0])
            inputs = (sample.to(self.dtype), t, prompt_embeds.to(self.dtype), video_embeds.to(self.dtype))
            graph = self._buckets[key]
            return self.forward(*inputs) if graph is None else graph(*inputs)

    @torch.no_grad()
    def _prepare(self, sample_shape: Shape, prompt_shape: Shape, video_shape: Shape) -> None:
        """Warm up and capture this bucket's graph (CUDA); without graphs, just note the bucket."""
        if not self.cuda_graphs:
            self._buckets[(sample_shape, prompt_shape, video_shape)] = None
            return
        g = torch.Generator(device=self.device).manual_seed(0)
        inputs = (
            torch.randn(sample_shape, device=self.device, dtype=self.dtype, generator=g),
            torch.full(sample_shape[:1], 981, device=self.device, dtype=torch.int64),
            torch.randn(prompt_shape, device=self.device, dtype=self.dtype, generator=g),
            torch.randn(video_shape, device=self.device, dtype=self.dtype, generator=g),
        )
        self._buckets[(sample_shape, prompt_shape, video_shape)] = CapturedGraph(self.forward, inputs, self._graph_pool)

    # ---- the forward ----

    def forward(self, sample: Tensor, timestep: Tensor, prompt_embeds: Tensor, video_embeds: Tensor) -> Tensor:
        """The module's forward on the engine's tree and attention backend (what each bucket's graph captures)."""
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        backend = contextlib.nullcontext() if self.backends is None else sdpa_kernel(self.backends)
        with backend:
            return self.module(sample, timestep, prompt_embeds, video_embeds).contiguous()
