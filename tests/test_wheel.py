"""The installed binary wheel (make wheel-test, make bazel-test run the suite
against it): it needs no compiler, and says what it was built for."""

import importlib.metadata
import os
import shutil

import pytest
import tensorflow as tf

import tf_xent_ops as txo
from tf_xent_ops import _load

WHEEL = os.environ.get("TFXENT_INSTALLED_WHEEL")
pytestmark = pytest.mark.skipif(WHEEL is None, reason="runs against an installed wheel")

TOOLCHAIN = ["cc", "c++", "gcc", "g++", "clang", "clang++", "nvcc", "ld", "as"]


def test_the_suite_runs_without_a_compiler_on_the_path():
    found = {tool: shutil.which(tool) for tool in TOOLCHAIN}
    assert not any(found.values()), found


def test_the_package_is_the_installed_wheel():
    assert txo.__file__.startswith(os.environ["TFXENT_PACKAGE_DIR"])
    assert os.path.basename(WHEEL).startswith(
        f"tf_xent_ops-{importlib.metadata.version('tf-xent-ops')}-"
    )


def test_the_wheel_names_the_tensorflow_it_was_built_for():
    series = ".".join(tf.__version__.split(".")[:2])
    version = importlib.metadata.version("tf-xent-ops")
    assert version.endswith(f"+tf{series}") or version.endswith(f"+tf{series}.native")
    requires = importlib.metadata.requires("tf-xent-ops")
    assert f"tensorflow=={series}.*" in requires


def test_every_level_this_cpu_runs_is_installed():
    assert _load.available_cpu_isas()[-1] == "baseline"
    assert txo.cpu_isa() == _load.available_cpu_isas()[0]
