"""What every exported-engine runtime shares: read the manifest, pick the graph by input shapes, warm up at load.

A backend (onnxruntime, TensorRT, AOTInductor) supplies `_open` (one graph file -> something runnable) and `_run`
(inputs -> outputs in the graph's order). Inputs are cast to the graph's declared dtypes on the engine's device, so
a caller hands over whatever its pipeline computes in (bf16 on the GPU, float32 on the CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from k4serve.engines.base import Shape
from k4serve.engines.contracts import GraphSpec, graph_for
from k4serve.engines.manifest import EngineManifest, EngineMismatch, GraphEntry


class EngineUnavailable(ImportError):
    """The runtime library of an engine is not installed here; the message names the package to install."""


class ExportedEngine:
    """One exported component (all its graphs) behind the Engine interface of k4serve.engines.base."""

    format = ""  # the manifest format this backend runs

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.manifest = EngineManifest.read(self.folder)
        if self.manifest.format != self.format:
            raise EngineMismatch(
                f"{self.folder} holds a {self.manifest.format} engine, not {self.format}: point engine_dir at the "
                f"folder `k4serve export {self.format}` wrote"
            )
        self.entries = {entry.spec.name: entry for entry in self.manifest.graphs}
        self._runners: dict[str, object] = {}

    @property
    def graphs(self) -> list[GraphSpec]:
        return self.manifest.graph_specs()

    @property
    def shapes(self) -> tuple[Shape, ...]:
        """The first-input shape of every graph loaded so far."""
        return tuple(self.entries[name].spec.inputs[0].shape for name in self._runners)

    def graph(self, shapes: Sequence[Shape]) -> GraphSpec | None:
        """The graph taking inputs of `shapes`, or None when this engine was not exported for them."""
        return graph_for(self.graphs, shapes)

    def load(self, shapes: Sequence[Shape] | None = None) -> None:
        """Open and run once every graph whose first input has one of `shapes` (None: every graph), so no request
        pays for loading, tuning or capture."""
        wanted = None if shapes is None else {tuple(s) for s in shapes}
        for spec in self.graphs:
            if wanted is None or spec.inputs[0].shape in wanted:
                self._call(spec, spec.sample_inputs(self.device))

    def __call__(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Run the graph of these input shapes: one output as a tensor, several as a tuple (graph order)."""
        spec = self.graph([tuple(x.shape) for x in inputs])
        if spec is None:
            served = ", ".join(f"{g.name} {list(g.input_shapes[0])}" for g in self.graphs)
            raise EngineMismatch(
                f"the {self.manifest.model} engine in {self.folder} has no graph for input shapes "
                f"{[list(x.shape) for x in inputs]} (it serves: {served}); export the bucket: {self.manifest.command}"
            )
        outputs = self._call(spec, inputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _call(self, spec: GraphSpec, inputs: Sequence[Tensor]) -> list[Tensor]:
        if spec.name not in self._runners:
            self._runners[spec.name] = self._open(self.entries[spec.name])
        cast = [
            x.to(device=self.device, dtype=s.torch_dtype).contiguous() for x, s in zip(inputs, spec.inputs, strict=True)
        ]
        return self._run(self._runners[spec.name], spec, cast)

    def _open(self, entry: GraphEntry) -> object:
        """Load one graph file of the engine folder."""
        raise NotImplementedError

    def _run(self, runner: object, spec: GraphSpec, inputs: list[Tensor]) -> list[Tensor]:
        """Inputs (already in the graph's dtypes, on the device) -> outputs in graph order."""
        raise NotImplementedError


def open_engine(engine: str, folder: str | Path, device: str | torch.device = "cpu") -> ExportedEngine:
    """The runtime of `engine` (aoti | tensorrt | onnxruntime) over an engine folder (imported only when asked for)."""
    if engine == "onnxruntime":
        from k4serve.engines.onnxruntime import OnnxRuntimeEngine as runtime
    elif engine == "tensorrt":
        from k4serve.engines.tensorrt import TensorRTEngine as runtime
    elif engine == "aoti":
        from k4serve.engines.aoti import AOTIEngine as runtime
    else:
        raise ValueError(f"engine {engine!r} does not run exported files; choose aoti, tensorrt or onnxruntime")
    return runtime(folder, device)
