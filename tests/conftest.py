"""Shared fixtures: one real tritonserver per test session, on loopback and free ports."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton's first import
# (torch._dynamo imports it while other test modules are collected): see k4serve/kernels/__init__.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# imageio-ffmpeg starts ffmpeg with preexec_fn (so a plain fork); once a gRPC client has threads in this process,
# gRPC's fork handlers can hang that child and decode_mp4 fails with "Could not load meta information" (seen
# here). Without preexec_fn Python spawns ffmpeg with vfork, and without fork support gRPC installs no handlers.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory):
    """A tritonserver on the repository's model_repository (tiny preset), stopped after the session.

    Its log is written to the session's temp directory and quoted when the server fails to start.
    """
    pytest.importorskip("pytriton", reason="tritonserver comes with the serve extra: pip install 'k4serve[serve]'")
    from serving_helpers import T2V_ENTRY_POINTS

    from k4serve.serving.launcher import ServerOptions, TritonServer

    log = tmp_path_factory.mktemp("tritonserver") / "server.log"
    # Pin the settings the tests assume, whatever K4SERVE_* the caller's environment holds.
    env = {"K4SERVE_PRESET": "tiny", "K4SERVE_WEIGHTS": "", "K4SERVE_ENGINE": "eager", "K4SERVE_DEVICE": ""}
    with TritonServer(ServerOptions(host="127.0.0.1", env=env, log=log, models=T2V_ENTRY_POINTS)) as server:
        yield server


@pytest.fixture(scope="module")
def single_thread():
    """torch on one thread for the module: the tiny models' ops are too small to gain from threads, and on a
    loaded 2-core machine OpenMP's barriers make a tiny UNet call ~10x slower (0.35 s instead of 0.03 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
