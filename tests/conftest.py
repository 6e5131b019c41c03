"""Shared fixtures: fresh random inputs every run, with the seed reported."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_xent_ops import _load  # noqa: E402

# Two logical CPUs for the tf.distribute tests: set before the runtime starts.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)


@pytest.fixture
def rng(request):
    """A generator seeded fresh each run; the seed is printed on failure.

    Set TFXENT_TEST_SEED to replay a failing run.
    """
    seed = int(os.environ.get("TFXENT_TEST_SEED", np.random.SeedSequence().entropy % 2**63))
    print(f"\n[{request.node.name}] TFXENT_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _ops_on_the_cpu(request):
    """Runs every test outside tests/test_gpu.py with its ops on the CPU.

    They specify the CPU kernels (bad labels raise there, before any row is
    read; results bitwise as the CPU computes them), and test_gpu.py compares
    the GPU kernels with those. TensorFlow would otherwise place them on a GPU
    wherever it sees one. Child processes get no GPU (subprocess_util).
    """
    if request.module.__name__ == "test_gpu":
        yield
        return
    with tf.device("/cpu:0"):
        yield


@pytest.fixture(params=_load.available_cpu_isas())
def each_cpu_isa(request):
    """Runs a test once at every instruction-set level of the CPU kernels
    that the build has and this CPU runs (switched in this process)."""
    before = _load.use_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _load.use_cpu_isa(before)
