"""`k4serve generate` (with --audio) and `k4serve v2a` end to end on the tiny preset, and a clear non-zero exit
for every bad argument."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from mp4_probe import FFMPEG, probe_mp4

from k4serve.cli import main
from k4serve.pipelines.media import UploadLimits
from k4serve.pipelines.video_io import decode_mp4, encode_mp4


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


# ---- sound: `k4serve v2a` and `k4serve generate --audio` ----


def assert_aac_44k_as_long_as_the_video(mp4: bytes, n_frames: int, tmp_path) -> np.ndarray:
    """The mp4's AAC stream is 44.1 kHz mono and lasts as long as its video within one frame; its samples."""
    info, audio, frames = probe_mp4(mp4, tmp_path)
    assert re.search(r"Audio: aac .*44100 Hz, mono", info), info
    fps = decode_mp4(mp4)[1]
    assert frames == n_frames
    assert abs(len(audio) / 44100 - frames / fps) <= 1 / fps
    return audio


def test_v2a_gives_an_uploaded_video_its_sound_and_says_it_trimmed(tmp_path, capsys, single_thread):
    upload = tmp_path / "in.mp4"  # 13 s at 2 fps: the official keeps its first 12 s (24 frames)
    upload.write_bytes(encode_mp4(np.random.default_rng(0).integers(0, 256, (26, 48, 64, 3), np.uint8), fps=2))
    out = tmp_path / "out.mp4"
    assert main(["v2a", str(upload), "-o", str(out), "--seed", "3", "--prompt", "rain on a roof"]) == 0
    stdout = capsys.readouterr().out
    assert "trimmed from 13.00 s to its first 12 s" in stdout and "seed 3" in stdout
    audio = assert_aac_44k_as_long_as_the_video(out.read_bytes(), 24, tmp_path)
    generated = 441 * (1184 - 1)  # 11.83 s; padded with silence to the video's 12 s
    assert np.abs(audio[: generated - 4096]).max() > 100 and np.abs(audio[generated + 4096 :]).max(initial=0) < 40


def test_generate_with_audio_writes_one_mp4_with_sound(tmp_path, capsys, single_thread):
    out = tmp_path / "fox.mp4"
    args = ["generate", "a red fox", "-o", str(out), "--seconds", "1", "--size", "384x672", "--seed", "4", "--audio"]
    assert main([*args, "--timing", "retime", "--audio-prompt", "paws on snow"]) == 0
    assert "seed 4" in capsys.readouterr().out
    # 9 frames at 8 fps keep 1 s (8 frames), played over the audio's 0.95 s as the official retimes them
    assert_aac_44k_as_long_as_the_video(out.read_bytes(), 8, tmp_path)
    assert abs(decode_mp4(out.read_bytes())[1] - 8 * 44100 / (441 * 95)) < 0.01


def ffv1_video(path, size: str) -> None:
    cmd = [FFMPEG, "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc=size={size}:rate=10", "-t", "2", "-c:v", "ffv1"]
    subprocess.run([*cmd, str(path)], check=True)


BAD_V2A = {
    "not a video": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), [], "not a video ffmpeg can read"),
    "empty file": (lambda p: p.write_bytes(b""), [], "the upload is empty"),
    "over the size limit": (lambda p: ffv1_video(p, "64x48"), [], "bytes; at most 1000 are accepted"),
    "odd dimensions": (lambda p: ffv1_video(p, "63x48"), [], "63x48; H.264 4:2:0 output needs an even width"),
    "under 1 s": (lambda p: p.write_bytes(encode_mp4(np.zeros((5, 16, 16, 3), np.uint8), fps=10)), [], "shorter"),
    "long prompt": (lambda p: ffv1_video(p, "64x48"), ["--prompt", "x" * 1001], "at most 1000 are accepted"),
    "missing file": (lambda p: None, [], "No such file or directory"),
    "no weights": (lambda p: ffv1_video(p, "64x48"), ["--weights", "/nonexistent/v2a"], "weights directory not found"),
}


@pytest.mark.parametrize("name", list(BAD_V2A))
def test_bad_v2a_input_exits_nonzero_naming_the_fix(name, tmp_path, capsys, monkeypatch):
    make, args, message = BAD_V2A[name]
    if name == "over the size limit":
        monkeypatch.setattr("k4serve.pipelines.v2a_cli.UPLOAD_LIMITS", UploadLimits(max_bytes=1000))
    video = tmp_path / "in.mkv"
    make(video)
    assert main(["v2a", str(video), "-o", str(tmp_path / "out.mp4"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


def test_generate_audio_needs_whole_seconds(tmp_path, capsys):
    assert main(["generate", "a red fox", "-o", str(tmp_path / "x.mp4"), "--seconds", "0", "--audio"]) == 2
    assert "--audio needs --seconds 1..12" in capsys.readouterr().err


@pytest.mark.parametrize("mode", [[], ["--stream"]])
def test_request_to_a_server_that_never_answers_ends_at_its_timeout(tmp_path, capsys, mode):
    """A listener that accepts and never speaks: the client gives up at --timeout with the fix, not a hang."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        code = main(["request", "a fox", *mode, "--url", url, "--timeout", "1.5", "-o", str(tmp_path / "v.mp4")])
        elapsed = time.monotonic() - started
    assert code == 2 and 1.5 <= elapsed < 10
    assert "no answer within 1.5 s; give it longer with --timeout (0: no limit)" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
