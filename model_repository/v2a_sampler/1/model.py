"""Triton entry point of `v2a_sampler`; the logic lives in k4serve.serving.v2a_stages.V2ASamplerModel."""

from k4serve.serving.v2a_stages import V2ASamplerModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
