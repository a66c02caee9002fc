"""`k4serve export onnx|tensorrt|aoti --model dit|vae-decoder|text-encoder ...`: engines for the exported runtimes.

Each writes `<-o DIR>/<model>-<format>/` (graph files + manifest.json); serve them with
`k4serve serve --engine onnxruntime|tensorrt|aoti --engine-dir DIR`. Buckets are the product of --size and --seconds.
"""

from __future__ import annotations

import argparse
import shlex
import time

from k4serve.cli_options import parse_size
from k4serve.engines.contracts import CONTRACTS, Bucket
from k4serve.engines.manifest import EXPORT_DTYPES, engine_path, export_command, weights_id
from k4serve.engines.options import ATTENTION, LINEAR
from k4serve.export.errors import ExportError
from k4serve.pipelines.t2v import PIPELINE_PRESETS, validate_request

FORMAT_HELP = {
    "onnx": "ONNX graphs (static shapes per bucket), run by --engine onnxruntime and built into TensorRT engines",
    "tensorrt": "TensorRT engines built from the ONNX graphs (exported first when absent); needs tensorrt and a GPU",
    "aoti": "AOTInductor .pt2 packages per bucket (eager module or the fast Triton path)",
}


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `k4serve export FORMAT`."""
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for fmt, help_text in FORMAT_HELP.items():
        sub = formats.add_parser(fmt, help=help_text, description=help_text)
        sub.add_argument("--model", required=True, choices=sorted(CONTRACTS))
        sub.add_argument("--preset", choices=sorted(PIPELINE_PRESETS), default="tiny")
        sub.add_argument("--weights", default=None, help="official weights directory (default: seeded random)")
        sub.add_argument("--seed", type=int, default=0, help="random-weight seed when no --weights are given")
        sub.add_argument("--size", type=parse_size, nargs="+", required=True, help="HEIGHTxWIDTH ... (buckets)")
        sub.add_argument("--seconds", type=int, nargs="+", required=True, help="durations 0..12 (buckets)")
        sub.add_argument("--dtype", choices=EXPORT_DTYPES, default="fp32" if fmt == "onnx" else "bf16")
        sub.add_argument("--device", default="cpu" if fmt == "onnx" else "cuda", help="where the model is built")
        sub.add_argument("-o", "--output", required=True, help="engine directory (serve with --engine-dir)")
        if fmt in ("onnx", "tensorrt"):
            carrier_help = "with --dtype fp8: the float dtype around the Q/DQ pairs (fp32 for onnxruntime)"
            sub.add_argument("--fp8-carrier", choices=("bf16", "fp32"), default="bf16", help=carrier_help)
            sub.add_argument("--opset", type=int, default=23, help="ONNX opset (23: the Attention op)")
        if fmt == "tensorrt":
            sub.add_argument("--timing-cache", default=None, help="timing cache file, read and updated")
            sub.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit")
            sub.add_argument("--optimization-level", type=int, default=3, help="builder optimization level 0..5")
            sub.add_argument("--weight-streaming", action="store_true", help="build for weight streaming")
        if fmt == "aoti":
            engine_help = "eager: the module (SDPA); fast: FastDiT with our Triton kernels (dit only)"
            sub.add_argument("--engine", choices=("eager", "fast"), default="eager", help=engine_help)
            sub.add_argument("--attention", choices=ATTENTION, default="triton", help="--engine fast: attention")
            sub.add_argument("--linear", choices=LINEAR, default=None, help="--engine fast: linears (default: dtype)")


def buckets_of(args: argparse.Namespace) -> list[Bucket]:
    """The size x seconds product, each checked like a request."""
    buckets = [Bucket(h, w, s) for h, w in args.size for s in args.seconds]
    for bucket in buckets:
        validate_request("-", bucket.height, bucket.width, bucket.seconds)
    return buckets


def format_extra(args: argparse.Namespace) -> list[str]:
    """The format-specific words of the command line (kept in the manifest, so a fix command repeats them)."""
    extra = []
    if args.format in ("onnx", "tensorrt") and args.dtype == "fp8":
        extra += ["--fp8-carrier", args.fp8_carrier]
    if args.format == "aoti" and args.engine == "fast":
        extra += ["--engine", "fast", "--attention", args.attention] + (
            ["--linear", args.linear] if args.linear else []
        )
    return extra


def build_component(args: argparse.Namespace, component: str):
    """The component with its weights (official or seeded random), on --device, in the run dtype."""
    from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline

    settings = PipelineSettings(preset=args.preset, weights=args.weights, device=args.device, seed=args.seed)
    pipeline = T2VPipeline.from_settings(settings, components=(component,))
    return {"dit": pipeline.dit, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}[component], settings


def run_export(args: argparse.Namespace) -> int:
    """Export one model for the buckets; 0 on success."""
    from k4serve.pipelines.exported import component_weight_files

    contract = CONTRACTS[args.model]
    buckets = buckets_of(args)
    if args.dtype == "fp8" and not contract.fp8:
        raise ExportError(f"fp8 is declared for the DiT's block linears only; export {args.model} as bf16 or fp16")
    preset = PIPELINE_PRESETS[args.preset][contract.component]
    extra = format_extra(args)

    def command(fmt: str) -> str:
        return export_command(fmt, args.model, preset, buckets, args.dtype, args.output, args.weights, extra, args.seed)

    started = time.perf_counter()
    if args.format == "tensorrt":
        from k4serve.export.tensorrt import require_tensorrt

        require_tensorrt()  # before minutes of ONNX export
    component, settings = build_component(args, contract.component)
    weights = weights_id(component_weight_files(settings, contract.component), args.seed)
    common = {"preset": preset, "weights": weights}
    if args.format in ("onnx", "tensorrt"):
        from k4serve.export.onnx import export_onnx

        onnx_dir = engine_path(args.output, args.model, "onnx")
        manifest = export_onnx(contract, component, buckets, args.dtype, onnx_dir, command=command("onnx"),
                               opset=args.opset, fp8_carrier=args.fp8_carrier, extra=extra, **common)  # fmt: skip
        if args.format == "tensorrt":
            from k4serve.export.tensorrt import build_engines

            manifest = build_engines(onnx_dir, engine_path(args.output, args.model, "tensorrt"), command("tensorrt"),
                                     timing_cache=args.timing_cache, workspace_gib=args.workspace_gib,
                                     optimization_level=args.optimization_level,
                                     weight_streaming=args.weight_streaming)  # fmt: skip
    else:
        from k4serve.export.aoti import export_aoti

        manifest = export_aoti(contract, component, buckets, args.dtype, engine_path(args.output, args.model, "aoti"),
                               command=command("aoti"), engine=args.engine, attention=args.attention,
                               linear=args.linear, extra=extra, **common)  # fmt: skip
    folder = engine_path(args.output, args.model, manifest.format)
    graphs = ", ".join(g.spec.name for g in manifest.graphs)
    print(f"wrote {folder} ({graphs}) in {time.perf_counter() - started:.1f} s; serve it with: k4serve serve "
          f"--engine {dict(onnx='onnxruntime').get(manifest.format, manifest.format)} "
          f"--engine-dir {shlex.quote(str(args.output))}")  # fmt: skip
    return 0
