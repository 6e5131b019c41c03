"""Runs Python code in a fresh interpreter that sees the package and the tests."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_env(gpu=False, **extra):
    """The environment of a child process that imports the package and the
    tests' helpers; it sees no GPU unless `gpu` (the CPU kernels' tests run
    on the CPU wherever a GPU is present, as in conftest)."""
    # TFXENT_PACKAGE_DIR points child processes at another build (make sanitize).
    package_dir = os.environ.get("TFXENT_PACKAGE_DIR", os.path.join(ROOT, "python"))
    path = os.pathsep.join([package_dir, os.path.join(ROOT, "tests")])
    env = {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return {**env, **extra}


def run_python(code, *args, timeout=180, check=True, env=None):
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=env or python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )
