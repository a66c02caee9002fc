"""Triton entry point of `t2va_stream`; the logic lives in k4serve.serving.entry_points.T2VAModel."""

from k4serve.serving.entry_points import T2VAModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
