"""Which ONNX operators and dtypes TensorRT's ONNX parser accepts, and a checker every exported graph must pass.

Target: TensorRT 10.15 GA (onnx-tensorrt `docs/operators.md` of the 10.15 GA release, 2026-02: "TensorRT 10.15
supports operators in the inclusive range of opset 9 to opset 24"). Below, every operator that page marks
supported ("Y"), with its "Supported Types" column; the restrictions that can bite our graphs are checked in
`check_graph` (each names its source line of that page). Quantized types (INT8, INT4, FP8, FP4) are only
supported as the output of QuantizeLinear / the input of DequantizeLinear ("support is available only through
quantization from a floating-point type with higher precision"); UINT8 only at network inputs and outputs.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto

TENSORRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)

_F = "FP32 FP16 BF16"
_FI = f"{_F} INT32 INT64"
_FIB = f"{_FI} BOOL"
_TABLE = f"""
Abs {_FI}|Acos {_F}|Acosh {_F}|Add {_FI}|And BOOL|ArgMax {_FI}|ArgMin {_FI}|Asin {_F}|Asinh {_F}|Atan {_F}|Atanh {_F}
Attention {_F} INT8 FP8|AveragePool {_F}|BatchNormalization {_F}|BlackmanWindow FP32 FP16
Cast {_FI} UINT8 BOOL|CastLike {_FI} UINT8 BOOL|Ceil {_F}|Celu {_F}|Clip {_F}|Concat {_FIB}
Constant {_F} FP8 FP4 INT4 INT32 INT64 BOOL|ConstantOfShape {_F} FP8 FP4 INT4 INT32 INT64 BOOL|Conv {_F}
ConvTranspose {_F}|Cos {_F}|Cosh {_F}|CumSum {_F}|DeformConv FP32 FP16|DepthToSpace {_FI}
DequantizeLinear INT8 FP8 FP4 INT4|Div {_FI}|Dropout {_F}|Einsum {_F}|Elu {_F}|Equal {_FI}|Erf {_F}|Exp {_F}
Expand {_FIB}|EyeLike {_FIB}|Flatten {_FIB}|Floor {_F}|Gather {_FIB}|GatherElements {_FIB}|GatherND {_FIB}
Gelu {_F} INT8 INT32 INT64|Gemm {_F}|GlobalAveragePool {_F}|GlobalLpPool {_F}|GlobalMaxPool {_F}|Greater {_FI}
GreaterOrEqual {_FI}|GridSample FP32 FP16|GroupNormalization {_F}|GRU {_F}|HammingWindow FP32 FP16
HannWindow FP32 FP16|HardSigmoid {_F}|HardSwish {_F}|Hardmax {_F}|Identity {_FIB}|If {_FIB}|ImageScaler {_F}
InstanceNormalization {_F}|IsInf {_F}|IsNaN {_FI}|LayerNormalization {_F}|LeakyRelu {_F}|Less {_FI}
LessOrEqual {_FI}|Log {_F}|LogSoftmax {_F}|Loop {_FIB}|LRN {_F}|LSTM {_F}|LpNormalization {_F}|LpPool {_F}
MatMul {_F}|Max {_FI}|MaxPool {_F}|Mean {_F} FP8 INT32 INT64|MeanVarianceNormalization {_F}|Min {_FI}
Mish FP32 FP16|Mod {_FI}|Mul {_FI}|Neg {_FI}|NonMaxSuppression FP32 FP16|NonZero FP32 FP16|Not BOOL
OneHot {_FIB}|Or BOOL|Pad {_FI}|ParametricSoftplus {_F}|Pow {_FI}|PRelu {_F}|QuantizeLinear {_F}
RandomNormal {_F}|RandomNormalLike {_F}|RandomUniform {_F}|RandomUniformLike {_F}|Range {_FI}|Reciprocal {_F}
ReduceL1 {_FI}|ReduceL2 {_FI}|ReduceLogSum {_FI}|ReduceLogSumExp {_FI}|ReduceMax {_FI}|ReduceMean {_FI}
ReduceMin {_FI}|ReduceProd {_FI}|ReduceSum {_FI}|ReduceSumSquare {_FI}|Relu {_FI}|Reshape {_FIB}|Resize {_F}
ReverseSequence {_FIB}|RMSNormalization {_F}|RNN {_F}|RoiAlign FP32 FP16|RotaryEmbedding {_F}|Round {_F}
STFT FP32|ScaledTanh {_F}|Scan {_F}|Scatter {_FI}|ScatterElements {_FI}|ScatterND {_FI}|Selu {_F}|Shape {_FIB}
Shrink {_FI}|Sigmoid {_F}|Sign {_FI}|Sin {_F}|Sinh {_F}|Size {_FIB}|Slice {_FIB}|Softmax {_F}|Softplus {_F}
Softsign {_F}|SpaceToDepth {_FI}|Split {_FIB}|Sqrt {_F}|Squeeze {_FIB}|Sub {_FI}|Sum {_FI}|Tan {_F}|Tanh {_F}
TensorScatter {_F} INT32|ThresholdedRelu {_F}|Tile {_FIB}|TopK {_FI}|Transpose {_FIB}|Trilu {_FIB}
Unsqueeze {_FIB}|Upsample {_F}|Where {_FIB}|Xor BOOL
"""
SUPPORTED: dict[str, frozenset[str]] = {
    op: frozenset(types)
    for op, *types in (entry.split() for line in _TABLE.strip().splitlines() for entry in line.split("|"))
}

TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL", TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4",
    TensorProto.FLOAT4E2M1: "FP4", TensorProto.DOUBLE: "DOUBLE",
}  # fmt: skip
QUANTIZED = {"INT8", "INT4", "FP8", "FP4"}
IO_TYPES = {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL", "FP8"}  # network inputs and outputs
# Inputs that must be build-time constants ("`axes` must be an initializer", ...): op -> input indices.
REDUCES = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")  # fmt: skip
CONSTANT_INPUTS = dict.fromkeys(REDUCES, (1,))
CONSTANT_INPUTS.update({"CumSum": (1,), "OneHot": (1,), "Squeeze": (1,), "Unsqueeze": (1,)})


def _types(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, int], set[str]]:
    """Element type name and rank of every value whose type is known, and the names of constant values."""
    graph = model.graph
    types, ranks = {}, {}
    for value in (*graph.input, *graph.output, *graph.value_info):
        tensor = value.type.tensor_type
        types[value.name] = TYPE_NAMES.get(tensor.elem_type, str(tensor.elem_type))
        if tensor.HasField("shape"):
            ranks[value.name] = len(tensor.shape.dim)
    constants = {init.name for init in graph.initializer}
    for init in graph.initializer:
        types[init.name] = TYPE_NAMES.get(init.data_type, str(init.data_type))
    for node in graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
    return types, ranks, constants


def check_graph(model: onnx.ModelProto | str | Path) -> list[str]:
    """Everything in `model` that TensorRT 10.15's ONNX parser does not take (empty: the graph passes)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)  # types of every intermediate value
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset}: TensorRT {TENSORRT_VERSION} parses opsets {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    types, ranks, constants = _types(model)
    for value in (*model.graph.input, *model.graph.output):
        if types[value.name] not in IO_TYPES:
            problems.append(f"network input/output {value.name} has type {types[value.name]}")
    for node in model.graph.node:
        problems += [f"{node.op_type} {node.name!r}: {p}" for p in _node_problems(node, types, ranks, constants)]
    return problems


def _node_problems(
    node: onnx.NodeProto, types: dict[str, str], ranks: dict[str, int], constants: set[str]
) -> list[str]:
    if node.domain not in ("", "ai.onnx"):
        return [f"custom domain {node.domain!r} (needs a TensorRT plugin)"]
    allowed = SUPPORTED.get(node.op_type)
    if allowed is None:
        return ["operator not supported"]
    problems = []
    data = types.get(node.input[0]) if node.input and node.input[0] else None
    if data is not None and data not in allowed:
        problems.append(f"input {node.input[0]} of type {data} (supported: {sorted(allowed)})")
    if node.op_type == "QuantizeLinear":
        if len(node.input) > 2 and node.input[2]:
            problems.append("a zero point: TensorRT wants it absent or zero (`y_zero_point` must be 0)")
    elif node.op_type == "DequantizeLinear":
        if len(node.input) > 2 and node.input[2]:
            problems.append("a zero point: TensorRT wants it absent or zero (`x_zero_point` must be zero)")
    else:
        # quantized types only between Q and DQ
        for name in (*node.input, *node.output):
            if types.get(name) in QUANTIZED and node.op_type != "Constant":
                problems.append(f"{name} of quantized type {types[name]} outside a Q/DQ pair")
    if node.op_type == "Attention":
        # "`Q`, `K`, `V` and `attn_mask ` must be 4D. `past_key`, `past_value` and `nonpad_kv_seqlen` inputs are
        # unsupported. `present_key`, `present_value` and `qk_matmul_output` outputs are unsupported.
        # `qk_matmul_output_mode` and `softcap` attributes are unsupported."
        if any(ranks.get(name) != 4 for name in node.input[:4] if name):
            problems.append(f"Q/K/V/attn_mask of ranks {[ranks.get(name) for name in node.input[:4]]}, not 4")
        if any(name for name in node.input[4:]):
            problems.append("past_key / past_value / nonpad_kv_seqlen inputs")
        if any(name for name in node.output[1:]):
            problems.append("present_key / present_value / qk_matmul_output outputs")
        if any(a.name in ("qk_matmul_output_mode", "softcap") and (a.i or a.f) for a in node.attribute):
            problems.append("qk_matmul_output_mode / softcap attributes")
    if node.op_type == "LayerNormalization" and any(name for name in node.output[1:]):
        problems.append("Mean / InvStdDev outputs (only the first output `Y` is supported)")
    for index in CONSTANT_INPUTS.get(node.op_type, ()):
        if index < len(node.input) and node.input[index] and node.input[index] not in constants:
            problems.append(f"input {index} ({node.input[index]}) must be a build-time constant")
    return problems
