"""The engine interface: a component prepared once for a set of static shapes, then called on tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

Shape = tuple[int, ...]

ENGINES = ("eager", "fast")  # the reference modules, or the fused kernels (FastDiT, the VAE's Triton norms)
# Engines run from files that `k4serve export` wrote into an engine_dir (k4serve.engines.exported).
EXPORTED_ENGINES = ("aoti", "tensorrt", "onnxruntime")
ENGINES += EXPORTED_ENGINES
# The fast DiT engine's attention and linear options: k4serve.engines.options (no triton import, for the CLIs).


@runtime_checkable
class Engine(Protocol):
    """What the pipelines and the Triton stages call: `load` per static shape (warm-up, tuning, capture),
    then `__call__` with the component's own input contract. A shape not loaded is prepared on first use."""

    @property
    def shapes(self) -> tuple[Shape, ...]:
        """The static input shapes prepared so far (the first input's shape identifies a bucket)."""
        ...

    def load(self, shapes: Sequence[Shape]) -> None:
        """Prepare every bucket in `shapes` ahead of the first request."""
        ...

    def __call__(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Run the component (several outputs, e.g. a VAE chunk step's video and cache, come as a tuple)."""
        ...
