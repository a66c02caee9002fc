"""Load on a running k4serve server: per concurrency, how many requests completed or were refused, and latency.

    python benchmarks/load.py --url 127.0.0.1:8001 --model t2v --seconds 0 --size 384x672 \\
        --concurrency 1,4,16,64 --requests 16 --device "CPU 2 cores"

For each concurrency C, C clients send `max(--requests, C)` requests in all, each one as soon as its previous
answer came back (a closed loop, as perf_analyzer runs). A request is `completed` (an mp4 came back), `rejected`
(UNAVAILABLE: past the entry point's bound or draining; not retried) or an `error` (anything else, printed).
Latency percentiles are over the completed requests; for `t2v_stream` also the time to the first progress
event. The table is printed last and appended to benchmarks/RESULTS.md with the date, device and command.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np
from results import append_table
from tritonclient.utils import InferenceServerException

from k4serve.cli_options import parse_size
from k4serve.client.client import STREAM_MODEL, AsyncT2VClient, Video, VideoRequest

PROMPT = "a red fox running through fresh snow, golden hour"


@dataclass
class Outcome:
    """One request: how it ended, its latency and (streams) the time to its first event."""

    kind: str  # completed | rejected | error
    seconds: float
    first_event_s: float | None = None
    message: str = ""


async def one_request(client: AsyncT2VClient, args: argparse.Namespace, seed: int) -> Outcome:
    request = VideoRequest(PROMPT, *args.size, seconds=args.seconds, seed=seed)
    started = time.perf_counter()
    first = None
    try:
        if args.model == STREAM_MODEL:
            async for item in client.stream(request):
                first = time.perf_counter() - started if first is None else first
                if isinstance(item, Video):
                    break
        else:
            await client.generate(request)
    except InferenceServerException as error:
        # A streamed refusal carries no gRPC status, only the message of the entry point's refusal.
        refused = error.status() == "StatusCode.UNAVAILABLE" or "retry" in (error.message() or "")
        return Outcome("rejected" if refused else "error", time.perf_counter() - started, first, str(error))
    return Outcome("completed", time.perf_counter() - started, first)


async def run_level(args: argparse.Namespace, concurrency: int) -> tuple[list[Outcome], float]:
    """All outcomes at one concurrency and the wall time they took."""
    total = max(args.requests, concurrency)
    seeds = iter(range(total))
    outcomes: list[Outcome] = []

    async def worker(client: AsyncT2VClient) -> None:
        for seed in seeds:  # one shared iterator: each seed is sent once
            outcomes.append(await one_request(client, args, args.seed + seed))

    async with AsyncT2VClient(args.url, timeout_s=args.timeout) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return outcomes, time.perf_counter() - started


def percentile(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f}" if values else "-"


def table_row(concurrency: int, outcomes: list[Outcome], wall_s: float, stream: bool) -> str:
    done = [o.seconds for o in outcomes if o.kind == "completed"]
    counts = {kind: sum(o.kind == kind for o in outcomes) for kind in ("completed", "rejected", "error")}
    cells = [
        str(concurrency),
        str(len(outcomes)),
        *(str(counts[kind]) for kind in ("completed", "rejected", "error")),
        f"{60 * counts['completed'] / wall_s:.1f}",
        *(percentile(done, q) for q in (50, 95, 99)),
    ]
    if stream:
        cells.append(percentile([o.first_event_s for o in outcomes if o.first_event_s is not None], 50))
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    parser.add_argument("--model", default="t2v", choices=["t2v", STREAM_MODEL])
    parser.add_argument("--seconds", type=int, default=0, help="video length of every request (0: one frame)")
    parser.add_argument("--size", type=parse_size, default=(384, 672))
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (at least its concurrency)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first request (then +1 each)")
    parser.add_argument("--timeout", type=float, default=3600, help="client deadline per request, seconds")
    parser.add_argument("--device", required=True, help='what serves, for RESULTS.md: "CPU 2 cores", "NVIDIA H200"')
    parser.add_argument("--no-write", action="store_true", help="print the table without appending it")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    stream = args.model == STREAM_MODEL
    header = "| concurrency | requests | completed | rejected | errors | videos/min | p50 s | p95 s | p99 s |"
    header += " first event p50 s |" if stream else ""
    rows, failed = [], False
    for concurrency in levels:
        outcomes, wall_s = asyncio.run(run_level(args, concurrency))
        for outcome in outcomes:
            if outcome.kind == "error":
                failed = True
                print(f"concurrency {concurrency}: {outcome.message}", file=sys.stderr)
        rows.append(table_row(concurrency, outcomes, wall_s, stream))
        print(rows[-1], flush=True)
    separator = "|" + "---|" * header.count(" |")
    table = "\n".join([header, separator, *rows])
    print(table)
    if not args.no_write:
        height, width = args.size
        command = "python benchmarks/load.py " + shlex.join(
            [
                f"--url={args.url}",
                f"--model={args.model}",
                f"--seconds={args.seconds}",
                f"--size={height}x{width}",
                f"--concurrency={args.concurrency}",
                f"--requests={args.requests}",
                f"--device={args.device}",
            ]
        )
        title = f"Load, {args.model}, {args.seconds} s {height}x{width}"
        method = "closed loop of C clients; latency percentiles over completed requests; rejected = UNAVAILABLE"
        append_table(title, command, method, table, device=args.device)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
