"""`k4serve export onnx`: every graph a contract declares for the buckets, as one static-shape ONNX file each.

torch.onnx's dynamo exporter (torch.export, then onnxscript's translation), opset 23: the first opset with the ONNX
`Attention` op, into which SDPA exports, so TensorRT sees one attention node for its fused MHA kernel (README.md
beside this file has the per-op reasoning). The onnxscript optimizer then folds constants, except the fp8
weights' DequantizeLinear nodes: folded, they would turn back into float weights and lose the Q/DQ pattern.
Weights go to an external data file once a graph passes 2 GB (protobuf's limit). Every graph written is checked
against TensorRT's ONNX operator list (tensorrt_ops.py) and against its contract's tensor names and shapes.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from k4serve.engines.contracts import Bucket, ExportContract, GraphSpec, parameter_bytes
from k4serve.engines.manifest import EngineManifest, GraphEntry
from k4serve.export.dtypes import compute_dtype
from k4serve.export.errors import ExportError
from k4serve.export.fp8_qdq import ONNX_TRANSLATIONS, quantize_linears
from k4serve.export.tensorrt_ops import TENSORRT_VERSION, check_graph

OPSET = 23  # Attention is in opset 23; TensorRT 10.15 parses opsets 9..24
PROTOBUF_LIMIT = 2**31  # bytes: past this a graph's weights must live in an external data file


def prepare_component(contract: ExportContract, component, dtype: str, fp8_carrier: str = "bf16"):
    """Cast the component to its compute dtype and, for fp8, swap its declared linears for Q/DQ ones (in place)."""
    carrier = compute_dtype(dtype, fp8_carrier)
    contract.modules(component).to(carrier)
    if dtype == "fp8":
        if not contract.fp8:
            raise ExportError(
                f"fp8 is declared for the DiT's block linears only; export {contract.model} as bf16 or fp16"
            )
        quantize_linears(contract.fp8_linears(component), carrier)
    return component


def _keep_dequantize(node) -> bool | None:
    """onnxscript's folding rule: never fold a DequantizeLinear (None: the default rule for everything else)."""
    return False if node.op_type == "DequantizeLinear" else None


def export_graph(module: nn.Module, graph: GraphSpec, path: Path, opset: int = OPSET) -> None:
    """Trace `module` on the graph's sample inputs and write it to `path` with the graph's tensor names."""
    import onnxscript.optimizer

    inputs = graph.sample_inputs()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each phase on stdout
        program = torch.onnx.export(
            module.eval(),
            inputs,
            input_names=[s.name for s in graph.inputs],
            output_names=[s.name for s in graph.outputs],
            opset_version=opset,
            dynamo=True,
            optimize=False,
            custom_translation_table=ONNX_TRANSLATIONS,
            verbose=False,
        )
    onnxscript.optimizer.optimize_ir(program.model, should_fold=_keep_dequantize)
    program.save(str(path), external_data=parameter_bytes(module) >= PROTOBUF_LIMIT)


def check_exported(path: Path, graph: GraphSpec) -> None:
    """The written graph has exactly the contract's inputs and outputs and passes the TensorRT operator check."""
    model = onnx.load(str(path), load_external_data=False)

    def described(values) -> list[tuple[str, tuple[int, ...]]]:
        return [(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]

    expected = ([(s.name, s.shape) for s in graph.inputs], [(s.name, s.shape) for s in graph.outputs])
    got = (described(model.graph.input), described(model.graph.output))
    if got != expected:
        raise ExportError(f"{path}: graph inputs/outputs {got} differ from the contract's {expected}")
    problems = check_graph(model)
    if problems:
        listing = "\n  ".join(problems[:20])
        raise ExportError(f"{path} uses what TensorRT {TENSORRT_VERSION}'s ONNX parser does not take:\n  {listing}")


def export_onnx(
    contract: ExportContract,
    component,
    buckets: Sequence[Bucket],
    dtype: str,
    folder: str | Path,
    *,
    preset: str,
    weights: str,
    command: str,
    opset: int = OPSET,
    fp8_carrier: str = "bf16",
    extra: Sequence[str] = (),
) -> EngineManifest:
    """Export every graph of `contract` for `buckets` into `folder` with its manifest; the component (built in
    float32) is converted in place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prepare_component(contract, component, dtype, fp8_carrier)
    entries, started = [], time.perf_counter()
    for graph in contract.graphs(component, buckets, compute_dtype(dtype, fp8_carrier)):
        path = folder / f"{graph.name}.onnx"
        with torch.no_grad():
            export_graph(contract.module(component, graph), graph, path, opset)
        check_exported(path, graph)
        entries.append(GraphEntry(graph, path.name))
    import onnxscript

    manifest = EngineManifest(
        model=contract.model,
        preset=preset,
        format="onnx",
        dtype=dtype,
        weights=weights,
        buckets=list(buckets),
        graphs=entries,
        command=command,
        tools={"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__},
        options={
            "opset": opset,
            "fp8_carrier": fp8_carrier if dtype == "fp8" else None,
            "tensorrt_ops": TENSORRT_VERSION,
            "export_seconds": round(time.perf_counter() - started, 2),
            "extra": list(extra),
        },  # fmt: skip
    )
    manifest.write(folder)
    return manifest
