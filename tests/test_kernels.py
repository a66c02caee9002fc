"""The Triton kernels against float64 torch references.

Without CUDA they run in Triton's CPU interpreter at small sizes (fp16/fp32 dots: the interpreter's bf16 dot
is broken); with CUDA the same tests run in bf16, plus the DiT's full attention shape.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from k4serve.kernels import group_norm
from k4serve.kernels.attention import (
    CANDIDATES,
    AttentionConfig,
    attention_reference,
    flash_attention,
    flash_attention_fp8,
    flash_attention_int8,
    quantize_qkv_fp8,
)
from k4serve.kernels.conv_bias import add_channel_bias_, conv3d_channels_last
from k4serve.kernels.gelu_quant import MAX_CHUNKS, gelu, quantize_rows, row_chunks
from k4serve.kernels.group_norm import (
    group_norm_stats,
    spatial_norm_silu,
    spatial_norm_silu_reference,
)
from k4serve.kernels.int8_gemm import LOADS, Int8Linear, int8_linear, int8_linear_reference
from k4serve.kernels.norm_modulate import norm_modulate, norm_modulate_reference
from k4serve.kernels.qk_norm_rope import qk_norm_rope_, qk_norm_rope_fp8, qk_norm_rope_reference
from k4serve.kernels.quantize import (
    FP8_MAX,
    INT8_MAX,
    QUANT_DTYPES,
    Fp8Linear,
    quantize_rowwise,
    quantize_rowwise_int8,
)

CUDA = torch.cuda.is_available()  # without it tests/conftest.py selected Triton's CPU interpreter
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16  # attention operand dtype
# interpreter configs stay tiny; on the GPU the real tiling is exercised
SMALL = AttentionConfig() if CUDA else AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (a model on GPU 1)")


@pytest.fixture(autouse=True)
def exact_fp8_casts(monkeypatch):
    """Triton 3.9's interpreter rounds fp32 -> e4m3 without carrying a mantissa overflow into the exponent
    (7.94 -> 4.0, a few % of all values); route those casts through torch so the kernels' logic is tested."""
    if CUDA:
        return
    from triton.language import float8e4nv
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    sources = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def exact(data, src, dst, rounding):
        if dst == float8e4nv and str(src) in sources:
            x = torch.from_numpy(np.ascontiguousarray(data)).view(sources[str(src)])
            return x.float().to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return convert(data, src, dst, rounding)

    monkeypatch.setattr(interpreter, "_convert_float", exact)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm()).item()


def random_qkv(b: int, s: int, h: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, S, H, D] as column slices of one QKV buffer, like the engine's."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = torch.randn(b, s, 3, h, d, device=DEVICE, generator=g).to(DTYPE)
    return qkv.unbind(2)


def dequantized(packed) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, S, H, D] float64 from an Fp8QKV (what the fp8 kernel effectively multiplies)."""
    b, s, h, d, kv = packed.batch, packed.seq_len, packed.num_heads, packed.head_dim, packed.kv_block
    q = packed.q.double().view(b, s, h, d) * packed.q_scale.double().transpose(1, 2)[..., None]
    k_scale = packed.k_scale.double().repeat_interleave(kv, -1)[..., :s]  # [B, H, S]
    k = packed.k.double().view(b, s, h, d) * k_scale.transpose(1, 2)[..., None]
    v_t = packed.v_t.double().view(b, h, d, -1) * packed.v_scale.double().repeat_interleave(kv, -1)[:, :, None]
    return q, k, v_t[..., :s].permute(0, 3, 1, 2)


# ---- attention ----


@pytest.mark.parametrize("b, s, h", [(2, 100, 2), (1, 64, 1)])
def test_flash_attention_matches_float64(b, s, h):
    q, k, v = random_qkv(b, s, h, 64, seed=s)
    out = flash_attention(q, k, v, SMALL)
    assert out.shape == (b, s, h * 64) and out.dtype == DTYPE
    assert rel_error(out, attention_reference(q, k, v)) < 5e-3  # bf16 output rounding is ~2e-3


def test_flash_attention_separate_contiguous_operands_and_fp32():
    q, k, v = (t.float().contiguous() for t in random_qkv(1, 50, 2, 16, seed=3))
    out = flash_attention(q, k, v, SMALL)
    assert rel_error(out, attention_reference(q, k, v)) < (2e-3 if CUDA else 1e-6)  # tf32 dots on the GPU


def test_flash_attention_fp8_matches_its_dequantized_operands():
    q, k, v = random_qkv(2, 150, 2, 64, seed=5)
    packed = quantize_qkv_fp8(q, k, v, kv_block=64)
    config = AttentionConfig(**{**SMALL.__dict__, "block_n": 64})
    out = flash_attention_fp8(packed, config)
    assert out.shape == (2, 150, 128) and out.dtype == torch.bfloat16
    # against the same fp8 operands the remaining error is P's e4m3 rounding (~2% rms per element)
    assert rel_error(out, attention_reference(*dequantized(packed))) < 3.5e-2
    # and the whole fp8 path against exact attention: Q/K/V rounding included
    assert rel_error(out, attention_reference(q, k, v)) < 8e-2


def test_small_head_dim_is_refused_with_the_fix():
    q, k, v = random_qkv(1, 32, 2, 8, seed=4)
    with pytest.raises(ValueError, match="attention='sdpa'"):
        flash_attention(q, k, v, SMALL)


def test_quantize_qkv_fp8_round_trips():
    q, k, v = random_qkv(2, 70, 3, 16, seed=6)
    packed = quantize_qkv_fp8(q, k, v, kv_block=32)
    assert packed.v_t.shape == (2 * 3 * 16, 96) and packed.k_scale.shape == (2, 3, 3)
    for original, restored in zip((q, k, v), dequantized(packed), strict=True):
        assert rel_error(restored, original) < 4e-2  # e4m3: 3 mantissa bits
    assert (packed.v_t.view(2, 3, 16, 96)[..., 70:].float() == 0).all()  # padded keys contribute nothing


@gpu
@pytest.mark.parametrize("config", CANDIDATES, ids=str)
@pytest.mark.parametrize("recipe, bound", [("bf16", 5e-3), ("int8", 3e-2), ("fp8", 8e-2)])
def test_attention_at_full_dit_shape(recipe, bound, config):
    """12 s at 384x672: 25,200 visual + 224 text tokens, 48 heads of 64; checked on two heads in fp32."""
    from k4serve.kernels.qk_int8 import quantize_qk_int8

    s, h = 25_424, 48
    q, k, v = random_qkv(1, s, h, 64, seed=7)
    if recipe == "fp8":
        out = flash_attention_fp8(quantize_qkv_fp8(q, k, v), config)
    elif recipe == "int8":
        out = flash_attention_int8(quantize_qk_int8(q, k, v), config)
    else:
        out = flash_attention(q, k, v, config)
    out = out.view(1, s, h, 64)
    for head in (0, h - 1):
        qh, kh, vh = (t[:, :, head].float() for t in (q, k, v))  # [1, S, 64]
        expected = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
        assert rel_error(out[:, :, head], expected) < bound


# ---- QK LayerNorm + RoPE ----


def qk_inputs(b: int, s: int, h: int, d: int, n_visual: int, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = (2.0 * torch.randn(b, s, 3 * h * d, device=DEVICE, generator=g) + 0.5).to(DTYPE)
    norms = [(1 + 0.1 * torch.randn(d, device=DEVICE, generator=g), 0.1 * torch.randn(d, device=DEVICE, generator=g))
             for _ in range(2)]  # fmt: skip
    angles = 10 * torch.rand(n_visual, d // 2, device=DEVICE, generator=g)
    return qkv, norms, angles.cos(), angles.sin()


def test_qk_norm_rope_in_place_matches_float64():
    qkv, (q_norm, k_norm), cos, sin = qk_inputs(2, 150, 3, 16, n_visual=120, seed=8)
    expected = qk_norm_rope_reference(qkv, 3, q_norm, k_norm, cos, sin, 120)
    unrotated = qk_norm_rope_reference(qkv, 3, q_norm, k_norm, cos[:0], sin[:0], 0)
    q, k, v = qk_norm_rope_(qkv, 3, q_norm, k_norm, cos, sin, 120, block=32)
    assert q.data_ptr() == qkv.data_ptr() and q.shape == (2, 150, 3, 16)
    for got, want in zip((q, k), expected[:2], strict=True):
        assert rel_error(got, want) < 6e-3  # one rounding to 16 bits (the interpreter truncates)
    assert torch.equal(v.double(), expected[2])  # v untouched
    assert rel_error(q[:, 120:], unrotated[0][:, 120:]) < 6e-3  # text tokens are not rotated


def test_qk_norm_rope_fp8_packs_like_the_reference():
    qkv, (q_norm, k_norm), cos, sin = qk_inputs(2, 150, 3, 16, n_visual=120, seed=9)
    expected = quantize_qkv_fp8(*(t.float() for t in qk_norm_rope_reference(qkv, 3, q_norm, k_norm, cos, sin, 120)),
                                kv_block=32)  # fmt: skip
    packed = qk_norm_rope_fp8(qkv, 3, q_norm, k_norm, cos, sin, 120, kv_block=32)
    for got, want in zip(dequantized(packed), dequantized(expected), strict=True):
        assert rel_error(got, want) < 1e-2  # equal up to rare one-step e4m3 flips from fp32 LN rounding
    for name in ("q_scale", "k_scale", "v_scale"):
        torch.testing.assert_close(getattr(packed, name), getattr(expected, name), rtol=1e-4, atol=0)
    assert (packed.v_t.view(2, 3, 16, -1)[..., 150:].float() == 0).all()


# ---- gated residual + LayerNorm + modulation ----


@pytest.mark.parametrize("quant", [None, "fp8", "int8"])
@pytest.mark.parametrize("with_delta", [False, True])
def test_norm_modulate_matches_float64(with_delta, quant):
    b, s, d, n_visual = 2, 40, 192, 30
    g = torch.Generator(device=DEVICE).manual_seed(10)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=DEVICE, generator=g)).to(torch.bfloat16)

    x, delta = rand(b, s, d, scale=3.0), rand(b, s, d)
    mods = rand(b, 2, 6, d, scale=0.5)  # the engine's layout: [B, stream, (shift, scale1, gate, ...), D]
    norm = (1 + 0.1 * torch.randn(d, device=DEVICE, generator=g), 0.1 * torch.randn(d, device=DEVICE, generator=g))
    args = (norm, mods[:, :, 0], mods[:, :, 1], n_visual)
    extra = dict(delta=delta, gate=mods[:, :, 2]) if with_delta else {}
    want_x, want_y = norm_modulate_reference(x, *args, **extra)
    x_in = x.clone()
    y, y_scale = norm_modulate(x_in, *args, **extra, quant=quant)
    assert rel_error(x_in, want_x) < 6e-3  # x updated in place (bf16)
    if quant is not None:
        assert y.dtype == QUANT_DTYPES[quant] and y_scale.shape == (b, s, 1)
        q_max = FP8_MAX if quant == "fp8" else INT8_MAX
        torch.testing.assert_close(y_scale, want_y.abs().amax(-1, keepdim=True).float() / q_max, rtol=2e-2, atol=0)
        if quant == "int8":  # rounded to nearest: at most one step from the float64 value's rounding
            steps = (y.double() - want_y / y_scale.double()).abs()
            assert steps.max() < 1.5 and (steps <= 0.5 + 2e-2).double().mean() > 0.9
        y = y.double() * y_scale
    assert rel_error(y, want_y) < {None: 6e-3, "fp8": 4e-2, "int8": 1.5e-2}[quant]


def test_norm_modulate_visual_rows_only_with_shared_stream():
    g = torch.Generator(device=DEVICE).manual_seed(11)
    x, delta = (torch.randn(2, 20, 64, device=DEVICE, generator=g) for _ in range(2))
    out_mods = torch.randn(2, 2, 64, device=DEVICE, generator=g)  # [B, (shift, scale1), D], one stream
    shift, scale1 = (out_mods[:, j : j + 1].expand(-1, 2, -1) for j in (0, 1))
    gate = torch.randn(2, 2, 64, device=DEVICE, generator=g)
    norm = (torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE))
    want_x, want_y = norm_modulate_reference(x, norm, shift, scale1, 12, delta=delta, gate=gate)
    y, _ = norm_modulate(x, norm, shift, scale1, 12, delta=delta, gate=gate, rows=12)
    assert y.shape == (2, 12, 64)
    assert rel_error(y, want_y[:, :12]) < 1e-5 and rel_error(x[:, :12], want_x[:, :12]) < 1e-5


# ---- GELU / per-token quantization ----


def test_gelu_bf16_and_fp8():
    g = torch.Generator(device=DEVICE).manual_seed(12)
    h = (2 * torch.randn(3, 5, 96, device=DEVICE, generator=g)).to(torch.bfloat16)
    want = torch.nn.functional.gelu(h.double())
    y, scale = gelu(h)
    assert scale is None and y.dtype == torch.bfloat16 and rel_error(y, want) < 6e-3
    y8, scale8 = gelu(h, quant="fp8")
    assert y8.dtype == torch.float8_e4m3fn and rel_error(y8.double() * scale8, want) < 4e-2
    y8, scale8 = gelu(h, quant="int8")
    assert y8.dtype == torch.int8 and rel_error(y8.double() * scale8, want) < 1.5e-2


def test_row_chunks_cover_each_row_without_a_spare_chunk():
    for d in (*range(1, 70), 96, 300, 3072, 5000, 12288, 16385):
        block, chunks = row_chunks(d)
        assert block & (block - 1) == 0 and 1 <= chunks <= MAX_CHUNKS and block * (chunks - 1) < d <= block * chunks
    assert row_chunks(12288) == (4096, 3) and row_chunks(3072) == (1024, 3)  # the DiT's widths: no masked lanes


@pytest.mark.parametrize("d", [300, 5000])  # 3 chunks, the last one ragged
def test_gelu_int8_is_the_int8_rounding_of_the_exact_gelu(d):
    g = torch.Generator(device=DEVICE).manual_seed(14)
    h = (3 * torch.randn(5, d, device=DEVICE, generator=g)).to(torch.bfloat16)
    exact = torch.nn.functional.gelu(h.double())  # the official exact-erf form, in float64
    want_q, want_scale = quantize_rowwise_int8(exact)
    q, scale = gelu(h, quant="int8")  # erf by the 1.5e-7 polynomial: it may move a value across a rounding tie
    torch.testing.assert_close(scale, want_scale.float(), rtol=1e-6, atol=0)
    diff = (q.int() - want_q.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3
    y, _ = gelu(h)  # bf16: libdevice's erf, every chunk stored (the interpreter truncates to bf16: 2^-8 rms)
    assert rel_error(y, exact) < 6e-3


def test_gelu_quant_lowers_for_sm90_with_one_exp_and_one_rsqrt_per_value():
    """The pass compiles for sm_90 (no GPU needed) at the DiT's widths; into 8 bits, each of a thread's 24 values of
    a 12288-wide row costs one ex2 and one rsqrt (erf's polynomial), no division, and at most 32 SASS instructions
    into int8; into bf16, libdevice's erf."""
    from sm90_lowering import lower_in_subprocess

    reports, stderr = lower_in_subprocess("gelu-quant")
    assert len(reports) == 4, stderr
    by_output = {r["kernel"].split("quant=")[1]: r for r in reports if "D=12288" in r["kernel"]}
    assert all(r["cubin"] for r in reports), reports
    for quant in ("int8", "fp8"):
        special = by_output[quant]["special"]
        assert special["ex2"] == special["rsqrt"] == 24 and special.get("div", 0) <= 2, special  # divisions: the scale
    assert "rsqrt" not in by_output["bf16"]["special"], by_output["bf16"]
    if by_output["int8"]["sass_instructions"] is not None:  # 30 per value (the one-block libdevice-erf kernel: 60)
        assert by_output["int8"]["sass_instructions"] <= 32 * 24, by_output["int8"]


@pytest.mark.parametrize("quant", ["fp8", "int8"])
def test_quantize_rows_matches_torch_quantizer(quant):
    g = torch.Generator(device=DEVICE).manual_seed(13)
    x = torch.randn(7, 130, device=DEVICE, generator=g) * torch.logspace(-3, 2, 7, device=DEVICE)[:, None]
    q, scale = quantize_rows(x.to(torch.bfloat16), quant)
    want_q, want_scale = (quantize_rowwise if quant == "fp8" else quantize_rowwise_int8)(x.to(torch.bfloat16))
    assert q.dtype == want_q.dtype
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert rel_error(q.double() * scale, want_q.double() * want_scale) < 1e-2
    assert rel_error(q.double() * scale, x) < (4e-2 if quant == "fp8" else 1.5e-2)  # every row keeps its own range


# ---- 8-bit linears (kernels/quantize.py, kernels/int8_gemm.py) ----

# quant -> (layer type, its weight dtype, the quantizer its forward applies to a float input, bound vs exact)
LINEARS_8BIT = {
    "fp8": (Fp8Linear, torch.float8_e4m3fn, quantize_rowwise, 6e-2),
    "int8": (Int8Linear, torch.int8, lambda x: quantize_rows(x, "int8"), 2e-2),
}


@pytest.mark.parametrize("quant", list(LINEARS_8BIT))
def test_8bit_linear_against_dequantized_and_exact_products(quant):
    layer_type, dtype, quantize, exact_bound = LINEARS_8BIT[quant]
    g = torch.Generator().manual_seed(14)
    # K = 160, N = 80: ragged for the int8 GEMM's tiles, multiples of 16 as cuBLAS fp8 needs
    linear = torch.nn.Linear(160, 80).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 160, generator=g) / math.sqrt(160))
    x = torch.randn(3, 45, 160, generator=g).to(DEVICE, torch.bfloat16)
    layer = layer_type.from_linear(linear)
    assert layer.weight.dtype == dtype and layer.weight_scale.numel() == 80
    x8, x_scale = quantize(x)
    out = layer(x8, x_scale)
    assert out.shape == (3, 45, 80) and out.dtype == torch.bfloat16
    dequant = (x8.double() * x_scale) @ layer.dequantized_weight().double().T + linear.bias.double()
    assert rel_error(out, dequant) < 6e-3  # only the bf16 output rounding remains
    torch.testing.assert_close(layer(x), out, rtol=0, atol=0)  # a float input is quantized the same way
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    assert rel_error(out, exact) < exact_bound  # e4m3 rounds each operand by ~4 %, int8 by ~1 %


@pytest.mark.parametrize("loads", LOADS)
@pytest.mark.parametrize("m, n, k", [(37, 50, 96), (300, 260, 384), (37, 50, 208), (5, 40, 200)])
def test_int8_gemm_accumulates_exactly(m, n, k, loads):
    """Integer operands with unit scales: the fp32 output must be the exact integer product (no int8 / fp16
    accumulation anywhere; the largest sums here need 23 bits). Rows and columns are ragged; K is a multiple of
    the tile, ragged in the last tile (208: the TMA's zero fill), or not a multiple of 16 (200: no TMA)."""
    g = torch.Generator().manual_seed(15)
    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x[0], w[0] = 127, -127  # one extreme product sum: -k·127²
    y = int8_linear(x.to(DEVICE), torch.ones(m, 1, device=DEVICE), w.to(DEVICE), torch.ones(n, device=DEVICE),
                    out_dtype=torch.float32, loads=loads)  # fmt: skip
    want = int8_linear_reference(x, torch.ones(m, 1), w, torch.ones(n))
    torch.testing.assert_close(want, (x.long() @ w.long().T).double(), rtol=0, atol=0)
    torch.testing.assert_close(y.cpu().double(), want, rtol=0, atol=0)


def test_int8_gemm_lowers_to_pipelined_hopper_int8_tensor_core_code():
    """Every GPU tiling of both int8 GEMMs compiles for sm_90 (no GPU needed) to int8 wgmma (s32 += s8 x s8), its
    operand tiles staged into at least two shared-memory buffers (the main loop is pipelined: typed without the
    JIT's alignment facts, the pointer kernel falls back to one buffer loaded through registers), by cp.async
    or, in the descriptor kernel, by the TMA engine (cp.async.bulk.tensor)."""
    from sm90_lowering import lower_in_subprocess

    reports, stderr = lower_in_subprocess("int8-gemm")
    assert [r["kernel"].split()[2] for r in reports] == ["pointers"] * 7 + ["tma"] * 5, stderr
    for report in reports:
        assert report["cubin"] and report["wgmma"] == ["wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8"], report
        copies = report["tma"] if "tma" in report["kernel"] else report["cp_async"]
        assert copies > 0 and report["shared"] >= 2 * 48 * 1024, report  # one 128x256x128 stage: 48 KiB


def test_int8_linear_refuses_wrong_operands():
    w = torch.zeros(8, 32, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="int8 x"):
        int8_linear(torch.zeros(4, 32, device=DEVICE), torch.ones(4, 1, device=DEVICE), w, torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="one per row"):
        int8_linear(torch.zeros(4, 32, dtype=torch.int8, device=DEVICE), torch.ones(3, 1, device=DEVICE), w,
                    torch.ones(8, device=DEVICE))  # fmt: skip
    with pytest.raises(ValueError, match="loads='cp.async': choose one of \\('pointers', 'tma'\\)"):
        int8_linear(torch.zeros(4, 32, dtype=torch.int8, device=DEVICE), torch.ones(4, 1, device=DEVICE), w,
                    torch.ones(8, device=DEVICE), loads="cp.async")  # fmt: skip


# ---- VAE GroupNorm + spatial modulation + SiLU (group_norm.py) ----

CHANNELS_LAST = torch.channels_last_3d
LAYOUTS = ("contiguous", "channels-last")  # NCDHW (the eager decoder) and NDHWC (the fast decoder)
# fp32 and fp16 in the interpreter; bf16 on the GPU. Only the output rounding separates them from float64.
NORM_DTYPES = [(torch.bfloat16, 4e-3)] if CUDA else [(torch.float32, 1e-6), (torch.float16, 1e-3)]


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST if layout == "channels-last" else torch.contiguous_format)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_norm_stats_keep_the_variance_of_large_mean_features(layout, monkeypatch):
    # mean 50, std 0.1: fp32 E[x²] - E[x]² would lose ~3 % of the variance; several chunks per group, the last
    # partial. Channels-last: 10 channels per group (not a power of two), 320 channels in two channel tiles, and
    # few programs, so that each chunk spans several tiles as on the GPU's large tensors.
    monkeypatch.setattr(group_norm, "STATS_PROGRAMS", 8)
    g = torch.Generator().manual_seed(15)
    channels, hw = (8, (40, 70)) if layout == "contiguous" else (320, (10, 14))
    x = in_layout((50.0 + 0.1 * torch.randn(2, channels, 3, *hw, generator=g)).to(DEVICE), layout)
    groups = 4 if layout == "contiguous" else 32
    mean, rstd = group_norm_stats(x, groups=groups, eps=1e-6)
    rows = x.double().reshape(2 * groups, -1)
    want_var = rows.var(1, unbiased=False)
    torch.testing.assert_close(mean.double(), rows.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), (want_var + 1e-6).rsqrt(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [dtype for dtype, _ in NORM_DTYPES])
def test_residual_is_added_in_the_statistics_pass(dtype):
    # a resnet's h += shortcut(x) fused with the next norm's statistics: the sum as torch's add_ rounds it
    g = torch.Generator().manual_seed(18)
    h, x = (in_layout((torch.randn(2, 64, 3, 8, 12, generator=g) + 4).to(DEVICE, dtype), "channels-last") for _ in "hx")
    expected_sum = h.clone().add_(x)
    mean, rstd = group_norm_stats(h, groups=32, eps=1e-6, residual=x)
    assert torch.equal(h, expected_sum)
    rows = expected_sum.double().reshape(2 * 32, -1)
    torch.testing.assert_close(mean.double(), rows.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (rows.var(1, unbiased=False) + 1e-6).rsqrt(), rtol=1e-4, atol=0)
    scale = torch.ones(2, 64, 3, 4, 6, device=DEVICE, dtype=dtype)
    weight, bias = torch.ones(64, device=DEVICE, dtype=dtype), torch.zeros(64, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match="stats must be"):
        spatial_norm_silu(h, scale, scale, weight, bias, groups=32, eps=1e-6, stats=(mean[:4], rstd[:4]))
    with pytest.raises(ValueError, match="residual .* must be channels-last like x"):
        group_norm_stats(h, groups=32, eps=1e-6, residual=x.contiguous())


@pytest.mark.parametrize("dtype", [dtype for dtype, _ in NORM_DTYPES])
def test_conv_bias_added_inside_the_norm_passes_equals_adding_it_first(dtype):
    """The fast decoder's conv outputs arrive without their bias: both norm passes (and the residual pass) add it
    as they read, with the rounding of the bias add they replace, so the outputs equal the biased path's bitwise."""
    g = torch.Generator().manual_seed(23)
    h, x = (in_layout((torch.randn(2, 64, 3, 8, 12, generator=g) + 4).to(DEVICE, dtype), "channels-last") for _ in "hx")
    conv_bias = (4 * torch.randn(64, generator=g)).to(DEVICE, dtype)
    biased = h + conv_bias.view(-1, 1, 1, 1)  # torch's broadcast add: one rounding
    scale, shift = (torch.randn(2, 64, 3, 4, 6, generator=g).to(DEVICE, dtype) for _ in "ss")
    weight, bias = (torch.randn(64, generator=g).to(DEVICE, dtype) for _ in "wb")
    want = spatial_norm_silu(biased, scale, shift, weight, bias, groups=32, eps=1e-6)
    got = spatial_norm_silu(h, scale, shift, weight, bias, groups=32, eps=1e-6, conv_bias=conv_bias)
    assert torch.equal(got, want) and not torch.equal(h, biased)  # h itself stays unbiased
    # with the skip connection: h = (h + bias) + x in place, as the biased conv and torch's add_ round it
    expected_sum = biased.clone().add_(x)
    stats = group_norm_stats(h, groups=32, eps=1e-6, residual=x, conv_bias=conv_bias)
    assert torch.equal(h, expected_sum)
    for got_stat, want_stat in zip(stats, group_norm_stats(expected_sum, groups=32, eps=1e-6), strict=True):
        torch.testing.assert_close(got_stat, want_stat, rtol=1e-6, atol=1e-6)  # the statistics of the sum written
    y = in_layout(torch.randn(2, 64, 3, 8, 12, generator=g).to(DEVICE, dtype), "channels-last")
    want_y = (y + conv_bias.view(-1, 1, 1, 1)).add_(x)
    assert torch.equal(add_channel_bias_(y, conv_bias, residual=x), want_y)
    with pytest.raises(ValueError, match="conv_bias \\(32,\\) must be \\[C\\] of a channels-last x"):
        group_norm_stats(h, groups=32, eps=1e-6, conv_bias=conv_bias[:32])
    with pytest.raises(ValueError, match="must be \\[C\\] of a channels-last x"):
        spatial_norm_silu(h.contiguous(), scale, shift, weight, bias, groups=32, eps=1e-6, conv_bias=conv_bias)
    with pytest.raises(ValueError, match="residual .* must have y's shape and layout"):
        add_channel_bias_(y, conv_bias, residual=x.contiguous())


# (frames, latent frames, spatial factor): odd with its lone first frame, even, the mid block's 1:1, an image
# cuda:1: the VAE on GPU 1 while GPU 0 stays current; the kernels must launch on their tensors' GPU
@pytest.mark.parametrize("device", [DEVICE, pytest.param("cuda:1", marks=two_gpus)])
@pytest.mark.parametrize("t, t_lat, up", [(9, 3, 2), (8, 2, 2), (3, 3, 1), (1, 1, 2)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, tolerance", NORM_DTYPES)
def test_spatial_norm_silu_into_a_padded_buffer_matches_float64(t, t_lat, up, device, layout, dtype, tolerance):
    g = torch.Generator().manual_seed(16)
    x = in_layout((torch.randn(2, 8, t, 4 * up, 6 * up, generator=g) * 3 + 1).to(device, dtype), layout)
    scale, shift = (torch.randn(2, 8, t_lat, 4, 6, generator=g).to(device, dtype) for _ in range(2))
    weight, bias = (torch.randn(8, generator=g).to(device, dtype) for _ in range(2))
    padded = in_layout(torch.full((2, 8, 2 + t, 4 * up, 6 * up), float("nan"), device=device, dtype=dtype), layout)
    out = spatial_norm_silu(x, scale, shift, weight, bias, groups=4, eps=1e-6, out=padded[:, :, 2:])
    assert out.data_ptr() == padded[:, :, 2:].data_ptr()
    assert padded[:, :, :2].isnan().all()  # the conv's past frames are left to it
    want = spatial_norm_silu_reference(x, scale, shift, weight, bias, groups=4, eps=1e-6)
    assert rel_error(out, want) < tolerance


@pytest.mark.parametrize("dtype, tolerance", NORM_DTYPES)
def test_channels_last_tail_gets_the_last_frames_and_wide_channels_tile(dtype, tolerance):
    # 320 channels: two channel tiles, the second masked; groups of 10; the tail is a conv's carried past frames
    g = torch.Generator().manual_seed(17)
    x = in_layout((torch.randn(1, 320, 5, 4, 6, generator=g) * 2 - 1).to(DEVICE, dtype), "channels-last")
    scale, shift = (torch.randn(1, 320, 2, 2, 3, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight, bias = (torch.randn(320, generator=g).to(DEVICE, dtype) for _ in range(2))
    tail = in_layout(torch.full((1, 320, 2, 4, 6), float("nan"), device=DEVICE, dtype=dtype), "channels-last")
    out = spatial_norm_silu(x, scale, shift, weight, bias, groups=32, eps=1e-6, tail=tail)
    assert out.is_contiguous(memory_format=CHANNELS_LAST)
    assert torch.equal(tail, out[:, :, -2:])
    want = spatial_norm_silu_reference(x, scale, shift, weight, bias, groups=32, eps=1e-6)
    assert rel_error(out, want) < tolerance


def test_spatial_norm_silu_refuses_a_buffer_in_the_other_layout():
    x = in_layout(torch.randn(1, 8, 3, 4, 6, device=DEVICE), "channels-last")
    scale = torch.randn(1, 8, 3, 4, 6, device=DEVICE)
    ones, zeros = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="out must be a frame slice .* of a channels-last buffer"):
        spatial_norm_silu(x, scale, scale, ones, zeros, 4, 1e-6, out=torch.empty(1, 8, 3, 4, 6, device=DEVICE))
    with pytest.raises(ValueError, match="tail is for channels-last x"):
        spatial_norm_silu(x.contiguous(), scale, scale, ones, zeros, 4, 1e-6, tail=torch.empty_like(x[:, :, :2]))


def test_spatial_norm_silu_refuses_a_grid_it_cannot_upsample():
    x = torch.randn(1, 8, 6, 8, 12, device=DEVICE)
    scale = torch.randn(1, 8, 4, 4, 6, device=DEVICE)  # nearest upsampling in time repeats each frame k times
    with pytest.raises(ValueError, match="6 frames are not an upsampling of 4 latent frames"):
        spatial_norm_silu(x, scale, scale, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE), 4, 1e-6)


@pytest.mark.parametrize("channels", [3, 64, 384])  # conv_out's RGB, one tile of channels, two (a ragged one)
@pytest.mark.parametrize("dtype", [dtype for dtype, _ in NORM_DTYPES])
def test_conv_bias_kernel_equals_torchs_conv_with_bias(channels, dtype):
    """The NDHWC conv with its bias added by our kernel: bitwise torch's conv3d + bias (the same roundings)."""
    g = torch.Generator().manual_seed(21)
    x = in_layout(torch.randn(2, 5, 3, 6, 7, generator=g).to(DEVICE, dtype), "channels-last")
    weight = (torch.randn(channels, 5, 3, 3, 3, generator=g) / 8).to(DEVICE, dtype)
    bias = (torch.randn(channels, generator=g) * 4).to(DEVICE, dtype)
    y = conv3d_channels_last(x, weight, bias, padding=(0, 1, 1))
    unbiased = F.conv3d(x, weight, None, padding=(0, 1, 1))
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    assert torch.equal(y, unbiased + bias.view(-1, 1, 1, 1))  # torch's broadcast add: the same fp32 sum rounded once
    with pytest.raises(ValueError, match="channels-last with bias"):
        add_channel_bias_(unbiased.contiguous(), bias)
