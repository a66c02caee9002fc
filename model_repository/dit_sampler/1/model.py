"""Triton entry point of `dit_sampler`; the logic lives in k4serve.serving.stages.DiTSamplerModel."""

from k4serve.serving.stages import DiTSamplerModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
