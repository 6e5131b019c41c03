"""The pip path: a wheel built from source installs and works in a fresh process."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import numpy as np
import tf_xent_ops
assert tf_xent_ops.__file__.startswith({target!r}), tf_xent_ops.__file__
loss = tf_xent_ops.losses.SparseCategoricalCrossentropy()([1, 2], [[.05, .95, 0], [.1, .8, .1]])
np.testing.assert_allclose(float(loss), 1.1769392, rtol=1e-6)
print("ok")
"""


@pytest.mark.slow
def test_pip_wheel_builds_installs_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q"]
        + ["-w", str(wheel_dir), ROOT],
        check=True,
    )
    (wheel,) = wheel_dir.glob("tf_xent_ops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tf_xent_ops/_xent_ops.so" in names and "tf_xent_ops/_build_info.py" in names
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target)]
        + [str(wheel)],
        check=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(target=str(target))],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip().endswith("ok")


def test_import_error_names_the_tensorflow_mismatch(tmp_path):
    # A copy of the package whose build info names another TensorFlow.
    package = tmp_path / "tf_xent_ops"
    package.mkdir()
    source = os.path.join(ROOT, "python", "tf_xent_ops")
    for name in os.listdir(source):
        if name.endswith(".py") and name != "_build_info.py":
            (package / name).write_text(open(os.path.join(source, name)).read())
    (package / "_build_info.py").write_text('TF_VERSION = "2.0.0"\n')
    out = subprocess.run(
        [sys.executable, "-c", "import tf_xent_ops"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "built against TensorFlow 2.0.0" in out.stderr
    assert "--no-build-isolation" in out.stderr
