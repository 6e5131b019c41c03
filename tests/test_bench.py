"""Smoke test of the CPU benchmark script: it runs, our losses agree with the
built-ins on its inputs, and it reports what docs/performance.md shows. And the
SASS reader (bench/sass_loads.py) on a small listing."""

import functools
import importlib.util
import os

import numpy as np
import pytest
import reference as ref


def _bench_module(name):
    """bench/NAME.py, imported (bench/ is not a package)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    module = _bench_module("bench_cpu")
    # A few quick runs instead of a second per measurement.
    module.time_ms = functools.partial(module.time_ms, min_runs=2, min_seconds=0.0)
    return module


def test_grid_covers_the_target_cases(bench):
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
    levels = bench.cpu_levels()
    for row in rows:
        assert row["ours_ms"] > 0 and row["builtin_ms"] > 0
        # A column per instruction-set level; the main one is the best's.
        assert list(row["ours_ms_by_isa"]) == levels == row["levels"]
        assert row["ours_ms"] == row["ours_ms_by_isa"][levels[0]]
        assert len(row["passes"]) == 3
        step = sorted(theirs / ours for ours, theirs, _ in row["passes"])[1]
        loss = sorted(bench.loss_speedup(o, t, p) for o, t, p in row["passes"])[1]
        assert row["step_speedup"] == pytest.approx(step)
        assert row["speedup"] == pytest.approx(loss)
    # The loss's time is the step's less the producer's.
    assert bench.loss_speedup(3.0, 9.0, 1.0) == 4.0
    assert bench.loss_speedup(1.0, 9.0, 1.0) == float("inf")
    assert bench.floor_bytes(fwd_bwd) == 2 * bench.floor_bytes(fwd) - (
        64 * 40 * 4 if labels == "dense" else 0
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_accuracy_rows(dtype):
    half_ulp = ref.HALF_ULP[dtype]
    accuracy = _bench_module("accuracy_16bit")
    for sparse, from_logits in accuracy.FORMS:
        worst = accuracy.worst(dtype, sparse, from_logits, rows=256, classes=32, seeds=1)
        relative, _, mean = worst["ours"]
        # One rounding of a float32 result, whose own error is ~1e-6.
        assert relative <= half_ulp + 2e-6 and mean <= half_ulp + 2e-6
        assert all(np.isfinite(worst["keras"]))


# Two kernels in nvdisasm's format: one loop that issues both of its 16-byte
# loads before reading the first, one that reads the first (R8) before the
# second load, with a scalar load and a line of the kernel header.
_LISTING = """\
.text._Z7batchedv:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.EF.128 R8, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.EF.128 R12, desc[UR4][R2.64+0x1000] ;
        /*0030*/                   FADD R20, R8, R12 ;
        /*0040*/              @!P0 BRA `(.L_x_1) ;
        /*0050*/                   EXIT ;
.text._Z6serialv:
.L_x_2:
	//## File "/src/tf_xent_ops/cc/kernels/xent_functor_gpu.cu.h", line 498
        /*0000*/                   LDG.E.EF.128 R8, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E R30, desc[UR4][R4.64] ;
        /*0020*/                   IMAD.U32 R20, R9.reuse, 0x10000, RZ ;
	//## File "/src/tf_xent_ops/cc/kernels/xent_functor.h", line 80
        /*0030*/                   LDG.E.EF.128 R12, desc[UR4][R2.64+0x1000] ;
        /*0040*/                   STG.E.EF.128 desc[UR4][R6.64], R12 ;
        /*0050*/                   BRA `(.L_x_2) ;
"""


def test_sass_loads_counts_the_loads_issued_before_the_first_is_used():
    batched, serial = _bench_module("sass_loads").loops(_LISTING)
    assert (batched.kernel, batched.wide_loads, batched.issued_before_use) == ("_Z7batchedv", 2, 2)
    assert (batched.scalar_loads, batched.lines) == (0, [])
    assert (serial.kernel, serial.wide_loads, serial.issued_before_use) == ("_Z6serialv", 2, 1)
    assert (serial.scalar_loads, serial.scalar_before_use, serial.lines) == (
        1,
        1,
        ["xent_functor_gpu.cu.h:498"],
    )
