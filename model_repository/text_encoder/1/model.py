"""Triton entry point of `text_encoder`; the logic lives in k4serve.serving.stages.TextEncoderModel."""

from k4serve.serving.stages import TextEncoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
