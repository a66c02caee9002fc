"""Serving pieces that need no server: instance placement, settings from config + environment, request checks,
the launcher's backend directory and environment, the --gpus rewrite of the real configs, the client's tensors."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from k4serve.pipelines.t2v import MAX_SEED, RequestError
from k4serve.serving.cli import add_serve_arguments, parse_gpus, stage_env
from k4serve.serving.launcher import (
    REPO_MODEL_REPOSITORY,
    ServerOptions,
    TritonDistribution,
    TritonServer,
    copy_repository,
    models_to_load,
    stub_environment,
    with_instance_groups,
)
from k4serve.serving.requests import VideoShape, decode_prompt
from k4serve.serving.settings import instance_device, pipeline_options, stage_device, v2a_options

T2V_STAGES = ("text_encoder", "dit_sampler", "vae_decoder")
V2A_STAGES = ("v2a_encoder", "v2a_sampler", "vocoder")
GPU_STAGES = (*T2V_STAGES, *V2A_STAGES)


@pytest.mark.parametrize("device_id", [0, 1, 2, 3])
def test_gpu_instance_runs_on_its_device_id(device_id):
    assert instance_device("GPU", str(device_id)) == f"cuda:{device_id}"
    assert instance_device("KIND_GPU", device_id) == f"cuda:{device_id}"


@pytest.mark.parametrize("device_id", [0, 1, 2, 3])
def test_cpu_instance_runs_on_the_cpu_whatever_its_id(device_id):
    assert instance_device("CPU", str(device_id)) == "cpu"


def test_model_kind_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="KIND_GPU or KIND_CPU"):
        instance_device("MODEL", "0")


def test_stage_device_follows_triton_unless_k4serve_device_is_set():
    args = {"model_instance_kind": "GPU", "model_instance_device_id": "2"}
    assert stage_device(args, environ={}) == "cuda:2"
    assert stage_device(args, environ={"K4SERVE_DEVICE": ""}) == "cuda:2"
    assert stage_device(args, environ={"K4SERVE_DEVICE": "cpu"}) == "cpu"


def read_config_parameters(model: str) -> dict:
    """config.pbtxt parameters in the JSON form Triton hands to `initialize`."""
    text = (REPO_MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    pairs = re.findall(r'key: "(\w+)", value: \{ string_value: "([^"]*)" \}', text)
    return {"parameters": {key: {"string_value": value} for key, value in pairs}}


@pytest.mark.parametrize("model", T2V_STAGES)
def test_configs_default_to_the_tiny_preset_and_env_overrides(model):
    config = read_config_parameters(model)
    encodes = {"mp4_preset": "fast"} if model == "t2v_stream" else {}  # the stage that writes the mp4 itself
    assert pipeline_options(config, environ={}) == {
        "preset": "tiny",
        "weights": None,
        "engine": "eager",
        "attention": "auto",
        "linear": "auto",
        **encodes,
    }
    env = {"K4SERVE_PRESET": "flash-512", "K4SERVE_WEIGHTS": "/weights", "K4SERVE_LINEAR": "fp8"}
    options = pipeline_options(config, environ=env)
    assert (options["preset"], options["weights"], options["linear"]) == ("flash-512", "/weights", "fp8")


@pytest.mark.parametrize("model", V2A_STAGES)
def test_v2a_configs_default_to_tiny_and_only_the_v2a_environment_overrides(model):
    config = read_config_parameters(model)
    assert v2a_options(config, environ={}) == {
        "preset": "tiny",
        "weights": None,
        "encoder_weights": None,
        "engine": "eager",
        "linear": "bf16",
    }
    env = {"K4SERVE_PRESET": "flash-512", "K4SERVE_V2A_PRESET": "kandinsky4-v2a", "K4SERVE_V2A_WEIGHTS": "/v2a"}
    options = v2a_options(config, environ=env)
    assert (options["preset"], options["weights"]) == ("kandinsky4-v2a", "/v2a")  # K4SERVE_PRESET is T2V's


def test_prompt_must_be_utf8_and_non_empty():
    assert decode_prompt(b"a fox") == "a fox"
    assert decode_prompt("лиса в снегу".encode()) == "лиса в снегу"
    with pytest.raises(RequestError, match=r"byte 0xff at position 4 is not valid UTF-8"):
        decode_prompt(b"fox \xff")
    with pytest.raises(RequestError, match="prompt is empty"):
        decode_prompt(b"   ")
    with pytest.raises(RequestError, match="10000 characters"):
        decode_prompt(b"a" * 10_000)


def test_video_shape_checks_size_seconds_seed_and_draws_a_seed():
    assert VideoShape.checked(384, 672, 12, 5) == VideoShape(384, 672, 12, 5)
    drawn = {VideoShape.checked(512, 512, 0, None).seed for _ in range(4)}
    assert all(0 <= seed <= MAX_SEED for seed in drawn) and len(drawn) == 4
    with pytest.raises(RequestError, match="use one of: 512x512, 352x736"):
        VideoShape.checked(400, 400, 1, 0)
    with pytest.raises(RequestError, match="from 0 to 12"):
        VideoShape.checked(384, 672, 13, 0)
    with pytest.raises(RequestError, match="seed must be from 0"):
        VideoShape.checked(384, 672, 1, -1)


def test_gpus_pin_every_gpu_stage_and_leave_the_muxer_on_the_cpu(tmp_path):
    repository = copy_repository(REPO_MODEL_REPOSITORY, tmp_path / "repo", gpus=[1, 3])
    for model in GPU_STAGES:
        text = (repository / model / "config.pbtxt").read_text()
        assert "instance_group [ { count: 1, kind: KIND_GPU, gpus: [ 1, 3 ] } ]" in text, model
    muxer = (repository / "muxer" / "config.pbtxt").read_text()
    assert muxer == (REPO_MODEL_REPOSITORY / "muxer" / "config.pbtxt").read_text()
    assert (repository / "t2v" / "1").is_dir()  # the entry point's version directory is copied too


def test_gpus_none_puts_every_stage_on_the_cpu_and_no_flag_changes_nothing():
    config = (REPO_MODEL_REPOSITORY / "dit_sampler" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 1, kind: KIND_CPU } ]" in with_instance_groups(config, [])
    assert with_instance_groups(config, None) == config


def test_parse_gpus():
    assert parse_gpus("0,2") == [0, 2]
    assert parse_gpus("none") == []
    with pytest.raises(argparse.ArgumentTypeError, match="like 0,1"):
        parse_gpus("first")


def test_serve_flags_become_k4serve_environment(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        ["--preset", "flash-512", "--weights", str(tmp_path), "--linear", "fp8", "--mp4-preset", "official"]
    )
    assert stage_env(args) == {
        "K4SERVE_PRESET": "flash-512",
        "K4SERVE_WEIGHTS": str(tmp_path.resolve()),
        "K4SERVE_LINEAR": "fp8",
        "K4SERVE_MP4_PRESET": "official",
    }
    assert stage_env(parser.parse_args([])) == {}
    v2a = parser.parse_args(["--v2a-preset", "kandinsky4-v2a", "--v2a-weights", str(tmp_path), "--v2a-engine", "fast"])
    assert stage_env(v2a) == {
        "K4SERVE_V2A_PRESET": "kandinsky4-v2a",
        "K4SERVE_V2A_WEIGHTS": str(tmp_path.resolve()),
        "K4SERVE_V2A_ENGINE": "fast",
    }


def test_an_entry_point_brings_its_stages_and_unknown_models_are_named():
    assert models_to_load(REPO_MODEL_REPOSITORY, ["t2v"]) == [
        "dit_sampler",
        "muxer",
        "t2v",
        "text_encoder",
        "vae_decoder",
    ]
    assert models_to_load(REPO_MODEL_REPOSITORY, ["t2v_stream"]) == [
        "dit_sampler",
        "muxer",
        "t2v_stream",
        "text_encoder",
        "vae_decoder",
    ]
    with pytest.raises(ValueError, match="no model t2a in .*; choose from dit_sampler, muxer, t2v, t2v_stream"):
        models_to_load(REPO_MODEL_REPOSITORY, ["t2a"])


def test_tritonserver_loads_models_explicitly_behind_restricted_apis(tmp_path, monkeypatch):
    binary = TritonDistribution(tmp_path / "tritonserver", tmp_path, tmp_path, tmp_path)
    monkeypatch.setattr(TritonDistribution, "find", classmethod(lambda cls: binary))
    server = TritonServer(ServerOptions())
    every = server.command(tmp_path, REPO_MODEL_REPOSITORY)
    loaded = [arg.removeprefix("--load-model=") for arg in every if arg.startswith("--load-model=")]
    assert "--model-control-mode=explicit" in every and loaded == models_to_load(REPO_MODEL_REPOSITORY, None)
    assert "--http-address=127.0.0.1" in every  # clients reach HTTP through the launcher's front only
    assert (
        f"--http-restricted-api=health,metadata,inference,shared-memory,model-config,model-repository,"
        f"statistics,trace,logging:k4serve-control={server.key}" in every
    )
    only = TritonServer(ServerOptions(models=["vae_decoder", "muxer"])).command(tmp_path, REPO_MODEL_REPOSITORY)
    assert only[-3:] == ["--model-control-mode=explicit", "--load-model=muxer", "--load-model=vae_decoder"]
    installed = TritonServer(ServerOptions(tritonserver=Path("/opt/tritonserver/bin/tritonserver")))
    assert installed.command(tmp_path, REPO_MODEL_REPOSITORY)[0] == "/opt/tritonserver/bin/tritonserver"


def test_backend_directory_holds_the_stub_for_this_python(tmp_path):
    pytest.importorskip("pytriton")
    dist = TritonDistribution.find()
    python = dist.assemble_backends(tmp_path / "backends") / "python"
    assert sorted(p.name for p in python.iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    assert os.access(python / "triton_python_backend_stub", os.X_OK)


def test_the_stub_runs_with_the_server_environment(tmp_path):
    """Every shared library of the copied stub resolves under the environment the server gets."""
    pytest.importorskip("pytriton")
    dist = TritonDistribution.find()
    stub = dist.assemble_backends(tmp_path / "backends") / "python" / "triton_python_backend_stub"
    env = stub_environment(dist, {})
    linked = subprocess.run(["ldd", str(stub)], env=env, capture_output=True, text=True, check=True).stdout
    assert "not found" not in linked, linked
    assert "libpython" in linked
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_client_request_tensors():
    pytest.importorskip("tritonclient.grpc")
    from k4serve.client.client import VideoRequest

    request = VideoRequest("лиса", 512, 512, 3, seed=2**63 - 1)
    tensors = {t.name(): t for t in request.inputs()}
    assert {name: tensors[name].datatype() for name in tensors} == {
        "PROMPT": "BYTES",
        "HEIGHT": "INT32",
        "WIDTH": "INT32",
        "SECONDS": "INT32",
        "SEED": "INT64",
    }
    assert all(tensor.shape() == [1] for tensor in tensors.values())
    assert "SEED" not in {t.name() for t in VideoRequest("fox").inputs()}
    assert request.with_id().request_id and request.with_id().prompt == "лиса"


def test_client_sound_request_tensors_and_entry_points():
    pytest.importorskip("tritonclient.grpc")
    from k4serve.client.client import AudioRequest, V2ARequest, VideoRequest

    def datatypes(request) -> dict[str, str]:
        return {t.name(): t.datatype() for t in request.inputs()}

    sound = AudioRequest("fox", 384, 672, 1, seed=3, audio_prompt="snow", timing="retime")
    assert (sound.model, sound.stream_model, VideoRequest("fox").model) == ("t2va", "t2va_stream", "t2v")
    assert datatypes(sound) == {
        **datatypes(VideoRequest("fox", 384, 672, 1, seed=3)),
        "AUDIO_PROMPT": "BYTES",
        "TIMING": "BYTES",
    }
    upload = V2ARequest(b"\x00mp4", negative_prompt="hiss", seed=2**63 - 1)
    assert (upload.model, upload.stream_model) == ("v2a", "v2a_stream")
    assert datatypes(upload) == {"VIDEO": "BYTES", "NEGATIVE_PROMPT": "BYTES", "SEED": "INT64"}
    video = {t.name(): t for t in upload.inputs()}["VIDEO"]
    assert video.shape() == [1]
    assert datatypes(V2ARequest(b"x")) == {"VIDEO": "BYTES"}  # the server's defaults for the rest
    assert upload.with_id().request_id and upload.with_id().video == b"\x00mp4"


def test_request_command_builds_the_request_its_flags_name(tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from k4serve.client.cli import add_request_arguments, build_request
    from k4serve.client.client import AudioRequest, V2ARequest, VideoRequest

    parser = argparse.ArgumentParser()
    add_request_arguments(parser)
    clip = tmp_path / "in.mp4"
    clip.write_bytes(b"video bytes")

    def request(*argv: str):
        return build_request(parser.parse_args(list(argv)))

    assert request("fox", "--seconds", "1") == VideoRequest("fox", seconds=1)
    assert request("fox", "--audio", "--audio-prompt", "snow") == AudioRequest("fox", audio_prompt="snow")
    assert request("--v2a", str(clip), "--prompt", "rain", "--seed", "4", "--timing", "retime") == V2ARequest(
        b"video bytes", "rain", seed=4, timing="retime"
    )
    refused = {
        ("--v2a", str(clip), "fox"): "--v2a takes a video, not a prompt",
        ("--v2a", str(clip), "--audio"): "--v2a takes a video, not a prompt or --audio",
        ("--audio",): "give a prompt (text -> video) or --v2a VIDEO",
        ("fox", "--timing", "pad"): "are for a video with sound: add --audio",
        ("fox", "--prompt", "rain"): "are for a video with sound: add --audio",
    }
    for argv, message in refused.items():
        with pytest.raises(RequestError, match=re.escape(message)):
            request(*argv)
