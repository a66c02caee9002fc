"""The V2A half of a real tritonserver (tiny preset, CPU): t2va's video with sound equals T2V + V2A in process with
the one seed it returns, v2a on an uploaded mp4 equals V2APipeline.add_audio, v2a_stream reports the sampler's 51
UNet calls, bad input is refused with INVALID_ARGUMENT naming the fix, and `k4serve request --audio / --v2a`.

One server for the module with only the V2A entry points (and the stages they bring); 1-second clips.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton", reason="tritonserver comes with the serve extra: pip install 'k4serve[serve]'")
from mp4_probe import probe_mp4  # noqa: E402
from serving_helpers import PROMPT, SIZE, TIMEOUT_S, grpc_inputs, stream_error, upload  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from k4serve.client.client import AudioRequest, T2VClient, V2ARequest, Video  # noqa: E402
from k4serve.pipelines.t2v import MAX_SEED, PipelineSettings, T2VPipeline, num_frames  # noqa: E402
from k4serve.pipelines.v2a import V2APipeline, V2ASettings, load_clip  # noqa: E402
from k4serve.pipelines.video_io import FPS, decode_mp4, encode_mp4, encode_png  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("single_thread")]

MODELS = ["t2va", "t2va_stream", "v2a", "v2a_stream"]
SOUND_PROMPT, NEGATIVE = "rain on a tin roof", "hissing noise. poor quality."
FEATURE_DIM = 64  # the tiny CogVLM2's width
AUDIO_ROWS = 8  # the tiny spectrogram's 64 mel rows through the 8x VAE


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from k4serve.serving.launcher import ServerOptions, TritonServer

    log = tmp_path_factory.mktemp("tritonserver-v2a") / "server.log"
    env = {"K4SERVE_PRESET": "tiny", "K4SERVE_WEIGHTS": "", "K4SERVE_ENGINE": "eager", "K4SERVE_DEVICE": ""}
    env |= {"K4SERVE_V2A_PRESET": "tiny", "K4SERVE_V2A_WEIGHTS": "", "K4SERVE_V2A_ENGINE": "eager"}
    # One torch thread per stage process, as the in-process references below (the same numerics): on a loaded
    # 2-core machine seven stages spinning two OpenMP threads each are several times slower.
    env |= {"OMP_NUM_THREADS": "1"}
    with TritonServer(ServerOptions(host="127.0.0.1", env=env, log=log, models=MODELS)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with T2VClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def v2a() -> V2APipeline:
    """The in-process tiny V2A pipeline: what the server's V2A stages must reproduce."""
    return V2APipeline.from_settings(V2ASettings(preset="tiny"))


def assert_same_video(served: bytes, expected: bytes, tmp_path) -> tuple[str, np.ndarray, np.ndarray]:
    """The two mp4s decode to the same frames, frame rate and audio samples; (description, audio, frames)."""
    info, audio, _ = probe_mp4(served, tmp_path)
    expected_info, expected_audio, _ = probe_mp4(expected, tmp_path)
    (frames, fps), (expected_frames, expected_fps) = decode_mp4(served), decode_mp4(expected)
    assert fps == expected_fps
    np.testing.assert_array_equal(frames, expected_frames)
    assert len(audio) == len(expected_audio) and np.abs(audio).max() > 100  # a sound, not silence
    np.testing.assert_array_equal(audio, expected_audio)
    return info, audio, frames


def test_t2va_is_t2v_then_v2a_with_the_one_seed_it_returns(client, v2a, tmp_path):
    video = client.generate(AudioRequest(PROMPT, *SIZE, seconds=1))  # no seed: the server draws one
    assert 0 <= video.seed <= MAX_SEED
    frames = T2VPipeline.from_settings(PipelineSettings(preset="tiny"))(PROMPT, *SIZE, 1, video.seed)
    audio = v2a(frames, seed=video.seed, fps=FPS)  # the official prompts, the video's seed
    expected = encode_mp4(frames[: int(FPS)], FPS, audio.waveform, audio.sample_rate)
    info, samples, served_frames = assert_same_video(video.mp4, expected, tmp_path)
    assert "Audio: aac" in info and "44100 Hz" in info
    assert len(served_frames) == int(FPS) < num_frames(1)  # t2v's first whole second, as the official V2A keeps it
    assert abs(len(samples) / 44100 - len(served_frames) / FPS) <= 1 / FPS


def test_v2a_equals_the_in_process_pipeline(client, v2a, tmp_path):
    clip = upload()
    served = client.generate(V2ARequest(clip, SOUND_PROMPT, NEGATIVE, seed=3, timing="retime", request_id="rain"))
    assert served.seed == 3 and served.request_id == "rain"
    assert served.notice == load_clip(clip).notice  # the response says what the official trim cut: 1.2 s -> 1 s
    assert served.notice.startswith("the video was trimmed from 1.20 s to its first 1 s (10 frames at 10 fps)")
    expected, audio = v2a.add_audio(clip, SOUND_PROMPT, NEGATIVE, seed=3, timing="retime")
    _, samples, frames = assert_same_video(served.mp4, expected, tmp_path)
    assert len(frames) == 10  # the first whole second of the 10 fps upload
    assert abs(len(samples) - len(audio.waveform)) <= 1024  # retimed: the audio kept (one AAC frame of slack)


def test_v2a_stream_reports_the_sampler_steps_and_its_seed_reproduces_the_video(client, tmp_path):
    items = list(client.stream(V2ARequest(upload())))
    video, events = items[-1], items[:-1]
    assert isinstance(video, Video) and 0 <= video.seed <= MAX_SEED
    assert [(e.stage, e.step, e.steps) for e in events] == [
        ("v2a_encoder", 0, 1),
        ("v2a_encoder", 1, 1),
        *[("v2a_sampler", step, 51) for step in range(52)],  # step 0: the sampler starts; then each UNet call
        ("vocoder", 0, 1),
        ("vocoder", 1, 1),
        ("muxer", 0, 1),
        ("muxer", 1, 1),
    ]
    again = client.generate(V2ARequest(upload(), seed=video.seed))
    info, samples, frames = assert_same_video(again.mp4, video.mp4, tmp_path)
    assert "44100 Hz" in info and abs(len(samples) / 44100 - len(frames) / 10) <= 1 / 10  # padded to the video


def text(value: bytes) -> np.ndarray:
    return np.array([value], np.object_)


def features(prompt_rows: int = 100, dim: int = FEATURE_DIM, fill: float = 0.0) -> dict[str, np.ndarray]:
    """A v2a_sampler request for 1 s with features of `prompt_rows` x `dim`, one value set to `fill`."""
    prompt = np.zeros((2, prompt_rows, dim), np.float32)
    prompt.reshape(-1)[5] = fill
    video = np.zeros((2, 96, dim), np.float32)
    return {"PROMPT_FEATURES": prompt, "VIDEO_FEATURES": video, "CLIP_SECONDS": np.array([1], np.int32)}


def t2va(**overrides) -> dict[str, np.ndarray]:
    values = {"PROMPT": text(PROMPT.encode()), "HEIGHT": np.array([SIZE[0]], np.int32)}
    values |= {"WIDTH": np.array([SIZE[1]], np.int32), "SECONDS": np.array([1], np.int32)}
    return {name: value for name, value in (values | overrides).items() if value is not None}


def v2a_request(**overrides) -> dict[str, np.ndarray]:
    values = {"VIDEO": text(upload())} | overrides
    return {name: value for name, value in values.items() if value is not None}


def latents(width: int = 12, fill: float = 0.0) -> dict[str, np.ndarray]:
    values = np.zeros((4, AUDIO_ROWS, width), np.float32)
    values.reshape(-1)[3] = fill
    return {"AUDIO_LATENTS": values, "SEED": np.array([1], np.int64)}


def muxer(**overrides) -> dict[str, np.ndarray]:
    values = {"FRAMES": np.zeros((10, 48, 64, 3), np.uint8), "FPS": np.array([10.0])} | overrides
    return {name: value for name, value in values.items() if value is not None}


BAD_INPUTS = {
    "v2a: not a video": ("v2a", v2a_request(VIDEO=text(b"not a video")), "not a video ffmpeg can read"),
    "v2a: empty upload": ("v2a", v2a_request(VIDEO=text(b"")), "the upload is empty: send the bytes of a video"),
    "v2a: a still image": (
        "v2a",
        v2a_request(VIDEO=text(encode_png(np.zeros((48, 64, 3), np.uint8)))),
        "is a still image",
    ),
    "v2a: under a second": ("v2a", v2a_request(VIDEO=text(upload(5, 8))), "shorter than 1 s (5 frames at 8 fps)"),
    "v2a: VIDEO missing": ("v2a", v2a_request(VIDEO=None, PROMPT=text(b"rain")), "input VIDEO is missing"),
    "v2a: long prompt": ("v2a", v2a_request(PROMPT=text(b"x" * 1001)), "1001 characters; at most 1000"),
    "v2a: non-UTF-8 prompt": ("v2a", v2a_request(PROMPT=text(b"rain \xff")), "PROMPT must be UTF-8 text"),
    "v2a: unknown timing": ("v2a", v2a_request(TIMING=text(b"stretch")), "TIMING must be one of pad, retime"),
    "v2a: negative seed": ("v2a", v2a_request(SEED=np.array([-1], np.int64)), "seed must be from 0 to 2**63-1"),
    "t2va: 0 seconds": ("t2va", t2va(SECONDS=np.array([0], np.int32)), "SECONDS must be from 1 to 12 for a video"),
    "t2va: non-UTF-8 sound prompt": ("t2va", t2va(AUDIO_PROMPT=text(b"\xfe")), "AUDIO_PROMPT must be UTF-8"),
    "t2va: long negative prompt": (
        "t2va",
        t2va(NEGATIVE_PROMPT=text(b"n" * 2000)),
        "negative prompt has 2000 characters",
    ),
    "t2va: unsupported size": ("t2va", t2va(HEIGHT=np.array([400], np.int32)), "is not supported; use one of"),
    "v2a_encoder: VIDEO and FRAMES": (
        "v2a_encoder",
        {"VIDEO": text(upload()), "FRAMES": np.zeros((9, 384, 672, 3), np.uint8)},
        "send exactly one of VIDEO",
    ),
    "v2a_encoder: a single frame": (
        "v2a_encoder",
        {"FRAMES": np.zeros((1, 384, 672, 3), np.uint8)},
        "FRAMES must last at least 1 s (9 frames at 8 fps)",
    ),
    "v2a_sampler: NaN features": ("v2a_sampler", features(fill=np.nan), "PROMPT_FEATURES holds 1 NaN or infinite"),
    "v2a_sampler: another width": (
        "v2a_sampler",
        features(dim=FEATURE_DIM + 1),
        f"PROMPT_FEATURES must be [2, 100, {FEATURE_DIM}]",
    ),
    "v2a_sampler: 99 prompt rows": ("v2a_sampler", features(prompt_rows=99), "unexpected shape"),
    "v2a_sampler: 13 s": (
        "v2a_sampler",
        features() | {"CLIP_SECONDS": np.array([13], np.int32)},
        "CLIP_SECONDS must be a whole number from 1 to 12",
    ),
    "vocoder: 2.5 s of latents": ("vocoder", latents(width=30), "w one of 12, 24, 36, ..., 148"),
    "vocoder: inf latents": ("vocoder", latents(fill=np.inf), "AUDIO_LATENTS holds 1 NaN or infinite"),
    "vocoder: 64 rows": (
        "vocoder",
        {"AUDIO_LATENTS": np.zeros((4, 64, 12), np.float32), "SEED": np.array([1], np.int64)},
        f"AUDIO_LATENTS must be [4, {AUDIO_ROWS}, w]",
    ),
    "muxer: FPS 0": ("muxer", muxer(FPS=np.array([0.0])), "FPS must be a frame rate above 0 and at most 120"),
    "muxer: odd frames": ("muxer", muxer(FRAMES=np.zeros((10, 47, 64, 3), np.uint8)), "64x47; H.264 4:2:0"),
    "muxer: unknown timing": ("muxer", muxer(TIMING=text(b"slow")), "TIMING must be one of pad, retime, got 'slow'"),
    "muxer: seconds the frames lack": (
        "muxer",
        muxer(CLIP_SECONDS=np.array([2], np.int32)),
        "CLIP_SECONDS 2 needs 20 frames at 10 fps, FRAMES holds 10",
    ),
}
DECOUPLED = {"v2a_encoder", "v2a_sampler"}


def test_bad_input_is_invalid_argument_naming_the_fix_and_the_server_serves_on(server, client, tmp_path):
    grpc = client.client
    for case, (model, values, message) in BAD_INPUTS.items():
        if model in DECOUPLED:
            error, events = stream_error(grpc, model, values, TIMEOUT_S)
            assert message in error and events == [], (case, error)  # refused before its first step
            continue
        with pytest.raises(InferenceServerException) as raised:
            grpc.infer(model, grpc_inputs(values), client_timeout=TIMEOUT_S)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", (case, raised.value.message())
        assert message in raised.value.message(), (case, raised.value.message())
    assert client.generate(V2ARequest(upload(), seed=1)).mp4[4:8] == b"ftyp"


def test_request_command_audio_and_v2a(server, tmp_path, capsys):
    from k4serve.cli import main

    url = ["--url", server.grpc_url]
    sound = tmp_path / "fox.mp4"
    audio = ["request", PROMPT, "--audio", "--seconds", "1", "--seed", "5", "--stream", "-o", str(sound)]
    assert main([*audio, *url]) == 0
    assert "seed 5" in capsys.readouterr().out
    info, samples, frames = probe_mp4(sound.read_bytes(), tmp_path)
    assert "44100 Hz" in info and frames == int(FPS) and np.abs(samples).max() > 100  # its whole second
    clip, output = tmp_path / "in.mp4", tmp_path / "out.mp4"
    clip.write_bytes(upload())
    argv = ["request", "--v2a", str(clip), "--prompt", SOUND_PROMPT, "--timing", "pad", "-o", str(output), *url]
    assert main([*argv, "--seed", "6"]) == 0
    out = capsys.readouterr().out
    assert "seed 6" in out and "note: the video was trimmed from 1.20 s to its first 1 s" in out
    assert "44100 Hz" in probe_mp4(output.read_bytes(), tmp_path)[0]
    clip.write_bytes(b"not a video")
    assert main(argv) == 2
    assert "not a video ffmpeg can read" in capsys.readouterr().err
