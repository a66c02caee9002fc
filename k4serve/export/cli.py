"""`k4serve export onnx|tensorrt|aoti --model dit|vae-decoder|text-encoder|v2a-unet ...`: engines for the exported
runtimes.

Each writes `<-o DIR>/<model>-<format>/` (graph files + manifest.json); serve them with
`k4serve serve --engine onnxruntime|tensorrt|aoti --engine-dir DIR` (the V2A UNet: `--v2a-engine`). Buckets are
the product of --size and --seconds; the V2A UNet's are durations only (--seconds 1..12, no --size), and its
--preset and --weights are the V2A pipeline's (tiny | kandinsky4-v2a, the ai-forever/kandinsky-4-v2a snapshot).
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
from k4serve.pipelines.v2a import PIPELINE_PRESETS as V2A_PRESETS
from k4serve.pipelines.v2a import validate_seconds

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
        sub.add_argument(
            "--preset",
            choices=sorted({*PIPELINE_PRESETS, *V2A_PRESETS}),
            default="tiny",
            help="the pipeline preset: T2V's for dit, vae-decoder and text-encoder, V2A's for v2a-unet",
        )
        sub.add_argument("--weights", default=None, help="official weights directory (default: seeded random)")
        sub.add_argument("--seed", type=int, default=0, help="random-weight seed when no --weights are given")
        sub.add_argument(
            "--size",
            type=parse_size,
            nargs="+",
            default=None,
            help="HEIGHTxWIDTH ... (buckets; every model but v2a-unet)",
        )
        sub.add_argument(
            "--seconds", type=int, nargs="+", required=True, help="durations 0..12 (buckets; v2a-unet: 1..12)"
        )
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
            cxx_help = "C++ compiler for the packages (default: CXX, then g++; checked to link libstdc++ dynamically)"
            sub.add_argument("--cxx", default=None, help=cxx_help)


def pipeline_presets(model: str) -> dict[str, dict[str, str]]:
    """The pipeline presets a model's --preset chooses from: V2A's for the V2A UNet, T2V's for the rest."""
    return V2A_PRESETS if CONTRACTS[model].component == "unet" else PIPELINE_PRESETS


def buckets_of(args: argparse.Namespace) -> list[Bucket]:
    """The size x seconds product (durations only for a model without sizes), each checked like a request."""
    if not CONTRACTS[args.model].sized:
        if args.size:
            raise ExportError(f"{args.model} takes no --size: its buckets are durations only (--seconds 1..12)")
        for seconds in args.seconds:
            validate_seconds(seconds)
        return [Bucket(0, 0, s) for s in args.seconds]
    if not args.size:
        raise ExportError(f"--size is required for {args.model}: give the HEIGHTxWIDTH of each bucket, e.g. 384x672")
    buckets = [Bucket(h, w, s) for h, w in args.size for s in args.seconds]
    for bucket in buckets:
        validate_request("-", bucket.height, bucket.width, bucket.seconds)
    return buckets


def format_extra(args: argparse.Namespace) -> list[str]:
    """The format-specific words of the command line (kept in the manifest, so a fix command repeats them)."""
    extra = []
    if args.format in ("onnx", "tensorrt") and args.dtype == "fp8":
        extra += ["--fp8-carrier", args.fp8_carrier]
    if args.format == "aoti" and not args.device.startswith("cuda"):
        extra += ["--device", args.device]  # a package runs only on the device kind it was compiled for
    if args.format == "aoti" and args.engine == "fast":
        extra += ["--engine", "fast", "--attention", args.attention] + (
            ["--linear", args.linear] if args.linear else []
        )
    return extra


def build_component(args: argparse.Namespace, component: str):
    """The component with its weights (official or seeded random) on --device, and the id of those weights. The
    V2A UNet comes as its pipeline (the contract reads the latent shapes from it)."""
    from k4serve.pipelines.exported import component_weight_files

    if component == "unet":
        from k4serve.pipelines.v2a import V2APipeline, V2ASettings, unet_weight_files

        settings = V2ASettings(preset=args.preset, weights=args.weights, device=args.device, seed=args.seed)
        pipeline = V2APipeline.from_settings(settings, components=("unet",))
        return pipeline, weights_id(unet_weight_files(settings), args.seed)
    from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline

    settings = PipelineSettings(preset=args.preset, weights=args.weights, device=args.device, seed=args.seed)
    pipeline = T2VPipeline.from_settings(settings, components=(component,))
    weights = weights_id(component_weight_files(settings, component), args.seed)
    return {"dit": pipeline.dit, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}[component], weights


def run_export(args: argparse.Namespace) -> int:
    """Export one model for the buckets; 0 on success."""
    contract = CONTRACTS[args.model]
    presets = pipeline_presets(args.model)
    if args.preset not in presets:
        raise ExportError(f"{args.model} is built from the presets {sorted(presets)}, not {args.preset!r}")
    buckets = buckets_of(args)
    if args.dtype == "fp8" and not contract.fp8:
        raise ExportError(f"fp8 is declared for the DiT's block linears only; export {args.model} as bf16 or fp16")
    preset = presets[args.preset][contract.component]
    extra = format_extra(args)

    def command(fmt: str) -> str:
        return export_command(fmt, args.model, args.preset, buckets, args.dtype, args.output, args.weights, extra,
                              args.seed)  # fmt: skip

    started = time.perf_counter()
    if args.format == "tensorrt":
        from k4serve.export.tensorrt import require_tensorrt

        require_tensorrt()  # before minutes of ONNX export
    component, weights = build_component(args, contract.component)
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
                               linear=args.linear, extra=extra, cxx=args.cxx, **common)  # fmt: skip
    folder = engine_path(args.output, args.model, manifest.format)
    graphs = ", ".join(g.spec.name for g in manifest.graphs)
    flag = "--v2a-engine" if contract.component == "unet" else "--engine"
    print(f"wrote {folder} ({graphs}) in {time.perf_counter() - started:.1f} s; serve it with: k4serve serve "
          f"{flag} {dict(onnx='onnxruntime').get(manifest.format, manifest.format)} "
          f"--engine-dir {shlex.quote(str(args.output))}")  # fmt: skip
    return 0
