"""Sequence-parallel DiT over 2 and 4 gloo processes against the single-process DiT."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k4serve.engines.sequence_parallel import SequenceParallelDiT, heads_per_rank
from k4serve.models.dit import PRESETS, build_dit, sdpa_attention

SEED = 5
# (batch, latent T, H/8, W/8, text tokens) -> token grids (4, 4, 4) = 64, (3, 3, 5) = 45 (no world size
# divides it: padding), (1, 1, 2) = 2 (with 4 ranks, two hold padding only).
CASES = [(1, 4, 8, 8, 6), (2, 3, 6, 10, 5), (1, 1, 2, 4, 3)]


def case_inputs(case: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (x, text_embed, time) for a case; the same on every process."""
    b, t, h, w, text_len = case
    g = torch.Generator().manual_seed(sum(case))
    x = torch.randn(b, t, h, w, 16, generator=g)
    text = torch.randn(b, text_len, PRESETS["tiny"].in_text_dim, generator=g)
    time = torch.randint(0, 1000, (b,), generator=g)
    return x, text, time


def worker(rank: int, world_size: int, out_dir: str) -> None:
    """One rank: the sequence-parallel forward of every case, saved for the parent to check.

    The ranks meet through a file store, not rank 0's TCP store, and pass a barrier before tearing their group
    down: with the TCP store a rank aborted at shutdown (SIGABRT "terminate called without an active exception",
    once in CI), likely because rank 0, which hosts that store, could exit while another rank still used it.
    """
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(out_dir) / 'store'}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        model = build_dit("tiny", seed=SEED)
        parallel = SequenceParallelDiT(model)
        with torch.no_grad():
            outputs = [parallel(*case_inputs(case)) for case in CASES]
        restored = all(block.self_attention.attention_fn is sdpa_attention for block in model.blocks())
        torch.save({"outputs": outputs, "restored": restored}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_sequence_parallel_equals_single_process(tmp_path, world_size):
    mp.spawn(worker, args=(world_size, str(tmp_path)), nprocs=world_size, join=True)
    model = build_dit("tiny", seed=SEED)
    with torch.no_grad():
        expected = [model(*case_inputs(case)) for case in CASES]
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["restored"], "the model's attention kernels were not restored after the call"
        for case, out, ref in zip(CASES, result["outputs"], expected, strict=True):
            assert out.shape == ref.shape, case
            error = ((out - ref).abs().max() / ref.abs().max()).item()
            assert error <= 1e-5, f"rank {rank}, case {case}: max relative error {error:.2e}"


def test_heads_must_divide_world_size():
    assert heads_per_rank(48, 8) == 6
    with pytest.raises(ValueError, match=r"world size in \[1, 2, 4\]"):
        heads_per_rank(4, 3)
