"""Triton entry point of `t2v_stream`; the logic lives in k4serve.serving.entry_points.T2VModel."""

from k4serve.serving.entry_points import T2VModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
