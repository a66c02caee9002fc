"""Exported engines behind the pipeline and the stages: the tiny preset on onnxruntime equals eager in process and
through a real tritonserver (K4SERVE_ENGINE=onnxruntime, and the V2A UNet's with K4SERVE_V2A_ENGINE=onnxruntime),
every bucket is loaded at start, and an engine that does not fit the weights or a request's shape is refused with
the export command that builds the right one."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from k4serve.cli import main
from k4serve.engines.manifest import EngineManifest, EngineMismatch
from k4serve.pipelines.t2v import PipelineSettings, RequestError, T2VPipeline
from k4serve.serving.settings import pipeline_options

SIZE = (384, 672)
PROMPT = "a red fox runs through fresh snow"
MODELS = ("dit", "vae-decoder", "text-encoder")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    """The tiny preset's three T2V components exported to ONNX for 384x672 at 0 s and 1 s, and the V2A UNet for 1 s,
    through the CLI, into one engine folder."""
    folder = tmp_path_factory.mktemp("engines")
    for model in MODELS:
        assert (
            main(["export", "onnx", "--model", model, "--size", "384x672", "--seconds", "0", "1", "-o", str(folder)])
            == 0
        )
    assert main(["export", "onnx", "--model", "v2a-unet", "--seconds", "1", "-o", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def eager():
    return T2VPipeline.from_settings(PipelineSettings(preset="tiny"))


@pytest.fixture(scope="module")
def exported(engine_dir):
    return T2VPipeline.from_settings(PipelineSettings(preset="tiny", engine="onnxruntime", engine_dir=str(engine_dir)))


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_manifest_records_what_the_engine_was_built_from(engine_dir):
    manifest = EngineManifest.read(engine_dir / "vae-decoder-onnx")
    assert (manifest.model, manifest.preset, manifest.format, manifest.dtype) == ("vae-decoder", "tiny", "onnx", "fp32")
    assert manifest.weights == "random:0" and {b.seconds for b in manifest.buckets} == {0, 1}
    assert [g.spec.name for g in manifest.graphs] == ["384x672-image", "384x672-first3"]
    assert {"torch", "onnx", "onnxscript"} <= set(manifest.tools) and manifest.k4serve
    assert manifest.command.startswith("k4serve export onnx --model vae-decoder --preset tiny --size 384x672")


def test_every_bucket_is_loaded_when_the_pipeline_is_built(exported):
    for component in (exported.dit, exported.vae, exported.text_encoder.encoder.component):
        engine = component.engine
        assert sorted(engine.shapes) == sorted(g.inputs[0].shape for g in engine.graphs)


def test_pipeline_on_onnxruntime_engines_equals_eager(exported, eager):
    text = exported.encode_prompt(PROMPT)
    assert rel(text, eager.encode_prompt(PROMPT)) <= 1e-4
    for seconds in (0, 1):
        latents = exported.sample(text, *SIZE, seconds, seed=3)
        reference = eager.sample(eager.encode_prompt(PROMPT), *SIZE, seconds, seed=3)
        assert rel(latents, reference) <= 1e-4
        frames, expected = exported.decode(latents), eager.decode(reference)
        assert frames.shape == expected.shape
        # 255 * x truncated to uint8: a 1e-6 difference can cross an integer, never by more than one level
        assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1
        assert (frames == expected).mean() > 0.99


def test_engine_of_other_weights_is_refused_with_the_export_command(engine_dir):
    settings = PipelineSettings(preset="tiny", engine="onnxruntime", engine_dir=str(engine_dir), seed=1)
    with pytest.raises(EngineMismatch) as error:
        T2VPipeline.from_settings(settings, components=("dit",))
    message = str(error.value)
    assert "weights 'random:0' (this stage: 'random:1')" in message
    assert "k4serve export onnx --model dit --preset tiny --seed 1 --size 384x672 --seconds 0 1 --dtype fp32" in message


def test_request_shape_without_a_bucket_names_the_export_command(exported):
    text = exported.encode_prompt(PROMPT)
    with pytest.raises(RequestError) as error:
        exported.sample(text, 512, 512, 2, seed=0)
    message = str(error.value)
    assert "serves 384x672-0s, 384x672-1s (batch 1), not 512x512-2s" in message
    assert "--size 384x672 512x512 --seconds 0 1 2" in message


def test_missing_engines_are_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match="give engine_dir"):
        T2VPipeline.from_settings(PipelineSettings(preset="tiny", engine="onnxruntime"))
    with pytest.raises(EngineMismatch, match="no dit engine in .*dit-onnx.*k4serve export onnx --model dit"):
        settings = PipelineSettings(preset="tiny", engine="onnxruntime", engine_dir=str(tmp_path))
        T2VPipeline.from_settings(settings, components=("dit",))


def test_tensorrt_engine_without_tensorrt_says_what_to_install(engine_dir):
    pytest.importorskip("onnx")
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    from k4serve.engines.exported import EngineUnavailable, open_engine

    (engine_dir / "dit-tensorrt").mkdir(exist_ok=True)
    manifest = EngineManifest.read(engine_dir / "dit-onnx")
    manifest.format = "tensorrt"
    manifest.write(engine_dir / "dit-tensorrt")
    with pytest.raises(EngineUnavailable, match="pip install tensorrt"):
        open_engine("tensorrt", engine_dir / "dit-tensorrt", "cuda")


def test_engine_settings_come_from_config_parameters_and_environment(tmp_path):
    from k4serve.serving.cli import add_serve_arguments, stage_env

    config = {"parameters": {"engine": {"string_value": "onnxruntime"}, "engine_dir": {"string_value": "/e"}}}
    assert pipeline_options(config, environ={}) == {"engine": "onnxruntime", "engine_dir": "/e"}
    environ = {"K4SERVE_ENGINE": "aoti", "K4SERVE_ENGINE_DIR": "/other"}
    assert pipeline_options(config, environ=environ) == {"engine": "aoti", "engine_dir": "/other"}
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--engine", "onnxruntime", "--engine-dir", str(tmp_path)])
    assert stage_env(args) == {"K4SERVE_ENGINE": "onnxruntime", "K4SERVE_ENGINE_DIR": str(tmp_path.resolve())}


@pytest.mark.server
def test_server_stages_serve_from_onnxruntime_engines_equal_to_eager(engine_dir, exported, eager, tmp_path):
    pytest.importorskip("pytriton", reason="tritonserver comes with the serve extra: pip install 'k4serve[serve]'")
    from mp4_probe import probe_mp4
    from serving_helpers import metrics, upload

    from k4serve.client.client import T2VClient, V2ARequest, VideoRequest
    from k4serve.pipelines.v2a import V2APipeline, V2ASettings
    from k4serve.pipelines.video_io import decode_mp4, encode_mp4
    from k4serve.serving.launcher import ServerOptions, TritonServer

    env = {"K4SERVE_PRESET": "tiny", "K4SERVE_WEIGHTS": "", "K4SERVE_DEVICE": "", "K4SERVE_ENGINE": "onnxruntime",
           "K4SERVE_ENGINE_DIR": str(engine_dir), "K4SERVE_V2A_PRESET": "tiny", "K4SERVE_V2A_WEIGHTS": "",
           "K4SERVE_V2A_ENGINE": "onnxruntime", "OMP_NUM_THREADS": "1"}  # fmt: skip
    options = ServerOptions(host="127.0.0.1", env=env, log=tmp_path / "server.log", models=["t2v", "v2a"])
    with TritonServer(options) as server:
        with T2VClient(server.grpc_url, timeout_s=240) as client:
            video = client.generate(VideoRequest(PROMPT, *SIZE, seconds=1, seed=7))
            with_sound = client.generate(V2ARequest(upload(), seed=5))
        samples = metrics(server).items()
    # the engines' weights live in onnxruntime: the samplers hold no torch weights, the V2A encoder (eager) does
    held = {dict(labels)["model"]: value for (name, labels), value in samples if name == "k4serve_weights_bytes"}
    assert held["dit_sampler"] == held["v2a_sampler"] == 0 < held["v2a_encoder"], held
    # the V2A stages with the UNet on its onnxruntime engine: the in-process pipeline's mp4 on the same engine
    v2a = V2APipeline.from_settings(V2ASettings(engine="onnxruntime", engine_dir=str(engine_dir)))
    expected_mp4, _ = v2a.add_audio(upload(), seed=5)
    (_, served_audio, _), (_, expected_audio, _) = (probe_mp4(mp4, tmp_path) for mp4 in (with_sound.mp4, expected_mp4))
    assert np.abs(served_audio).max() > 100  # a sound, not silence
    np.testing.assert_array_equal(served_audio, expected_audio)
    served, _ = decode_mp4(video.mp4)
    # exactly what the same engines give in process (after the same H.264 encode) ...
    frames = exported(PROMPT, *SIZE, 1, 7)
    np.testing.assert_array_equal(served, decode_mp4(encode_mp4(frames))[0])
    # ... which are eager's frames up to one level where 255 * x truncates across an integer (H.264 would turn
    # those few one-level steps into different block decisions, so the comparison is made before encoding)
    expected = eager(PROMPT, *SIZE, 1, 7)
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1 and (frames == expected).mean() > 0.99
