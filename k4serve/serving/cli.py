"""`k4serve serve`: run tritonserver on the model repository until Ctrl-C / SIGTERM, which drain it.

The first Ctrl-C / SIGTERM drains (readiness false, the requests in flight finish, then the server stops); a
second one stops at once. `--once PROMPT` starts the server, sends one request over gRPC, writes the mp4 and
stops: the whole path (server, ensemble, client) in one command.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from k4serve.cli_options import add_model_arguments
from k4serve.pipelines.v2a import PIPELINE_PRESETS as V2A_PRESETS
from k4serve.pipelines.v2a import V2A_ENGINES
from k4serve.serving.launcher import REPO_MODEL_REPOSITORY, ServerOptions, TritonServer
from k4serve.serving.settings import ENV_PREFIX, PATH_KEYS, SETTING_KEYS, V2A_SETTING_KEYS


def parse_gpus(text: str) -> list[int]:
    """'0,1' -> [0, 1]; 'none' -> [] (CPU only)."""
    if text.lower() == "none":
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("--gpus takes GPU indices like 0,1 or 'none' for CPU only") from None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `k4serve serve`."""
    add_model_arguments(parser)  # unset: each stage's config.pbtxt decides (tiny, eager)
    v2a = parser.add_argument_group("V2A models (v2a_encoder, v2a_sampler, vocoder); unset: their config.pbtxt's")
    v2a.add_argument("--v2a-preset", choices=sorted(V2A_PRESETS), default=None)
    v2a.add_argument("--v2a-weights", default=None, metavar="DIR", help="the ai-forever/kandinsky-4-v2a snapshot")
    v2a.add_argument("--v2a-encoder-weights", default=None, metavar="DIR",
                     help="the THUDM/cogvlm2-video-llama3-chat snapshot, if not inside the V2A weights")  # fmt: skip
    v2a.add_argument(
        "--v2a-engine",
        choices=V2A_ENGINES,
        default=None,
        help="fast: the UNet under CUDA graphs; aoti|tensorrt|onnxruntime: its engine in --engine-dir",
    )
    parser.add_argument("--gpus", type=parse_gpus, default=None, help="0,1: stages on these GPUs; none: CPU only")
    parser.add_argument("--model-repository", type=Path, default=REPO_MODEL_REPOSITORY)
    parser.add_argument(
        "--models", nargs="+", default=None, metavar="MODEL",
        help="load only these models (an entry point brings the stages it calls), e.g. `--models t2v_stream`; "
        "every entry point shares one instance of each stage per GPU; default: every model",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--grpc-port", type=int, default=None, help="default 8001 (with --once: a free port)")
    parser.add_argument("--http-port", type=int, default=None, help="default 8000 (with --once: a free port)")
    parser.add_argument("--metrics-port", type=int, default=None, help="default 8002 (with --once: a free port)")
    parser.add_argument(
        "--tritonserver", type=Path, default=None, metavar="BINARY",
        help="a Triton install's tritonserver (NVIDIA's container: /opt/tritonserver/bin/tritonserver); "
        "default: the one of the nvidia-pytriton wheel",
    )  # fmt: skip
    parser.add_argument(
        "--triton-option", action="append", default=[], metavar="OPTION", dest="triton_args",
        help="one more tritonserver option, e.g. --triton-option=--log-format=ISO8601 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds SIGTERM waits for requests")
    parser.add_argument("--log-file", type=Path, default=None, help="write tritonserver's log here, not to stdout")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level")
    parser.add_argument("--once", metavar="PROMPT", default=None, help="serve one request for PROMPT, then stop")
    parser.add_argument("-o", "--output", default="out.mp4", help="with --once: where to write the mp4")
    parser.add_argument("--seconds", type=int, default=2, help="with --once: duration, 0..12")


def stage_env(args: argparse.Namespace) -> dict[str, str]:
    """K4SERVE_* variables for the settings given on the command line (the rest come from config.pbtxt)."""
    env = {}
    for key in dict.fromkeys((*SETTING_KEYS, *V2A_SETTING_KEYS)):  # engine_dir is in both
        value = getattr(args, key, None)  # v2a_linear has no flag: config or K4SERVE_V2A_LINEAR
        if value is not None:
            env[ENV_PREFIX + key.upper()] = str(Path(value).resolve()) if key in PATH_KEYS else value
    return env


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted (or for one request with --once); 0 when it served and stopped cleanly."""

    def port(given: int | None, standard: int) -> int:
        return given if given is not None else 0 if args.once is not None else standard  # 0: a free port

    options = ServerOptions(
        model_repository=args.model_repository,
        host=args.host,
        grpc_port=port(args.grpc_port, 8001),
        http_port=port(args.http_port, 8000),
        metrics_port=port(args.metrics_port, 8002),
        gpus=args.gpus,
        # --once sends one t2v_stream request: without --models, load only that entry point and its stages
        models=args.models if args.models is not None or args.once is None else ["t2v_stream"],
        env=stage_env(args),
        log=args.log_file,
        log_verbose=args.log_verbose,
        tritonserver=args.tritonserver,
        drain_timeout_s=args.drain_timeout,
        triton_args=args.triton_args,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    server = TritonServer(options).start()
    received = []

    def on_signal(signum: int, frame) -> None:
        received.append(signum)
        if len(received) == 1:
            server.stop_requested.set()  # the main loop drains
        else:
            server.signal(signal.SIGKILL)  # asked twice: stop now

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    result = 0
    try:
        server.wait_ready()
        if not server.stop_requested.is_set():
            print(
                f"k4serve ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}",
                flush=True,
            )
            if args.once is not None:
                result = _serve_once(server, args)
            while args.once is None and not server.stop_requested.wait(0.5):
                if server.failed():
                    result = 1
                    break
    finally:
        code = server.stop()
        print(f"k4serve stopped (tritonserver exit code {code})", flush=True)
    return result or (0 if code == 0 else 1)


def _serve_once(server: TritonServer, args: argparse.Namespace) -> int:
    """`k4serve request --stream` against the server just started (without --stream if t2v_stream is not loaded)."""
    from k4serve.client.cli import add_request_arguments, run_request

    parser = argparse.ArgumentParser()
    add_request_arguments(parser)
    argv = [args.once, "-o", str(args.output), "--url", server.grpc_url, "--seconds", str(args.seconds)]
    if args.models is None or "t2v_stream" in args.models:
        argv.append("--stream")
    return run_request(parser.parse_args(argv))
