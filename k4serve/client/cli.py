"""`k4serve request "prompt" -o out.mp4 [--stream]`: send a prompt to a running k4serve server.

The arguments are defined without tritonclient, so `k4serve --help` and `k4serve generate` work without the
`serve` extra; running a request imports the client.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from k4serve.cli_options import parse_size
from k4serve.client import DEFAULT_URL

if TYPE_CHECKING:
    from k4serve.client.client import T2VClient, Video, VideoRequest


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `k4serve request`."""
    parser.add_argument("prompt", help="text description of the video")
    parser.add_argument("-o", "--output", default="out.mp4", help="where to write the mp4")
    parser.add_argument("--url", default=DEFAULT_URL, help="the server's gRPC address, host:port")
    parser.add_argument("--seconds", type=int, default=12, help="duration, 0..12 (0: a single frame)")
    parser.add_argument("--size", type=parse_size, default=(384, 672), help="HEIGHTxWIDTH, e.g. 384x672")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (the server draws one if absent)")
    parser.add_argument("--request-id", default="", help="id that tags the request in the server's logs")
    parser.add_argument("--stream", action="store_true", help="show progress from t2v_stream while it runs")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")


def run_request(args: argparse.Namespace) -> int:
    """Send one request and write the mp4; 2 if the server refused it."""
    from tritonclient.utils import InferenceServerException

    from k4serve.client.client import T2VClient, VideoRequest

    height, width = args.size
    request = VideoRequest(args.prompt, height, width, args.seconds, args.seed, args.request_id)
    started = time.perf_counter()
    try:
        with T2VClient(args.url, args.timeout) as client:
            video = _stream_with_bars(client, request) if args.stream else client.generate(request)
    except InferenceServerException as error:
        print(f"error: {error.message()}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(video.mp4)
    elapsed = time.perf_counter() - started
    print(f"wrote {output} ({len(video.mp4)} bytes, seed {video.seed}, request {video.request_id}) in {elapsed:.1f} s")
    return 0


def _stream_with_bars(client: T2VClient, request: VideoRequest) -> Video:
    """Stream the request, one progress bar per stage; the stream's last item is the video."""
    from k4serve.client.client import Progress

    bars: dict[str, tqdm] = {}
    for item in client.stream(request):
        if isinstance(item, Progress):
            if item.stage not in bars:
                bars[item.stage] = tqdm(total=item.steps, desc=f"{item.stage:>12}", unit="step")
            bars[item.stage].update(item.step - bars[item.stage].n)
            if item.step == item.steps:
                bars[item.stage].close()
    return item
