"""The CUDA kernels run on the CPU through tests/gpu/emulation, against float64
references (tests/gpu/kernel_checks.py), under AddressSanitizer: their logic
is tested on every run, GPU or not. And what the emulation itself can find."""

import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu"))

import harness as gpu_harness  # noqa: E402

ROOT = gpu_harness.ROOT
CHECKS = os.path.join(ROOT, "tests", "gpu", "kernel_checks.py")

# The emulation compiles the CUDA sources as C++ (an installed wheel's test
# run has no compiler).
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler on this machine"
)


def _assert_kernel_checks_pass(*args):
    """kernel_checks.py --emulated with `args`, in a child process: 0 cases fail."""
    run = subprocess.run(
        [sys.executable, CHECKS, "--emulated", *args], capture_output=True, text=True, timeout=900
    )
    report = run.stdout[-20000:] + run.stderr[-20000:]
    assert run.returncode == 0, report
    assert "0 of " in run.stdout.splitlines()[-1], report


@pytest.mark.slow
def test_gpu_kernels_emulated_under_sanitizers_match_references():
    args = []
    if gpu_harness.sanitizer_preload() is not None:
        args.append("--sanitize")
    seed = os.environ.get("TFXENT_TEST_SEED")
    if seed:
        args += ["--seed", seed]
    _assert_kernel_checks_pass(*args)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    source = os.path.join(ROOT, "tests", "gpu", "emulation", "self_test_kernels.cc")
    out = str(tmp_path_factory.mktemp("emulation") / "libself_test.so")
    lib = ctypes.CDLL(gpu_harness.build_emulated(out, source=source))
    return lib


def _error(lib):
    buffer = ctypes.create_string_buffer(4096)
    lib.tfxent_emulation_take_error(buffer, len(buffer))
    return buffer.value.decode()


def _block_sum(lib, synced, call):
    """The block sum of call number `call` (fibers ordered by seed `call`),
    and what it should be."""
    lib.tfxent_emulation_set_seed(ctypes.c_uint64(call))
    out = np.zeros(1, np.int64)
    ptr = out.ctypes.data_as(ctypes.c_void_p)
    assert lib.emulation_block_sum(int(synced), call, ptr) == 0
    return int(out[0]), 128 * 129 // 2 + 128 * 1000 * call


def test_emulation_runs_a_block_sum_with_its_barrier_right_in_any_order(kernels):
    for call in range(1, 20):
        got, expected = _block_sum(kernels, True, call)
        assert got == expected, call


def test_emulation_shows_a_missing_barrier_as_wrong_results_for_some_orders(kernels):
    results = [_block_sum(kernels, False, call) for call in range(1, 20)]
    assert any(got != expected for got, expected in results)


def test_emulation_reports_a_barrier_not_every_thread_reaches(kernels):
    out = np.zeros(1, np.int32)
    assert kernels.emulation_divergent_barrier(out.ctypes.data_as(ctypes.c_void_p)) != 0
    error = _error(kernels)
    assert "can never complete" in error and "__syncthreads" in error, error


def test_emulation_reports_a_shuffle_in_divergent_code(kernels):
    out = np.zeros(64, np.int32)
    assert kernels.emulation_divergent_shuffle(out.ctypes.data_as(ctypes.c_void_p)) != 0
    assert "warp shuffle" in _error(kernels)


def test_emulation_shuffles_read_the_lanes_cuda_defines(kernels):
    out = np.zeros((64, 3), np.int32)
    assert kernels.emulation_shuffle_lanes(out.ctypes.data_as(ctypes.c_void_p)) == 0, _error(
        kernels
    )
    t = np.arange(64)
    lane = t % 32
    down = np.where(lane + 1 < 32, t + 1, t)
    np.testing.assert_array_equal(out[:, 0], 100 * down)
    np.testing.assert_array_equal(out[:, 1], 100 * (t - lane + (lane ^ 5)))
    np.testing.assert_array_equal(out[:, 2], 100 * (t - lane + 7))
