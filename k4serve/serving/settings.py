"""Where a Triton model instance runs and how its pipeline is built: config.pbtxt parameters + environment.

Every stage reads the same keys from its config.pbtxt `parameters`, and `K4SERVE_<KEY>` environment variables
override them, so one model repository serves the tiny preset on a laptop and the official weights in NGC's
container (`docker run -e K4SERVE_PRESET=flash-512 -e K4SERVE_WEIGHTS=/weights ...`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# config.pbtxt parameter -> PipelineSettings field. `linear` is the dtype knob: the DiT's linear layers in
# bf16 or fp8 on the fast engine; activations follow the device (bf16 on the GPU, float32 on the CPU). `engine_dir`:
# where `k4serve export` wrote the engines that engine aoti | tensorrt | onnxruntime runs.
SETTING_KEYS = ("preset", "weights", "engine", "attention", "linear", "engine_dir", "mp4_preset")
PATH_KEYS = ("weights", "engine_dir", "v2a_weights", "v2a_encoder_weights")  # made absolute from the command line
# config.pbtxt parameter -> V2ASettings field, for the V2A stages (v2a_encoder, v2a_sampler, vocoder). Their own
# keys, so K4SERVE_PRESET=flash-512 sets the T2V models and K4SERVE_V2A_PRESET=kandinsky4-v2a the V2A ones.
V2A_SETTING_KEYS = {
    "v2a_preset": "preset",
    "v2a_weights": "weights",
    "v2a_encoder_weights": "encoder_weights",
    "v2a_engine": "engine",
    "v2a_linear": "linear",
    "engine_dir": "engine_dir",  # one engine folder for the deployment: the V2A UNet's engine sits beside the DiT's
}
# `mp4_preset`: the H.264 settings of the muxer and t2v_stream (fast, or official: the official writer's).
ENV_PREFIX = "K4SERVE_"
DEVICE_ENV = "K4SERVE_DEVICE"  # forces every stage onto one device ("cpu", "cuda:1"), whatever Triton chose


def instance_device(kind: str, device_id: int | str) -> str:
    """Triton's `model_instance_kind` / `model_instance_device_id` -> the torch device of this instance."""
    kind = kind.upper().removeprefix("KIND_")
    if kind == "CPU":
        return "cpu"
    if kind == "GPU":
        return f"cuda:{int(device_id)}"
    raise ValueError(
        f"instance kind {kind!r} is not supported: give the instance_group kind KIND_GPU or KIND_CPU "
        "(or leave it out: Triton then picks the GPUs when there are any)"
    )


def config_parameters(model_config: Mapping) -> dict[str, str]:
    """The string parameters of a parsed config.pbtxt (`{"parameters": {key: {"string_value": v}}}`)."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def _options(
    model_config: Mapping, fields: Mapping[str, str], environ: Mapping[str, str] | None
) -> dict[str, str | None]:
    """{field: value} for each config parameter key of `fields` ({key: field}); K4SERVE_<KEY> wins."""
    environ = os.environ if environ is None else environ
    parameters = config_parameters(model_config)
    options: dict[str, str | None] = {}
    for key, name in fields.items():
        value = environ.get(ENV_PREFIX + key.upper(), parameters.get(key))
        if value is not None:
            options[name] = value or None  # an empty string clears the setting (weights "" -> random weights)
    return options


def pipeline_options(model_config: Mapping, environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The PipelineSettings keyword arguments a model asks for; K4SERVE_<KEY> in the environment wins."""
    return _options(model_config, {key: key for key in SETTING_KEYS}, environ)


def v2a_options(model_config: Mapping, environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The V2ASettings keyword arguments a V2A stage asks for; K4SERVE_V2A_<KEY> in the environment wins."""
    return _options(model_config, V2A_SETTING_KEYS, environ)


def stage_device(args: Mapping[str, str], environ: Mapping[str, str] | None = None) -> str:
    """The device of the instance Triton is initializing (`args` of `initialize`), unless K4SERVE_DEVICE says."""
    environ = os.environ if environ is None else environ
    override = environ.get(DEVICE_ENV)
    if override:
        return override
    return instance_device(args["model_instance_kind"], args["model_instance_device_id"])
