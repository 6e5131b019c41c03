"""The CPU kernels' instruction-set levels: which one runs, TFXENT_CPU_ISA,
the choice on CPUs and builds this machine is not (tests/cpu/cpu_levels_test.cc),
and what the libraries' machine code holds."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from subprocess_util import ROOT
from subprocess_util import python_env
from subprocess_util import run_python

import tf_xent_ops as txo
from tf_xent_ops import _load

LEVELS = _load.available_cpu_isas()
PACKAGE_DIR = os.path.dirname(_load._LIBRARY_PATH)
PORTABLE = ["avx512bf16", "avx512", "avx2", "baseline"]

_REPORT = """
import numpy as np, tensorflow as tf, tf_xent_ops as txo
z = tf.constant(np.linspace(-3, 3, 4 * 1000, dtype=np.float32).reshape(4, 1000))
with tf.GradientTape() as tape:
    tape.watch(z)
    loss = txo.ops.sparse_crossentropy([1, 2, 3, 999], z, True, 0.1)
print(txo.cpu_isa(), float(tf.reduce_sum(loss)), float(tf.reduce_sum(tape.gradient(loss, z) ** 2)))
"""


def _report(**env):
    out = run_python(_REPORT, env=python_env(**env)).stdout.split()
    return out[-3], float(out[-2]), float(out[-1])


def test_default_is_the_best_level_this_build_and_cpu_have():
    assert _report()[0] == LEVELS[0]
    assert _report(TFXENT_CPU_ISA="auto")[0] == LEVELS[0]
    if "native" not in LEVELS:
        # The portable build has every level; the baseline runs anywhere.
        assert set(LEVELS) <= set(PORTABLE) and LEVELS[-1] == "baseline"


def test_the_environment_chooses_each_level_with_the_same_results():
    results = {level: _report(TFXENT_CPU_ISA=level) for level in LEVELS}
    for level, (used, loss, grad) in results.items():
        assert used == level
        np.testing.assert_allclose(loss, results[LEVELS[0]][1], rtol=1e-6)
        np.testing.assert_allclose(grad, results[LEVELS[0]][2], rtol=1e-5)


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "avx3",
            'TFXENT_CPU_ISA="avx3" is not a CPU level: use auto, avx512bf16, avx512, avx2 or '
            "baseline",
        ),
        ("native", "TFXENT_CPU_ISA=native, but this build of tf_xent_ops has no native kernels"),
    ],
)
def test_a_level_that_cannot_run_fails_the_import_naming_it(value, message):
    if value in LEVELS:
        pytest.skip(f"this build has {value} kernels")
    run = run_python("import tf_xent_ops", check=False, env=python_env(TFXENT_CPU_ISA=value))
    assert run.returncode != 0
    assert "ImportError" in run.stderr and message in run.stderr, run.stderr[-2000:]


def test_a_level_this_cpu_lacks_fails_the_import_naming_it():
    lacking = [level for level in PORTABLE if level not in LEVELS]
    if not lacking or not os.path.exists(os.path.join(PACKAGE_DIR, f"_xent_cpu_{lacking[0]}.so")):
        pytest.skip("this CPU runs every level this build has (cpu_levels_test covers it)")
    env = python_env(TFXENT_CPU_ISA=lacking[0])
    run = run_python("import tf_xent_ops", check=False, env=env)
    assert f"TFXENT_CPU_ISA={lacking[0]}, but this CPU lacks" in run.stderr, run.stderr[-2000:]


def test_use_cpu_isa_switches_in_process_and_refuses_what_cannot_run():
    before = txo.cpu_isa()
    try:
        for level in LEVELS:
            _load.use_cpu_isa(level)
            assert txo.cpu_isa() == level
        with pytest.raises(ValueError, match="is not a CPU level"):
            _load.use_cpu_isa("sse9")
        assert txo.cpu_isa() == LEVELS[-1]  # a refused switch changes nothing
    finally:
        _load.use_cpu_isa(before)


def test_the_choice_on_other_cpus_and_builds(tmp_path):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) on this machine")
    program = str(tmp_path / "cpu_levels_test")
    subprocess.run(
        [cxx, "-std=c++17", "-I" + ROOT, os.path.join(ROOT, "tests/cpu/cpu_levels_test.cc")]
        + ["-o", program],
        check=True,
    )
    portable = "avx512bf16 avx512 avx2 baseline"
    cases = {
        # requested, built, supported by the CPU: the level, or the error.
        ("auto", portable, portable): "avx512bf16",
        ("auto", portable, "avx512 avx2 baseline"): "avx512",
        ("auto", portable, "avx2 baseline"): "avx2",
        ("", portable, "baseline"): "baseline",
        ("auto", "native", "native baseline"): "native",
        ("avx512", portable, "avx512 avx2 baseline"): "avx512",
        ("baseline", portable, "avx512 avx2 baseline"): "baseline",
        ("avx512bf16", portable, "avx512 avx2 baseline"): (
            "TFXENT_CPU_ISA=avx512bf16, but this CPU lacks AVX-512 F, CD, BW, DQ, VL and BF16 "
            "(x86-64-v4 and AVX512-BF16) (levels it runs: avx512, avx2, baseline)"
        ),
        ("avx512", portable, "avx2 baseline"): (
            "TFXENT_CPU_ISA=avx512, but this CPU lacks AVX-512 F, CD, BW, DQ and VL "
            "(x86-64-v4) (levels it runs: avx2, baseline)"
        ),
        ("avx2", portable, "baseline"): (
            "TFXENT_CPU_ISA=avx2, but this CPU lacks AVX2, FMA, F16C, BMI1 and BMI2 "
            "(x86-64-v3) (levels it runs: baseline)"
        ),
        ("avx2", "native", "native baseline"): (
            "TFXENT_CPU_ISA=avx2, but this build of tf_xent_ops has no avx2 kernels "
            "(it has: native)"
        ),
        ("auto", "avx512", "avx2 baseline"): (
            "this build of tf_xent_ops has no CPU kernels this CPU runs (built: avx512)"
        ),
        ("AVX2", portable, portable): 'TFXENT_CPU_ISA="AVX2" is not a CPU level',
    }
    args = [arg for case in cases for arg in case]
    lines = subprocess.run([program, *args], check=True, capture_output=True, text=True).stdout
    got = {tuple(line.split("|")[:3]): line.split("|")[3] for line in lines.splitlines()}
    for case, expected in cases.items():
        assert got[case].startswith(expected), (case, got[case])


def _avx_instructions(library):
    """{function: number of AVX (VEX- or EVEX-encoded) instructions} in
    `library`'s code, whether any uses a zmm register, and their mnemonics."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump (binutils) on this machine")
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", library], capture_output=True, text=True, check=True
    ).stdout
    # Mnemonics that start with v without being AVX: virtualization and verr/verw.
    not_avx = re.compile(
        r"vm(call|launch|resume|xoff|xon|read|write|ptrld|ptrst|clear|func)$|ver[rw]$"
    )
    counts, function, zmm, mnemonics = {}, None, False, set()
    for line in listing.splitlines():
        header = re.match(r"[0-9a-f]+ <(.+)>:$", line)
        if header:
            function = header.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].strip():
            continue
        mnemonic = parts[1].split()[0]
        if mnemonic.startswith("v") and not not_avx.match(mnemonic):
            counts[function] = counts.get(function, 0) + 1
            zmm = zmm or "%zmm" in line
            mnemonics.add(mnemonic)
    return counts, zmm, mnemonics


def test_only_the_dispatched_libraries_hold_avx_instructions():
    # The op library (ops, OpKernels, dispatch, the GPU kernels' host code and
    # CUDA runtime) and the baseline level run on any x86-64 CPU.
    for name in ["_xent_ops.so", "_xent_cpu_baseline.so"]:
        counts, _, _ = _avx_instructions(os.path.join(PACKAGE_DIR, name))
        assert not counts, f"{name}: AVX instructions in " + ", ".join(sorted(counts)[:10])
    # The check can fail: the dispatched levels do hold them, and only the
    # avx512bf16 level rounds to bfloat16 with AVX512-BF16's instruction.
    for level, wants_zmm, wants_bf16 in [
        ("avx2", False, False),
        ("avx512", True, False),
        ("avx512bf16", True, True),
    ]:
        path = os.path.join(PACKAGE_DIR, f"_xent_cpu_{level}.so")
        if os.path.exists(path):
            counts, zmm, mnemonics = _avx_instructions(path)
            assert sum(counts.values()) > 1000 and zmm == wants_zmm, level
            assert ("vcvtneps2bf16" in mnemonics) == wants_bf16, level


def test_level_libraries_export_only_their_table():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) on this machine")
    for level in LEVELS:
        library = os.path.join(PACKAGE_DIR, f"_xent_cpu_{level}.so")
        out = subprocess.run(
            [nm, "-D", "--defined-only", "-C", library], capture_output=True, text=True, check=True
        ).stdout
        ours = [line for line in out.splitlines() if "tf_xent_ops" in line or "Eigen" in line]
        assert ours == [], (level, ours[:5])
        assert " TfXentCpuKernels" in out
