"""`k4serve generate --device` on a host without that device: exit 2 naming the missing device and the fix."""

from __future__ import annotations

import re

import pytest
import torch

from k4serve.cli import main
from k4serve.pipelines.t2v import PipelineSettings, check_device


def generate(tmp_path, device: str) -> int:
    return main(["generate", "a red fox", "-o", str(tmp_path / "fox.mp4"), "--seconds", "0", "--device", device])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize(
    ("device", "missing"),
    [("cuda", "cuda"), ("cuda:3", "cuda:3"), ("text_encoder=cpu,dit=cuda:1,vae=cpu", "cuda:1")],
)
def test_cuda_on_a_cpu_only_torch_names_the_device_and_cpu(tmp_path, capsys, device, missing):
    assert generate(tmp_path, device) == 2
    error = capsys.readouterr().err
    assert f"device '{missing}' is not available: this torch ({torch.__version__}) is built without CUDA" in error
    assert error.strip().endswith("use the device cpu (--device cpu)")
    assert "Traceback" not in error and not (tmp_path / "fox.png").exists()


def test_a_gpu_index_past_the_last_gpu_names_the_ones_there(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert generate(tmp_path, "cuda:3") == 2
    assert "device 'cuda:3' does not exist: this host has 2 GPUs (cuda:0 .. cuda:1); use one of those" in (
        capsys.readouterr().err
    )
    assert check_device("cuda:1") == "cuda:1"  # the ones there pass


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "'gpu' is not a device: use cpu, cuda or cuda:N"), ("meta", "k4serve runs on cpu or cuda[:N]")],
)
def test_a_device_that_is_not_cpu_or_cuda_is_refused(device, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PipelineSettings(device=device).device_map()
    assert PipelineSettings(device="cpu").device_map() == dict.fromkeys(("text_encoder", "dit", "vae"), "cpu")
