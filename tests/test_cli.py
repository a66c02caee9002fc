"""`k4serve generate` end to end on the tiny preset, and a clear non-zero exit for every bad argument."""

from __future__ import annotations

import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from k4serve.cli import main
from k4serve.pipelines.video_io import decode_mp4


def test_generate_writes_a_decodable_mp4(tmp_path):
    out = tmp_path / "fox.mp4"
    cmd = [sys.executable, "-m", "k4serve.cli", "generate", "a red fox", "-o", str(out), "--seconds", "1"]
    cmd += ["--size", "384x672", "--seed", "42", "--preset", "tiny"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "seed 42" in result.stdout
    frames, fps = decode_mp4(out.read_bytes())
    assert frames.shape == (9, 384, 672, 3) and fps == 8.0
    assert frames.std() > 1.0  # a picture, not a constant


def test_zero_seconds_writes_a_png_image(tmp_path):
    assert main(["generate", "a red fox", "-o", str(tmp_path / "img.mp4"), "--seconds", "0", "--size", "512x512"]) == 0
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "img.png"))
    meta = next(reader)
    assert meta["size"] == (512, 512) and len(list(reader)) == 1


@pytest.mark.parametrize(
    ("prompt", "args", "message"),
    [
        ("a red fox", ["--size", "500x500"], "use one of: 512x512, 352x736"),
        ("a red fox", ["--seconds", "-1"], "seconds must be a whole number from 0 to 12"),
        ("a red fox", ["--seconds", "13"], "seconds must be a whole number from 0 to 12"),
        ("   ", [], "prompt is empty"),
        ("a red fox", ["--weights", "/nonexistent/k4"], "weights directory not found: /nonexistent/k4"),
    ],
)
def test_bad_arguments_exit_nonzero_naming_the_fix(tmp_path, capsys, prompt, args, message):
    assert main(["generate", prompt, "-o", str(tmp_path / "x.mp4"), *args]) != 0
    assert message in capsys.readouterr().err


def test_malformed_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red fox", "--size", "big"])
    assert exit_info.value.code != 0
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_checkpoint_of_the_wrong_model_is_refused(tmp_path, capsys):
    weights = tmp_path / "weights"
    for folder in ("vae", "text_encoder", "tokenizer"):
        (weights / folder).mkdir(parents=True)
    torch.save({"decoder.conv_in.conv.weight": torch.zeros(1)}, weights / "kandinsky4_distil_512.pt")
    code = main(["generate", "a fox", "-o", str(tmp_path / "x.mp4"), "--weights", str(weights), "--seconds", "1"])
    assert code != 0
    assert "does not match the model (missing keys: " in capsys.readouterr().err


def test_frames_are_deterministic_for_a_seed(tmp_path):
    from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline

    pipeline = T2VPipeline.from_settings(PipelineSettings(preset="tiny"))
    a = pipeline("a red fox", 384, 672, 1, seed=5)
    b = pipeline("a red fox", 384, 672, 1, seed=5)
    c = pipeline("a red fox", 384, 672, 1, seed=6)
    assert a.dtype == np.uint8 and a.shape == (9, 384, 672, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_without_the_serve_extra_generate_works_and_request_names_the_extra(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith(("tritonclient", "k4serve.client.client"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tritonclient", None)  # as if not installed: importing it raises
    out = tmp_path / "img.png"
    assert main(["generate", "a red fox", "-o", str(out), "--seconds", "0", "--size", "512x512"]) == 0
    assert out.is_file()
    assert main(["request", "a red fox", "-o", str(tmp_path / "x.mp4")]) == 2
    assert "pip install 'k4serve[serve]'" in capsys.readouterr().err
