"""Triton entry point of `v2a_encoder`; the logic lives in k4serve.serving.v2a_stages.V2AEncoderModel."""

from k4serve.serving.v2a_stages import V2AEncoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
