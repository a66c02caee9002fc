"""Per-GEMM error of the 8-bit linear recipes, emulated in float64 (runs on the CPU; no kernel involved).

    python benchmarks/linear_recipes.py [--tokens 2048]

For the DiT's linear shapes (K = 3072 for QKV / out / FF1, K = 12288 for FF2) the activations are quantized per
token and the weights per output channel, exactly as `kernels.quantize` rounds them (e4m3: amax / 448 and a
round-to-nearest e4m3 cast; int8: amax / 127, halves away from zero), the product is taken in float64, and the
relative L2 error is measured against the float64 product of the unquantized operands. Inputs:
  LayerNorm'd rows     N(0, 1) rows through LayerNorm (the QKV, out and FF1 inputs: LayerNorm + modulation)
  GELU of FF1          GELU of a LayerNorm'd row times N(0, 1/K) weights (the FF2 input)
  8 outlier channels   LayerNorm'd rows whose first 8 channels are 20x larger: the case that int8's per-token
                       scale handles worst (random weights have none; trained transformers often do)
Weights N(0, 1/K). The table is printed and appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from results import append_table

from k4serve.kernels.quantize import quantize_rowwise, quantize_rowwise_int8

RECIPES = {"e4m3 (fp8, fp8-fast)": quantize_rowwise, "int8": quantize_rowwise_int8}


def dequantized(x: torch.Tensor, quantize) -> torch.Tensor:
    q, scale = quantize(x)
    return q.double() * scale.double()


def inputs(tokens: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The inputs a linear of width K reads in the DiT: K = 3072 a LayerNorm'd row, 12288 the GELU of FF1."""
    rows = F.layer_norm(torch.randn(tokens, 3072, generator=g, dtype=torch.float64), (3072,))
    if k != 3072:
        return {"GELU of FF1": F.gelu(rows @ (torch.randn(k, 3072, generator=g, dtype=torch.float64) / 3072**0.5).T)}
    outliers = rows.clone()
    outliers[:, :8] *= 20
    return {"LayerNorm'd rows": rows, "8 outlier channels": outliers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    lines = ["| K | input | " + " | ".join(RECIPES) + " |", "|---|---|" + "---|" * len(RECIPES)]
    for k in (3072, 12288):
        w = torch.randn(3072, k, generator=g, dtype=torch.float64) / k**0.5
        for name, x in inputs(args.tokens, k, g).items():
            exact = x @ w.T
            errors = [(dequantized(x, q) @ dequantized(w, q).T - exact).norm() / exact.norm() for q in RECIPES.values()]
            lines.append(f"| {k} | {name} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        command = f"python benchmarks/linear_recipes.py --tokens {args.tokens}"
        method = "float64 emulation of the roundings; rel. L2 error of one GEMM vs the unquantized float64 product"
        append_table("8-bit linear recipes: per-GEMM error", command, method, table)


if __name__ == "__main__":
    main()
