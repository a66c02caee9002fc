"""Exported engines on one GPU at full size (random weights, 12 s at 384x672): AOTInductor against eager and `fast`.

    # DiT, one denoiser call: eager (bf16 autocast, SDPA flash) and fast, then AOTI packages of both paths
    python benchmarks/engines.py --variants dit-eager dit-fast-bf16 dit-fast-fp8 --engine-dir /tmp/k4-engines
    python benchmarks/engines.py --variants dit-aoti-bf16 --engine-dir /tmp/k4-engines        # compiles: minutes
    python benchmarks/engines.py --variants dit-aoti-fast-bf16 --engine-dir /tmp/k4-engines
    python benchmarks/engines.py --variants dit-aoti-fast-fp8 dit-aoti-fp8 --engine-dir /tmp/k4-engines
    # VAE decode of the 25 latent frames: eager, fast (Triton norms), the AOTI chunk step looped over 13 chunks
    python benchmarks/engines.py --variants vae-eager vae-fast vae-aoti --engine-dir /tmp/k4-engines
    # V2A UNet, one CFG-batched sampler call at 12 s: eager (bf16), fast (CUDA graph), the AOTI package
    python benchmarks/engines.py --variants unet-eager unet-fast unet-aoti --engine-dir /tmp/k4-engines
    # T5-XXL encoder (AOTI, for a server without JIT), then time to first response: `k4serve serve` started twice
    python benchmarks/engines.py --variants t5-eager t5-aoti --engine-dir /tmp/k4-engines
    python benchmarks/engines.py --first-response --engine-dir /tmp/k4-engines
    # or compile several packages side by side first (their export times are then measured under contention)
    for v in dit-aoti-fast-fp8 vae-aoti t5-aoti; do python benchmarks/engines.py --export-only --variants $v & done

Each AOTI variant exports into `<engine-dir>/<variant>/` once and reuses that package on later runs (its export time
then comes from the manifest), so no single call has to compile more than one model: keep each call under the
9-minute limit by listing the compiling variants one per call. Every variant runs in try/except (a failure is a
row, not the end of the run). Times are medians of --repeat calls after a warm-up; errors are relative L2 against
the eager bf16 output of the same inputs measured in the same run (the reference row is always run first).
`--first-response` starts `k4serve serve --models t2v` with today's JIT path (engine fast: kernel compilation,
tuning and CUDA-graph capture on the first request) and with prebuilt AOTI engines (dit from dit-aoti-fast-bf16,
vae from vae-aoti, text encoder from t5-aoti; run those first), and times start -> ready, the first 12 s
request, and a second (warm) one. Tables print last and are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from results import append_table
from torch.nn.attention import SDPBackend, sdpa_kernel

from k4serve.engines.contracts import CONTRACTS, Bucket
from k4serve.engines.manifest import MANIFEST, EngineManifest, engine_path

BUCKET = Bucket(384, 672, 12)
V2A_BUCKET = Bucket(0, 0, 12)  # the V2A UNet's buckets are durations only
PROMPT = "a red fox running through fresh snow, golden hour"
# variant -> (component, runner, options)
VARIANTS = {
    "dit-eager": ("dit", "eager", {}),
    "dit-fast-bf16": ("dit", "fast", {"attention": "triton", "linear": "bf16"}),
    "dit-fast-fp8": ("dit", "fast", {"attention": "triton-fp8", "linear": "fp8-fast"}),
    "dit-aoti-bf16": ("dit", "aoti", {"dtype": "bf16", "engine": "eager"}),
    "dit-aoti-fp8": ("dit", "aoti", {"dtype": "fp8", "engine": "eager"}),
    "dit-aoti-fast-bf16": ("dit", "aoti", {"dtype": "bf16", "engine": "fast", "attention": "triton", "linear": "bf16"}),
    "dit-aoti-fast-fp8": (
        "dit",
        "aoti",
        {"dtype": "fp8", "engine": "fast", "attention": "triton-fp8", "linear": "fp8-fast"},
    ),  # fmt: skip
    "vae-eager": ("vae", "eager", {}),
    "vae-fast": ("vae", "fast", {}),
    "vae-aoti": ("vae", "aoti", {"dtype": "bf16", "engine": "eager"}),
    "t5-eager": ("text_encoder", "eager", {}),
    "t5-aoti": ("text_encoder", "aoti", {"dtype": "bf16", "engine": "eager"}),
    "unet-eager": ("unet", "eager", {}),
    "unet-fast": ("unet", "fast", {}),
    "unet-aoti": ("unet", "aoti", {"dtype": "bf16", "engine": "eager"}),
}
REFERENCE = {"dit": "dit-eager", "vae": "vae-eager", "text_encoder": "t5-eager", "unet": "unet-eager"}
PRESETS = {"dit": "flash-512", "vae": "cogvideox-5b", "text_encoder": "xxl", "unet": "kandinsky4-v2a"}


def synced(fn):
    """(result, seconds) of fn() with the GPU drained before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def build(component: str):
    """The full-size component with seeded random weights on the GPU in bf16 (the pipeline's own builder); the V2A
    UNet comes as its pipeline, which its export contract reads the latent shapes from."""
    if component == "unet":
        from k4serve.pipelines.v2a import V2APipeline, V2ASettings

        return V2APipeline.from_settings(V2ASettings(preset="kandinsky4-v2a", device="cuda"), components=("unet",))
    from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline

    settings = PipelineSettings(preset="flash-512", device="cuda")
    pipeline = T2VPipeline.from_settings(settings, components=(component,))
    return {"dit": pipeline.dit, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}[component]


def inputs_of(component: str) -> tuple:
    """The same seeded inputs for every variant of a component, on the GPU."""
    if component == "text_encoder":
        from k4serve.models.t5 import T5TextEncoder, preset_tokenizer

        return (T5TextEncoder(preset_tokenizer("xxl"), torch.nn.Identity()).tokenize(PROMPT).cuda(),)
    if component == "unet":
        from k4serve.engines.contracts import CFG_BATCH, V2A_FRAMES, V2A_PROMPT_TOKENS
        from k4serve.models.audio import PRESETS as AUDIO_PRESETS
        from k4serve.models.audio import audio_width
        from k4serve.models.v2a_unet import PRESETS as UNET_PRESETS

        g, config = torch.Generator().manual_seed(0), UNET_PRESETS[PRESETS["unet"]]
        mels, width = AUDIO_PRESETS["v2a"].n_mels // 8, audio_width(V2A_BUCKET.seconds) // 8
        sample = torch.randn(CFG_BATCH, config.in_channels, mels, width, generator=g)
        prompt = torch.randn(CFG_BATCH, V2A_PROMPT_TOKENS, config.feature_dim, generator=g)
        video = torch.randn(CFG_BATCH, V2A_FRAMES, config.feature_dim, generator=g)
        timestep = torch.full((CFG_BATCH,), 981, dtype=torch.int64, device="cuda")
        sample, prompt, video = (t.to("cuda", torch.bfloat16) for t in (sample, prompt, video))
        return sample, timestep, prompt, video
    if component == "vae":
        t = BUCKET.latent_frames
        z = torch.randn(1, 16, t, BUCKET.height // 8, BUCKET.width // 8, generator=torch.Generator().manual_seed(0))
        return (z.to("cuda", torch.bfloat16),)
    from k4serve.models.dit import PRESETS as DIT_PRESETS
    from k4serve.models.dit import DiffusionTransformer3D

    with torch.device("meta"):  # the contract needs the config only
        dit = DiffusionTransformer3D(DIT_PRESETS[PRESETS["dit"]])
    x, text, _ = CONTRACTS["dit"].graphs(dit, [BUCKET], torch.bfloat16)[0].sample_inputs("cuda")
    return x, text, torch.full((1,), 999, dtype=torch.int64, device="cuda")


def exported(variant: str, component: str, options: dict, engine_dir: Path) -> tuple[Path, float]:
    """(folder, export seconds) of the variant's package, exported unless already there."""
    model_name = {c.component: c.model for c in CONTRACTS.values()}[component]
    folder = engine_path(engine_dir / variant, model_name, "aoti")
    if not (folder / MANIFEST).is_file():
        from k4serve.export.aoti import export_aoti

        model = build(component)
        bucket = V2A_BUCKET if component == "unet" else BUCKET
        export_aoti(CONTRACTS[model_name], model, [bucket], options["dtype"], folder, preset=PRESETS[component],
                    weights="random:0", command=f"benchmarks/engines.py --variants {variant}",
                    engine=options["engine"], attention=options.get("attention", "triton"),
                    linear=options.get("linear"))  # fmt: skip
        del model
        torch.cuda.empty_cache()
    return folder, sum(EngineManifest.read(folder).options["export_seconds"].values())


def aoti_engine(variant: str, component: str, options: dict, engine_dir: Path) -> tuple[object, float, float]:
    """(engine, export seconds, load seconds): the variant's package, exported unless already there."""
    from k4serve.engines.aoti import AOTIEngine

    folder, export_s = exported(variant, component, options, engine_dir)
    engine, load_s = synced(lambda: _loaded(AOTIEngine(folder, "cuda")))
    return engine, export_s, load_s


def _loaded(engine, shapes=None):
    engine.load(shapes)  # None: every graph of an exported engine
    return engine


def runner_of(variant: str, engine_dir: Path, cache: dict):
    """(call, export s, load s) for a variant; `cache` keeps the eager module of a component between variants."""
    component, kind, options = VARIANTS[variant]
    if kind == "aoti":
        engine, export_s, load_s = aoti_engine(variant, component, options, engine_dir)
        if component == "vae":
            from k4serve.engines.vae_chunk import ChunkedDecoder

            chunks = ChunkedDecoder(engine)
            return (lambda z: torch.cat(list(chunks.decode_chunks(z)), dim=2)), export_s, load_s
        return engine, export_s, load_s
    if component not in cache:
        cache.clear()  # one full-size model on the GPU at a time
        torch.cuda.empty_cache()
        cache[component] = build(component)
    model = cache[component]
    if component == "unet":
        if kind == "eager":
            return model.unet, 0.0, 0.0  # the official path: the bf16 module, torch's SDPA choice
        from k4serve.engines.unet import FastUNet

        sample_shape = inputs_of("unet")[0].shape
        fast, load_s = synced(lambda: _loaded(FastUNet(model.unet), [tuple(sample_shape)]))
        return fast, 0.0, load_s
    if component == "dit" and kind == "fast":
        from k4serve.engines.torch import FastDiT

        fast, load_s = synced(lambda: FastDiT(model, **options))
        return fast, 0.0, load_s
    if component == "dit":

        def eager(x, text, time):
            with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return model(x, text, time)

        return eager, 0.0, 0.0
    if component == "vae":
        model.use_triton_norms(kind == "fast")
        return model.decode, 0.0, 0.0
    return (lambda ids: model.encoder(input_ids=ids).last_hidden_state), 0.0, 0.0


def measure(variants: list[str], engine_dir: Path, repeat: int) -> list[tuple]:
    """A row per variant: name, median s, x vs reference, rel. error, export s, load s, first call s (or the error)."""
    rows, references, cache = [], {}, {}
    ordered = []  # each component's eager reference first, then its other variants
    for component, reference in REFERENCE.items():
        chosen = [v for v in variants if VARIANTS[v][0] == component and v != reference]
        ordered += [reference, *chosen] if chosen or reference in variants else []
    for variant in ordered:
        component = VARIANTS[variant][0]
        try:
            call, export_s, load_s = runner_of(variant, engine_dir, cache)
            inputs = inputs_of(component)
            with torch.no_grad():
                run = lambda call=call, inputs=inputs: call(*inputs)  # noqa: E731
                out, first_s = synced(run)  # compile / tune / capture for JIT paths
                times = [synced(run)[1] for _ in range(repeat)]
            out = out[0] if isinstance(out, tuple) else out
            if variant == REFERENCE[component]:
                references[component] = (out.float(), statistics.median(times))
            ref_out, ref_s = references[component]
            error = ((out.float() - ref_out).norm() / ref_out.norm()).item()
            rows.append((variant, statistics.median(times), ref_s / statistics.median(times), error, export_s, load_s,
                         first_s))  # fmt: skip
        except Exception as failure:  # one variant's failure is a row; the others still run
            traceback.print_exc()
            rows.append((variant, f"failed: {type(failure).__name__}: {str(failure)[:120]}"))
        torch.cuda.empty_cache()
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_first_response(engine_args: list[str], repeat: int) -> tuple[float, float, float]:
    """(start -> ready s, first request s, median warm request s) of a fresh `k4serve serve --models t2v`."""
    from k4serve.client.client import T2VClient, VideoRequest

    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "k4serve.cli", "serve", "--models", "t2v", "--preset", "flash-512", "--gpus", "0",
               "--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port", str(ports[2]),
               *engine_args]  # fmt: skip
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        for line in server.stdout:
            print(line, end="")
            if line.startswith("k4serve ready"):
                break
        else:
            raise RuntimeError(f"server exited with {server.wait()} before it was ready")
        ready_s = time.perf_counter() - started
        request = VideoRequest(PROMPT, BUCKET.height, BUCKET.width, seconds=BUCKET.seconds, seed=0)
        with T2VClient(f"127.0.0.1:{ports[0]}", timeout_s=900) as client:
            _, first_s = synced_wall(lambda: client.generate(request))
            warm = [synced_wall(lambda: client.generate(request))[1] for _ in range(repeat)]
        return ready_s, first_s, statistics.median(warm)
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=60)


def synced_wall(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def first_response(engine_dir: Path, repeat: int) -> list[tuple]:
    """Rows for today's JIT path and for prebuilt AOTI engines (assembled from the variants' folders)."""
    serve_dir = engine_dir / "serve"
    serve_dir.mkdir(parents=True, exist_ok=True)
    for variant, model in (("dit-aoti-fast-bf16", "dit"), ("vae-aoti", "vae-decoder"), ("t5-aoti", "text-encoder")):
        link, target = engine_path(serve_dir, model, "aoti"), engine_path(engine_dir / variant, model, "aoti")
        if not link.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)
    rows = []
    servers = (
        (
            "fast (JIT: compile, tune, capture on request 1)",
            ["--engine", "fast", "--attention", "triton", "--linear", "bf16"],
        ),
        ("aoti (prebuilt: dit fast-bf16, vae, t5)", ["--engine", "aoti", "--engine-dir", str(serve_dir)]),
    )
    for name, args in servers:
        try:
            ready_s, first_s, warm_s = serve_first_response(args, repeat)
            rows.append((name, ready_s, first_s, warm_s, first_s / warm_s))
        except Exception as failure:
            traceback.print_exc()
            rows.append((name, f"failed: {type(failure).__name__}: {str(failure)[:120]}"))
    return rows


def fmt(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=[])
    parser.add_argument("--first-response", action="store_true", help="time `k4serve serve` JIT vs prebuilt AOTI")
    parser.add_argument("--engine-dir", type=Path, default=Path("/tmp/k4-engines"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--export-only", action="store_true", help="export the AOTI variants' packages, time nothing")
    args = parser.parse_args()
    if args.export_only:
        for variant in args.variants:
            component, kind, options = VARIANTS[variant]
            if kind == "aoti":
                print(f"{variant}: exported in {exported(variant, component, options, args.engine_dir)[1]:.1f} s")
        return
    tables = []
    if args.variants:
        rows = measure(args.variants, args.engine_dir, args.repeat)
        lines = ["| variant | s per call | x vs eager | rel. error vs eager | export s | load s | first call s |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r[0]} | " + (" | ".join(fmt(v) for v in r[1:]) if len(r) > 2 else f"{r[1]} |||||") + " |"
                  for r in rows]  # fmt: skip
        tables.append(("engines", "\n".join(lines), f"median of {args.repeat} after a first call; 12 s 384x672"))
    if args.first_response:
        rows = first_response(args.engine_dir, args.repeat)
        lines = [
            "| server | start -> ready s | first response s | warm response s | first / warm |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r[0]} | " + (" | ".join(fmt(v, 2) for v in r[1:]) if len(r) > 2 else f"{r[1]} ||||") + " |"
                  for r in rows]  # fmt: skip
        tables.append(("first response", "\n".join(lines), f"12 s 384x672 requests, warm: median of {args.repeat}"))
    for _, table, _ in tables:
        print(table)
    if not args.no_write:
        command = "python benchmarks/engines.py " + " ".join(sys.argv[1:])
        for what, table, method in tables:
            append_table(f"Exported engines ({what}), full size, random weights", command, method, table)


if __name__ == "__main__":
    main()
