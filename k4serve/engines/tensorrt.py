"""TensorRT engines (`k4serve export tensorrt`) behind the engine interface, one CUDA graph per shape.

Per graph (bucket): the plan is deserialized once, an execution context made, and torch tensors allocated for
every input and output and bound to it by address (`set_tensor_address`). The first call runs
`execute_async_v3` on the current torch stream (TensorRT does its lazy setup there), then captures that same
launch into a CUDA graph; every later call copies the inputs into the bound buffers and replays the graph.
With weight streaming (`weight_streaming_budget`, bytes of weights kept on the GPU) large engines run in less
memory than their weights, at the cost of the streamed traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from k4serve.engines.contracts import GraphSpec
from k4serve.engines.exported import EngineUnavailable, ExportedEngine
from k4serve.engines.manifest import GraphEntry

INSTALL = (
    "install TensorRT >= 10.15 for Python (pip install tensorrt-cu12, or tensorrt-cu13 for CUDA 13, from NVIDIA's "
    "package index; NGC's TensorRT and Triton containers ship it)"
)


def _tensorrt():
    try:
        import tensorrt
    except ImportError as error:
        raise EngineUnavailable(f"the tensorrt engine needs TensorRT's Python package: {INSTALL}") from error
    return tensorrt


@dataclass
class _Plan:
    """One deserialized engine with its bound buffers and (after the first call) its CUDA graph."""

    engine: object
    context: object
    inputs: list[Tensor]
    outputs: list[Tensor]
    graph: torch.cuda.CUDAGraph | None = None


class TensorRTEngine(ExportedEngine):
    """An engine folder of TensorRT plans run on one GPU."""

    format = "tensorrt"

    def __init__(self, folder: str | Path, device: str | torch.device = "cuda", cuda_graphs: bool = True,
                 weight_streaming_budget: int | None = None):  # fmt: skip
        super().__init__(folder, device)
        trt = _tensorrt()
        if self.device.type != "cuda":
            raise EngineUnavailable(f"TensorRT engines run on a CUDA device, not {self.device}")
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.cuda_graphs = cuda_graphs
        self.weight_streaming_budget = weight_streaming_budget

    def _open(self, entry: GraphEntry) -> _Plan:
        with torch.cuda.device(self.device):
            engine = self.runtime.deserialize_cuda_engine((self.folder / entry.file).read_bytes())
            if engine is None:
                raise EngineUnavailable(
                    f"TensorRT could not load {self.folder / entry.file} (built by another version?)"
                )
            if self.weight_streaming_budget is not None:
                engine.weight_streaming_budget_v2 = self.weight_streaming_budget
            context = engine.create_execution_context()
            spec = entry.spec
            inputs = [torch.empty(s.shape, dtype=s.torch_dtype, device=self.device) for s in spec.inputs]
            outputs = [torch.empty(s.shape, dtype=s.torch_dtype, device=self.device) for s in spec.outputs]
            for s, buffer in zip((*spec.inputs, *spec.outputs), (*inputs, *outputs), strict=True):
                if tuple(engine.get_tensor_shape(s.name)) != s.shape:
                    raise EngineUnavailable(f"{entry.file}: tensor {s.name} is {engine.get_tensor_shape(s.name)}, "
                                            f"the manifest says {list(s.shape)}: rebuild the engine")  # fmt: skip
                context.set_tensor_address(s.name, buffer.data_ptr())
        return _Plan(engine, context, inputs, outputs)

    def _run(self, plan: _Plan, spec: GraphSpec, inputs: list[Tensor]) -> list[Tensor]:
        with torch.cuda.device(self.device):
            for bound, given in zip(plan.inputs, inputs, strict=True):
                bound.copy_(given)
            if plan.graph is not None:
                plan.graph.replay()
            else:
                stream = torch.cuda.current_stream(self.device)
                if not plan.context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError(f"TensorRT failed to run {spec.name} (its log above says why)")
                if self.cuda_graphs:
                    plan.graph = self._capture(plan)
            return [out.clone() for out in plan.outputs]  # the bound buffers are overwritten by the next call

    @staticmethod
    def _capture(plan: _Plan) -> torch.cuda.CUDAGraph:
        """The engine's launch captured as a CUDA graph (after one eager run, as TensorRT requires)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return graph
