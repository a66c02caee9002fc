"""Multi-GPU scaling on one host, 1, 2, 4, 8 GPUs: a table printed and appended to benchmarks/RESULTS.md.

What has run (RESULTS.md): the latency rows for 1 and 2 GPUs on two H200s (`table --gpus 1 2 --skip-server`);
the latency mode in its CPU smoke form (`--device-type cpu --preset tiny`, gloo instead of NCCL); the throughput
mode against a stand-in CPU Python-backend model, and once on two H200s, where the instances on GPU 1 failed (since
fixed, not yet re-run). No 4- or 8-GPU host has been lent.

The two modes of issue 5:
- latency (one video over N GPUs): `torchrun` starts N processes; the DiT runs sequence-parallel
  (k4serve.engines.sequence_parallel: Ulysses all-to-all over the heads, NCCL) at full size with random
  weights, bf16 autocast as the eager pipeline, 12 s at 384x672 by default. Measured: one DiT step (median),
  its relative error against the unsplit DiT on rank 0's GPU, and end to end text -> uint8 frames (T5 and
  the VAE on rank 0's GPU; the mp4 encode is not included).
- throughput (N requests on N GPUs): a Triton server that sees N GPUs (CUDA_VISIBLE_DEVICES) starts one
  instance per GPU (instance_group KIND_GPU); `--concurrency-per-gpu` gRPC clients per GPU keep it busy
  for `--videos-per-gpu` videos per GPU: videos per minute.

Usage:
  python benchmarks/scaling.py table --gpus 1 2 4 8           # both modes for each N -> RESULTS.md
  python benchmarks/scaling.py table --gpus 1 2 4 8 --skip-server
  torchrun --standalone --nproc-per-node 4 benchmarks/scaling.py latency --json row.json
  python benchmarks/scaling.py throughput --gpus 4 --server-cmd "k4serve serve"
On a GPU host whose image lacks the serving wheels and the network: `bash scripts/gpu_bundle.sh` here, carry
`.whl`, and `source .whl/gpu_serve.sh` there first; then `--server-cmd "python -m k4serve.cli serve ..."`.
The server's request inputs are matched by name (case-insensitive) to the JSON in `--request`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from k4serve.cli_options import parse_size

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PROMPT = "A red fox runs through fresh snow in a pine forest at sunrise, cinematic"
DEFAULT_REQUEST = {"prompt": PROMPT, "height": 384, "width": 672, "seconds": 12, "seed": 0}


# ---- latency mode: one torchrun process per GPU ----


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup`; a run ends when the slowest rank is done."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_latency(args: argparse.Namespace) -> dict:
    """This rank's part of one latency row; rank 0 returns the row (others an empty dict)."""
    from k4serve.engines.sequence_parallel import SequenceParallelDiT
    from k4serve.pipelines.t2v import PipelineSettings, T2VPipeline, latent_shape

    cuda = args.device_type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    pipeline = T2VPipeline.from_settings(PipelineSettings(preset=args.preset, device=str(device), seed=0))
    parallel = SequenceParallelDiT(pipeline.dit)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)  # as the eager pipeline

    def denoise(x: torch.Tensor, text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast:
            return parallel(x, text, t)

    # Every rank draws the same seeded noise, so the sampler's loop runs in lockstep over the collectives.
    pipeline.denoiser = denoise
    height, width = args.size
    dtype = next(pipeline.dit.parameters()).dtype
    shape = latent_shape(height, width, args.seconds)
    x = torch.randn(1, *shape, device=device, dtype=dtype)
    text = torch.randn(1, 224, pipeline.dit.config.in_text_dim, device=device, dtype=dtype)
    t = torch.tensor([999], device=device)
    for tensor in (x, text):  # rank 0's inputs everywhere: the contract of SequenceParallelDiT
        dist.broadcast(tensor, src=0)

    with torch.no_grad():
        # 1. one DiT step, sequence-parallel over the world
        step = timed(lambda: denoise(x, text, t), args.warmup, args.repeats, device)
        # 2. the same step unsplit on rank 0: how far the parallel result is from it
        out = denoise(x, text, t).float()
        error = float("nan")
        if rank == 0:
            with autocast:
                reference = pipeline.dit(x, text, t).float()
            error = ((out - reference).norm() / reference.norm()).item()
            del reference

        # 3. end to end: T5 (rank 0's embedding everywhere), 4 parallel DiT steps, VAE decode on rank 0
        def end_to_end() -> None:
            text_embed = pipeline.encode_prompt(PROMPT)
            dist.broadcast(text_embed, src=0)
            latents = pipeline.sample(text_embed, height, width, args.seconds, seed=0)
            if rank == 0:
                pipeline.decode(latents)

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        total = timed(end_to_end, 1, args.e2e_repeats, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    dist.destroy_process_group()
    if rank != 0:
        return {}
    return {
        "gpus": world_size,
        "dit_step_s": step,
        "rel_error": error,
        "end_to_end_s": total,
        "peak_gib": peak,
    }


# ---- throughput mode: a Triton server on N GPUs ----


def request_inputs(metadata: dict, values: dict) -> list:
    """Triton InferInputs for a model's metadata (as JSON), filled from `values` by input name."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import triton_to_np_dtype

    given = {name.lower(): value for name, value in values.items()}
    inputs = []
    for spec in metadata["inputs"]:
        name, datatype = spec["name"], spec["datatype"]
        if name.lower() not in given:
            wanted = ", ".join(f"{s['name']} ({s['datatype']})" for s in metadata["inputs"])
            raise SystemExit(f"--request lacks input {name!r}; the model {metadata['name']} takes: {wanted}")
        shape = [max(int(dim), 1) for dim in spec["shape"]]  # -1 (batch or variable) -> 1
        value = given[name.lower()]
        if datatype == "BYTES":
            array = np.full(shape, str(value).encode(), dtype=np.object_)
        else:
            array = np.full(shape, value, dtype=triton_to_np_dtype(datatype))
        infer_input = grpcclient.InferInput(name, shape, datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def wait_ready(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Block until the server at `url` reports ready; fail if it exits or takes longer than timeout_s."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before it was ready")
        try:
            if client.is_server_ready():
                return
        except Exception:  # not listening yet
            pass
        time.sleep(2.0)
    raise SystemExit(f"the server was not ready after {timeout_s:.0f} s: raise --ready-timeout or read its log")


def run_throughput(args: argparse.Namespace, gpus: int) -> float:
    """Videos per minute through a Triton server that sees the first `gpus` GPUs."""
    import tritonclient.grpc as grpcclient

    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)))
    server = subprocess.Popen(shlex.split(args.server_cmd), env=env, start_new_session=True)
    try:
        wait_ready(args.url, server, args.ready_timeout)
        metadata = grpcclient.InferenceServerClient(args.url).get_model_metadata(args.model, as_json=True)
        values = json.loads(args.request)
        local = threading.local()  # one gRPC client per worker thread

        def infer(_: int) -> None:
            if not hasattr(local, "client"):
                local.client = grpcclient.InferenceServerClient(args.url)
            local.client.infer(args.model, request_inputs(metadata, values), client_timeout=args.request_timeout)

        concurrency = args.concurrency_per_gpu * gpus
        videos = args.videos_per_gpu * gpus
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(infer, range(concurrency)))  # warm every instance
            start = time.perf_counter()
            list(pool.map(infer, range(videos)))
            elapsed = time.perf_counter() - start
        return 60.0 * videos / elapsed
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(server.pid, signal.SIGTERM)  # the server's own session: it and its backend stubs
        server.wait(timeout=180)


# ---- the table ----


def latency_flags(args: argparse.Namespace) -> list[str]:
    """The latency options of `args`, as flags for a torchrun child."""
    height, width = args.size
    flags = ["--preset", args.preset, "--size", f"{height}x{width}", "--seconds", str(args.seconds)]
    flags += [
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--e2e-repeats",
        str(args.e2e_repeats),
    ]
    return flags + ["--device-type", args.device_type]


def run_latency_row(args: argparse.Namespace, gpus: int) -> dict:
    """One latency row: `gpus` processes under torchrun."""
    with tempfile.TemporaryDirectory() as tmp:
        row_path = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
        command += [__file__, "latency", "--json", str(row_path), *latency_flags(args)]
        subprocess.run(command, check=True)
        return json.loads(row_path.read_text())


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "uncommitted"


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    """A markdown section: settings, then one row per GPU count, speed-ups against the 1-GPU row."""
    base = next((row for row in rows if row["gpus"] == 1), None)

    def cell(row: dict, key: str, fmt: str, speedup: bool = False, higher_is_better: bool = False) -> str:
        if key not in row:
            mode = "server" if key == "videos_per_min" else "latency"
            return "failed" if mode in row.get("failed", []) else "—"
        text = format(row[key], fmt)
        if speedup and base is not None and key in base:
            ratio = row[key] / base[key] if higher_is_better else base[key] / row[key]
            text += f" ({ratio:.2f}×)"
        return text

    cuda = args.device_type == "cuda"
    device, numerics = (torch.cuda.get_device_name(0), "bf16 autocast") if cuda else ("CPU smoke test", "fp32")
    height, width = args.size
    lines = [
        f"## Multi-GPU scaling — {datetime.date.today()}, commit {git_commit()}",
        "",
        f"`python benchmarks/scaling.py {shlex.join(sys.argv[1:])}`; {device}, torch {torch.__version__}; "
        f"preset {args.preset}, "
        f"random weights, {numerics}, {args.seconds} s at {height}x{width}, batch 1. Latency: DiT "
        f"sequence-parallel (Ulysses, {'NCCL' if cuda else 'gloo'}), SDPA attention; end to end = T5 + 4 DiT "
        "steps + VAE decode (no mp4 encode); rel. err = the parallel step against the unsplit DiT. "
        f"Throughput: Triton, one instance per GPU, {args.concurrency_per_gpu} requests in flight per GPU, "
        f"{args.videos_per_gpu} videos per GPU. "
        "Speed-up (×) against the 1-GPU row of this run.",
        "",
        "| GPUs | DiT step (s) | rel. err | end to end (s) | peak GiB (rank 0) | server videos/min |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['gpus']} | {cell(row, 'dit_step_s', '.3f', True)} | {cell(row, 'rel_error', '.1e')} "
            f"| {cell(row, 'end_to_end_s', '.2f', True)} | {cell(row, 'peak_gib', '.1f')} "
            f"| {cell(row, 'videos_per_min', '.2f', True, higher_is_better=True)} |"
        )
    return "\n".join(lines) + "\n"


def run_table(args: argparse.Namespace) -> int:
    """Every row; a mode that fails marks its cells and the run goes on (device time is scarce). Exit code."""
    rows = []
    for gpus in args.gpus:
        row: dict = {"gpus": gpus}
        for mode, run in (("latency", run_latency_row), ("server", run_throughput)):
            if getattr(args, f"skip_{mode}"):
                continue
            try:
                result = run(args, gpus)
            except (Exception, SystemExit) as error:  # SystemExit: wait_ready's and request_inputs' verdicts
                print(f"{gpus} GPU(s), {mode} failed: {error!r}", file=sys.stderr, flush=True)
                row["failed"] = [*row.get("failed", []), mode]
                continue
            row |= result if mode == "latency" else {"videos_per_min": result}
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = format_table(rows, args)
    print(table)
    if not args.no_write:
        with RESULTS.open("a") as results:
            results.write("\n" + table)
        print(f"appended to {RESULTS}")
    return 1 if any("failed" in row for row in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="both modes for each GPU count; append the table to RESULTS.md")
    latency = commands.add_parser("latency", help="one latency row (run under torchrun)")
    throughput = commands.add_parser("throughput", help="videos per minute through a server on N GPUs")
    for sub in (table, latency):
        sub.add_argument("--preset", default="flash-512", help="pipeline preset (tiny: a smoke test)")
        sub.add_argument("--size", type=parse_size, default=(384, 672), help="HEIGHTxWIDTH")
        sub.add_argument("--seconds", type=int, default=12)
        sub.add_argument("--warmup", type=int, default=2, help="untimed DiT steps first")
        sub.add_argument("--repeats", type=int, default=10, help="timed DiT steps (median reported)")
        sub.add_argument("--e2e-repeats", type=int, default=3, help="timed end-to-end runs (median)")
        sub.add_argument("--device-type", choices=("cuda", "cpu"), default="cuda", help="cpu: gloo smoke test")
    for sub in (table, throughput):
        sub.add_argument("--server-cmd", default="k4serve serve", help="starts Triton on the model repository")
        sub.add_argument("--url", default="localhost:8001", help="the server's gRPC address")
        sub.add_argument("--model", default="t2v", help="the model (ensemble) to request")
        sub.add_argument("--request", default=json.dumps(DEFAULT_REQUEST), help="JSON: input name -> value")
        sub.add_argument("--concurrency-per-gpu", type=int, default=2, help="requests in flight per GPU")
        sub.add_argument("--videos-per-gpu", type=int, default=8, help="timed videos per GPU")
        sub.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for model load")
        sub.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    table.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    table.add_argument("--skip-latency", action="store_true", help="throughput column only")
    table.add_argument("--skip-server", action="store_true", help="latency columns only")
    table.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    latency.add_argument("--json", type=Path, required=True, help="where rank 0 writes its row")
    throughput.add_argument("--gpus", type=int, required=True)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.command == "latency":
        row = run_latency(args)
        if row:
            args.json.write_text(json.dumps(row))
    elif args.command == "throughput":
        print(f"{args.gpus} GPU(s): {run_throughput(args, args.gpus):.2f} videos/min")
    else:
        return run_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
