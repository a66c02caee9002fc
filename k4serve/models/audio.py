"""Spectrogram image -> 44.1 kHz mono waveform, as the official V2A does it (riffusion's converter).

The official chain (kandinsky4_video2audio/utils.py `image_to_audio`, riffusion's `SpectrogramImageConverter`):
1. image -> mel amplitudes: flip vertically (low frequencies are at the bottom of the image), take the R
   channel, `((255 - R) / 255) ** (1 / power) * 30e6` (riffusion's default `max_value`: the image carries no
   EXIF once the official code round-trips it through numpy, so every default below applies);
2. mel -> linear spectrogram: torchaudio's `InverseMelScale` (current versions: `relu(lstsq(fb.T, mel))`,
   the minimum-norm least-squares solution of the underdetermined 512 x 8821 system, clamped at 0);
3. linear -> waveform: torchaudio's `GriffinLim` (Hann window, power 1, 32 iterations, momentum 0.99, a
   random initial phase, `length=None`), giving `hop * (W - 1)` samples;
4. level processing with pydub: peak-normalise to int16 full scale, gain to -12 dBFS, `normalize(headroom=0.1)`,
   then set the RMS level to -30 dBFS (`official_loudness`).

Steps 1-3 are torch on any device; our differences from the official are deliberate and stated where they
happen: the least-squares solve is one cached float64 pseudo-inverse instead of a float32 `lstsq` per call
(the filterbank has condition number 6.6, so both give the same solution to float32 precision), and the
initial phase comes from a caller's `torch.Generator`, so a seed reproduces the audio (the official leaves it
unseeded). Step 4 is integer arithmetic on the host, reproduced exactly (CPython's `audioop` and pydub).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

COLUMNS_PER_SECOND = 100  # one spectrogram column per 10 ms hop: the official duration mapping's "100"
WIDTH_MULTIPLE = 32  # the official rounds the width down to a multiple of 32
VAE_SCALE = 8  # the SD VAE's spatial factor: latent width = image width / 8
INT16_FULL_SCALE = 32768  # pydub's max_possible_amplitude for 16-bit samples (2**16 / 2)


@dataclass(frozen=True)
class SpectrogramParams:
    """riffusion's `SpectrogramParams` defaults (mono, HTK mel scale without norm) as the official uses them."""

    sample_rate: int = 44100
    hop_length: int = 441  # 10 ms
    win_length: int = 4410  # 100 ms
    n_fft: int = 17640  # 400 ms (the window zero-padded)
    n_mels: int = 512  # image rows
    f_min: float = 0.0
    f_max: float = 10000.0
    image_power: float = 0.25
    max_value: float = 30e6  # riffusion's `audio_from_spectrogram_image(max_value=30e6)`
    griffin_lim_iters: int = 32
    momentum: float = 0.99

    @property
    def n_stft(self) -> int:
        return self.n_fft // 2 + 1


PRESETS = {
    "v2a": SpectrogramParams(),
    # The same 10 ms hop (so the duration mapping holds) with a 64-row image and a short FFT.
    # 4 Griffin-Lim iterations keep the CPU server tests fast (each iteration is an STFT and an inverse STFT).
    "tiny": SpectrogramParams(win_length=2205, n_fft=4410, n_mels=64, griffin_lim_iters=4),
}


def audio_width(seconds: int) -> int:
    """Spectrogram width W for a clip of whole `seconds` (official: `(seconds * 100) // 32 * 32`)."""
    if seconds < 1:
        raise ValueError(f"seconds must be at least 1 (the official duration mapping gives W = 0), got {seconds}")
    return seconds * COLUMNS_PER_SECOND // WIDTH_MULTIPLE * WIDTH_MULTIPLE


def latent_width(seconds: int) -> int:
    """The UNet latent's width for `seconds`: audio_width / 8."""
    return audio_width(seconds) // VAE_SCALE


def audio_samples(width: int, params: SpectrogramParams = PRESETS["v2a"]) -> int:
    """Samples Griffin-Lim returns for a W-column spectrogram (`length=None`): hop * (W - 1)."""
    return params.hop_length * (width - 1)


def mel_filterbank(params: SpectrogramParams) -> Tensor:
    """HTK triangular mel filterbank [n_stft, n_mels], float32, computed as torchaudio's `melscale_fbanks`.

    float32 throughout and on the CPU, in torchaudio's order of operations, to reproduce its matrix (not
    compared with torchaudio itself, which is no dependency; a float64 filterbank differs by up to 5e-5).
    """
    all_freqs = torch.linspace(0, params.sample_rate // 2, params.n_stft)
    m_min = 2595.0 * math.log10(1.0 + params.f_min / 700.0)
    m_max = 2595.0 * math.log10(1.0 + params.f_max / 700.0)
    f_pts = 700.0 * (10.0 ** (torch.linspace(m_min, m_max, params.n_mels + 2) / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]  # [n_stft, n_mels + 2]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.minimum(down, up).clamp(min=0.0)
    if (fb.amax(dim=0) == 0).any():
        raise ValueError(f"{params}: some mel filters cover no FFT bin; use fewer mel bins or a longer n_fft")
    return fb


@functools.lru_cache(maxsize=8)
def mel_pseudo_inverse(params: SpectrogramParams, device: torch.device) -> Tensor:
    """pinv(fb.T) [n_stft, n_mels], float64 on `device`: maps mel amplitudes to the minimum-norm linear ones.

    fb.T (n_mels x n_stft) has full row rank, so its pseudo-inverse is fb (fb.T fb)^-1, through a Cholesky
    factor of the well-conditioned n_mels x n_mels Gram matrix (an SVD of fb takes seconds on a CPU). It is the
    same for every request, so it is computed once per (params, device) and kept (36 MB at full size); float64
    also keeps the product exact when a caller has enabled TF32 matmuls for the models.
    """
    fb = mel_filterbank(params).double()
    gram = torch.linalg.cholesky(fb.T @ fb)
    return torch.cholesky_solve(fb.T, gram).T.contiguous().to(device)


@functools.lru_cache(maxsize=8)
def hann_window(params: SpectrogramParams, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """torch's periodic Hann window of win_length, built on the CPU as torchaudio does and moved to `device`."""
    return torch.hann_window(params.win_length, dtype=dtype).to(device)


def spectrogram_image_to_mel(image: Tensor | np.ndarray, params: SpectrogramParams = PRESETS["v2a"]) -> Tensor:
    """uint8 RGB spectrogram image [n_mels, W, 3] (the VAE postprocess) -> mel amplitudes [n_mels, W] float32."""
    image = torch.as_tensor(image)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != params.n_mels or image.shape[2] != 3:
        raise ValueError(
            f"a spectrogram image must be uint8 [{params.n_mels}, W, 3], got {image.dtype} {list(image.shape)}"
        )
    red = image.flip(0)[..., 0].float()  # row 0 = lowest frequency
    return ((255.0 - red) / 255.0).pow(1.0 / params.image_power) * params.max_value


def mel_to_linear(mel: Tensor, params: SpectrogramParams = PRESETS["v2a"]) -> Tensor:
    """Mel amplitudes [..., n_mels, W] -> linear amplitudes [..., n_stft, W] float32 (InverseMelScale)."""
    if mel.shape[-2] != params.n_mels:
        raise ValueError(f"expected {params.n_mels} mel bins, got mel of shape {list(mel.shape)}")
    linear = mel_pseudo_inverse(params, mel.device) @ mel.double()
    return linear.relu().float()


def griffin_lim(
    magnitude: Tensor, params: SpectrogramParams = PRESETS["v2a"], generator: torch.Generator | None = None
) -> Tensor:
    """Linear amplitudes [..., n_stft, W] -> waveform [..., hop * (W - 1)] (torchaudio's GriffinLim), float32
    (float64 for a float64 input).

    The initial phase is torchaudio's `torch.rand(shape, dtype=complex64)` (real and imaginary parts uniform in
    [0, 1), so not unit-modulus), drawn from `generator` on its own device: a CPU generator gives the same
    phase on every device, and the official call after `torch.manual_seed(s)` on the CPU draws the same one.
    """
    *lead, n_stft, width = magnitude.shape
    if n_stft != params.n_stft:
        raise ValueError(f"expected {params.n_stft} frequency bins (n_fft {params.n_fft}), got {n_stft}")
    if audio_samples(width, params) <= params.n_fft // 2:  # torch.stft's reflect padding needs more samples
        minimum = params.n_fft // 2 // params.hop_length + 2
        raise ValueError(f"a spectrogram needs at least {minimum} columns for n_fft {params.n_fft}, got {width}")
    if magnitude.dtype != torch.float64:
        magnitude = magnitude.float()  # torchaudio computes in the input's dtype; the official passes float32
    device = magnitude.device
    window = hann_window(params, device, magnitude.dtype)
    stft_args = dict(n_fft=params.n_fft, hop_length=params.hop_length, win_length=params.win_length, window=window)
    magnitude = magnitude.reshape(-1, n_stft, width)
    phase_dtype = torch.complex128 if magnitude.dtype == torch.float64 else torch.complex64
    gen_device = generator.device if generator is not None else device
    angles = torch.rand(magnitude.shape, dtype=phase_dtype, generator=generator, device=gen_device).to(device)
    momentum = params.momentum / (1 + params.momentum)  # fast Griffin-Lim's alpha, as torchaudio rescales it
    previous = None
    for _ in range(params.griffin_lim_iters):
        inverse = torch.istft(magnitude * angles, **stft_args)
        rebuilt = torch.stft(inverse, **stft_args, center=True, pad_mode="reflect", return_complex=True)
        angles = rebuilt if previous is None else rebuilt - previous * momentum
        angles = angles / (angles.abs() + 1e-16)
        previous = rebuilt
    waveform = torch.istft(magnitude * angles, **stft_args)
    return waveform.reshape(*lead, -1)


def _dbfs(pcm: np.ndarray) -> float:
    """pydub's `AudioSegment.dBFS`: 20 log10 of audioop's integer RMS (truncated) over full scale."""
    # Each square is an integer below 2**31 and the sum stays below 2**53, so this float64 sum is exact, as is
    # audioop's sequential double sum.
    rms = int(math.sqrt(float(np.sum(pcm.astype(np.int64) ** 2)) / len(pcm)))
    return -math.inf if rms == 0 else 20 * math.log(rms / INT16_FULL_SCALE, 10)


def _apply_gain(pcm: np.ndarray, gain_db: float) -> np.ndarray:
    """pydub's `apply_gain`: audioop.mul by 10**(dB/20) in double, clipped to int16 and rounded down."""
    scaled = pcm * 10 ** (float(gain_db) / 20)  # float64
    # audioop's fbound: above 32767 -> 32767, below -32767 -> -32768, else floor.
    scaled = np.where(scaled > 32767, 32767.0, np.where(scaled < -32767, -32768.0, np.floor(scaled)))
    return scaled.astype(np.int16)


def _normalize(pcm: np.ndarray, headroom: float) -> np.ndarray:
    """pydub's `effects.normalize`: gain so the peak sits `headroom` dB below full scale (silence unchanged)."""
    peak = int(np.abs(pcm.astype(np.int32)).max())
    if peak == 0:
        return pcm
    target_peak = INT16_FULL_SCALE * 10 ** (-headroom / 20)
    return _apply_gain(pcm, 20 * math.log(target_peak / peak, 10))


def official_loudness(waveform: np.ndarray | Tensor, target_dbfs: float = -30.0) -> np.ndarray:
    """Griffin-Lim waveform [N] -> float32 [N] in [-1, 1): the official int16 level processing, divided by 32768.

    riffusion's `audio_from_waveform(normalize=True)` (peak to 32767 in float32, truncated to int16) and
    `apply_filters(compression=False)` (gain to -12 dBFS, `normalize(headroom=0.1)`), then the official
    `set_to_target_level(-30)`. Silence (the official divides by zero there) stays silence.
    """
    x = torch.as_tensor(waveform).detach().float().cpu().numpy().reshape(-1)
    peak = np.abs(x).max(initial=0.0)
    if not np.isfinite(peak):
        raise ValueError("the waveform has non-finite samples")
    if peak == 0:
        return np.zeros_like(x)
    # float32 like the official under numpy 2 (np.iinfo(np.int16).max / np.float32 stays float32 there).
    pcm = (x * (np.float32(32767) / peak)).astype(np.int16)
    pcm = _apply_gain(pcm, -12 - _dbfs(pcm))
    pcm = _normalize(pcm, headroom=0.1)
    pcm = _apply_gain(pcm, target_dbfs - _dbfs(pcm))
    return pcm.astype(np.float32) / INT16_FULL_SCALE


def spectrogram_image_to_audio(
    image: Tensor | np.ndarray,
    params: SpectrogramParams = PRESETS["v2a"],
    generator: torch.Generator | None = None,
    target_dbfs: float = -30.0,
) -> np.ndarray:
    """uint8 spectrogram image [n_mels, W, 3] -> float32 mono audio [hop * (W - 1)] in [-1, 1) at params.sample_rate.

    Runs on the image's device (a numpy image on the CPU); the level processing runs on the host.
    """
    mel = spectrogram_image_to_mel(image, params)
    waveform = griffin_lim(mel_to_linear(mel, params), params, generator)
    return official_loudness(waveform, target_dbfs)
