"""AOTInductor packages (`k4serve export aoti`) behind the engine interface.

Each graph's .pt2 is loaded with `torch._inductor.aoti_load_package` on the engine's device: a compiled shared
library with its weights, run without Dynamo, Inductor or a compiler in the serving process. The package was
compiled for the device kind it was exported on (the manifest's tools.device).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from k4serve.engines.contracts import GraphSpec
from k4serve.engines.exported import EngineUnavailable, ExportedEngine
from k4serve.engines.manifest import GraphEntry


class AOTIEngine(ExportedEngine):
    """An engine folder of AOTInductor packages."""

    format = "aoti"

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        super().__init__(folder, device)
        built_for = torch.device(self.manifest.tools.get("device", "cpu")).type
        if built_for != self.device.type:
            raise EngineUnavailable(
                f"{self.folder} was compiled for {built_for}, not {self.device.type}: export it again with "
                f"--device {self.device.type} ({self.manifest.command})"
            )

    def _open(self, entry: GraphEntry) -> object:
        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
        return torch._inductor.aoti_load_package(str(self.folder / entry.file), device_index=index)

    def _run(self, runner, spec: GraphSpec, inputs: list[Tensor]) -> list[Tensor]:
        outputs = runner(*inputs)
        return list(outputs) if isinstance(outputs, list | tuple) else [outputs]
