"""Ulysses sequence parallelism for the DiT: one video's tokens spread over the processes of a group.

The latency mode of issue 5: N GPUs work on one request. Every rank holds the full weights, a contiguous
slice of the visual tokens and all text tokens (224 of them: cheap to replicate). Everything in a block but
the attention is per token, so the model's own blocks run unchanged on the local slice; only the attention
function is wrapped, exchanging tokens for heads around the model's kernel (SDPA, Triton, ...):

    visual q, k, v  [B, N/W, H, d]  --all-to-all-->  [B, N, H/W, d]      (+ text q, k, v: this rank's heads)
    attention over [all visual ; text] with this rank's H/W heads
    visual out      [B, N, H/W, d]  --all-to-all-->  [B, N/W, H, d]      (text out: all-gather over heads)

So each text token's q/k/v enters the attention exactly once per head, as in the single-process model.
Visual tokens that do not divide by the world size are padded at the end; padded tokens are dropped before
the attention (never attended) and trimmed at the end, so the result does not depend on the padding.
Inference only: the collectives are not differentiable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from k4serve.models.dit import AttentionFn, DiffusionTransformer3D, TransformerBlock


def heads_per_rank(num_heads: int, world_size: int) -> int:
    """Attention heads each rank computes; raises unless the heads split evenly over the ranks."""
    if num_heads % world_size:
        sizes = [n for n in range(1, num_heads + 1) if num_heads % n == 0]
        raise ValueError(
            f"{num_heads} attention heads do not split over {world_size} processes: "
            f"run sequence parallelism with a world size in {sizes}"
        )
    return num_heads // world_size


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Split x into world-size chunks along scatter_dim, send chunk i to rank i, concatenate what arrives
    (in rank order) along gather_dim."""
    world_size = dist.get_world_size(group)
    send = torch.stack(x.chunk(world_size, dim=scatter_dim))  # [W, ...chunk], contiguous
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def all_gather(x: Tensor, dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's x concatenated in rank order along dim, on every rank."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def pad_tokens(x: Tensor, count: int, dim: int) -> Tensor:
    """x with `count` zero rows appended along dim."""
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, count]
    return F.pad(x, pad)


@dataclass(frozen=True)
class UlyssesAttention:
    """An `AttentionFn` for a rank's [local visual ; text] tokens that attends over the whole sequence."""

    inner: AttentionFn  # the model's attention kernel, run on all tokens with this rank's heads
    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    n_local: int  # visual tokens held by each rank, padding included
    n_visual: int  # real visual tokens over all ranks

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v [B, n_local + L, H, d] -> out [B, n_local + L, H, d]."""
        n_local, n_visual, group = self.n_local, self.n_visual, self.group
        heads = heads_per_rank(q.shape[2], self.world_size)
        mine = slice(self.rank * heads, (self.rank + 1) * heads)
        # 1. visual q, k, v: trade tokens for heads (one collective for all three), drop the padding
        qkv = torch.stack([q[:, :n_local], k[:, :n_local], v[:, :n_local]])  # [3, B, n_local, H, d]
        qkv = all_to_all(qkv, scatter_dim=3, gather_dim=2, group=group)[:, :, :n_visual]  # [3, B, N, H/W, d]
        # 2. text q, k, v are replicated: each rank keeps its own heads, so each appears once
        q, k, v = (torch.cat([vis, t[:, n_local:, mine]], dim=1) for vis, t in zip(qkv, (q, k, v), strict=True))
        # 3. joint attention over [all visual ; text] with this rank's heads   [B, N + L, H/W, d]
        out = self.inner(q, k, v)
        # 4. back: visual rows re-padded, heads traded for tokens; text heads gathered from every rank
        visual = pad_tokens(out[:, :n_visual], n_local * self.world_size - n_visual, dim=1)
        visual = all_to_all(visual, scatter_dim=1, gather_dim=2, group=group)  # [B, n_local, H, d]
        text = all_gather(out[:, n_visual:], dim=2, group=group)  # [B, L, H, d]
        return torch.cat([visual, text], dim=1)


@contextlib.contextmanager
def wrapped_attention(blocks: list[TransformerBlock], **layout) -> Iterator[None]:
    """Wrap each block's attention kernel in `UlyssesAttention(kernel, **layout)`; restore them on exit."""
    kernels = [block.self_attention.attention_fn for block in blocks]
    try:
        for block, kernel in zip(blocks, kernels, strict=True):
            block.self_attention.attention_fn = UlyssesAttention(kernel, **layout)
        yield
    finally:
        for block, kernel in zip(blocks, kernels, strict=True):
            block.self_attention.attention_fn = kernel


class SequenceParallelDiT:
    """The DiT forward with the visual tokens split over a process group; same call contract as the model.

    Every rank must call it with the same inputs; every rank returns the full output. During a call the
    model's attention kernels are wrapped (and restored after), so one model serves one caller at a time.
    """

    def __init__(self, model: DiffusionTransformer3D, process_group: dist.ProcessGroup | None = None):
        self.model = model
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        heads_per_rank(model.config.num_heads, self.world_size)  # fail here, not inside the first collective

    def __call__(self, x: Tensor, text_embed: Tensor, time: Tensor) -> Tensor:
        """x [B, T, H/8, W/8, 16] noisy latents, text_embed [B, L, in_text_dim], time [B]
        -> velocity [B, T, H/8, W/8, 16]."""
        model = self.model
        grid = model.token_grid(x.shape)
        n_visual = math.prod(grid)
        n_local = -(-n_visual // self.world_size)
        n_pad = n_local * self.world_size - n_visual
        mine = slice(self.rank * n_local, (self.rank + 1) * n_local)
        # 1. time embedding                                                  [B, time_dim]
        time_embed = model.time_embeddings(time)
        # 2. this rank's visual tokens (padded to W * n_local) ; all text    [B, n_local + L, D]
        visual = pad_tokens(model.visual_embeddings(x), n_pad, dim=1)[:, mine]
        x = torch.cat([visual, model.text_embeddings(text_embed)], dim=1)
        # 3. RoPE angles of those tokens (padding rows: zeros)           cos, sin [n_local, 1, head_dim/2]
        rope = tuple(pad_tokens(table, n_pad, dim=0)[mine] for table in model.rope_embeddings(grid))
        # 4. the model's blocks; only the attention sees the other ranks
        blocks = model.blocks()
        ranks = dict(group=self.group, rank=self.rank, world_size=self.world_size)
        with wrapped_attention(blocks, n_local=n_local, n_visual=n_visual, **ranks):
            for block in blocks:
                x = block(x, n_local, time_embed, rope)
        # 5. every rank's visual tokens, padding trimmed; out layer, unpatchify [B, T, H/8, W/8, C_out]
        visual = all_gather(x[:, :n_local], dim=1, group=self.group)[:, :n_visual]
        return model.out_layer(visual, time_embed, grid)
