"""`k4serve bench` against a real tritonserver (tiny preset, CPU) and its summary arithmetic."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from k4serve.cli import main
from k4serve.client.bench import RequestResult, parse_concurrency, plot, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(url: str, tmp_path, *extra: str) -> tuple[int, dict]:
    """Run `k4serve bench` on small images; (exit code, the JSON it wrote)."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--url", url, "--seconds", "0", "--json", str(out), "--plot", str(tmp_path / "bench.png")]
    code = main(argv + list(extra))
    return code, json.loads(out.read_text())


@pytest.mark.server
@pytest.mark.parametrize("model", ["t2v", "t2v_stream"])
def test_bench_measures_each_concurrency_through_the_server(triton_server, tmp_path, model):
    levels = ("--concurrency", "1,2", "--requests", "2", "--warmup", "0")  # warm-up: the refused-request test
    code, report = bench(triton_server.grpc_url, tmp_path, "--model", model, *levels)
    assert code == 0 and report["model"] == model and report["warmup_errors"] == {}
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        requests = [r for r in report["requests"] if r["concurrency"] == level["concurrency"]]
        latencies = sorted(r["latency"] for r in requests)
        assert level["requests"] == level["succeeded"] == len(requests) == 2 and level["errors"] == {}
        assert level["videos_per_min"] == pytest.approx(60 * 2 / level["wall_s"])
        assert latencies[0] <= level["latency_s"]["p50"] <= level["latency_s"]["p95"] <= latencies[-1]
        assert max(r["started"] + r["latency"] for r in requests) <= level["wall_s"]
        if model == "t2v_stream":  # the first event (text_encoder started) comes before the video
            assert all(0 < r["first_event"] < r["latency"] for r in requests)
        else:
            assert all(r["first_event"] is None for r in requests)
    if importlib.util.find_spec("matplotlib"):  # the `bench` extra (in `test`); without it no plot is drawn
        assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.server
def test_refused_requests_are_counted_by_grpc_code(triton_server, tmp_path):
    code, report = bench(triton_server.grpc_url, tmp_path, "--size", "100x100", "--concurrency", "2", "--requests", "2")
    assert code == 1
    assert report["warmup_errors"] == {"INVALID_ARGUMENT": 1}
    (level,) = report["levels"]
    assert (level["succeeded"], level["videos_per_min"], level["errors"]) == (0, 0.0, {"INVALID_ARGUMENT": 2})
    assert level["latency_s"] == {"p50": None, "p95": None, "p99": None}


def test_summary_counts_videos_over_the_wall_time_and_errors_by_code():
    results = [RequestResult(2, 0.0, latency=s) for s in (10.0, 20.0, 30.0)] + [
        RequestResult(2, 1.0, error="DEADLINE_EXCEEDED"),
        RequestResult(2, 2.0, error="UNAVAILABLE"),
        RequestResult(2, 3.0, error="UNAVAILABLE"),
    ]
    level = summarize(2, results, wall_s=45.0)
    assert (level.requests, level.succeeded, level.videos_per_min) == (6, 3, 4.0)
    assert level.latency_s == {"p50": 20.0, "p95": 29.0, "p99": 29.8}  # linear between order statistics
    assert level.first_event_s == {"p50": None, "p95": None, "p99": None}
    assert level.errors == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2}


def test_without_matplotlib_the_plot_is_skipped_with_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    level = summarize(1, [RequestResult(1, 0.0, latency=1.0)], wall_s=1.0)
    assert plot([level], tmp_path / "bench.png", "title") is False
    assert not (tmp_path / "bench.png").exists()
    assert "pip install 'k4serve[bench]'" in capsys.readouterr().out


def test_concurrency_levels_are_positive_counts():
    assert parse_concurrency("1,2,4") == [1, 2, 4]
    for bad in ("0,1", "one", ""):
        with pytest.raises(Exception, match="positive request counts"):
            parse_concurrency(bad)
