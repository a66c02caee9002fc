"""The VAE decoder's widest convs: torch's conv3d against the cuDNN frontend's fastest plan, in bf16 and fp8.

    python benchmarks/vae_convs.py

At the conv shapes of one temporal chunk of the full-size decoder (NDHWC, the input already padded in time as
the causal convs see it, batch 1), one run times:
  torch bf16           F.conv3d, torch's cuDNN path (what the `fast` engine runs without the frontend)
  cuDNN frontend bf16  k4serve.kernels.library_conv.cudnn_conv: every plan of the shape timed, the fastest kept
  cuDNN frontend fp8   e4m3 operands (per-tensor scales by amax), fp32 accumulation, the descale fused, bf16 out;
                       every plan timed (the operands' quantization not included: its own row)
Error: relative L2 against the float32 conv of the unquantized operands (TF32 off). Operands: SiLU of N(0, 1)
activations, weights N(0, 1/fan_in). Medians of CUDA-event timings; the table is printed and appended to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from results import append_table

from k4serve.kernels import library_conv
from k4serve.kernels.quantize import FP8_MAX

# (name, in channels, out channels, frames, H, W) of one 8-frame chunk's convs, widest first
SHAPES = [
    ("up block 3 (128 ch)", 128, 128, 8, 384, 672),
    ("up block 3, first conv", 256, 128, 8, 384, 672),
    ("up block 2 (256 ch)", 256, 256, 8, 192, 336),
    ("up block 1 (256 ch)", 256, 256, 4, 96, 168),
    ("mid block (512 ch)", 512, 512, 2, 48, 84),
]
PADDING = [0, 1, 1]
RUNS = 10  # timed runs per path (medians)


def fp8_conv(x8: torch.Tensor, w8: torch.Tensor, descale: torch.Tensor, out: torch.Tensor):
    """A cuDNN frontend graph out = conv(x8, w8) * descale (e4m3 in, fp32 accumulation, bf16 out) with its fastest
    plan: returns the call."""
    import cudnn

    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    e4m3, fp32, bf16 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT, cudnn.data_type.BFLOAT16
    graph = cudnn.pygraph(io_data_type=bf16, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    gx = graph.tensor(name="x", dim=list(x8.shape), stride=library_conv.ndhwc_strides(x8.shape), data_type=e4m3)
    gw = graph.tensor(name="w", dim=list(w8.shape), stride=library_conv.ndhwc_strides(w8.shape), data_type=e4m3)
    gs = graph.tensor(name="descale", dim=[1] * 5, stride=[1] * 5, data_type=fp32)
    y = graph.conv_fprop(image=gx, weight=gw, padding=PADDING, stride=[1, 1, 1], dilation=[1, 1, 1],
                         compute_data_type=fp32, name="conv")  # fmt: skip
    y.set_data_type(fp32)
    gy = graph.mul(a=y, b=gs, compute_data_type=fp32, name="descale")
    gy.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(bf16)
    pack = {gx: x8, gw: w8, gs: descale, gy: out}
    tuned = library_conv.tune(cudnn, graph, pack, handle)

    def run() -> None:
        graph.execute_plan_at_index(pack, tuned.workspace, index=tuned.index, handle=handle)

    return run, tuned.timed


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


def measure(name: str, c: int, k: int, t: int, h: int, w: int) -> list[tuple]:
    torch.manual_seed(0)
    layout = torch.channels_last_3d
    x = F.silu(torch.randn(1, c, t + 2, h, w, device="cuda")).contiguous(memory_format=layout)
    weight = (torch.randn(k, c, 3, 3, 3, device="cuda") / (27 * c) ** 0.5).contiguous(memory_format=layout)
    tflop = 2 * k * c * 27 * t * h * w / 1e12
    torch.backends.cudnn.allow_tf32 = False
    reference = F.conv3d(x, weight, padding=PADDING)
    torch.backends.cudnn.allow_tf32 = True
    xb, wb = x.bfloat16(), weight.bfloat16()
    rows = []
    ms = library_conv.median_ms(lambda: F.conv3d(xb, wb, padding=PADDING), RUNS)
    rows.append(
        (name, "torch bf16", ms, tflop / ms * 1e3, relative_error(F.conv3d(xb, wb, padding=PADDING), reference))
    )
    ms = library_conv.median_ms(lambda: library_conv.cudnn_conv(xb, wb, PADDING), RUNS)
    error = relative_error(library_conv.cudnn_conv(xb, wb, PADDING), reference)
    rows.append((name, "cuDNN frontend bf16 (fastest plan)", ms, tflop / ms * 1e3, error))
    scale_x, scale_w = FP8_MAX / x.abs().amax(), FP8_MAX / weight.abs().amax()
    x8 = (x * scale_x).to(torch.float8_e4m3fn)
    w8 = (weight * scale_w).to(torch.float8_e4m3fn)
    out = torch.empty(reference.shape, device="cuda", dtype=torch.bfloat16, memory_format=layout)
    try:
        run, count = fp8_conv(x8, w8, (1 / (scale_x * scale_w)).view(1, 1, 1, 1, 1).float(), out)
        ms = library_conv.median_ms(run, RUNS)
        run()
        rows.append((name, f"cuDNN frontend fp8 e4m3 (fastest of {count} plans)", ms, tflop / ms * 1e3,
                     relative_error(out, reference)))  # fmt: skip
    except Exception as error:  # a missing fp8 engine must not stop the table
        rows.append((name, f"cuDNN frontend fp8 e4m3: {type(error).__name__}: {str(error)[:120]}", None, None, None))
    ms = library_conv.median_ms(lambda: (x * scale_x).to(torch.float8_e4m3fn), RUNS)
    rows.append((name, "quantize the input to e4m3 (torch, fp32 input)", ms, None, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if reason := library_conv.unavailable_reason("cuda"):
        raise SystemExit(reason)
    rows = []
    for shape in SHAPES:
        rows += measure(*shape)
        torch.cuda.empty_cache()

    def cell(value, fmt):
        return "—" if value is None else format(value, fmt)

    table = "\n".join(
        ["| conv | path | ms | TFLOP/s | rel. error vs fp32 |", "|---|---|---|---|---|"]
        + [f"| {n} | {p} | {cell(ms, '.3f')} | {cell(tf, '.0f')} | {cell(e, '.2e')} |" for n, p, ms, tf, e in rows]
    )
    print(table)
    if not args.no_write:
        append_table("VAE convs: torch vs the cuDNN frontend, bf16 and fp8", "python benchmarks/vae_convs.py",
                     "medians of 10 CUDA-event timings", table)  # fmt: skip


if __name__ == "__main__":
    main()
