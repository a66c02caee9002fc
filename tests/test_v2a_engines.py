"""The V2A UNet exported (`k4serve export onnx --model v2a-unet`): its graphs equal the PyTorch UNet through
onnxruntime at the shortest and the longest duration (12 s: the odd latent width 148 that upsamples to each skip's
exact size), pass the TensorRT operator check, and serve the V2A pipeline's sampler (engine onnxruntime) with the
eager sampler's latents; a duration or weights the engine was not built for are refused with the export command."""

from __future__ import annotations

import pytest
import torch

from k4serve.cli import main
from k4serve.engines.manifest import EngineManifest, EngineMismatch
from k4serve.engines.onnxruntime import OnnxRuntimeEngine
from k4serve.export.tensorrt_ops import check_graph
from k4serve.pipelines.exported import ExportedUNet
from k4serve.pipelines.t2v import RequestError
from k4serve.pipelines.v2a import V2APipeline, V2ASettings

SECONDS = (1, 12)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    pytest.importorskip("onnxscript", reason="ONNX export comes with the export extra: pip install 'k4serve[export]'")
    folder = tmp_path_factory.mktemp("engines")
    argv = ["export", "onnx", "--model", "v2a-unet", "--preset", "tiny", "--seconds", *map(str, SECONDS)]
    assert main([*argv, "-o", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def eager():
    return V2APipeline.from_settings(V2ASettings(preset="tiny"), components=("unet",))


def conditioning(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 100, d, generator=g), torch.randn(2, 96, d, generator=g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_unet_graphs_equal_pytorch_and_pass_the_tensorrt_check(engine_dir, eager):
    folder = engine_dir / "v2a-unet-onnx"
    manifest = EngineManifest.read(folder)
    assert [b.seconds for b in manifest.buckets] == list(SECONDS)
    assert [g.spec.name for g in manifest.graphs] == ["1s", "12s"]
    assert manifest.command.startswith("k4serve export onnx --model v2a-unet --preset tiny --seconds 1 12")
    engine = OnnxRuntimeEngine(folder)
    d = eager.unet.config.feature_dim
    for seconds, entry in zip(SECONDS, manifest.graphs, strict=True):
        assert check_graph(folder / entry.file) == [], entry.file
        sample_spec = entry.spec.inputs[0]
        assert sample_spec.shape == (2, *eager.latent_shape(seconds))
        sample = torch.randn(sample_spec.shape, generator=torch.Generator().manual_seed(seconds))
        timestep = torch.tensor([981, 981])
        prompt, video = conditioning(d, seconds)
        with torch.no_grad():
            reference = eager.unet(sample, timestep, prompt, video)
        assert rel(engine(sample, timestep, prompt, video), reference) <= 1e-4, seconds
    assert manifest.graphs[1].spec.inputs[0].shape[-1] == 148  # 12 s: the odd width diffusers upsamples exactly


def test_sampler_on_the_onnxruntime_unet_equals_eager(engine_dir, eager):
    settings = V2ASettings(preset="tiny", engine="onnxruntime", engine_dir=str(engine_dir))
    exported = V2APipeline.from_settings(settings, components=("unet",))
    assert isinstance(exported.unet, ExportedUNet)
    cond = conditioning(eager.unet.config.feature_dim, 3)
    expected = eager.sample(cond, 12, seed=11)
    latents = exported.sample(cond, 12, seed=11)
    assert latents.shape == expected.shape and latents.dtype == expected.dtype
    assert rel(latents, expected) <= 1e-4  # 51 UNet calls, each <= 1e-4 apart


def test_a_duration_without_a_graph_is_refused_with_the_export_command(engine_dir):
    settings = V2ASettings(preset="tiny", engine="onnxruntime", engine_dir=str(engine_dir))
    exported = V2APipeline.from_settings(settings, components=("unet",))
    with pytest.raises(RequestError) as error:
        exported.sample(conditioning(exported.unet.feature_dim, 0), 5, seed=0)
    message = str(error.value)
    assert "serves 1s, 12s (batch 2), not 5s" in message
    assert "k4serve export onnx --model v2a-unet --preset tiny --seconds 1 5 12 --dtype fp32" in message
    assert "--size" not in message


def test_engine_of_other_weights_is_refused_naming_the_export_command(engine_dir):
    settings = V2ASettings(preset="tiny", engine="onnxruntime", engine_dir=str(engine_dir), seed=4)
    with pytest.raises(EngineMismatch) as error:
        V2APipeline.from_settings(settings, components=("unet",))
    message = str(error.value)
    assert "weights 'random:0' (this stage: 'random:4')" in message
    assert "--model v2a-unet --preset tiny --seed 4 --seconds 1 12" in message


def test_exported_engine_without_engine_dir_says_what_to_give():
    with pytest.raises(ValueError, match="give engine_dir .* --model v2a-unet"):
        V2APipeline.from_settings(V2ASettings(preset="tiny", engine="onnxruntime"), components=("unet",))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "384x672", "--seconds", "1"], "v2a-unet takes no --size"),
        (["--seconds", "0"], "seconds must be a whole number from 1 to 12"),
        (["--seconds", "1", "--preset", "flash-512"], "v2a-unet is built from the presets ['kandinsky4-v2a', 'tiny']"),
        (["--seconds", "1", "--dtype", "fp8"], "fp8 is declared for the DiT's block linears only"),
    ],
)
def test_bad_v2a_unet_export_arguments_exit_nonzero_naming_the_fix(tmp_path, capsys, args, message):
    assert main(["export", "onnx", "--model", "v2a-unet", *args, "-o", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_sized_models_need_a_size(tmp_path, capsys):
    assert main(["export", "onnx", "--model", "dit", "--seconds", "1", "-o", str(tmp_path)]) == 2
    assert "--size is required for dit" in capsys.readouterr().err
