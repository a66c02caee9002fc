"""The fast DiT engine: the reference module's weights, fused Triton kernels, CUDA graphs per bucket.

`FastDiT(dit, attention=..., linear=...)` reads a `DiffusionTransformer3D`'s parameters (bf16
linears are shared, fp8 / int8 ones quantized once) and runs its own forward with the same contract as
`DiffusionTransformer3D.forward` (the options and their `auto` default: `k4serve.engines.options`).
Per block the work is 4 GEMMs plus 5 fused passes (+1 packing pass for the int8 recipes and cudnn-fp8):
  norm+modulate → QKV GEMM → QK-norm+RoPE(+fp8 pack) → attention → out GEMM
  → gated add+norm+modulate → FF1 GEMM → GELU(+8-bit quant) → FF2 GEMM → gated add+next norm+modulate.
With 8-bit linears each GEMM's input is written per token in its format by the pass before it (the attention
output by a quantize pass of its own).
All 42 blocks' modulations come from the time embedding alone, so they are computed up front. Each
(latent shape, text shape) bucket is warmed up (kernel tuning included) and captured as one CUDA graph on
its first use, or ahead of time through `load`; a call then copies the inputs in and replays the graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k4serve.engines.base import Shape
from k4serve.engines.cuda_graphs import CapturedGraph
from k4serve.engines.options import AUTO, resolve_fast_options
from k4serve.kernels import attention as attn
from k4serve.kernels import on_device
from k4serve.kernels.attention_sm90 import flash_attention_int8_sm90, flash_attention_sm90
from k4serve.kernels.gelu_quant import gelu, quantize_rows
from k4serve.kernels.int8_gemm import Int8Linear
from k4serve.kernels.library_attention import cudnn_fp8_attention, fa4_attention
from k4serve.kernels.norm_modulate import norm_modulate
from k4serve.kernels.qk_int8 import quantize_qk_int8
from k4serve.kernels.qk_norm_rope import qk_norm_rope_, qk_norm_rope_fp8
from k4serve.kernels.quantize import Fp8Linear
from k4serve.models.dit import DiffusionTransformer3D, TransformerBlock, sdpa_attention, unpatchify

TEXT_LEN = 224  # T5 max_length: the text shape of every bucket the pipelines serve
# Triton kernel recipe of each attention option that runs ours (tuned per bucket)
TRITON_RECIPES = {"triton": "bf16", "triton-int8": "int8", "triton-fp8": "fp8"}
# the per-token operand format each linear option's GEMMs read (None: bf16 activations)
LINEAR_QUANT = {"bf16": None, "fp8": "fp8", "fp8-fast": "fp8", "int8": "int8"}


def _int8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return attn.flash_attention_int8(quantize_qk_int8(q, k, v))


def _int8_attention_sm90(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return flash_attention_int8_sm90(quantize_qk_int8(q, k, v))


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    b, s, h, d = q.shape
    return sdpa_attention(q, k, v).reshape(b, s, h * d)


# attention over the bf16 q, k, v views of the QKV buffer -> [B, S, H*D]; triton-fp8 packs inside the QK-norm pass
ATTENTION_FNS = {
    "sdpa": _sdpa,
    "triton": attn.flash_attention,
    "cuda": flash_attention_sm90,
    "triton-int8": _int8_attention,
    "cuda-int8": _int8_attention_sm90,
    "fa4": fa4_attention,
    "cudnn-fp8": cudnn_fp8_attention,
}


def _norm(layer: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    return layer.weight, layer.bias


def _project(layer: nn.Module, x: Tensor, x_scale: Tensor | None) -> Tensor:
    """Apply a bf16 nn.Linear, or an 8-bit linear to its quantized input with the per-token scale."""
    return layer(x) if x_scale is None else layer(x, x_scale)


def _linear(layer: nn.Linear, kind: str) -> nn.Module:
    """The module's own bf16 linear (shared, no copy), or its fp8 / int8 quantization (made once, here)."""
    if kind == "bf16":
        return layer
    if kind == "int8":
        return Int8Linear.from_linear(layer)
    return Fp8Linear.from_linear(layer, fast_accum=kind == "fp8-fast")


def _weights_moved_to_engine(module: nn.Module, args: tuple) -> None:
    raise RuntimeError(
        "this DiT's linear weights were handed to a FastDiT engine (keep_source_weights=False), which holds them "
        "quantized: call the engine, or build the module again to run it eagerly"
    )


@dataclass
class _Block:
    """One transformer block's weights as the fast forward uses them."""

    source: TransformerBlock
    qkv: nn.Module
    out: nn.Module
    ff_in: nn.Module
    ff_out: nn.Module

    @classmethod
    def wrap(cls, block: TransformerBlock, kind: str, keep_source_weights: bool) -> _Block:
        attention, ff = block.self_attention, block.feed_forward
        layers = (attention.to_query_key_value, attention.output_layer, ff.in_layer, ff.out_layer)
        wrapped = cls(block, *(_linear(layer, kind) for layer in layers))
        if kind != "bf16" and not keep_source_weights:
            for layer in layers:
                layer.weight = None  # the 8-bit copy is all the engine reads (the bias stays shared)
        return wrapped

    def quantized_linears(self) -> list[nn.Module]:
        """The 8-bit linears made for this block (none when the linears are the module's own bf16 ones)."""
        return [layer for layer in (self.qkv, self.out, self.ff_in, self.ff_out) if not isinstance(layer, nn.Linear)]

    def modulations(self, time_act: Tensor) -> Tensor:
        """[B, 2 streams, 6, D]: attn (shift, 1+scale, gate), ff (shift, 1+scale, gate) per stream."""
        streams = (self.source.visual_modulation, self.source.text_modulation)
        mods = torch.stack([F.linear(time_act, m.out_layer.weight, m.out_layer.bias) for m in streams], dim=1)
        mods = mods.unflatten(2, (6, -1))
        mods[:, :, 1::3] += 1.0  # scale + 1 in the model dtype, rounded as the reference does
        return mods


class FastDiT:
    """Fused-kernel DiT forward over a reference module's weights; see the module docstring."""

    def __init__(self, dit: DiffusionTransformer3D, attention: str = AUTO, linear: str = AUTO,
                 cuda_graphs: bool = True, keep_source_weights: bool = True):  # fmt: skip
        """`keep_source_weights=False` drops the bf16 weights of the linears this engine quantizes from `dit`
        (8.9 GiB at full size, twice their int8 copies): for a pipeline that runs only the engine. `dit` then
        refuses to run itself."""
        self.device = next(dit.parameters()).device
        attention, linear = resolve_fast_options(attention, linear, str(self.device), dit.config.head_dim)
        self.dit = dit
        self.config = dit.config
        self.attention = attention
        self.linear = linear
        self.quant = LINEAR_QUANT[linear]
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.blocks = [_Block.wrap(block, linear, keep_source_weights) for block in dit.blocks()]
        # what this engine holds beyond the module's tensors (for the serving stage's weights metric)
        self.quantized_linears = nn.ModuleList(layer for block in self.blocks for layer in block.quantized_linears())
        if not keep_source_weights and len(self.quantized_linears):
            dit.register_forward_pre_hook(_weights_moved_to_engine)
        self._rope: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        # (x shape, text shape) -> its captured graph, or None when running without graphs
        self._buckets: dict[tuple[Shape, Shape], CapturedGraph | None] = {}
        # one memory pool for every bucket's graph: only one replays at a time, so their scratch can overlap
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # ---- the Engine interface ----

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return tuple(x_shape for x_shape, _ in self._buckets)

    def load(self, shapes: Sequence[Shape], text_len: int = TEXT_LEN) -> None:
        """Prepare each latent shape [B, T, H/8, W/8, C] (text [B, text_len, in_text_dim]) before first use."""
        with on_device(self.device):
            for shape in shapes:
                self._prepare(tuple(shape), (shape[0], text_len, self.config.in_text_dim))

    @torch.no_grad()
    def __call__(self, x: Tensor, text_embed: Tensor, time: Tensor) -> Tensor:
        """x [B, T, H/8, W/8, 16], text_embed [B, L, in_text_dim], time [B] -> velocity, like the module."""
        with on_device(self.device):  # the kernels, side streams and graphs on the model's GPU, not GPU 0
            key = (tuple(x.shape), tuple(text_embed.shape))
            if key not in self._buckets:
                self._prepare(*key)
            graph = self._buckets[key]
            return self.forward(x, text_embed, time) if graph is None else graph(x, text_embed, time)

    @torch.no_grad()
    def _prepare(self, x_shape: Shape, text_shape: Shape) -> None:
        """Tune the attention kernel for this bucket, then (CUDA) warm up and capture its graph."""
        self._tune(x_shape, text_shape[1])
        if not self.cuda_graphs:
            self._buckets[(x_shape, text_shape)] = None
            return
        dtype = next(self.dit.parameters()).dtype
        inputs = (
            torch.randn(x_shape, device=self.device, dtype=dtype),
            torch.randn(text_shape, device=self.device, dtype=dtype),
            torch.full(x_shape[:1], 999, device=self.device, dtype=torch.int64),
        )
        self._buckets[(x_shape, text_shape)] = CapturedGraph(self.forward, inputs, self._graph_pool)

    def _tune(self, x_shape: Shape, text_len: int) -> None:
        """Pick the attention kernel's tiling for this bucket's sequence length (skipped when cached)."""
        if self.attention not in TRITON_RECIPES or self.device.type != "cuda":
            return
        seq_len = math.prod(self.dit.token_grid(x_shape)) + text_len
        recipe = TRITON_RECIPES[self.attention]
        attn.ensure_tuned(x_shape[0], seq_len, self.config.num_heads, self.config.head_dim, recipe)

    # ---- the forward ----

    def rope(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """fp32 cos, sin [N, D/2] of the module's RoPE tables (their model-dtype rounding kept)."""
        if grid not in self._rope:
            cos, sin = self.dit.rope_embeddings(grid)
            self._rope[grid] = (cos.float().flatten(1).contiguous(), sin.float().flatten(1).contiguous())
        return self._rope[grid]

    def _attention(self, block: _Block, y: Tensor, y_scale: Tensor | None, n_visual: int, rope) -> Tensor:
        """Joint attention of one block: [B, S, D] normalised input -> [B, S, D] attention output."""
        source = block.source.self_attention
        heads = self.config.num_heads
        qkv = _project(block.qkv, y, y_scale)  # [B, S, 3D]
        norms = (_norm(source.query_norm), _norm(source.key_norm), *rope, n_visual, source.query_norm.eps)
        if self.attention == "triton-fp8":
            return attn.flash_attention_fp8(qk_norm_rope_fp8(qkv, heads, *norms), out_dtype=qkv.dtype)
        q, k, v = qk_norm_rope_(qkv, heads, *norms)  # [B, S, H, Dh] views of qkv
        return ATTENTION_FNS[self.attention](q, k, v)

    def forward(self, x: Tensor, text_embed: Tensor, time: Tensor) -> Tensor:
        """The fused forward without graphs (what each bucket's graph captures)."""
        dit, quant = self.dit, self.quant
        grid = dit.token_grid(x.shape)
        n_visual = math.prod(grid)
        # 1. time embedding and every block's modulations                  [B, 2, 6, D] per block
        time_act = F.silu(dit.time_embeddings(time))
        mods = [block.modulations(time_act) for block in self.blocks]
        out_mods = dit.out_layer.modulation_out(time_act).unflatten(1, (2, -1))  # [B, (shift, scale), D]
        out_mods[:, 1] += 1.0
        # 2. joint token sequence [visual ; text]                          [B, N + L, D]
        x = torch.cat([dit.visual_embeddings(x), dit.text_embeddings(text_embed)], dim=1)
        rope = self.rope(grid)
        # 3. blocks; each gated add is fused with the next LayerNorm + modulation
        first = self.blocks[0].source.self_attention_norm
        y, y_scale = norm_modulate(x, _norm(first), mods[0][:, :, 0], mods[0][:, :, 1], n_visual, quant=quant)
        for i, block in enumerate(self.blocks):
            m = mods[i]
            o = self._attention(block, y, y_scale, n_visual, rope)
            o = block.out(o) if quant is None else _project(block.out, *quantize_rows(o, quant))
            y, y_scale = norm_modulate(x, _norm(block.source.feed_forward_norm), m[:, :, 3], m[:, :, 4], n_visual,
                                       delta=o, gate=m[:, :, 2], quant=quant)  # fmt: skip
            o = _project(block.ff_out, *gelu(_project(block.ff_in, y, y_scale), quant=quant))
            if i + 1 < len(self.blocks):
                nxt = (_norm(self.blocks[i + 1].source.self_attention_norm), mods[i + 1][:, :, 0], mods[i + 1][:, :, 1])
                rows, next_quant = None, quant
            else:  # the out layer: visual rows only, bf16
                shift, scale1 = (out_mods[:, j : j + 1].expand(-1, 2, -1) for j in (0, 1))  # one stream
                nxt = (_norm(dit.out_layer.norm), shift, scale1)
                rows, next_quant = n_visual, None
            y, y_scale = norm_modulate(x, *nxt, n_visual, delta=o, gate=m[:, :, 5], rows=rows, quant=next_quant)
        # 4. out layer and unpatchify                                       [B, T, H/8, W/8, C]
        return unpatchify(dit.out_layer.out_layer(y), grid, self.config.patch_size)
