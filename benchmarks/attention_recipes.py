"""Which quantized attention recipe can reach 3e-2 per call: a float64 emulation on the CPU (a minute or two).

    python benchmarks/attention_recipes.py [--tokens-grid 5x16x48] [--heads 2]

Each recipe rounds Q, K (with or without smoothing), P and V as the kernels would — e4m3 (3 mantissa bits,
per-row / per-block / per-channel scales) or symmetric int8 (round to nearest) or bf16 — and runs the online
softmax over 128-key blocks in float64, so the only error is the operands' rounding. Inputs are the DiT's
distribution: per-head LayerNorm'd (scales 1 + N(0, 0.1²), biases N(0, b²)) and RoPE-rotated q, k with the
flash-512 axes, random v. The table is what benchmarks/NOTES.md ("fp8 accuracy") reasons from.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from k4serve.models.dit import RoPE3D, apply_rope

E4M3 = torch.float8_e4m3fn
KV_BLOCK = 128


def dit_inputs(grid: tuple[int, int, int], heads: int, bias_std: float, text: int = 224, seed: int = 0):
    """q, k, v [S, H, 64] float64 as the DiT's attention sees them."""
    g = torch.Generator().manual_seed(seed)
    n, d = math.prod(grid), 64
    raw = torch.randn(2, n + text, heads, d, generator=g, dtype=torch.float64) * 2 + 0.5
    cos, sin = RoPE3D((16, 24, 24), 128, dtype=torch.float64)(grid)
    qk = []
    for x in raw:
        weight = 1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
        x = F.layer_norm(x, (d,), weight, bias_std * torch.randn(d, generator=g, dtype=torch.float64))
        qk.append(torch.cat([apply_rope(x[:n], cos, sin), x[n:]]))
    return qk[0], qk[1], torch.randn(n + text, heads, d, generator=g, dtype=torch.float64)


def block_amax(x: torch.Tensor) -> torch.Tensor:
    """amax per (block of KV_BLOCK tokens, head) of x [S, H, D], broadcast back to x's shape."""
    s = x.shape[0]
    n = -(-s // KV_BLOCK)
    blocks = F.pad(x, (0, 0, 0, 0, 0, n * KV_BLOCK - s)).view(n, KV_BLOCK, *x.shape[1:])
    return blocks.abs().amax(dim=(1, 3), keepdim=True).expand_as(blocks).reshape(-1, *x.shape[1:])[:s]


def round_e4m3(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = amax / 448
    return (x / scale).clamp(-448, 448).to(E4M3).double() * scale


def round_int8(x: torch.Tensor, amax: torch.Tensor, top: float = 127.0) -> torch.Tensor:
    scale = amax / top
    return torch.round(x / scale).clamp(-top, top) * scale


def quantize(x: torch.Tensor, how: str) -> torch.Tensor:
    """Round x [S, H, D] by one operand recipe: `fmt-granularity`."""
    if how == "exact":
        return x
    if how == "bf16":
        return x.to(torch.bfloat16).double()
    fmt, granularity = how.split("-")
    amax = {"row": lambda: x.abs().amax(-1, keepdim=True), "block": lambda: block_amax(x),
            "channel": lambda: x.abs().amax(0, keepdim=True)}[granularity]()  # fmt: skip
    return round_e4m3(x, amax) if fmt == "e4m3" else round_int8(x, amax)


def round_p(p: torch.Tensor, how: str) -> torch.Tensor:
    """P in (0, 1] (relative to the running max), rounded as the P·V operand."""
    return {"exact": lambda: p, "bf16": lambda: p.to(torch.bfloat16).double(),
            "e4m3": lambda: (p * 256).to(E4M3).double() / 256,  # the kernels' 2^8 shift into e4m3's normal range
            "uint8": lambda: torch.round(p * 255) / 255, "int8": lambda: torch.round(p * 127) / 127}[how]()  # fmt: skip


def attention(q, k, v, p_how: str) -> torch.Tensor:
    """Online softmax over KV blocks in float64 with P rounded per block, as the kernels accumulate it."""
    m = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float64)
    l, acc = torch.zeros_like(m), torch.zeros(q.shape[1], q.shape[0], q.shape[2], dtype=torch.float64)
    for start in range(0, k.shape[0], KV_BLOCK):
        s = torch.einsum("qhd,khd->hqk", q, k[start : start + KV_BLOCK]) / math.sqrt(q.shape[-1])
        m_new = torch.maximum(m, s.amax(-1))
        p, alpha = round_p(torch.exp(s - m_new[..., None]), p_how), torch.exp(m - m_new)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("hqk,khd->hqd", p, v[start : start + KV_BLOCK])
        m = m_new
    return (acc / l[..., None]).permute(1, 0, 2)


# name -> (Q, K, smooth K, P, V)
RECIPES = {
    "e4m3 Q row, K block; e4m3 P; e4m3 V block (triton-fp8)": ("e4m3-row", "e4m3-block", False, "e4m3", "e4m3-block"),
    "  + smoothed K": ("e4m3-row", "e4m3-block", True, "e4m3", "e4m3-block"),
    "  + smoothed K, V per channel": ("e4m3-row", "e4m3-block", True, "e4m3", "e4m3-channel"),
    "exact Q·Kᵀ; e4m3 P; e4m3 V per channel (the e4m3 P·V floor)": ("exact", "exact", False, "e4m3", "e4m3-channel"),
    "e4m3 Q·Kᵀ smoothed; bf16 P·V": ("e4m3-row", "e4m3-block", True, "bf16", "bf16"),
    "int8 Q·Kᵀ smoothed; e4m3 P; e4m3 V per channel (SageAttention2)": (
        "int8-row", "int8-block", True, "e4m3", "e4m3-channel"),
    "int8 Q·Kᵀ smoothed; int8 P (127); int8 V per channel": ("int8-row", "int8-block", True, "int8", "int8-channel"),
    "int8 Q·Kᵀ smoothed; uint8 P (255); int8 V per channel": ("int8-row", "int8-block", True, "uint8", "int8-channel"),
    "int8 Q·Kᵀ smoothed; bf16 P·V (triton-int8)": ("int8-row", "int8-block", True, "bf16", "bf16"),
    "int8 Q·Kᵀ, no smoothing; bf16 P·V": ("int8-row", "int8-block", False, "bf16", "bf16"),
    "exact Q·Kᵀ; bf16 P·V": ("exact", "exact", False, "bf16", "bf16"),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-grid", default="5x16x48", help="visual token grid TxHxW (+224 text tokens)")
    parser.add_argument("--heads", type=int, default=2)
    args = parser.parse_args()
    grid = tuple(int(n) for n in args.tokens_grid.split("x"))
    biases = (0.02, 0.5)  # init_random_weights' LayerNorm biases, and a checkpoint-like offset of the keys
    print(f"rel. L2 error vs exact float64 attention; {math.prod(grid) + 224} tokens, {args.heads} heads of 64\n")
    print("| recipe | " + " | ".join(f"LN bias std {b}" for b in biases) + " |\n|---|" + "---|" * len(biases))
    inputs = [dit_inputs(grid, args.heads, b) for b in biases]
    refs = [attention(q, k, v, "exact") for q, k, v in inputs]
    for name, (q_how, k_how, smooth, p_how, v_how) in RECIPES.items():
        errors = []
        for (q, k, v), ref in zip(inputs, refs, strict=True):
            k = k - k.mean(0, keepdim=True) if smooth else k
            out = attention(quantize(q, q_how), quantize(k, k_how), quantize(v, v_how), p_how)
            errors.append(((out - ref).norm() / ref.norm()).item())
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    main()
