"""mp4 writing (the chunk-fed encoder against the one-shot one, decoded back; failures and early exits), audio
muxing probed with ffmpeg, and uploaded videos: decoding, the official 12 s trim, and every refusal."""

from __future__ import annotations

import re
import subprocess
import wave
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from mp4_probe import FFMPEG, probe_mp4

from k4serve.models.frame_sampling import conditioning_frame_indices, official_trim
from k4serve.pipelines.media import MediaError, UploadLimits, decode_video, parse_ffmpeg_probe, trim_video
from k4serve.pipelines.t2v import RequestError
from k4serve.pipelines.video_io import (
    DEFAULT_MP4_PRESET,
    FPS,
    MP4_PRESETS,
    SAMPLE_RATE,
    Mp4Encoder,
    decode_mp4,
    encode_mp4,
    encode_png,
    fit_audio_to_video,
    mp4_settings,
    retimed_fps,
    write_wav,
)


def moving_gradient(frames: int, height: int = 64, width: int = 96) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x + 5 * i) % 256, (y + 3 * i) % 256, (x + y) % 256], -1) for i in range(frames)])


def test_chunks_fed_while_encoding_give_the_one_shot_video():
    frames = moving_gradient(9).astype(np.uint8)
    with Mp4Encoder(64, 96) as encoder:
        for chunk in (frames[:1], frames[1:5], frames[5:]):  # the VAE's chunk pattern: 1 + 4k frames
            encoder.write(chunk)
        streamed = encoder.finish()
    decoded, fps = decode_mp4(streamed)
    assert decoded.shape == frames.shape and fps == FPS
    np.testing.assert_array_equal(decoded, decode_mp4(encode_mp4(frames))[0])
    mse = ((decoded.astype(float) - frames) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 35  # crf 5: near-lossless, bar the 4:2:0 chroma


def x264_options(mp4: bytes) -> str:
    """The encoder settings x264 writes into its stream (an SEI message: 'options: cabac=1 ref=3 ...')."""
    return re.search(rb"x264 - core .*? options: ([ -~]*)", mp4).group(1).decode()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255**2 / ((a.astype(float) - b) ** 2).mean())


def test_official_preset_is_x264_medium_crf_5_and_the_default_keeps_its_psnr():
    frames = (moving_gradient(9) + np.random.default_rng(0).integers(0, 8, (9, 64, 96, 3))).astype(np.uint8)
    official = encode_mp4(frames, x264=mp4_settings("official"))
    default = encode_mp4(frames)
    # x264's medium preset: CABAC, 3 refs, hex search, subme 7, 3 B-frames (the official writer's defaults)
    assert re.search(r"cabac=1 ref=3 .* me=hex subme=7 .* bframes=3 .* crf=5\.0", x264_options(official))
    preset = MP4_PRESETS[DEFAULT_MP4_PRESET]
    assert f"crf={preset.crf}.0" in x264_options(default) and x264_options(default) != x264_options(official)
    loss = psnr(decode_mp4(official)[0], frames) - psnr(decode_mp4(default)[0], frames)
    assert loss < 0.5  # dB: the rule the default was chosen by (benchmarks/encode.py)
    with pytest.raises(ValueError, match=r"unknown mp4 preset 'slow'; choose one of \['fast', 'official'\]"):
        mp4_settings("slow")


def test_close_before_finish_stops_ffmpeg_and_removes_its_files():
    encoder = Mp4Encoder(64, 96)
    encoder.write(moving_gradient(4).astype(np.uint8))
    folder = Path(encoder.path).parent
    encoder.close()  # e.g. the client cancelled mid-decode
    assert encoder._process.poll() is not None and not folder.exists()


def test_ffmpeg_failure_is_reported_with_its_message():
    with Mp4Encoder(64, 95) as encoder:  # H.264 4:2:0 needs even sizes
        encoder.write(np.zeros((2, 64, 95, 3), np.uint8))
        with pytest.raises(RuntimeError, match="ffmpeg failed to encode 2 frames: .*divisible by 2"):
            encoder.finish()


def test_a_chunk_of_another_size_is_refused():
    with Mp4Encoder(64, 96) as encoder, pytest.raises(ValueError, match=r"frames are \[64, 64, 3\]"):
        encoder.write(np.zeros((1, 64, 64, 3), np.uint8))


# --- Audio muxing: the AAC stream ends with the video --------------------------------------------------------


@pytest.mark.parametrize(
    "n_frames, fps, timing",
    [(97, 8, "pad"), (360, 30, "pad"), (96, 8, "retime"), (360, 30, "retime")],
    ids=["t2v-97-frames-8fps", "upload-30fps", "t2v-official-retime", "upload-official-retime"],
)
def test_muxed_aac_stream_lasts_as_long_as_the_video(n_frames, fps, timing, tmp_path):
    samples = 441 * (1184 - 1)  # what V2A returns for 12 s: 11.83 s
    t = np.arange(samples) / SAMPLE_RATE
    audio = (np.round(0.25 * np.sin(2 * np.pi * 440 * t) * 32768) / 32768).astype(np.float32)
    frames = moving_gradient(n_frames, 32, 48).astype(np.uint8)
    info, decoded, decoded_frames = probe_mp4(encode_mp4(frames, fps, audio, SAMPLE_RATE, timing), tmp_path)
    assert re.search(r"Audio: aac .*44100 Hz, mono", info), info
    assert decoded_frames == n_frames  # every frame is kept (ffmpeg's -shortest would drop the last one)
    video_seconds = n_frames / (fps if timing == "pad" else float(retimed_fps(n_frames, samples)))
    assert abs(len(decoded) / SAMPLE_RATE - video_seconds) <= 1 / fps
    tone = decoded[: samples - 2048].astype(float) / 32768  # AAC is lossy: compare levels, not samples
    assert abs(np.sqrt(np.mean(tone**2)) - 0.25 / np.sqrt(2)) < 0.01
    if timing == "pad":  # the silence is appended at the end, not spread or prepended
        assert np.abs(decoded[samples + 2048 :]).max(initial=0) < 40 and len(decoded) > samples + 2048


def test_fit_audio_pads_with_silence_or_cuts_the_tail():
    audio = np.arange(1, 11, dtype=np.float32) / 10
    np.testing.assert_array_equal(fit_audio_to_video(audio, 3, 2, sample_rate=4), [*audio[:6]])
    np.testing.assert_array_equal(fit_audio_to_video(audio, 6, 2, sample_rate=4), [*audio, 0, 0])
    assert retimed_fps(96, 521703) == Fraction(96 * 44100, 521703)  # the official's n_frames / audio duration


def test_wav_round_trips_int16_levels(tmp_path):
    pcm = np.array([-32768, -12345, -1, 0, 1, 32767], np.int16)
    write_wav(tmp_path / "a.wav", pcm / 32768, SAMPLE_RATE)
    with wave.open(str(tmp_path / "a.wav")) as wav:
        np.testing.assert_array_equal(np.frombuffer(wav.readframes(6), np.int16), pcm)


# --- Uploads: decode from bytes, trim as the official load_video, refuse bad input clearly ----------------


def ffmpeg_video(tmp_path: Path, name: str, *args: str) -> bytes:
    """A test video from ffmpeg's lavfi sources."""
    path = tmp_path / name
    subprocess.run([FFMPEG, "-loglevel", "error", "-y", *args, str(path)], check=True)
    return path.read_bytes()


def test_a_14_s_upload_is_trimmed_to_12_s_as_the_official():
    data = encode_mp4(moving_gradient(14 * 30, 32, 48).astype(np.uint8), fps=30)
    video = decode_video(data)
    frames, fps = decode_mp4(data)  # imageio's reader: every frame
    assert (fps, len(frames)) == (30, 420)
    assert (video.fps, video.seconds, video.trimmed) == (30, 12, True)
    np.testing.assert_array_equal(video.frames, frames[:360])
    assert "trimmed from 14.00 s to its first 12 s" in video.notice
    assert official_trim(97, 8) == (12, 96) and trim_video(frames[:97], 8).trimmed  # T2V's 97 frames at 8 fps
    assert not decode_video(encode_mp4(frames[:60], fps=30)).trimmed  # exactly 2 s


@pytest.mark.parametrize(
    "name, codec, fps, seconds, kept",
    [("clip.webm", "libvpx", "25", 3, 75), ("clip.mkv", "mpeg4", "24000/1001", 3, 71)],
)
def test_webm_and_mkv_uploads_decode(name, codec, fps, seconds, kept, tmp_path):
    data = ffmpeg_video(tmp_path, name, "-f", "lavfi", "-i", f"testsrc=size=64x48:rate={fps}", "-t", "3", "-c:v", codec)
    video = decode_video(data)
    assert video.frames.shape == (kept, 48, 64, 3) and video.seconds == seconds
    # 23.98 fps (as ffmpeg prints 24000/1001): 72 frames, int(3 * 23.98) = 71 kept, as the official would.
    assert video.trimmed == (kept < 72 if name.endswith("mkv") else False)
    reader = imageio_ffmpeg.read_frames(str(tmp_path / name))
    next(reader)
    np.testing.assert_array_equal(video.frames[-1], np.frombuffer(list(reader)[kept - 1], np.uint8).reshape(48, 64, 3))


def test_bad_uploads_get_a_clear_error(tmp_path):
    def refused(data, match, **limits):
        with pytest.raises(MediaError, match=match) as error:
            decode_video(data, UploadLimits(**limits))
        assert isinstance(error.value, RequestError)  # -> INVALID_ARGUMENT in the server

    video = encode_mp4(moving_gradient(30, 32, 48).astype(np.uint8), fps=30)
    refused(b"", "empty")
    refused(np.random.default_rng(0).bytes(5000), "not a video ffmpeg can read")
    refused(encode_png(np.zeros((16, 16, 3), np.uint8)), r"still image \(png_pipe\)")
    refused(ffmpeg_video(tmp_path, "a.wav", "-f", "lavfi", "-i", "sine", "-t", "1"), r"\(wav\) has no video stream")
    refused(video, f"{len(video)} bytes; at most 1000", max_bytes=1000)
    refused(video, "48x32; at most 1000 pixels", max_pixels=1000)
    refused(video, "30 fps; at most 24", max_fps=24)
    refused(video, "361 frames of 48x32 would take", max_decoded_bytes=2**20)
    refused(encode_mp4(moving_gradient(20, 32, 48).astype(np.uint8), fps=30), "shorter than 1 s")
    odd = ffmpeg_video(
        tmp_path, "odd.mkv", "-f", "lavfi", "-i", "testsrc=size=63x48:rate=10", "-t", "2", "-c:v", "ffv1"
    )
    refused(odd, "63x48; H.264 4:2:0 output needs an even width and height")
    # A video stream whose frames are missing: the header of a fast-start mp4 without its media data.
    truncated = video[: video.index(b"mdat") + 4]
    refused(truncated, "no decodable frames")


def test_probe_parsing_of_ffmpeg_stream_lines():
    log = (
        "Input #0, mp3, from 'upload':\n  Duration: 00:01:02.50, start: 0.0, bitrate: 128 kb/s\n"
        "  Stream #0:0: Audio: mp3, 44100 Hz, stereo, fltp, 128 kb/s\n"
        "  Stream #0:1: Video: mjpeg (Baseline), yuvj420p(pc, bt470bg/unknown/unknown), 500x500, 90k tbr "
        "(attached pic)\n"
        "  Stream #0:2[0x3](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709, progressive), "
        "1920x1080 [SAR 1:1 DAR 16:9], 5000 kb/s, 29.97 fps, 29.97 tbr, 30k tbn (default)\n"
    )
    stream = parse_ffmpeg_probe(log)
    assert (stream.index, stream.codec, stream.width, stream.height, stream.fps) == (2, "h264", 1920, 1080, 29.97)
    assert stream.duration_s == 62.5 and stream.container == "mp3"
    only_cover = "\n".join(log.splitlines()[:4])
    with pytest.raises(MediaError, match="no video stream"):
        parse_ffmpeg_probe(only_cover)
    assert conditioning_frame_indices(360).tolist()[:3] == [0, 3, 7] and conditioning_frame_indices(360)[-1] == 359


def test_the_printed_ntsc_rates_give_the_trim_of_the_exact_rates():
    for exact, printed in [
        (Fraction(24000, 1001), 23.98),
        (Fraction(30000, 1001), 29.97),
        (Fraction(60000, 1001), 59.94),
    ]:
        for n in range(1, 13 * 60):  # torchvision gives the official the exact rate; ffmpeg prints two decimals
            assert official_trim(n, float(exact)) == official_trim(n, printed), (printed, n)
