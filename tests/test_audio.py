"""Spectrogram image -> audio against independent references: float64 numpy formulas, a hand-written numpy STFT,
numpy's least squares, and pydub itself (with CPython's audioop) for the official level processing."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from k4serve.models.audio import (
    PRESETS,
    audio_samples,
    audio_width,
    griffin_lim,
    latent_width,
    mel_filterbank,
    mel_to_linear,
    official_loudness,
    spectrogram_image_to_audio,
    spectrogram_image_to_mel,
)

TINY = PRESETS["tiny"]
FULL = PRESETS["v2a"]


def htk_filterbank_float64(p) -> np.ndarray:
    """Triangles through consecutive HTK mel points, one np.interp per filter, in float64."""
    freqs = np.linspace(0.0, p.sample_rate / 2, p.n_stft)

    def mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    points = 700.0 * (10.0 ** (np.linspace(mel(p.f_min), mel(p.f_max), p.n_mels + 2) / 2595.0) - 1.0)
    return np.stack([np.interp(freqs, points[m : m + 3], [0.0, 1.0, 0.0]) for m in range(p.n_mels)], axis=1)


@pytest.mark.parametrize("name", ["tiny", "v2a"])
def test_mel_filterbank_equals_float64_htk_triangles(name):
    p = PRESETS[name]
    ours = mel_filterbank(p)
    assert ours.dtype == torch.float32 and ours.shape == (p.n_stft, p.n_mels)
    # torchaudio's float32 construction: the grid of frequencies up to 10 kHz carries ~1e-3 Hz of rounding,
    # over filter edges ~57 Hz apart at the top: ~5e-5 of a filter's height.
    np.testing.assert_allclose(ours.double().numpy(), htk_filterbank_float64(p), rtol=0, atol=1e-4)


def test_a_filterbank_with_an_empty_filter_is_refused():
    with pytest.raises(ValueError, match="cover no FFT bin"):
        mel_filterbank(replace(TINY, n_mels=512))


def test_image_to_mel_equals_the_riffusion_formula():
    image = np.random.default_rng(0).integers(0, 256, (TINY.n_mels, 40, 3), dtype=np.uint8)
    red = image[::-1, :, 0].astype(np.float32)  # riffusion: FLIP_TOP_BOTTOM, then channel 0 (R) only
    expected = np.power((255 - red) / 255, 1 / 0.25) * 30e6
    ours = spectrogram_image_to_mel(image, TINY)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    torch.testing.assert_close(spectrogram_image_to_mel(torch.from_numpy(image), TINY), ours, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"uint8 \[64, W, 3\]"):
        spectrogram_image_to_mel(image[:32], TINY)
    with pytest.raises(ValueError, match=r"uint8 \[64, W, 3\]"):
        spectrogram_image_to_mel(image.astype(np.float32), TINY)


@pytest.mark.parametrize("name", ["tiny", "v2a"])
def test_mel_inverse_equals_the_minimum_norm_least_squares_solution(name):
    p = PRESETS[name]
    mel = torch.rand(p.n_mels, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 30e6
    mel[:, 3] = 0.0  # a silent column stays silent
    fb = mel_filterbank(p).double().numpy()
    solution = np.linalg.lstsq(fb.T, mel.numpy(), rcond=None)[0]  # SVD: the minimum-norm solution
    expected = np.maximum(solution, 0.0)  # torchaudio's relu
    ours = mel_to_linear(mel.float(), p)
    assert ours.dtype == torch.float32 and ours.shape == (p.n_stft, 12)
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert (expected < 0).sum() == 0 and (solution < 0).any()  # the clamp is exercised
    # What torchaudio runs (float32 lstsq, gels) agrees to float32 precision.
    gels = torch.linalg.lstsq(torch.from_numpy(fb.T).float()[None], mel.float()[None], driver="gels").solution[0]
    torch.testing.assert_close(ours, gels.relu(), rtol=0, atol=2e-6 * gels.abs().max().item())


def padded_window(p) -> np.ndarray:
    """A periodic Hann window of win_length, centred in n_fft zeros (as torch.stft pads a short window)."""
    window = np.zeros(p.n_fft)
    left = (p.n_fft - p.win_length) // 2
    window[left : left + p.win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(p.win_length) / p.win_length)
    return window


def numpy_stft(x: np.ndarray, p) -> np.ndarray:
    window, hop = padded_window(p), p.hop_length
    x = np.pad(x, p.n_fft // 2, mode="reflect")
    frames = [x[t * hop : t * hop + p.n_fft] * window for t in range(1 + (len(x) - p.n_fft) // hop)]
    return np.fft.rfft(np.stack(frames, axis=1), axis=0)


def numpy_istft(spectrum: np.ndarray, p) -> np.ndarray:
    """Weighted overlap-add, divided by the summed squared window, without the n_fft/2 centring pad."""
    window, hop = padded_window(p), p.hop_length
    frames = np.fft.irfft(spectrum, n=p.n_fft, axis=0) * window[:, None]
    length = p.n_fft + hop * (spectrum.shape[1] - 1)
    signal, envelope = np.zeros(length), np.zeros(length)
    for t in range(spectrum.shape[1]):
        signal[t * hop : t * hop + p.n_fft] += frames[:, t]
        envelope[t * hop : t * hop + p.n_fft] += window**2
    centre = slice(p.n_fft // 2, length - p.n_fft // 2)
    return signal[centre] / envelope[centre]


def numpy_griffin_lim(magnitude: np.ndarray, angles: np.ndarray, p) -> np.ndarray:
    """Fast Griffin-Lim (Perraudin et al.) with torchaudio's alpha = momentum / (1 + momentum)."""
    alpha, previous = p.momentum / (1 + p.momentum), None
    for _ in range(p.griffin_lim_iters):
        rebuilt = numpy_stft(numpy_istft(magnitude * angles, p), p)
        angles = rebuilt if previous is None else rebuilt - alpha * previous
        angles = angles / (np.abs(angles) + 1e-16)
        previous = rebuilt
    return numpy_istft(magnitude * angles, p)


@pytest.mark.parametrize(
    "p, width",
    [(replace(TINY, griffin_lim_iters=32), 40), (replace(FULL, griffin_lim_iters=3), 24)],
    ids=["tiny", "v2a"],
)
def test_griffin_lim_equals_a_numpy_implementation_from_the_same_initial_phase(p, width):
    magnitude = torch.rand(p.n_stft, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e3
    # The initial phase is torch.rand(complex) from the caller's generator, as torchaudio draws it.
    phase = torch.rand((1, p.n_stft, width), dtype=torch.complex128, generator=torch.Generator().manual_seed(5))
    expected = numpy_griffin_lim(magnitude.numpy(), phase[0].numpy(), p)
    ours = griffin_lim(magnitude, p, torch.Generator().manual_seed(5))
    assert ours.dtype == torch.float64 and ours.shape == (audio_samples(width, p),)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-9 * np.abs(expected).max())
    # The float32 path (what the official runs) against the same float64 computation: momentum 0.99 amplifies float32
    # rounding with every step, by how much depends on the CPU's FFT (measured here: rel. L2 1e-5 after 8 steps,
    # 2e-3 after 32; per sample up to 0.5 % of the peak), so the bound is on the whole waveform and tight early on.
    phase32 = torch.rand((1, p.n_stft, width), dtype=torch.complex64, generator=torch.Generator().manual_seed(5))
    for steps, bound in ((min(8, p.griffin_lim_iters), 1e-4), (p.griffin_lim_iters, 1e-2)):
        q = replace(p, griffin_lim_iters=steps)
        expected32 = numpy_griffin_lim(magnitude.numpy(), phase32[0].numpy().astype(np.complex128), q)
        ours32 = griffin_lim(magnitude.float(), q, torch.Generator().manual_seed(5))
        assert ours32.dtype == torch.float32
        error = np.linalg.norm(ours32.double().numpy() - expected32) / np.linalg.norm(expected32)
        assert error < bound, (steps, error)


def test_griffin_lim_is_seeded_and_keeps_batch_dimensions():
    magnitude = torch.rand(2, TINY.n_stft, 30, generator=torch.Generator().manual_seed(0))
    first = griffin_lim(magnitude, TINY, torch.Generator().manual_seed(3))
    assert first.shape == (2, audio_samples(30, TINY))
    torch.testing.assert_close(griffin_lim(magnitude, TINY, torch.Generator().manual_seed(3)), first, rtol=0, atol=0)
    assert not torch.allclose(griffin_lim(magnitude, TINY, torch.Generator().manual_seed(4)), first)
    with pytest.raises(ValueError, match="at least 7 columns"):
        griffin_lim(magnitude[..., :6], TINY)


def import_pydub():
    with warnings.catch_warnings():  # pydub imports audioop, deprecated since Python 3.11
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("pydub", reason="pydub is a test reference: pip install 'k4serve[test]'")


def pydub_official_levels(waveform: np.ndarray, target_dbfs: float = -30.0) -> np.ndarray:
    """riffusion's audio_from_waveform + apply_filters(compression=False) and set_to_target_level, in pydub."""
    pydub = import_pydub()
    samples = waveform.copy()
    samples *= np.iinfo(np.int16).max / np.max(np.abs(samples))
    segment = pydub.AudioSegment(data=samples.astype(np.int16).tobytes(), sample_width=2, frame_rate=44100, channels=1)
    segment = segment.apply_gain(-12 - segment.dBFS)
    segment = pydub.effects.normalize(segment, headroom=0.1)
    segment = segment.apply_gain(target_dbfs - segment.dBFS)
    return np.array(segment.get_array_of_samples(), dtype=np.int16)


def test_official_loudness_equals_pydub_sample_for_sample():
    pydub = import_pydub()
    rng = np.random.default_rng(0)
    n = 44100
    t = np.arange(n) / 44100
    signals = {
        "noise": rng.standard_normal(n) * 1e-3,
        "sine+clicks": np.sin(2 * np.pi * 440 * t) + 40 * (rng.random(n) > 0.9995),  # peaky: clips at -12 dBFS
        "quiet tone": 1e-6 * np.sin(2 * np.pi * 50 * t),
    }
    for name, signal in signals.items():
        waveform = signal.astype(np.float32)
        expected = pydub_official_levels(waveform)
        ours = official_loudness(torch.from_numpy(waveform))
        assert ours.dtype == np.float32 and ours.shape == (n,)
        np.testing.assert_array_equal(ours * 32768, expected.astype(np.float32), err_msg=name)
        segment = pydub.AudioSegment(data=expected.tobytes(), sample_width=2, frame_rate=44100, channels=1)
        assert abs(segment.dBFS - -30.0) < 0.1, name
    assert not official_loudness(np.zeros(100, np.float32)).any()  # silence stays silence (the official: NaN)
    with pytest.raises(ValueError, match="non-finite"):
        official_loudness(np.array([0.0, np.nan], np.float32))


def test_duration_mapping_is_the_official_one():
    widths = [audio_width(s) for s in range(1, 13)]
    assert widths == [96, 192, 288, 384, 480, 576, 672, 800, 896, 992, 1088, 1184]
    assert latent_width(12) == 148 and audio_samples(1184) == 521703  # 11.83 s at 44.1 kHz
    with pytest.raises(ValueError, match="at least 1"):
        audio_width(0)


def test_spectrogram_image_to_audio_composes_the_steps():
    image = torch.randint(0, 256, (TINY.n_mels, audio_width(1), 3), generator=torch.Generator().manual_seed(0))
    image = image.to(torch.uint8)
    audio = spectrogram_image_to_audio(image, TINY, torch.Generator().manual_seed(2))
    magnitude = mel_to_linear(spectrogram_image_to_mel(image, TINY), TINY)
    expected = official_loudness(griffin_lim(magnitude, TINY, torch.Generator().manual_seed(2)))
    assert audio.dtype == np.float32 and audio.shape == (audio_samples(audio_width(1)),)
    np.testing.assert_array_equal(audio, expected)
    rms_dbfs = 20 * math.log10(math.sqrt(float(np.mean((audio * 32768.0) ** 2))) / 32768)
    assert abs(rms_dbfs - -30.0) < 0.1
