"""V2A on one GPU at full size (random weights), 12 s of video: each stage's time and peak memory, the eager
reference against the fast path in the same run, and text -> video with sound end to end.

    python benchmarks/v2a.py                                                  # the H200 run: about 3 min
    python benchmarks/v2a.py --preset tiny --device cpu --repeat 1 --no-t2va --no-write   # a CPU check of the script

Input: 96 random uint8 frames at 384x672 and 8 fps (12 s: the official keeps all 96 and samples each once), the
default prompts, seed 0. Rows, each in its own try block (a failure is a row, the others still run):
  CogVLM2 features   eager: both branches per request, as the official (negative prompt + the black video,
                     prompt + the video); fast: V2APipeline.encode, the conditional branch only (uncond kept)
  UNet sampling      the 51 guided calls (PNDM, batch 2): eager bf16 (the module; torch SDPA's choice, as diffusers);
                     fast: FastUNet (one CUDA graph per call, SDPA flash); fast fp8: its linears in e4m3
  SD VAE decode      fp16, the same module in both paths
  vocoder            mel inverse + 32 Griffin-Lim iterations + the official levels: eager: torchaudio's float32
                     lstsq on every call; fast: the cached float64 pseudo-inverse (the same phase generator)
  mux                H.264 + AAC of the 96 frames: x264 medium crf 5 (mp4 preset official) vs the default preset
  V2A one call       V2APipeline(...) (frames -> audio) and add_audio (-> mp4), fast, timed as single calls
  t2va               T2V `fast` then V2A `fast` add_audio: 12 s 384x672 text -> mp4 with sound
Errors are relative L2 against the eager row of the same stage: the conditioning, the latents, the audio; the
one-call rows against the whole eager chain's audio (same seed, same phase). Times are medians of --repeat runs
after a warm-up (graph capture, the uncond cache); peak GiB is the device's peak allocation during the timed runs
(every resident model included), stage GiB that peak less what was allocated before. The table is printed last
and appended to benchmarks/RESULTS.md with the V2A total against its targets (<= 1.5 s, >= 3x eager).
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
from measure import Measured, measure, relative_error
from results import append_table
from vocoder import official_solve, vocode

from k4serve.models.audio import spectrogram_image_to_audio
from k4serve.models.cogvlm2_video import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, Conditioning
from k4serve.models.frame_sampling import conditioning_frame_indices
from k4serve.models.pndm import unet_denoiser
from k4serve.models.sd_vae import to_uint8_image
from k4serve.pipelines.media import trim_video
from k4serve.pipelines.v2a import PIPELINE_PRESETS, V2APipeline, V2ASettings
from k4serve.pipelines.video_io import MP4_PRESETS, encode_mp4

V2A_STAGES = ("CogVLM2 features", "UNet sampling, 51 calls", "SD VAE decode", "mel inverse + Griffin-Lim + levels")
T2V_PRESET_OF = {"kandinsky4-v2a": "flash-512", "tiny": "tiny"}
T2V_PROMPT = "a red fox running through fresh snow, golden hour"
TARGET_S, TARGET_SPEEDUP = 1.5, 3.0


@dataclass
class Row:
    stage: str
    role: str  # eager (the stage's reference), fast (the pipeline's path), both (one path), option (not the default)
    path: str
    measured: Measured | None = None  # None: the row failed
    error: float | None = None  # rel. L2 vs the stage's eager result
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="kandinsky4-v2a", choices=sorted(PIPELINE_PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fp8", action="store_true", help="skip the fp8-linear UNet row")
    parser.add_argument("--no-t2va", action="store_true", help="skip the T2V + V2A end-to-end rows")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    device, seed, prompt, negative = args.device, args.seed, DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT
    frames = np.random.default_rng(0).integers(0, 256, (96, 384, 672, 3), dtype=np.uint8)
    clip = trim_video(frames, 8.0)  # 12 s, all 96 frames kept
    rows: list[Row] = []

    def row(stage: str, role: str, path: str, fn, reference=None, view=None, repeat=args.repeat, warmup=1):
        """Measure fn into `rows`, with its error against the eager `reference` (compared through `view`) when
        given; its result, or None if it failed."""
        try:
            measured = measure(fn, repeat, device, warmup)
            view = view or (lambda x: x)
            error = None if reference is None else relative_error(view(measured.result), view(reference))
            rows.append(Row(stage, role, path, measured, error))
            return measured.result
        except Exception as failure:  # one failing row must not stop the others
            traceback.print_exc()
            rows.append(Row(stage, role, path, note=f"failed: {type(failure).__name__}: {str(failure)[:90]}"))
            return None

    started = time.perf_counter()
    pipeline = V2APipeline.from_settings(V2ASettings(preset=args.preset, device=device, engine="fast"))
    build_s = time.perf_counter() - started
    models = (pipeline.encoder.model, pipeline.unet, pipeline.vae)
    weights_gib = sum(p.numel() * p.element_size() for m in models for p in m.parameters()) / 2**30
    encoder, params, vocoder_device = pipeline.encoder, pipeline.spectrogram, pipeline.devices["vocoder"]
    sampled = clip.frames[conditioning_frame_indices(len(clip.frames))]

    def generator() -> torch.Generator:  # the initial phase of both vocoder paths: the same draw
        return torch.Generator(vocoder_device).manual_seed(seed)

    with torch.no_grad():
        # 1. CogVLM2-Video features
        def official_conditioning() -> Conditioning:
            negative_prompt = encoder.text_features(negative)
            black_video = encoder.video_features(sampled * 0)  # the official's images * 0
            cond = encoder.condition(sampled, prompt)
            return Conditioning(torch.stack([negative_prompt, cond.prompt]), torch.stack([black_video, cond.video]))

        eager_cond = row("CogVLM2 features", "eager", "both branches per request (official)", official_conditioning)
        fast_cond = row(
            "CogVLM2 features", "fast", "conditional branch, uncond kept",
            lambda: pipeline.encode(clip.frames, clip.fps, prompt, negative),
            eager_cond, view=lambda c: torch.cat([c.prompt, c.video], dim=1),
        )  # fmt: skip
        # 2. UNet sampling: 51 guided calls
        shape, unet = pipeline.latent_shape(clip.seconds), pipeline.unet
        dtype = unet.conv_in.weight.dtype

        def sample_with(unet_fn, conditioning: Conditioning) -> torch.Tensor:
            prompt_embeds, video_embeds = (t.to(device, dtype) for t in conditioning)
            denoiser = unet_denoiser(unet_fn, prompt_embeds, video_embeds)
            return pipeline.sampler(denoiser, shape, [seed], device, dtype)[0]

        eager_latents = row(
            "UNet sampling, 51 calls", "eager", f"{dtype_name(dtype)} module (SDPA's choice)",
            lambda: sample_with(unet, eager_cond),
        )  # fmt: skip
        fast_latents = row(
            "UNet sampling, 51 calls", "fast", f"FastUNet: CUDA graphs, {dtype_name(dtype)}",
            lambda: pipeline.sample(fast_cond, clip.seconds, seed), eager_latents,
        )  # fmt: skip
        if not args.no_fp8:
            engines = {}

            def fp8_sampling() -> torch.Tensor:
                if "fp8" not in engines:  # built inside the row: on a CPU it refuses, and that is the row
                    from k4serve.engines.unet import FastUNet

                    engines["fp8"] = FastUNet(unet, linear="fp8")
                return sample_with(engines["fp8"], fast_cond)

            row("UNet sampling, 51 calls", "option", "FastUNet: CUDA graphs, fp8 linears", fp8_sampling, eager_latents)
            engines.clear()
            gc.collect()
        latents = fast_latents if fast_latents is not None else eager_latents
        # 3. SD VAE decode -> uint8 spectrogram image
        image = row(
            "SD VAE decode", "both", f"{dtype_name(pipeline.vae.decoder.conv_in.weight.dtype)} module",
            lambda: to_uint8_image(pipeline.vae.decode(latents[None].to(vocoder_device)))[0],
        )  # fmt: skip
        # 4. vocoder: mel inverse + Griffin-Lim + levels
        eager_audio_only = row(
            "mel inverse + Griffin-Lim + levels", "eager", "float32 lstsq per call (torchaudio)",
            lambda: vocode(image, official_solve, generator(), params)[1],
        )  # fmt: skip
        fast_audio_only = row(
            "mel inverse + Griffin-Lim + levels", "fast", "cached float64 pseudo-inverse",
            lambda: spectrogram_image_to_audio(image, params, generator()), eager_audio_only,
        )  # fmt: skip
        # 5. mux
        audio = fast_audio_only if fast_audio_only is not None else eager_audio_only
        for name in ("official", "fast"):
            settings = MP4_PRESETS[name]
            row(
                "mux (H.264 + AAC)", "eager" if name == "official" else "fast",
                f"x264 {settings.preset} crf {settings.crf} (mp4 preset {name})",
                lambda s=settings: encode_mp4(clip.frames, clip.fps, audio, params.sample_rate, "pad", s),
            )  # fmt: skip
        # 6. the whole eager chain's audio (untimed: its stages are timed above), then V2A fast as single calls
        eager_audio = None
        try:
            eager_image = to_uint8_image(pipeline.vae.decode(eager_latents[None].to(vocoder_device)))[0]
            eager_audio = vocode(eager_image, official_solve, generator(), params)[1]
        except Exception:
            traceback.print_exc()

        def magnitudes(waveform) -> torch.Tensor:
            """|STFT| of a waveform at the spectrogram's own resolution: what is heard. Griffin-Lim from the same
            initial phase turns a 1e-2 change of the latents into an O(1) change of the samples (their phase), so
            the samples themselves are no measure of the difference."""
            window = torch.hann_window(params.win_length, dtype=torch.float64)
            samples = torch.as_tensor(np.asarray(waveform), dtype=torch.float64)
            return torch.stft(samples, params.n_fft, params.hop_length, params.win_length, window,
                              return_complex=True).abs()  # fmt: skip

        row(
            "V2A frames -> audio, one call", "fast", "V2APipeline(...); error: STFT magnitudes",
            lambda: pipeline(clip, prompt, negative, seed).waveform, eager_audio, view=magnitudes,
        )  # fmt: skip
        row(
            "V2A frames -> mp4, one call", "fast", "add_audio",
            lambda: pipeline.add_audio(clip, prompt, negative, seed)[0],
        )  # fmt: skip
        # 7. text -> video with sound
        if not args.no_t2va:
            try:
                from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline

                t2v_settings = PipelineSettings(preset=T2V_PRESET_OF[args.preset], device=device, engine="fast")
                t2v = T2VPipeline.from_settings(t2v_settings)
                row("T2V 12 s 384x672", "fast", "pipeline defaults", lambda: t2v(T2V_PROMPT, seed=seed), repeat=1)
                row(
                    "t2va end to end", "fast", "T2V fast, then V2A fast add_audio",
                    lambda: pipeline.add_audio(t2v(T2V_PROMPT, seed=seed), prompt, negative, seed, fps=8)[0],
                    repeat=1, warmup=0,
                )  # fmt: skip
                del t2v
            except Exception:
                traceback.print_exc()
                rows.append(Row("t2va end to end", "fast", "T2V fast, then V2A fast", note="failed to build T2V"))

    table = format_table(rows)
    method = (
        f"median of {args.repeat} after a warm-up; 96 frames 384x672 at 8 fps (12 s), prompt {prompt!r}, seed {seed}; "
        f"V2A weights {weights_gib:.1f} GiB ({args.preset}, random), built on the device in {build_s:.1f} s"
    )
    print(method)
    print(table)
    if not args.no_write:
        command = f"python benchmarks/v2a.py --preset {args.preset} --device {device} --repeat {args.repeat}"
        command += " --no-fp8" * args.no_fp8 + " --no-t2va" * args.no_t2va
        append_table(f"V2A, 12 s of video: stages eager vs fast, and t2va ({args.preset}, random weights)",
                     command, method, table)  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def format_table(rows: list[Row]) -> str:
    """The markdown table (× eager: the stage's eager row over this one) and the V2A totals against the targets."""
    header = (
        "| stage | path | seconds | × eager | peak GiB | stage GiB | rel. error vs eager | note |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    eager = {r.stage: r.measured.seconds for r in rows if r.measured is not None and r.role in ("eager", "both")}
    lines = []
    for r in rows:
        if r.measured is None:
            lines.append(f"| {r.stage} | {r.role}: {r.path} | — | — | — | — | — | {r.note} |")
            continue
        m = r.measured
        speedup = f"{eager[r.stage] / m.seconds:.2f}" if r.stage in eager else "—"
        error = f"{r.error:.2e}" if r.error is not None else "—"
        lines.append(
            f"| {r.stage} | {r.role}: {r.path} | {m.seconds:.3f} | {speedup} | {m.peak_gib:.1f} | {m.stage_gib:.2f} "
            f"| {error} | {r.note} |"
        )
    notes = []
    fast_call = next((r.measured.seconds for r in rows if r.stage == "V2A frames -> audio, one call" and r.measured),
                     None)  # fmt: skip
    if all(stage in eager for stage in V2A_STAGES) and fast_call:
        total = sum(eager[stage] for stage in V2A_STAGES)
        verdict = "meets" if fast_call <= TARGET_S else f"misses by {fast_call - TARGET_S:.2f} s"
        speedup = total / fast_call
        notes.append(
            f"V2A 12 s (frames -> audio): the eager stages sum to {total:.2f} s; the fast path, one call, takes "
            f"{fast_call:.2f} s, which {verdict} the <= {TARGET_S} s target; {speedup:.2f}x eager (target >= "
            f"{TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'missed'})"
        )
    return "\n".join([header, *lines] + ([""] + notes if notes else []))


if __name__ == "__main__":
    main()
