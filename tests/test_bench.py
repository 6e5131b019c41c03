"""Smoke test of the CPU benchmark script: it runs, our losses agree with the
built-ins on its inputs, and it reports what the README table shows."""

import functools
import importlib.util
import os

import pytest

_BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "bench_cpu.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # A few quick runs instead of a second per measurement.
    module.time_ms = functools.partial(module.time_ms, min_runs=2, min_seconds=0.0)
    return module


def test_grid_covers_the_issue_cases(bench):
    cases = bench.case_grid(quick=False)
    assert {(k["n"], k["c"]) for k in cases} == set(bench.SHAPES)
    assert {k["dtype"] for k in cases} == {"float32", "bfloat16"}
    assert {k["direction"] for k in cases} == {"fwd", "fwd+bwd"}
    assert {(k["labels"], k["from_logits"], k["ls"]) for k in cases} >= {
        ("sparse", True, 0.0),
        ("sparse", True, 0.1),
        ("sparse", False, 0.0),
        ("dense", True, 0.1),
        ("dense", False, 0.1),
    }


@pytest.mark.parametrize("labels", ["sparse", "dense"])
@pytest.mark.parametrize("from_logits", [True, False])
def test_timing_rows(bench, labels, from_logits):
    case = dict(n=64, c=40, dtype="float32", labels=labels, from_logits=from_logits, ls=0.0)
    rows, bandwidth = bench.run_timing([dict(case, direction=d) for d in ("fwd", "fwd+bwd")])
    assert bandwidth > 0
    fwd, fwd_bwd = rows
    assert fwd["producer_ms"] == 0.0 and fwd_bwd["producer_ms"] > 0.0
    for row in rows:
        assert row["ours_ms"] > 0 and row["builtin_ms"] > 0
        assert len(row["passes"]) == 3
        step = sorted(theirs / ours for ours, theirs, _ in row["passes"])[1]
        loss = sorted((t - p) / (o - p) for o, t, p in row["passes"])[1]
        assert row["step_speedup"] == pytest.approx(step)
        assert row["speedup"] == pytest.approx(loss)
    assert bench.floor_bytes(fwd_bwd) == 2 * bench.floor_bytes(fwd) - (
        64 * 40 * 4 if labels == "dense" else 0
    )
