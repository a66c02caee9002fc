"""Triton entry point of `v2a`; the logic lives in k4serve.serving.entry_points.V2AModel."""

from k4serve.serving.entry_points import V2AModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
