"""The benchmark tool: its pure metrics against hand-computed values, its prompt sets, and a
real run against the stack and a synthetic worker."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from chatfabric.bench.metrics import RequestResult, distribution, percentile, summarize
from chatfabric.bench.prompts import sharegpt, synthetic
from conftest import CHATFABRIC, MODEL
from shared_data import SHAREGPT_FILE, shared_file

SHAREGPT = shared_file(SHAREGPT_FILE)


def test_percentile_hand_computed():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)
    assert percentile([], 50) is None
    assert distribution([0.001, 0.003]) == {"mean": 2.0, "p50": 2.0, "p90": pytest.approx(2.8),
                                             "p99": pytest.approx(2.98)}


def test_summary_hand_computed():
    a = RequestResult(start=0.0, ok=True, first_token=0.1, end=1.1, token_times=[0.1, 0.6, 1.1],
                      prompt_tokens=10, output_tokens=3, usage_reported=True)
    b = RequestResult(start=0.5, ok=True, first_token=0.9, end=1.9, token_times=[0.9, 1.9],
                      prompt_tokens=20, output_tokens=2, usage_reported=True)
    c = RequestResult(start=1.0, error="http_429")
    s = summarize([a, b, c], duration=2.0, slo_ttft_ms=200)
    assert s["completed"] == 2 and s["errors"] == {"http_429": 1}
    assert s["request_throughput"] == 1.0
    assert s["output_throughput"] == 2.5 and s["total_token_throughput"] == 17.5
    assert s["goodput"] == 0.5  # only a meets the 200 ms TTFT objective
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert a.tpot == pytest.approx(0.5) and b.tpot == pytest.approx(1.0)
    assert s["itl_ms"]["p50"] == pytest.approx(500.0)


def test_synthetic_prompts_are_deterministic():
    assert synthetic(3, 8, 16, seed=1) == synthetic(3, 8, 16, seed=1)
    assert synthetic(3, 8, 16, seed=1) != synthetic(3, 8, 16, seed=2)
    p = synthetic(1, 8, 16)[0]
    assert len(p.text.split(": ", 1)[1].split()) == 8 and p.output_len == 16
    with pytest.raises(ValueError):
        synthetic(0, 8, 16)


def test_sharegpt_prompts(tmp_path):
    items = sharegpt(SHAREGPT, 5, 32, seed=0)
    assert len(items) == 5 and all(p.text and p.output_len == 32 for p in items)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="no ShareGPT conversations"):
        sharegpt(bad, 1, 8)


def run_bench(base: str, model: str, tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [CHATFABRIC, "bench", "--base-url", f"{base}/v1", "--model", model, "--output", str(out),
         "--no-progress", *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "TTFT p50" in proc.stdout
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_bench_against_the_real_model_with_sharegpt(stack, tmp_path):
    rows = run_bench(stack, MODEL, tmp_path, "--dataset", "sharegpt", "--sharegpt-path", str(SHAREGPT),
                     "--concurrency", "1,3", "--num-requests", "6", "--warmup", "1", "--output-len", "8")
    assert [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["completed"] == 6 and r["errors"] == {}
        assert r["output_tokens"] == 6 * 8  # exact counts from usage (ignore_eos: every request runs to 8)
        assert r["usage_reported"] and r["prompt_tokens"] > 0
        assert 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"]


def test_bench_with_synthetic_worker_and_poisson_load(fabric, stack, tmp_path):
    fabric.worker("synthetic-model", "--backend", "synthetic", "--max-concurrency", "64")
    fabric.wait_workers(stack, "synthetic-model", 1)
    rows = run_bench(stack, "synthetic-model", tmp_path, "--endpoint", "completions", "--request-rate", "50",
                     "--num-requests", "40", "--output-len", "16")
    (row,) = rows
    assert row["request_rate"] == 50 and row["completed"] == 40
    assert row["output_tokens"] == 40 * 16


def test_bench_counts_errors_by_kind(stack, tmp_path):
    out = tmp_path / "e.jsonl"
    proc = subprocess.run(
        [CHATFABRIC, "bench", "--base-url", f"{stack}/v1", "--model", "no-such-model", "--num-requests", "3",
         "--warmup", "0", "--output", str(out), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert json.loads(out.read_text())["errors"] == {"http_404": 3}


def test_nats_hop_measures_each_kind_at_each_gap(tmp_path):
    out = tmp_path / "hop.jsonl"
    subprocess.run([str(Path(CHATFABRIC).parent / "python"), "-m", "chatfabric.bench.nats_hop", "--gaps-ms", "0,1",
                    "--count", "5", "--output", str(out)], check=True, capture_output=True, timeout=60)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["gap_ms"], r["n"]) for r in rows] == [
        ("core", 0.0, 5), ("jetstream", 0.0, 5), ("core", 1.0, 5), ("jetstream", 1.0, 5)]
    assert all(0 < r["p50_ms"] <= r["p90_ms"] for r in rows)
