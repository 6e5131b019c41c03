"""The pip path: a wheel built from source installs and works in a fresh process."""

import os
import subprocess
import sys
import zipfile

import pytest
import setup_script
import tensorflow as tf

import tf_xent_ops as txo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import numpy as np
import tf_xent_ops
assert tf_xent_ops.cpu_isa() in ("avx512bf16", "avx512", "avx2", "baseline"), tf_xent_ops.cpu_isa()
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
    # Any Python 3; this platform; the TensorFlow series in the local label.
    series = ".".join(tf.__version__.split(".")[:2])
    assert wheel.name.startswith(f"tf_xent_ops-{txo.__version__}+tf{series}-py3-none-linux_")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ["_xent_ops.so", "_build_info.py", *setup_script.load().PORTABLE_CPU_LEVELS]:
        library = name if "." in name else f"_xent_cpu_{name}.so"
        assert f"tf_xent_ops/{library}" in names, library
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = zipfile.ZipFile(wheel).read(metadata).decode()
    assert f"Requires-Dist: tensorflow=={series}.*" in requires
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


def test_cpu_levels_to_build():
    cpu_level_flags = setup_script.load().cpu_level_flags
    portable = cpu_level_flags({}, "x86_64")
    assert list(portable) == ["baseline", "avx2", "avx512", "avx512bf16"]
    assert portable["avx512"][0] == "-march=x86-64-v4"
    assert "-mavx512bf16" in portable["avx512bf16"]
    assert list(cpu_level_flags({"TFXENT_CPU_LEVELS": "native"}, "x86_64")) == ["native"]
    assert cpu_level_flags({}, "aarch64") == {"baseline": []}
    with pytest.raises(ValueError, match="avx3"):
        cpu_level_flags({"TFXENT_CPU_LEVELS": "avx3"}, "x86_64")


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


def _executable(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_nvcc_lookup_order_cuda_home_path_then_a_toolkit_from_pypi(tmp_path):
    find_nvcc = setup_script.load().find_nvcc
    home = _executable(tmp_path / "home" / "bin" / "nvcc")
    on_path = _executable(tmp_path / "path" / "nvcc")
    site = tmp_path / "site"
    _executable(site / "nvidia" / "cu12" / "bin" / "nvcc")
    pypi = _executable(site / "nvidia" / "cu13" / "bin" / "nvcc")
    _executable(site / "nvidia" / "cudnn" / "bin" / "nvcc")  # not a toolkit
    empty = str(tmp_path / "empty")
    both = {"CUDA_HOME": str(tmp_path / "home"), "PATH": str(tmp_path / "path")}
    assert find_nvcc(both, [str(site)]) == home
    assert find_nvcc({**both, "CUDA_HOME": empty}, [str(site)]) == on_path
    assert find_nvcc({"CUDA_PATH": str(tmp_path / "home"), "PATH": empty}, []) == home
    assert find_nvcc({"PATH": empty}, [empty, str(site)]) == pypi
    assert find_nvcc({"PATH": empty}, [empty]) is None
    assert find_nvcc({**both, "TFXENT_CUDA": "0"}, [str(site)]) is None


@pytest.mark.parametrize("layout", ["lib64", "targets/x86_64-linux/lib", "lib"])
def test_static_cuda_runtime_found_in_each_toolkit_layout(tmp_path, layout):
    cudart_static_dir = setup_script.load().cudart_static_dir
    (tmp_path / layout).mkdir(parents=True)
    (tmp_path / layout / "libcudart_static.a").write_bytes(b"")
    assert cudart_static_dir(str(tmp_path)) == str(tmp_path / layout)


def test_toolkit_without_static_runtime_is_a_clear_error(tmp_path):
    (tmp_path / "lib64").mkdir()
    with pytest.raises(RuntimeError, match=r"no libcudart_static\.a .*TFXENT_CUDA=0"):
        setup_script.load().cudart_static_dir(str(tmp_path))


def test_nvcc_flags_build_each_arch_and_ptx_of_the_last():
    nvcc_flags = setup_script.load().nvcc_flags
    flags = nvcc_flags("/src", {"TFXENT_CUDA_ARCHS": "75;86;100"})
    assert "-I/src" in flags
    gencode = [f for f in flags if f.startswith("-gencode=")]
    assert gencode == [
        "-gencode=arch=compute_75,code=sm_75",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_100,code=compute_100",
    ]
    assert [f for f in nvcc_flags("/src", {}) if f.startswith("-gencode=")][-1].endswith(
        "code=compute_90"
    )


def test_cuda_build_config_is_none_without_a_toolkit(tmp_path):
    # What Bazel's cuda_configure reads: None builds the CPU kernels alone.
    cuda_build_config = setup_script.load().cuda_build_config
    assert cuda_build_config({"PATH": str(tmp_path)}, [str(tmp_path)]) is None
    assert cuda_build_config({"TFXENT_CUDA": "0"}, []) is None
