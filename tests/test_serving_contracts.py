"""Stage contracts and the control files, without a server: what each stage accepts, what it refuses (naming the
allowed values), the entry points' bound, the drain file, the cancellation flags, the entry points' pipelines."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from k4serve.pipelines.t2v import RequestError
from k4serve.serving.control import (
    DRAINING_MESSAGE,
    Admission,
    CancelFlags,
    control_dir,
    is_draining,
    max_queue,
)
from k4serve.serving.launcher import REPO_MODEL_REPOSITORY, models_to_load
from k4serve.serving.requests import (
    check_audio,
    check_embeddings,
    check_frames,
    check_latents,
    check_sample_rate,
)
from k4serve.serving.steps import ENTRY_POINTS, stage_models

# The buckets from the official formulas: T = seconds * 8 // 4 + 1 latent frames (1 for an image), 4(T-1)+1 pixel
# frames, the seven sizes of the 512 family, 8x spatial compression.
SIZES = [(512, 512), (352, 736), (736, 352), (384, 672), (672, 384), (480, 544), (544, 480)]
LATENT_TS = [1] + [s * 8 // 4 + 1 for s in range(1, 13)]
FRAME_COUNTS = [4 * (t - 1) + 1 for t in LATENT_TS]
TEXT_DIM = 32


def test_every_supported_latent_bucket_is_accepted():
    for t in LATENT_TS:
        check_latents(torch.zeros(t, 48, 84, 16))
    for h, w in SIZES:
        check_latents(torch.zeros(1, h // 8, w // 8, 16))


BAD_LATENTS = {
    "T=0": (torch.zeros(0, 48, 84, 16), "T one of 1, 3, 5, ..., 25"),
    "even T": (torch.zeros(2, 48, 84, 16), "got [2, 48, 84, 16]"),
    "T past 12 s": (torch.zeros(27, 48, 84, 16), "got [27, 48, 84, 16]"),
    "unsupported size": (torch.zeros(1, 256, 256, 16), "H/8 x W/8 one of 64x64, 44x92, 92x44, 48x84"),
    "15 channels": (torch.zeros(1, 48, 84, 15), "[T, H/8, W/8, 16]"),
    "rank 3": (torch.zeros(48, 84, 16), "got [48, 84, 16]"),
    "float64": (torch.zeros(1, 48, 84, 16, dtype=torch.float64), "LATENTS must be FP32, got float64"),
    "NaN": (torch.zeros(1, 48, 84, 16).index_fill_(0, torch.tensor([0]), float("nan")), "64512 NaN or infinite"),
    "inf": (torch.zeros(3, 48, 84, 16).index_fill_(1, torch.tensor([5]), float("inf")), "NaN or infinite"),
}


@pytest.mark.parametrize("case", list(BAD_LATENTS))
def test_bad_latents_are_refused_naming_the_allowed_values(case):
    latents, message = BAD_LATENTS[case]
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace(".", r"\.")):
        check_latents(latents)


def test_every_supported_frame_count_and_size_is_accepted():
    for frames in FRAME_COUNTS:
        check_frames(torch.zeros(frames, 384, 672, 3, dtype=torch.uint8))
    for h, w in SIZES:
        check_frames(torch.zeros(1, h, w, 3, dtype=torch.uint8))


BAD_FRAMES = {
    "0 frames": (torch.zeros(0, 384, 672, 3, dtype=torch.uint8), "F one of 1, 9, 17, ..., 97"),
    "8 frames": (torch.zeros(8, 384, 672, 3, dtype=torch.uint8), "got [8, 384, 672, 3]"),
    "8192x8192": (torch.zeros(1, 8192, 8192, 3, dtype=torch.uint8), "H x W one of 512x512, 352x736"),
    "odd size": (torch.zeros(1, 385, 672, 3, dtype=torch.uint8), "got [1, 385, 672, 3]"),
    "RGBA": (torch.zeros(1, 384, 672, 4, dtype=torch.uint8), "[F, H, W, 3]"),
    "float frames": (torch.zeros(1, 384, 672, 3), "FRAMES must be UINT8, got float32"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frames_are_refused_naming_the_allowed_values(case):
    frames, message = BAD_FRAMES[case]
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace(".", r"\.")):
        check_frames(frames)


def test_embeddings_must_be_224_tokens_of_the_dit_width_and_finite():
    check_embeddings(torch.zeros(224, TEXT_DIM), TEXT_DIM)
    for shape in [(223, TEXT_DIM), (224, TEXT_DIM + 1), (1, 224, TEXT_DIM)]:
        with pytest.raises(RequestError, match=rf"EMBEDDINGS must be \[224, {TEXT_DIM}\]"):
            check_embeddings(torch.zeros(shape), TEXT_DIM)
    nan = torch.zeros(224, TEXT_DIM)
    nan[3, 4] = float("nan")
    with pytest.raises(RequestError, match="holds 1 NaN or infinite values"):
        check_embeddings(nan, TEXT_DIM)


def test_sample_rate_and_audio_length_must_be_allowed():
    check_sample_rate(44100)
    check_audio(torch.zeros(44100 * 12), 44100)
    for rate in (-1, 0, 12345, 10**9):
        with pytest.raises(RequestError, match="SAMPLE_RATE must be one of 16000, 22050, 24000, 32000, 44100, 48000"):
            check_sample_rate(rate)
    for audio in (torch.zeros(0), torch.zeros(44100 * 13 + 1), torch.zeros(2, 100)):
        with pytest.raises(RequestError, match=r"1 <= N <= 573300 \(13 s at 44100 Hz\)"):
            check_audio(audio, 44100)
    with pytest.raises(RequestError, match="NaN or infinite"):
        check_audio(torch.tensor([0.0, float("-inf")]), 44100)


def test_max_queue_comes_from_the_config_unless_the_environment_says():
    assert max_queue({"max_queue": "64"}, environ={}) == 64
    assert max_queue({"max_queue": "64"}, environ={"K4SERVE_MAX_QUEUE": "3"}) == 3
    for bad in ("0", "-2", "many", ""):
        with pytest.raises(ValueError, match="max_queue must be a whole number >= 1"):
            max_queue({"max_queue": bad}, environ={})


def test_control_dir_is_the_environment_s_or_a_temp_one(tmp_path):
    assert control_dir({"K4SERVE_CONTROL_DIR": str(tmp_path)}) == tmp_path
    assert control_dir({}).name == "k4serve-control"


def test_admission_holds_the_bound_and_frees_a_place_per_release(tmp_path):
    admission = Admission("t2v", bound=2, directory=tmp_path)
    assert admission.admit() is None and admission.admit() is None
    refusal = admission.admit()
    assert refusal.reason == "bound"
    assert "t2v already holds 2 requests" in refusal.message and "K4SERVE_MAX_QUEUE" in refusal.message
    assert "retry in about 1 s" in refusal.message  # no request finished yet: the shortest hint
    admission.release(seconds=7.2)
    assert admission.in_flight == 1
    assert admission.admit() is None
    assert "retry in about 8 s" in admission.admit().message  # from the finished request's time, rounded up


def test_admission_counts_concurrent_requests_exactly(tmp_path):
    admission = Admission("t2v", bound=50, directory=tmp_path)
    results = []

    def admit_many():
        results.extend(admission.admit() for _ in range(20))

    threads = [threading.Thread(target=admit_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(result is None for result in results) == 50 and admission.in_flight == 50


def test_draining_file_refuses_new_requests_until_removed(tmp_path):
    admission = Admission("t2v_stream", bound=4, directory=tmp_path)
    assert admission.admit() is None
    (tmp_path / "draining").touch()
    assert is_draining(tmp_path)
    assert admission.admit() == ("draining", DRAINING_MESSAGE)
    assert admission.in_flight == 1  # the admitted one still runs
    (tmp_path / "draining").unlink()
    assert admission.admit() is None


def test_cancel_flags_are_per_token_and_refuse_path_like_tokens(tmp_path):
    flags = CancelFlags(tmp_path)
    first, second = flags.new_token(), flags.new_token()
    flags.set(first)
    assert flags.is_set(first) and not flags.is_set(second) and not flags.is_set(None)
    (tmp_path / "escape").touch()
    assert not flags.is_set("../escape")
    flags.clear(first)
    assert not flags.is_set(first)
    flags.clear(first)  # clearing twice is harmless


def config_tensors(model: str, section: str) -> set[str]:
    """The tensor names of a config.pbtxt's `input` or `output` block."""
    text = (REPO_MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    block = re.search(rf"^{section} \[(.*?)^\]", text, re.S | re.M).group(1)
    return set(re.findall(r'name: "(\w+)"', block))


def is_decoupled(model: str) -> bool:
    return "decoupled: true" in (REPO_MODEL_REPOSITORY / model / "config.pbtxt").read_text()


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_point_steps_match_the_stage_configs(entry):
    """Every step names a stage's real inputs and outputs, streams exactly when the stage is decoupled, takes only
    tensors the request or an earlier step provides (under their own name or the one its `sources` give), and the
    entry point's outputs come out of the pipeline."""
    available = set(config_tensors(entry, "input"))
    for step in ENTRY_POINTS[entry]:
        assert set(step.inputs) <= config_tensors(step.model, "input"), step.model
        assert set(step.outputs) <= config_tensors(step.model, "output"), step.model
        assert set(step.sources) <= set(step.inputs), step.model
        assert step.streams == is_decoupled(step.model), step.model
        assert {step.source(name) for name in step.inputs} <= available, step.model
        available |= set(step.outputs)
    assert config_tensors(entry, "output") - {"EVENT"} <= available
    # The launcher loads an entry point's stages from the `model_name: "..."` comment of its config.
    assert models_to_load(REPO_MODEL_REPOSITORY, [entry]) == sorted([entry, *stage_models(entry)])
