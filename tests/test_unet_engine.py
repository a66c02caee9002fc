"""The fast V2A UNet engine against the module it wraps (eager on the CPU; CUDA graphs, fp8, NHWC on the GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from k4serve.engines.base import Engine
from k4serve.engines.unet import FastUNet, channels_last_convs, quantize_linears, shared_copy
from k4serve.models.pndm import PNDMSampler, unet_denoiser
from k4serve.models.v2a_unet import V2AUNetConfig, build_v2a_unet

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
# head widths 16 and 32 (FlashAttention wants multiples of 8), 32 norm groups, all linears fp8-eligible
GPU_CONFIG = V2AUNetConfig(block_out_channels=(128, 256, 256, 256), cross_attention_dim=128, feature_dim=256)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def inputs(config: V2AUNetConfig, shape, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    tensors = (torch.randn(shape, generator=g), torch.randn(b, 100, config.feature_dim, generator=g),
               torch.randn(b, 96, config.feature_dim, generator=g))  # fmt: skip
    sample, prompt, video = (x.to(device, dtype) for x in tensors)
    return sample, torch.tensor([981] * b, device=device), prompt, video


def test_cpu_engine_is_the_eager_module():
    unet = build_v2a_unet("tiny", seed=1)
    engine = FastUNet(unet)
    assert isinstance(engine, Engine) and engine.unet is unet and not engine.cuda_graphs
    sample, t, prompt, video = inputs(unet.config, (2, 4, 8, 9))
    torch.testing.assert_close(engine(sample, 981, prompt, video), unet(sample, t, prompt, video), rtol=0, atol=0)
    engine.load([(2, 4, 8, 12)])
    assert engine.shapes == ((2, 4, 8, 9), (2, 4, 8, 12))


def test_engine_tree_shares_weights_and_leaves_the_module_alone():
    """What the GPU options do to the engine's copy (run here on the CPU): NHWC convs, 8-bit transformer linears."""
    unet = build_v2a_unet("tiny", seed=2)
    sample, t, prompt, video = inputs(unet.config, (2, 4, 8, 9))
    expected = unet(sample, t, prompt, video)
    nhwc = shared_copy(unet)
    channels_last_convs(nhwc)
    block, original = (m.down_blocks[0].attentions[0].transformer_blocks[0].attn1 for m in (nhwc, unet))
    assert block is not original and block.to_q.weight is original.to_q.weight  # shared, not copied
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and unet.conv_in.weight.is_contiguous()
    out = nhwc(sample.contiguous(memory_format=torch.channels_last), t, prompt, video)
    assert rel_error(out, expected) < 1e-5
    fp8 = shared_copy(unet)
    # 10 tiny blocks x (q, k, v, out; video q, k, v, out; text q, k, v, out, projection; FF in, out)
    assert quantize_linears(fp8, "fp8") == 10 * 15
    assert type(original.to_q) is torch.nn.Linear and type(fp8.mid_block.attentions[0].proj_in) is torch.nn.Conv2d
    assert type(fp8.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q).__name__ == "Fp8Linear"
    int8 = shared_copy(unet)
    assert quantize_linears(int8, "int8") == 10 * 15
    assert type(int8.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q).__name__ == "Int8Linear"
    # one swapped layer against the linear it replaced (the int8 GEMM runs here in Triton's interpreter; the whole
    # int8 engine is checked on the GPU below)
    x = torch.randn(2, 9, original.to_q.in_features)
    assert rel_error(int8.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q(x), original.to_q(x)) < 3e-2
    torch.testing.assert_close(unet(sample, t, prompt, video), expected, rtol=0, atol=0)


def test_bad_options_name_the_fix():
    unet = build_v2a_unet("tiny")
    with pytest.raises(ValueError, match="needs a CUDA GPU.*linear='bf16'"):
        FastUNet(unet, linear="fp8")
    with pytest.raises(ValueError, match="attention one of"):
        FastUNet(unet, attention="xformers")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("linear, channels_last, torch_compile, bound", [
    ("bf16", False, False, 1.5), ("bf16", True, False, 1.5), ("bf16", False, True, 1.5), ("fp8", False, False, 1e-1),
    ("int8", False, False, 5e-2),
])  # fmt: skip
def test_cuda_graph_engine_equals_eager(linear, channels_last, torch_compile, bound):
    """Error vs the float32 module with the same weights: a bf16 engine within `bound` x the eager bf16 module's own
    (two bf16 paths differ by about their rounding: 1.5e-2 measured between them), fp8 within `bound` absolute."""
    unet = build_v2a_unet(GPU_CONFIG, "cuda", torch.bfloat16, seed=2)
    engine = FastUNet(unet, linear=linear, channels_last=channels_last, torch_compile=torch_compile)
    assert engine.cuda_graphs and (engine.quantized_linears > 0) == (linear != "bf16")
    odd, even = (
        inputs(GPU_CONFIG, (2, 4, 64, 148), "cuda", torch.bfloat16),
        inputs(GPU_CONFIG, (2, 4, 64, 96), "cuda", torch.bfloat16, seed=1),
    )
    out = engine(*odd)  # first call: warm-up + capture, then replay
    other = engine(*even)  # a second bucket in the same graph pool
    assert engine.shapes == ((2, 4, 64, 148), (2, 4, 64, 96)) and out.shape == odd[0].shape
    torch.testing.assert_close(engine(*odd), out, rtol=0, atol=0)  # replays are deterministic, buckets independent
    torch.testing.assert_close(engine.forward(*odd), out, rtol=0, atol=0)  # the graph is the engine's forward
    reference = copy.deepcopy(unet).float()
    for result, args in ((out, odd), (other, even)):
        exact = reference(*(x.float() if x.is_floating_point() else x for x in args))
        limit = bound * rel_error(unet(*args), exact) if linear == "bf16" else bound
        assert rel_error(result, exact) < limit
    assert unet.conv_in.weight.is_contiguous()  # the module itself is untouched


@gpu
@pytest.mark.gpu
def test_sampler_through_the_engine_matches_eager():
    unet = build_v2a_unet(GPU_CONFIG, "cuda", torch.bfloat16, seed=3)
    _, _, prompt, video = inputs(GPU_CONFIG, (2, 4, 64, 37), "cuda", torch.bfloat16)
    sampler = PNDMSampler(num_steps=10)
    fast = sampler(unet_denoiser(FastUNet(unet), prompt, video), (4, 64, 37), [5], "cuda", torch.bfloat16)
    eager = sampler(unet_denoiser(unet, prompt, video), (4, 64, 37), [5], "cuda", torch.bfloat16)
    assert rel_error(fast, eager) < 5e-2
