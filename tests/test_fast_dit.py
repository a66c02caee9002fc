"""The fast DiT engine against the reference module it wraps (CPU interpreter; CUDA graphs on the GPU)."""

from __future__ import annotations

import pytest
import torch
from test_kernels import exact_fp8_casts, rel_error, two_gpus  # noqa: F401  (fixture re-used by name)

from k4serve.engines.base import Engine
from k4serve.engines.options import unavailable_reason
from k4serve.engines.torch import FastDiT
from k4serve.models.dit import DiTConfig, build_dit

CUDA = torch.cuda.is_available()  # without it tests/conftest.py selected Triton's CPU interpreter

# head_dim 16 (the kernels' minimum: fp8 rows of 16 bytes), 4 heads, 2 transformer blocks
SMALL = DiTConfig(in_text_dim=32, time_dim=32, model_dim=64, ff_dim=128, num_blocks=1, axes_dims=(4, 6, 6))
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
interpreter = pytest.mark.skipif(CUDA, reason="float32 check for the CPU interpreter; CUDA runs the bf16 test")


def inputs(config: DiTConfig, device: str, dtype: torch.dtype, grid=(3, 8, 12), text_len: int = 9):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *grid, config.in_visual_dim, generator=g).to(device, dtype)
    text = torch.randn(2, text_len, config.in_text_dim, generator=g).to(device, dtype)
    return x, text, torch.tensor([999, 249], device=device)


@interpreter
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_fast_forward_equals_module_in_float32(attention):
    dit = build_dit(SMALL, seed=2)
    x, text, time = inputs(SMALL, "cpu", torch.float32)  # 72 visual + 9 text tokens: ragged blocks
    engine = FastDiT(dit, attention=attention, linear="bf16")
    assert rel_error(engine(x, text, time), dit(x, text, time)) < 1e-5


@interpreter
@pytest.mark.parametrize(
    "attention, linear, bound",
    [("triton-fp8", "bf16", 2e-2), ("triton-int8", "bf16", 2e-3), ("sdpa", "fp8", 5e-2), ("sdpa", "int8", 8e-3)],
)
def test_8bit_paths_stay_close_to_module(attention, linear, bound):
    dit = build_dit(SMALL, seed=3)
    x, text, time = inputs(SMALL, "cpu", torch.float32)
    engine = FastDiT(dit, attention=attention, linear=linear)
    assert rel_error(engine(x, text, time), dit(x, text, time)) < bound


def test_dropping_the_source_weights_keeps_the_output_and_frees_the_bf16_copies():
    kept, dropped = build_dit(SMALL, seed=3), build_dit(SMALL, seed=3)
    x, text, time = inputs(SMALL, "cpu", torch.float32)
    expected = FastDiT(kept, attention="sdpa", linear="int8")(x, text, time)
    params_before = sum(p.numel() for p in dropped.parameters())
    engine = FastDiT(dropped, attention="sdpa", linear="int8", keep_source_weights=False)
    torch.testing.assert_close(engine(x, text, time), expected, rtol=0, atol=0)
    attention, ff = SMALL.model_dim, SMALL.ff_dim
    linear_weights = 2 * SMALL.num_blocks * (3 * attention * attention + attention * attention + 2 * attention * ff)
    assert params_before - sum(p.numel() for p in dropped.parameters()) == linear_weights
    assert sum(layer.weight.numel() for layer in engine.quantized_linears) == linear_weights  # int8, held by the engine
    with pytest.raises(RuntimeError, match="handed to a FastDiT engine"):
        dropped(x, text, time)
    assert len(FastDiT(kept, attention="sdpa", linear="bf16", keep_source_weights=False).quantized_linears) == 0
    kept(x, text, time)  # bf16 linears are the module's own: nothing was dropped


def test_engine_interface_and_bad_options():
    engine = FastDiT(build_dit(SMALL), attention="sdpa", cuda_graphs=False)
    assert isinstance(engine, Engine)
    engine.load([(1, 2, 4, 4, 16)], text_len=3)
    assert engine.shapes == ((1, 2, 4, 4, 16),)
    with pytest.raises(ValueError, match="attention must be one of"):
        FastDiT(build_dit(SMALL), attention="flash")


@gpu
# cuda:1 while GPU 0 stays current (a Triton instance on GPU 1, a device map): kernels, streams, graphs follow the model
@pytest.mark.parametrize("device", ["cuda:0", pytest.param("cuda:1", marks=two_gpus)])
@pytest.mark.parametrize(
    "attention, linear, bound",
    [("triton", "bf16", 2e-2), ("cuda", "bf16", 2e-2), ("fa4", "bf16", 2e-2), ("triton-int8", "bf16", 4e-2),
     ("cuda-int8", "bf16", 4e-2), ("cuda", "int8", 4e-2),
     ("triton-fp8", "fp8", 1.5e-1), ("cudnn-fp8", "bf16", 1.5e-1)],
)  # fmt: skip
def test_cuda_graph_engine_against_autocast_module(attention, linear, bound, device):
    config = DiTConfig(in_text_dim=256, time_dim=128, model_dim=512, ff_dim=2048, num_blocks=2)  # head_dim 64
    dit = build_dit(config, device=device, dtype=torch.bfloat16, seed=4)
    x, text, time = inputs(config, device, torch.bfloat16, grid=(5, 16, 24), text_len=224)
    reason = unavailable_reason(attention, device)
    if reason is not None:
        pytest.skip(reason)
    torch.cuda.set_device(0)
    engine = FastDiT(dit, attention=attention, linear=linear)
    out = engine(x, text, time)  # first call: tune + capture, then replay
    assert engine.shapes == (tuple(x.shape),) and out.device == x.device
    torch.testing.assert_close(engine(x, text, time), out, rtol=0, atol=0)  # replays are deterministic
    with torch.cuda.device(x.device):  # forward, the graph's body, runs on the current device as captured
        torch.testing.assert_close(engine.forward(x, text, time), out, rtol=0, atol=0)  # the graph is the forward
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = dit(x, text, time)
    assert rel_error(out, expected) < bound
