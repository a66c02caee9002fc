"""Triton entry point of `vocoder`; the logic lives in k4serve.serving.v2a_stages.VocoderModel."""

from k4serve.serving.v2a_stages import VocoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
