"""Triton entry point of `t2v_stream`; the logic lives in k4serve.serving.stream.T2VStreamModel."""

from k4serve.serving.stream import T2VStreamModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
