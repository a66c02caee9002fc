"""Stage contracts and the control files, without a server: what each stage accepts, what it refuses (naming the
allowed values), the entry points' bound, the drain file, the cancellation flags, the entry points' pipelines."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from k4serve.models.cogvlm2_video import DEFAULT_NEGATIVE_PROMPT as DEFAULT_NEGATIVE
from k4serve.pipelines.t2v import RequestError
from k4serve.serving.control import (
    DRAINING_MESSAGE,
    Admission,
    CancelFlags,
    control_dir,
    is_draining,
    max_queue,
    max_stage_calls,
)
from k4serve.serving.launcher import REPO_MODEL_REPOSITORY, models_to_load
from k4serve.serving.requests import (
    check_audio,
    check_audio_latents,
    check_clip_seconds,
    check_embeddings,
    check_frames,
    check_latents,
    check_sample_rate,
    check_t2v_clip,
    check_uploaded_clip,
    check_v2a_features,
    decode_audio_prompts,
    decode_timing,
)
from k4serve.serving.steps import ENTRY_POINTS, T2V_STEPS, T2VA_STEPS, Step, stage_models

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


# ---- the V2A stages ----

FEATURE_DIM = 64
# The official duration mapping: W = (100 s) // 32 * 32 spectrogram columns, latents W / 8 wide.
AUDIO_LATENT_WIDTHS = [(100 * s) // 32 * 32 // 8 for s in range(1, 13)]


def test_v2a_features_must_be_the_uncond_cond_pair_of_the_model_width_and_finite():
    check_v2a_features(torch.zeros(2, 100, FEATURE_DIM), torch.zeros(2, 96, FEATURE_DIM), FEATURE_DIM)
    shapes = {"PROMPT_FEATURES": [(1, 100, 64), (2, 99, 64), (2, 100, 65)], "VIDEO_FEATURES": [(2, 95, 64)]}
    for name, bad in shapes.items():
        for shape in bad:
            prompt = torch.zeros(shape if name == "PROMPT_FEATURES" else (2, 100, 64))
            video = torch.zeros(shape if name == "VIDEO_FEATURES" else (2, 96, 64))
            rows = 100 if name == "PROMPT_FEATURES" else 96
            with pytest.raises(RequestError, match=rf"{name} must be \[2, {rows}, 64\] \(\[uncond; cond\]"):
                check_v2a_features(prompt, video, FEATURE_DIM)
    video = torch.zeros(2, 96, FEATURE_DIM)
    video[1, 3, 7] = float("nan")
    with pytest.raises(RequestError, match="VIDEO_FEATURES holds 1 NaN or infinite values"):
        check_v2a_features(torch.zeros(2, 100, FEATURE_DIM), video, FEATURE_DIM)
    with pytest.raises(RequestError, match="PROMPT_FEATURES must be FP32, got float64"):
        check_v2a_features(torch.zeros(2, 100, FEATURE_DIM, dtype=torch.float64), video, FEATURE_DIM)


def test_audio_latents_of_every_duration_are_accepted_and_others_refused():
    for width in AUDIO_LATENT_WIDTHS:
        check_audio_latents(torch.zeros(4, 8, width), 4, 8)
    allowed = re.escape("AUDIO_LATENTS must be [4, 8, w] with w one of 12, 24, 36, ..., 148")
    for shape in [(4, 8, 13), (4, 8, 160), (4, 64, 12), (3, 8, 12), (8, 12)]:
        with pytest.raises(RequestError, match=allowed):
            check_audio_latents(torch.zeros(shape), 4, 8)
    latents = torch.zeros(4, 8, 12)
    latents[2, 5, 7] = float("inf")
    with pytest.raises(RequestError, match="AUDIO_LATENTS holds 1 NaN or infinite"):
        check_audio_latents(latents, 4, 8)


def test_clip_seconds_are_1_to_12():
    for seconds in range(1, 13):
        check_clip_seconds(seconds)
    for seconds in (0, 13, -1):
        with pytest.raises(RequestError, match="CLIP_SECONDS must be a whole number from 1 to 12"):
            check_clip_seconds(seconds)


def test_t2v_frames_for_sound_must_last_a_second():
    check_t2v_clip(torch.zeros(9, 384, 672, 3, dtype=torch.uint8))
    with pytest.raises(RequestError, match=r"at least 1 s \(9 frames at 8 fps\) to get sound, got 1 frame"):
        check_t2v_clip(torch.zeros(1, 384, 672, 3, dtype=torch.uint8))
    with pytest.raises(RequestError, match="F one of 1, 9, 17"):
        check_t2v_clip(torch.zeros(10, 384, 672, 3, dtype=torch.uint8))


def clip(frames: int, height: int, width: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    return torch.zeros(frames, height, width, 3, dtype=dtype)


def test_uploaded_clip_frames_and_rate_must_fit_the_upload_limits():
    check_uploaded_clip(clip(30, 48, 64), 29.97)
    bad = {
        "FPS must be a frame rate above 0 and at most 120, got 0": (clip(1, 48, 64), 0.0),
        "at most 120, got 240": (clip(1, 48, 64), 240.0),
        "got nan": (clip(1, 48, 64), float("nan")),
        "FRAMES must be UINT8, got float32": (clip(1, 48, 64, torch.float32), 8.0),
        "frames are 64x47; H.264 4:2:0": (clip(1, 47, 64), 8.0),
        "frames are 2048x1152; at most 2088960 pixels": (clip(1, 1152, 2048), 8.0),
        "no frames": (clip(0, 48, 64), 8.0),
    }
    for message, (frames, fps) in bad.items():
        with pytest.raises(RequestError, match=re.escape(message)):
            check_uploaded_clip(frames, fps)


def test_sound_prompts_default_to_the_official_ones_and_must_be_utf8_and_short():
    assert decode_audio_prompts(None, None) == ("clean. clear. good quality.", DEFAULT_NEGATIVE)
    assert decode_audio_prompts("дождь".encode(), b"") == ("дождь", "")  # an empty prompt is allowed
    with pytest.raises(RequestError, match="AUDIO_PROMPT must be UTF-8 text: byte 0xff at position 0"):
        decode_audio_prompts(b"\xff", None, prompt_name="AUDIO_PROMPT")
    with pytest.raises(RequestError, match="NEGATIVE_PROMPT must be UTF-8"):
        decode_audio_prompts(None, b"a\xfe")
    with pytest.raises(RequestError, match="the prompt has 1001 characters; at most 1000"):
        decode_audio_prompts(b"x" * 1001, None)


def test_timing_is_pad_by_default_or_retime():
    assert decode_timing(None) == "pad" and decode_timing(b"retime") == "retime"
    with pytest.raises(RequestError, match="TIMING must be one of pad, retime, got 'stretch'"):
        decode_timing(b"stretch")


def test_a_step_feeds_an_input_from_the_tensor_its_sources_name():
    vocoder = next(step for step in T2VA_STEPS if step.model == "vocoder")
    assert vocoder.source("SEED") == "SEED_USED" and vocoder.source("AUDIO_LATENTS") == "AUDIO_LATENTS"
    assert all(step.sources == {} for step in T2V_STEPS)
    assert Step("muxer", ("FRAMES",), ("MP4",)).source("FRAMES") == "FRAMES"


def test_t2va_draws_the_video_and_the_audio_from_one_seed():
    """The samplers and the vocoder of t2va all take the seed the DiT used, which t2va returns."""
    seeded = {step.model: step.source("SEED") for step in T2VA_STEPS if "SEED" in step.inputs}
    assert seeded == {"dit_sampler": "SEED", "v2a_sampler": "SEED_USED", "vocoder": "SEED_USED"}
    assert [step.model for step in T2VA_STEPS].index("dit_sampler") == 1  # SEED_USED exists before V2A runs


def test_max_queue_comes_from_the_config_unless_the_environment_says():
    assert max_queue({"max_queue": "64"}, environ={}) == 64
    assert max_queue({"max_queue": "64"}, environ={"K4SERVE_MAX_QUEUE": "3"}) == 3
    for bad in ("0", "-2", "many", ""):
        with pytest.raises(ValueError, match="max_queue must be a whole number >= 1"):
            max_queue({"max_queue": bad}, environ={})


def test_stage_calls_at_once_default_to_two_unless_the_environment_says():
    assert max_stage_calls(environ={}) == 2
    assert max_stage_calls(environ={"K4SERVE_MAX_STAGE_CALLS": "4"}) == 4
    with pytest.raises(ValueError, match=r"max_stage_calls must be a whole number >= 1 \(K4SERVE_MAX_STAGE_CALLS\)"):
        max_stage_calls(environ={"K4SERVE_MAX_STAGE_CALLS": "0"})


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
