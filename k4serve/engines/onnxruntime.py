"""Exported ONNX graphs run by onnxruntime: the CPU provider, or the CUDA provider where it is installed.

On the CPU the tensors cross as numpy arrays (zero-copy for contiguous float32 / int64 tensors). On the GPU the
inputs and preallocated torch outputs are bound in place through an IO binding, so nothing leaves the device.
bf16 graphs are for TensorRT and AOTInductor: onnxruntime's CPU provider lacks bf16 kernels for most ops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from k4serve.engines.contracts import GraphSpec
from k4serve.engines.exported import EngineUnavailable, ExportedEngine
from k4serve.engines.manifest import EngineMismatch, GraphEntry

INSTALL = "pip install onnxruntime (CPU) or onnxruntime-gpu (the CUDA provider)"
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise EngineUnavailable(f"the onnxruntime engine needs onnxruntime: {INSTALL}") from error
    return onnxruntime


class OnnxRuntimeEngine(ExportedEngine):
    """An engine folder of ONNX graphs (`k4serve export onnx`) run by onnxruntime."""

    format = "onnx"

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", threads: int = 0):
        super().__init__(folder, device)
        ort = _onnxruntime()
        self.threads = threads  # intra-op threads; 0: onnxruntime's default (all cores)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineUnavailable(f"onnxruntime here has no CUDA provider for {self.device}: {INSTALL}")
            self.providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        else:
            self.providers = ["CPUExecutionProvider"]
        odd = {s.dtype for g in self.graphs for s in (*g.inputs, *g.outputs)} - set(NUMPY_DTYPES)
        if odd:
            raise EngineMismatch(
                f"{self.folder}: onnxruntime cannot run {sorted(odd)} graphs; export --dtype fp32, fp16 or fp8 "
                "--fp8-carrier fp32 for onnxruntime (bf16 is for tensorrt and aoti)"
            )

    def _open(self, entry: GraphEntry) -> object:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        return ort.InferenceSession(str(self.folder / entry.file), options, providers=self.providers)

    def _run(self, session, spec: GraphSpec, inputs: list[Tensor]) -> list[Tensor]:
        if self.device.type != "cuda":
            feeds = {s.name: x.numpy() for s, x in zip(spec.inputs, inputs, strict=True)}
            outputs = session.run([s.name for s in spec.outputs], feeds)
            return [torch.from_numpy(np.ascontiguousarray(out)) for out in outputs]
        binding = session.io_binding()
        device_id = self.device.index or 0
        for s, x in zip(spec.inputs, inputs, strict=True):
            binding.bind_input(s.name, "cuda", device_id, NUMPY_DTYPES[s.dtype], list(x.shape), x.data_ptr())
        outputs = [torch.empty(s.shape, dtype=s.torch_dtype, device=self.device) for s in spec.outputs]
        for s, out in zip(spec.outputs, outputs, strict=True):
            binding.bind_output(s.name, "cuda", device_id, NUMPY_DTYPES[s.dtype], list(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime runs on its own stream
        session.run_with_iobinding(binding)
        return outputs
