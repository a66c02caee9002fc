"""The in-process V2A pipeline (tiny, CPU, float32) against a transcription of the official composition, its
unconditional cache, seeds, stage contracts and cancellation, request checks, and the official weights layout."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from k4serve.models.checkpoints import DIFFUSERS_WEIGHTS, CheckpointError
from k4serve.models.sd_vae import to_uint8_image
from k4serve.models.v2a_unet import PRESETS as UNET_PRESETS
from k4serve.models.v2a_unet import latent_shape
from k4serve.pipelines.t2v import MAX_SEED, RequestError
from k4serve.pipelines.v2a import ENCODER_FOLDER, V2APipeline, V2ASettings

diffusers = pytest.importorskip("diffusers")
from official_v2a import SD1_PNDM, diffusers_unet, official_v2a_audio  # noqa: E402
from test_cogvlm2_video import synthetic_state, write_snapshot  # noqa: E402
from test_sd_vae import diffusers_vae  # noqa: E402

PROMPT, NEGATIVE = "rain on a tin roof", "hissing noise. poor quality."
pytestmark = pytest.mark.usefixtures("single_thread")


def clip_frames(n: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipeline() -> V2APipeline:
    return V2APipeline.from_settings(V2ASettings(preset="tiny"))


def test_pipeline_equals_the_official_composition(pipeline, monkeypatch):
    frames = clip_frames(21, seed=1)  # 2.6 s at 8 fps: the official keeps 2 s, its first 16 frames
    latents = []
    sample = pipeline.sample
    monkeypatch.setattr(pipeline, "sample", lambda *args, **kw: latents.append(sample(*args, **kw)) or latents[-1])
    result = pipeline(frames, PROMPT, NEGATIVE, seed=7, fps=8)
    expected_latents, pil, expected_audio = official_v2a_audio(
        pipeline.encoder, pipeline.unet, pipeline.vae, pipeline.spectrogram, frames, 8, PROMPT, NEGATIVE, 7
    )
    # Same modules, same seeded draws: the composition (CFG order, black video + negative prompt, PNDM steps,
    # VAE scaling, image postprocessing, image -> audio) is the official's bit for bit.
    torch.testing.assert_close(latents[0], expected_latents[0], rtol=0, atol=0)
    image = to_uint8_image(pipeline.vae.decode(latents[0][None]))[0].numpy()
    np.testing.assert_array_equal(image, np.asarray(pil))
    np.testing.assert_array_equal(result.waveform, expected_audio)
    assert (result.seconds, result.seed, result.sample_rate) == (2, 7, 44100)
    assert "trimmed from 2.62 s to its first 2 s" in result.notice
    assert result.waveform.dtype == np.float32 and len(result.waveform) == 441 * (192 - 1)
    assert image.std() > 20 and np.abs(result.waveform).max() > 0.01  # real values, not a saturated image


def test_unconditional_branch_is_computed_once_and_kept():
    pipeline = V2APipeline.from_settings(V2ASettings(preset="tiny"))
    encoder, calls = pipeline.encoder, Counter()
    for name in ("video_features", "text_features"):
        method = getattr(encoder, name)
        setattr(encoder, name, lambda *args, _m=method, _n=name: calls.update([_n]) or _m(*args))
    frames = clip_frames(8)
    first = pipeline.encode(frames, 8, PROMPT, NEGATIVE)
    assert calls == {"video_features": 2, "text_features": 2}
    assert first.prompt.shape == (2, 100, 64) and first.video.shape == (2, 96, 64)
    second = pipeline.encode(frames, 8, PROMPT, NEGATIVE)
    assert calls == {"video_features": 3, "text_features": 3}  # the conditional branch only
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    pipeline.encode(frames, 8, PROMPT, "another negative prompt")
    assert calls == {"video_features": 4, "text_features": 5}  # its text only: the black video is kept


def test_a_seed_reproduces_the_audio_and_a_drawn_seed_is_returned(pipeline):
    frames, events = clip_frames(8, seed=2), []
    drawn = pipeline(frames, fps=8, progress=lambda *event: events.append(event))
    assert 0 <= drawn.seed <= MAX_SEED and drawn.seconds == 1 and drawn.notice is None
    assert events == [("v2a_encoder", 1, 1), *[("v2a_sampler", i, 51) for i in range(1, 52)], ("vocoder", 1, 1)]
    np.testing.assert_array_equal(pipeline(frames, seed=drawn.seed, fps=8).waveform, drawn.waveform)
    other = pipeline(frames, seed=(drawn.seed + 1) % (MAX_SEED + 1), fps=8).waveform
    assert np.corrcoef(other, drawn.waveform)[0, 1] < 0.5


class Cancelled(Exception):
    pass


def test_sampling_stops_when_progress_raises_and_the_stage_serves_on(pipeline):
    conditioning = pipeline.encode(clip_frames(8), 8)
    done = []

    def cancel_at_3(step, total):
        done.append(step)
        if step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        pipeline.sample(conditioning, 1, 5, cancel_at_3)
    assert done == [1, 2, 3]
    latents = pipeline.sample(conditioning, 1, 5)
    assert latents.shape == pipeline.latent_shape(1) == (4, 8, 12) and torch.isfinite(latents).all()
    audio = pipeline.vocode(latents, 5)
    assert audio.dtype == np.float32 and audio.shape == (441 * (96 - 1),)


def test_latent_shapes_of_the_full_size_pipeline():
    full = V2APipeline.from_settings(V2ASettings(preset="kandinsky4-v2a"), components=())  # builds no model
    assert full.latent_shape(12) == latent_shape(12) == (4, 64, 148)
    assert [full.latent_shape(s)[2] for s in (1, 8)] == [12, 100]


BAD_REQUESTS = {
    "long prompt": (lambda p: p(clip_frames(8), "x" * 1001, fps=8), "1001 characters; at most 1000"),
    "long negative": (lambda p: p(clip_frames(8), negative_prompt="x" * 1001, fps=8), "negative prompt has 1001"),
    "prompt not text": (lambda p: p(clip_frames(8), None, fps=8), "prompt must be text"),
    "surrogate": (lambda p: p(clip_frames(8), "\ud800", fps=8), "not valid Unicode"),
    "negative seed": (lambda p: p(clip_frames(8), seed=-1, fps=8), "seed must be from 0 to 2"),
    "fractional seed": (lambda p: p(clip_frames(8), seed=1.5, fps=8), "seed must be from 0 to 2"),
    "no frames": (lambda p: p(clip_frames(0), fps=8), "no frames"),
    "no fps": (lambda p: p(clip_frames(8)), "pass fps"),
    "float frames": (lambda p: p(clip_frames(8).astype(np.float32), fps=8), "uint8 RGB array"),
    "under 1 s": (lambda p: p(clip_frames(5), fps=8), "shorter than 1 s"),
    "odd size": (lambda p: p(clip_frames(8, 47, 64), fps=8), "64x47; H.264 4:2:0 output needs an even width"),
    "not a video": (lambda p: p(b"not a video at all"), "not a video ffmpeg can read"),
    "empty upload": (lambda p: p(b""), "the upload is empty"),
    "timing": (lambda p: p.add_audio(clip_frames(8), fps=8, timing="stretch"), "timing must be one of"),
    "untrimmed": (lambda p: p.encode(clip_frames(97), 8), "97 frames at 8 fps are not a clip of whole seconds"),
    "0 seconds": (lambda p: p.sample(None, 0, 1), "seconds must be a whole number from 1 to 12"),
    "13 seconds": (lambda p: p.sample(None, 13, 1), "seconds must be a whole number from 1 to 12"),
    "sampler seed": (lambda p: p.sample(None, 1, None), "sample needs a seed"),
    "latents": (lambda p: p.vocode(torch.zeros(4, 64, 12), 1), r"latents must be \[4, 8, width\]"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_are_refused_naming_the_fix_before_any_model_runs(name):
    request, message = BAD_REQUESTS[name]
    without_models = V2APipeline.from_settings(V2ASettings(preset="tiny"), components=())  # a late check would crash
    with pytest.raises(RequestError, match=message):
        request(without_models)


def test_conditioning_of_another_shape_is_refused(pipeline):
    with pytest.raises(RequestError, match=r"conditioning must be prompt \[2, 100, 64\] and video \[2, 96, 64\]"):
        pipeline.sample((torch.zeros(1, 100, 64), torch.zeros(1, 96, 64)), 1, 1)


# ---- the official weights layout ----


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """ai-forever/kandinsky-4-v2a's layout with tiny models saved as their owners save them, and a CogVLM2 snapshot."""
    root = tmp_path_factory.mktemp("v2a-weights")
    unet = diffusers_unet(replace(UNET_PRESETS["tiny"], feature_dim=64), official=True, seed=3)
    unet.save_pretrained(root / "unet")
    vae = diffusers_vae(V2APipeline.from_settings(V2ASettings(preset="tiny"), components=()).vae_config, seed=4)
    vae.save_pretrained(root / "vae")
    raw = json.loads((root / "vae" / "config.json").read_text())
    del raw["scaling_factor"]  # as the official vae/config.json: diffusers' default 0.18215 applies
    (root / "vae" / "config.json").write_text(json.dumps(raw))
    diffusers.PNDMScheduler(**SD1_PNDM).save_config(root / "scheduler")
    (root / ENCODER_FOLDER).mkdir()
    write_snapshot(root / ENCODER_FOLDER, synthetic_state())
    return root, unet.state_dict(), vae.state_dict()


def test_official_weights_layout_loads_strictly_and_runs(weights_dir, tmp_path):
    root, unet_state, vae_state = weights_dir
    loaded = V2APipeline.from_settings(V2ASettings(preset="tiny", weights=str(root)))
    assert all(torch.equal(t, unet_state[k]) for k, t in loaded.unet.state_dict().items())
    assert all(torch.equal(t, vae_state[k]) for k, t in loaded.vae.state_dict().items())
    state = synthetic_state()
    assert all(torch.equal(t, state[k]) for k, t in loaded.encoder.model.state_dict().items())
    assert loaded.vae_config.scaling_factor == 0.18215 and loaded.sampler.config.steps_offset == 1
    audio = loaded(clip_frames(8), PROMPT, seed=1, fps=8)
    assert audio.waveform.shape == (441 * 95,) and np.isfinite(audio.waveform).all()
    # The CogVLM2 snapshot may live elsewhere (e.g. a Hugging Face cache): encoder_weights.
    elsewhere = tmp_path / "cogvlm2"
    shutil.copytree(root / ENCODER_FOLDER, elsewhere)
    moved = tmp_path / "v2a"
    shutil.copytree(root, moved, ignore=shutil.ignore_patterns(ENCODER_FOLDER))
    with pytest.raises(FileNotFoundError, match=f"missing .*{ENCODER_FOLDER}/config.json: expected the ai-forever"):
        V2APipeline.from_settings(V2ASettings(weights=str(moved)))
    relocated = V2APipeline.from_settings(V2ASettings(weights=str(moved), encoder_weights=str(elsewhere)))
    torch.testing.assert_close(relocated.encoder.text_features("a"), loaded.encoder.text_features("a"))


def test_a_renamed_or_mismatched_checkpoint_is_refused_naming_it(weights_dir, tmp_path):
    root = tmp_path / "v2a"
    shutil.copytree(weights_dir[0], root)
    state = load_file(root / "unet" / DIFFUSERS_WEIGHTS)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.video_q.weight"
    state[key.replace("video_q", "video_query")] = state.pop(key)
    save_file(state, root / "unet" / DIFFUSERS_WEIGHTS)
    with pytest.raises(CheckpointError, match=f"missing keys: {key}"):
        V2APipeline.from_settings(V2ASettings(weights=str(root)), components=("unet",))
    # a UNet made for another feature width than the encoder's
    shutil.rmtree(root / "unet")
    diffusers_unet(UNET_PRESETS["tiny"], official=True).save_pretrained(root / "unet")
    with pytest.raises(ValueError, match="CogVLM2 width 64 != the UNet's feature_dim 32"):
        V2APipeline.from_settings(V2ASettings(weights=str(root)), components=("encoder", "unet"))
    with pytest.raises(FileNotFoundError, match="V2A weights directory not found: /nonexistent"):
        V2APipeline.from_settings(V2ASettings(weights="/nonexistent"))
