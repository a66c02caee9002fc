"""`k4serve bench` against a real tritonserver (tiny preset, CPU) and its summary arithmetic."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from k4serve.cli import main
from k4serve.client.bench import (
    BUSY_STAGES,
    RequestResult,
    add_busy_bound,
    parse_concurrency,
    plot,
    stage_means,
    stage_totals,
    summarize,
)

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
    metrics = ("--metrics-url", triton_server.metrics_url)
    code, report = bench(triton_server.grpc_url, tmp_path, "--model", model, *levels, *metrics)
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
        # the server's stage histograms, read around the level: every t2v stage ran once per request
        stages = level["stage_s"]
        assert set(stages) >= {"text_encoder", "dit_sampler", "vae_decoder", "muxer"}
        assert level["busy_s"] == pytest.approx(stages["text_encoder"] + stages["dit_sampler"] + stages["vae_decoder"])
        assert 0 < level["busy_s"] < latencies[-1]
    first = report["levels"][0]  # one request in flight: its stages run one after another inside its latency
    assert first["of_bound"] == pytest.approx(first["videos_per_min"] * first["busy_s"] / 60) and first["of_bound"] < 1
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


METRICS_BEFORE = """# TYPE k4serve_stage_duration_seconds histogram
k4serve_stage_duration_seconds_count{model="dit_sampler",stage="dit_sampler"} 2
k4serve_stage_duration_seconds_sum{model="dit_sampler",stage="dit_sampler"} 9.0
k4serve_stage_duration_seconds_bucket{model="dit_sampler",stage="dit_sampler",le="10"} 2
nv_inference_count{model="dit_sampler",version="1"} 2
"""
METRICS_AFTER = """k4serve_stage_duration_seconds_count{model="dit_sampler",stage="dit_sampler"} 6
k4serve_stage_duration_seconds_sum{model="dit_sampler",stage="dit_sampler"} 27.0
k4serve_stage_duration_seconds_count{model="vae_decoder",stage="vae_decoder"} 4
k4serve_stage_duration_seconds_sum{model="vae_decoder",stage="vae_decoder"} 4.4
k4serve_stage_duration_seconds_count{model="muxer",stage="muxer"} 4
k4serve_stage_duration_seconds_sum{model="muxer",stage="muxer"} 2.0
"""


def test_gpu_stage_seconds_per_video_and_the_bound_they_set():
    means = stage_means(stage_totals(METRICS_BEFORE), stage_totals(METRICS_AFTER))
    assert means == pytest.approx({"dit_sampler": 4.5, "vae_decoder": 1.1, "muxer": 0.5})  # (27-9)/(6-2), ...
    levels = [summarize(c, [RequestResult(c, 0.0, latency=1.0)], wall_s=wall) for c, wall in ((1, 6.0), (2, 5.0))]
    add_busy_bound(levels, [means, {"dit_sampler": 5.0, "vae_decoder": 1.5}], BUSY_STAGES)
    assert [level.busy_s for level in levels] == pytest.approx([5.6, 6.5])  # the muxer is no GPU stage
    # the bound is the first level's: 60 / 5.6 s = 10.71 videos/min; 10 and 12 videos/min reach 0.93 and 1.12 of it
    assert [level.of_bound for level in levels] == pytest.approx([10 / (60 / 5.6), 12 / (60 / 5.6)])


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
