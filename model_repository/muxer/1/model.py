"""Triton entry point of `muxer`; the logic lives in k4serve.serving.stages.MuxerModel."""

from k4serve.serving.stages import MuxerModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
