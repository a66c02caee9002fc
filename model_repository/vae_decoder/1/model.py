"""Triton entry point of `vae_decoder`; the logic lives in k4serve.serving.stages.VaeDecoderModel."""

from k4serve.serving.stages import VaeDecoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
