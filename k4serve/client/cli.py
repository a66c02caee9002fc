"""`k4serve request "prompt" -o out.mp4 [--audio] [--stream]` or `k4serve request --v2a in.mp4 -o out.mp4`: send a
prompt (t2v; with --audio, t2va: the video with sound) or a video file's bytes (v2a) to a running k4serve server.

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

from k4serve.cli_options import add_timeout_argument, parse_size
from k4serve.client import DEFAULT_URL
from k4serve.pipelines.t2v import RequestError
from k4serve.pipelines.v2a import TIMINGS, UPLOAD_LIMITS

if TYPE_CHECKING:
    from k4serve.client.client import EntryPointRequest, T2VClient, Video


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `k4serve request`."""
    parser.add_argument("prompt", nargs="?", default=None, help="text description of the video (not with --v2a)")
    parser.add_argument("-o", "--output", default="out.mp4", help="where to write the mp4")
    parser.add_argument("--audio", action="store_true", help="the video with a generated soundtrack (t2va)")
    parser.add_argument(
        "--v2a", metavar="VIDEO", type=Path, default=None,
        help="give this video file (mp4, webm, ...; its first whole seconds, at most 12) a soundtrack (v2a)",
    )  # fmt: skip
    parser.add_argument("--url", default=DEFAULT_URL, help="the server's gRPC address, host:port")
    parser.add_argument("--seconds", type=int, default=12, help="duration, 0..12 (0: a single frame)")
    parser.add_argument("--size", type=parse_size, default=(384, 672), help="HEIGHTxWIDTH, e.g. 384x672")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (the server draws one if absent)")
    parser.add_argument("--request-id", default="", help="id that tags the request in the server's logs")
    parser.add_argument("--stream", action="store_true", help="show progress (the _stream entry point) while it runs")
    add_timeout_argument(parser, "the request")
    sound = parser.add_argument_group("sound (with --audio or --v2a; absent: the server's defaults)")
    sound.add_argument("--audio-prompt", "--prompt", dest="audio_prompt", default=None, metavar="TEXT",
                       help="what the sound should be (default: the official V2A prompt)")  # fmt: skip
    sound.add_argument("--negative-prompt", default=None, metavar="TEXT", help="what it should not be")
    sound.add_argument("--timing", choices=TIMINGS, default=None,
                       help="pad (default): the video keeps its frame rate; retime: the official mapping")  # fmt: skip


def run_request(args: argparse.Namespace) -> int:
    """Send one request and write the mp4; 2 if the server refused it."""
    from tritonclient.utils import InferenceServerException

    from k4serve.client.client import T2VClient

    request = build_request(args)
    started = time.perf_counter()
    try:
        with T2VClient(args.url, args.timeout) as client:
            video = _stream_with_bars(client, request) if args.stream else client.generate(request)
    except InferenceServerException as error:
        if error.status() == "StatusCode.DEADLINE_EXCEEDED":
            print(f"error: no answer within {args.timeout:g} s; give it longer with --timeout (0: no limit)",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"error: {error.message()}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(video.mp4)
    elapsed = time.perf_counter() - started
    print(f"wrote {output} ({len(video.mp4)} bytes, seed {video.seed}, request {video.request_id}) in {elapsed:.1f} s")
    if video.notice:
        print(f"note: {video.notice}")
    return 0


def build_request(args: argparse.Namespace) -> EntryPointRequest:
    """The request the arguments describe: t2v, t2va (--audio) or v2a (--v2a, the file's bytes read here)."""
    from k4serve.client.client import AudioRequest, V2ARequest, VideoRequest

    sound = {"negative_prompt": args.negative_prompt, "timing": args.timing}
    if args.v2a is not None:
        if args.prompt is not None or args.audio:
            raise RequestError("--v2a takes a video, not a prompt or --audio: the sound's prompt is --prompt TEXT")
        size = args.v2a.stat().st_size  # before reading it: an oversized file is refused unread
        if size > UPLOAD_LIMITS.max_bytes:
            raise RequestError(f"{args.v2a} has {size} bytes; the server accepts at most {UPLOAD_LIMITS.max_bytes}")
        return V2ARequest(args.v2a.read_bytes(), args.audio_prompt, seed=args.seed, request_id=args.request_id, **sound)
    if args.prompt is None:
        raise RequestError("give a prompt (text -> video) or --v2a VIDEO (video -> video with sound)")
    height, width = args.size
    video = (args.prompt, height, width, args.seconds, args.seed, args.request_id)
    if args.audio:
        return AudioRequest(*video, audio_prompt=args.audio_prompt, **sound)
    if args.audio_prompt is not None or any(value is not None for value in sound.values()):
        raise RequestError("--audio-prompt, --negative-prompt and --timing are for a video with sound: add --audio")
    return VideoRequest(*video)


def _stream_with_bars(client: T2VClient, request: EntryPointRequest) -> Video:
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
