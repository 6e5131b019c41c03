"""Runs the property-based fuzzer in a child process: a crash fails the test."""

import os
import subprocess
import sys

import pytest
from subprocess_util import python_env

from tf_xent_ops import _load

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = int(os.environ.get("TFXENT_FUZZ_EXAMPLES", "5000"))


@pytest.mark.parametrize("level", _load.available_cpu_isas())
def test_fuzz_ops_in_a_child_process(level):
    """At every instruction-set level of the CPU kernels this machine runs."""
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "fuzz_ops.py"), "--examples", str(EXAMPLES)],
        env=dict(python_env(), TFXENT_CPU_ISA=level),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode >= 0, f"the fuzzer crashed with signal {-result.returncode}"
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert f"fuzz: {EXAMPLES} examples passed" in result.stdout
    assert f"CPU kernels: {level}" in result.stdout
