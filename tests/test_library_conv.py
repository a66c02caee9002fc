"""The cuDNN frontend convs of the fast VAE (k4serve.kernels.library_conv): the plan choice on the CPU, the convs
on a GPU with the package against torch's float32 conv3d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k4serve.engines.vae import FastVAEDecoder
from k4serve.kernels import library_conv
from k4serve.kernels.conv_bias import conv3d_channels_last
from k4serve.models.cogvideox_vae import build_cogvideox_decoder

REASON = library_conv.unavailable_reason("cuda")
needs_cudnn = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def test_fastest_plan_skips_plans_that_fail_and_takes_the_smallest_time():
    times = {0: 3.0, 1: None, 2: 1.5, 3: 2.0}

    def time_plan(index: int) -> float:
        if times[index] is None:
            raise RuntimeError("CUDNN_STATUS_NOT_SUPPORTED")
        return times[index]

    assert library_conv.fastest_plan(4, time_plan) == 2
    with pytest.raises(RuntimeError, match="none of the 2 cuDNN plans ran: plan 0: ValueError: no"):
        library_conv.fastest_plan(2, lambda index: (_ for _ in ()).throw(ValueError("no")))


@pytest.mark.parametrize("shape", [(2, 8, 5, 6, 7), (1, 128, 10, 48, 84), (3, 16, 4, 5)])
def test_ndhwc_strides_are_torchs_channels_last_strides(shape):
    layout = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    assert library_conv.ndhwc_strides(shape) == list(torch.empty(shape, memory_format=layout).stride())


def test_the_cpu_has_no_cudnn_frontend_convs_and_the_engine_says_why():
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    assert "CUDA GPU" in library_conv.unavailable_reason("cpu")
    decoder, _ = build_cogvideox_decoder("tiny")
    assert FastVAEDecoder(decoder).convs == "torch"  # the default
    with pytest.raises(ValueError, match="convs='cudnn': cuDNN frontend convs need a CUDA GPU"):
        FastVAEDecoder(decoder, convs="cudnn")
    with pytest.raises(ValueError, match="choose one of \\('torch', 'cudnn'\\)"):
        FastVAEDecoder(decoder, convs="cudnn-fp8")


def test_an_unknown_conv_backend_is_refused_with_the_choices():
    x = torch.zeros(1, 2, 3, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    with pytest.raises(ValueError, match="conv backend 'cudnn-fp8': choose one of \\('torch', 'cudnn'\\)"):
        conv3d_channels_last(x, torch.zeros(2, 2, 3, 3, 3), None, (0, 1, 1), backend="cudnn-fp8")


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@needs_cudnn
@pytest.mark.gpu
@pytest.mark.parametrize(
    "x_shape, w_shape, padding",
    [((1, 64, 6, 20, 36), (64, 64, 3, 3, 3), (0, 1, 1)),  # a causal conv: time pre-padded
     ((2, 32, 3, 9, 11), (16, 32, 1, 3, 3), (0, 1, 1)),  # the upsampler's per-frame conv, odd sizes, batch 2
     ((1, 48, 4, 8, 8), (24, 48, 1, 1, 1), (0, 0, 0))],  # a shortcut 1x1x1
)  # fmt: skip
def test_cudnn_convs_equal_torchs_float32_conv_up_to_bf16_rounding(x_shape, w_shape, padding):
    torch.manual_seed(0)
    x = torch.randn(x_shape, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(w_shape, device="cuda") / w_shape[1] ** 0.5).contiguous(memory_format=torch.channels_last_3d)
    torch.backends.cudnn.allow_tf32 = False
    try:
        reference = F.conv3d(x, w, padding=padding)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    xb, wb = x.bfloat16(), w.bfloat16()
    bias = torch.randn(w_shape[0], device="cuda", dtype=torch.bfloat16)
    out = conv3d_channels_last(xb, wb, bias, padding, backend="cudnn")
    expected = conv3d_channels_last(xb, wb, bias, padding, backend="torch")
    assert out.shape == reference.shape and out.is_contiguous(memory_format=torch.channels_last_3d)
    # both round the same bf16 operands' products once to bf16: equal error against float32
    torch_error = relative_error(expected, reference + bias.float().view(1, -1, 1, 1, 1))
    assert relative_error(out, reference + bias.float().view(1, -1, 1, 1, 1)) < max(1.2 * torch_error, 4e-3)
    # the chosen plan is cached: a second call of the same shape reuses it and gives the same values
    assert torch.equal(conv3d_channels_last(xb, wb, bias, padding, backend="cudnn"), out)


@needs_cudnn
@pytest.mark.gpu
def test_a_new_conv_shape_inside_a_graph_capture_is_refused():
    x = torch.randn(1, 8, 3, 5, 5, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(8, 8, 3, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), pytest.raises(RuntimeError, match="before the graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
            library_conv.cudnn_conv(x, w, (0, 1, 1))


@needs_cudnn
@pytest.mark.gpu
def test_the_engine_with_cudnn_convs_matches_torchs_convs_and_replays_exactly():
    decoder, _ = build_cogvideox_decoder("cogvideox-5b", "cuda", torch.bfloat16, seed=4)
    decoder.use_triton_norms()
    z = torch.randn(
        1, 16, 5, 6, 8, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(5)
    )
    fast = FastVAEDecoder(decoder, convs="cudnn")
    video = fast.decode(z)
    expected = FastVAEDecoder(decoder, convs="torch").decode(z)
    assert relative_error(video, expected) < 2e-2  # two bf16 decodes: different conv kernels and roundings
    assert torch.equal(fast.decode(z), video)
    assert torch.equal(FastVAEDecoder(decoder, cuda_graphs=False, convs="cudnn").decode(z), video)
