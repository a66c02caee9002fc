"""`k4serve bench`: load-test a running server, as perf_analyzer / genai-perf do for LLMs.

    k4serve bench --url HOST:8001 --model t2v_stream --concurrency 1,2,4 --requests 16 --seconds 12

For each concurrency c, c clients keep one request each in flight until `--requests` have been sent (after
`--warmup` requests that compile kernels and capture graphs on a fresh server). Per level: videos per minute
(finished videos over the level's wall time), latency percentiles (request sent -> mp4 received), for
`t2v_stream` the time to the first progress event, and failures by gRPC status code. With `--metrics-url` (the
server's Prometheus endpoint, e.g. http://HOST:8002/metrics) it also reads k4serve's stage-duration histograms
around each level: the seconds per video spent in the `--busy-stages` (the GPU stages), and each level's
throughput as a fraction of the bound those seconds set at the first level (60 / busy s per video, with one
request in flight the stages do not share the GPU): how much of the GPU the deployment keeps busy as requests
overlap. Everything, each request included, goes to a JSON file; latency and throughput against concurrency to a
PNG when matplotlib is installed (`pip install 'k4serve[bench]'`). The requests go through
`k4serve.client.client.AsyncT2VClient`; defining the arguments imports no optional package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from k4serve.cli_options import add_timeout_argument, parse_size
from k4serve.client import DEFAULT_URL

MODELS = ("t2v", "t2v_stream")
BUSY_STAGES = ("text_encoder", "dit_sampler", "vae_decoder")  # the GPU stages of t2v (the muxer encodes on the CPU)
STAGE_HISTOGRAM = "k4serve_stage_duration_seconds"
PERCENTILES = (50, 95, 99)
PROMPT = "a red fox running through fresh snow in a pine forest at sunrise"


def parse_concurrency(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("--concurrency takes positive request counts like 1,2,4")
    return levels


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `k4serve bench`."""
    parser.add_argument("--url", default=DEFAULT_URL, help="the server's gRPC address, host:port")
    parser.add_argument("--model", choices=MODELS, default="t2v", help="t2v_stream also measures progress events")
    parser.add_argument(
        "--concurrency", type=parse_concurrency, default=[1, 2, 4], help="requests in flight, e.g. 1,2,4"
    )
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=1, help="requests sent one by one before measuring")
    parser.add_argument("--seconds", type=int, default=12, help="video duration, 0..12")
    parser.add_argument("--size", type=parse_size, default=(384, 672), help="HEIGHTxWIDTH, e.g. 384x672")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--seed", type=int, default=None, help="seed of every request (the server draws if absent)")
    add_timeout_argument(parser, "each request (counted as an error)")
    parser.add_argument("--json", type=Path, default=Path("k4serve-bench.json"), help="where to write the results")
    parser.add_argument("--plot", type=Path, default=Path("k4serve-bench.png"), help="where to draw them")
    parser.add_argument("--metrics-url", default=None, help="the server's metrics, e.g. http://HOST:8002/metrics: "
                        "adds GPU-stage seconds per video and the fraction of the GPU bound reached")  # fmt: skip
    parser.add_argument("--busy-stages", type=lambda text: tuple(text.split(",")), default=BUSY_STAGES,
                        help=f"the stages that occupy the GPU (default {','.join(BUSY_STAGES)})")  # fmt: skip


@dataclass
class RequestResult:
    """One measured request: seconds from sending it (None where it failed or had no such event)."""

    concurrency: int
    started: float  # since the level started
    latency: float | None = None
    first_event: float | None = None
    error: str | None = None  # gRPC status code name (or the exception's type)


@dataclass
class LevelSummary:
    """One concurrency level."""

    concurrency: int
    requests: int
    succeeded: int
    wall_s: float
    videos_per_min: float
    latency_s: dict[str, float | None] = field(default_factory=dict)  # p50, p95, p99
    first_event_s: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)  # mean seconds per request in each stage (metrics)
    busy_s: float | None = None  # the busy stages' sum: GPU seconds per video (an upper bound under overlap)
    of_bound: float | None = None  # videos/min over 60 / the first level's busy_s


def percentiles(values: list[float]) -> dict[str, float | None]:
    """{'p50': ..., 'p95': ..., 'p99': ...} (linear interpolation; None without values)."""
    return {f"p{q}": float(np.percentile(values, q)) if values else None for q in PERCENTILES}


def error_code(error: Exception) -> str:
    """'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED', ... for a tritonclient error; the exception type otherwise."""
    status = getattr(error, "status", None)
    code = status() if callable(status) else None
    return str(code).removeprefix("StatusCode.") if code else type(error).__name__


def summarize(concurrency: int, results: list[RequestResult], wall_s: float) -> LevelSummary:
    """The level's throughput, percentiles and error counts."""
    latencies = [r.latency for r in results if r.latency is not None]
    first_events = [r.first_event for r in results if r.first_event is not None]
    return LevelSummary(
        concurrency=concurrency,
        requests=len(results),
        succeeded=len(latencies),
        wall_s=wall_s,
        videos_per_min=60.0 * len(latencies) / wall_s if wall_s > 0 else 0.0,
        latency_s=percentiles(latencies),
        first_event_s=percentiles(first_events),
        errors=dict(Counter(r.error for r in results if r.error is not None)),
    )


async def timed_request(client, request, stream: bool, concurrency: int, level_start: float) -> RequestResult:
    """Send one request and time it; a failure is recorded, not raised."""
    from k4serve.client.client import Progress

    started = time.perf_counter()
    result = RequestResult(concurrency, started - level_start)
    try:
        if stream:
            async for item in client.stream(request):
                if isinstance(item, Progress) and result.first_event is None:
                    result.first_event = time.perf_counter() - started
        else:
            await client.generate(request)
        result.latency = time.perf_counter() - started
    except Exception as error:  # every failure is data here: counted by its gRPC code
        result.error = error_code(error)
    return result


async def run_level(args: argparse.Namespace, concurrency: int, requests: int) -> tuple[LevelSummary, list]:
    """`requests` requests with `concurrency` of them in flight -> (summary, each RequestResult)."""
    from k4serve.client.client import AsyncT2VClient, VideoRequest

    height, width = args.size
    request = VideoRequest(args.prompt, height, width, args.seconds, args.seed)
    stream = args.model == "t2v_stream"
    pending = iter(range(requests))
    results: list[RequestResult] = []
    async with AsyncT2VClient(args.url, args.timeout) as client:
        level_start = time.perf_counter()

        async def worker() -> None:
            for _ in pending:  # shared: each worker takes the next request number until none are left
                results.append(await timed_request(client, request, stream, concurrency, level_start))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - level_start
    return summarize(concurrency, results, wall_s), results


def stage_totals(text: str) -> dict[str, tuple[float, float]]:
    """Prometheus text -> {stage: (seconds summed, requests counted)} of k4serve's stage histogram, all instances."""
    from k4serve.serving.triton_api import parse_metrics  # stdlib only: no serving dependency comes with it

    totals: dict[str, list[float]] = {}
    for (name, labels), value in parse_metrics(text).items():
        if name in (f"{STAGE_HISTOGRAM}_sum", f"{STAGE_HISTOGRAM}_count"):
            entry = totals.setdefault(dict(labels).get("stage", ""), [0.0, 0.0])
            entry[name.endswith("_count")] += value
    return {stage: (seconds, count) for stage, (seconds, count) in totals.items()}


def stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean seconds per request in each stage between two `stage_totals` readings."""
    means = {}
    for stage, (seconds, count) in after.items():
        seconds0, count0 = before.get(stage, (0.0, 0.0))
        if count > count0:
            means[stage] = (seconds - seconds0) / (count - count0)
    return means


def read_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def add_busy_bound(levels: list[LevelSummary], stage_s: list[dict[str, float]], busy_stages: tuple) -> None:
    """Fill each level's stage seconds, busy seconds and fraction of the first level's GPU bound."""
    for level, stages in zip(levels, stage_s, strict=True):
        level.stage_s = stages
        level.busy_s = sum(stages[s] for s in busy_stages if s in stages) if stages else None
    reference = levels[0].busy_s if levels else None
    for level in levels:
        if reference:
            level.of_bound = level.videos_per_min / (60.0 / reference)


def markdown_table(levels: list[LevelSummary], stream: bool) -> str:
    """The summary as a markdown table."""

    def seconds(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    header = "| concurrency | requests | ok | videos/min | p50 s | p95 s | p99 s |"
    header += " first event p50 s | first event p95 s |" if stream else ""
    busy = any(level.busy_s is not None for level in levels)
    header += " GPU stages s/video | x of GPU bound |" if busy else ""
    header += " errors |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for level in levels:
        row = f"| {level.concurrency} | {level.requests} | {level.succeeded} | {level.videos_per_min:.2f} | "
        row += " | ".join(seconds(level.latency_s[f"p{q}"]) for q in PERCENTILES) + " |"
        if stream:
            row += f" {seconds(level.first_event_s['p50'])} | {seconds(level.first_event_s['p95'])} |"
        if busy:
            row += f" {seconds(level.busy_s)} | {seconds(level.of_bound)} |"
        errors = ", ".join(f"{code} {n}" for code, n in sorted(level.errors.items())) or "none"
        lines.append(f"{row} {errors} |")
    return "\n".join(lines)


def plot(levels: list[LevelSummary], path: Path, title: str) -> bool:
    """Latency percentiles and throughput against concurrency as a PNG; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install 'k4serve[bench]'); the JSON has the results")
        return False
    concurrency = [level.concurrency for level in levels]
    figure, (latency_axes, throughput_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for q in PERCENTILES:
        values = [level.latency_s[f"p{q}"] for level in levels]
        latency_axes.plot(concurrency, [np.nan if v is None else v for v in values], marker="o", label=f"p{q}")
    latency_axes.set(xlabel="concurrency", ylabel="latency (s)", title="latency")
    latency_axes.legend()
    throughput_axes.plot(concurrency, [level.videos_per_min for level in levels], marker="o")
    throughput_axes.set(xlabel="concurrency", ylabel="videos / min", title="throughput")
    for axes in (latency_axes, throughput_axes):
        axes.set_xticks(concurrency)
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def run_bench(args: argparse.Namespace) -> int:
    """Measure every concurrency level, write the JSON (and the PNG); 1 if any request failed."""
    if args.requests < 1 or args.warmup < 0:
        raise ValueError("--requests must be at least 1 and --warmup at least 0")
    height, width = args.size
    warmup = asyncio.run(run_level(args, 1, args.warmup))[0] if args.warmup else None
    warmup_errors = warmup.errors if warmup else {}
    if warmup_errors:
        print(f"warm-up requests failed ({warmup_errors}); measuring anyway", file=sys.stderr)
    levels, requests, stage_s = [], [], []
    for concurrency in args.concurrency:
        before = stage_totals(read_metrics(args.metrics_url)) if args.metrics_url else {}
        summary, results = asyncio.run(run_level(args, concurrency, args.requests))
        stage_s.append(stage_means(before, stage_totals(read_metrics(args.metrics_url))) if args.metrics_url else {})
        levels.append(summary)
        requests += results
        print(f"concurrency {concurrency}: {summary.videos_per_min:.2f} videos/min, p50 {summary.latency_s['p50']} s, "
              f"errors {summary.errors or 'none'}", flush=True)  # fmt: skip
    add_busy_bound(levels, stage_s, args.busy_stages)
    stream = args.model == "t2v_stream"
    report = {
        "url": args.url,
        "model": args.model,
        "seconds": args.seconds,
        "size": f"{height}x{width}",
        "prompt": args.prompt,
        "seed": args.seed,
        "warmup": args.warmup,
        "warmup_errors": warmup_errors,
        "metrics_url": args.metrics_url,
        "busy_stages": list(args.busy_stages),
        "levels": [asdict(level) for level in levels],
        "requests": [asdict(result) for result in requests],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    title = f"{args.model}, {args.seconds} s {height}x{width}, {args.url}"
    drawn = plot(levels, args.plot, title)
    print(markdown_table(levels, stream))
    print(f"wrote {args.json}" + (f" and {args.plot}" if drawn else ""))
    return 1 if any(level.errors for level in levels) else 0
