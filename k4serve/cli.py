"""`k4serve` command line: the entry point that assembles the subcommands; each lives in its own module."""

from __future__ import annotations

import argparse
import sys

from k4serve.client.bench import add_bench_arguments
from k4serve.client.cli import add_request_arguments
from k4serve.export.cli import add_export_arguments
from k4serve.pipelines.cli import add_generate_arguments
from k4serve.pipelines.t2v import RequestError
from k4serve.pipelines.v2a_cli import add_v2a_arguments
from k4serve.serving.cli import add_serve_arguments


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (defining arguments imports no optional package)."""
    parser = argparse.ArgumentParser(prog="k4serve", description="Kandinsky 4.0 T2V Flash + V2A serving engine")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(commands.add_parser("generate", help="prompt -> mp4 (--audio: with sound), in process"))
    add_v2a_arguments(commands.add_parser("v2a", help="video -> the video with a generated soundtrack, in process"))
    add_serve_arguments(commands.add_parser("serve", help="run tritonserver on the model repository"))
    add_request_arguments(commands.add_parser("request", help="send a prompt (or --v2a: a video) to a running server"))
    add_export_arguments(commands.add_parser("export", help="build engines: onnx, tensorrt, aoti"))
    add_bench_arguments(commands.add_parser("bench", help="load-test a running server: throughput and latency"))
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch to the subcommand's module (imported only now: serve, request and bench need the serve extra)."""
    if args.command == "generate":
        from k4serve.pipelines.cli import run_generate

        return run_generate(args)
    if args.command == "v2a":
        from k4serve.pipelines.v2a_cli import run_v2a

        return run_v2a(args)
    if args.command == "serve":
        from k4serve.serving.cli import run_serve

        return run_serve(args)
    if args.command == "export":
        from k4serve.export.cli import run_export

        return run_export(args)
    if args.command == "bench":
        from k4serve.client.bench import run_bench

        return run_bench(args)
    from k4serve.client.cli import run_request

    return run_request(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (RequestError, OSError, ValueError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:  # only serve / request / bench / export import optional packages
        if args.command == "export":
            print(f"error: {error}: `k4serve export` needs the export extra: pip install 'k4serve[export]'",
                  file=sys.stderr)  # fmt: skip
            return 2
        print(
            f"error: {error}: `k4serve {args.command}` needs the serve extra: pip install 'k4serve[serve]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
