"""The GPU kernels: registered where the build had nvcc, and equal to the CPU
kernels where TensorFlow sees a GPU (skipped otherwise)."""

import os
import re
import shutil
import subprocess

import keras
import numpy as np
import pytest
import reference as ref
import setup_script
import tensorflow as tf
import training_util
from subprocess_util import python_env
from subprocess_util import run_python
from tensorflow.python.framework import kernels

import tf_xent_ops as txo
from tf_xent_ops import _build_info

OPS = {
    "TfXent>SparseXent": True,
    "TfXent>SparseXentGrad": True,
    "TfXent>DenseXent": False,
    "TfXent>DenseXentGrad": False,
    "TfXent>DenseXentLabelsGrad": False,
}
DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
HAS_GPU = bool(tf.config.list_physical_devices("GPU"))
HAS_GPU_KERNELS = getattr(_build_info, "CUDA_VERSION", None) is not None
# Where TensorFlow sees a GPU but the build has no GPU kernels (no nvcc), eager
# soft placement would run the CPU kernels under tf.device("/gpu:0"): the
# comparisons would hold without testing anything.
requires_gpu_kernels = pytest.mark.skipif(
    not (HAS_GPU and HAS_GPU_KERNELS),
    reason="TensorFlow sees no GPU" if not HAS_GPU else "built without GPU kernels",
)


def test_both_builds_compile_gpu_kernels_when_nvcc_is_found():
    # setup.py and Bazel's cuda_configure find the toolkit through the same
    # function (setup.py's cuda_build_config), so either build has GPU kernels.
    if setup_script.load().find_nvcc() is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert _build_info.CUDA_VERSION is not None, _build_info.BUILT_BY


def _cuda_runtime_symbols(library, which):
    """The CUDA runtime API symbols (cuda*, __cuda*) that `library` leaves
    undefined or exports (`which`: "--undefined-only" or "--defined-only")."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) on this machine")
    out = subprocess.run([nm, "-D", which, library], capture_output=True, text=True, check=True)
    names = (line.split()[-1].split("@")[0] for line in out.stdout.splitlines() if line.strip())
    return sorted(n for n in names if re.match(r"_*cuda", n))


def test_gpu_kernels_call_the_cuda_runtime_of_their_own_toolkit():
    # TensorFlow's library exports a CUDA 12 runtime API (a stub over
    # libcudart.so.12). Linked after it, the static runtime would add nothing:
    # nvcc's host code (fat binary registration, launches) would call that
    # runtime whatever toolkit compiled it, and cudaGetLastError could report
    # TensorFlow's launches' errors as ours.
    if not HAS_GPU_KERNELS:
        pytest.skip("built without GPU kernels")
    library = os.path.join(os.path.dirname(txo.__file__), "_xent_ops.so")
    assert _cuda_runtime_symbols(library, "--undefined-only") == []
    # Hidden: it binds no one else's calls either.
    assert _cuda_runtime_symbols(library, "--defined-only") == []


@pytest.mark.parametrize("op", sorted(OPS))
def test_gpu_kernels_registered_for_every_dtype(op):
    if not HAS_GPU_KERNELS:
        pytest.skip("built without GPU kernels")
    registered = set()
    for kernel in kernels.get_registered_kernels_for_op(op).kernel:
        if kernel.device_type != "GPU":
            continue
        constraints = {c.name: tuple(c.allowed_values.list.type) for c in kernel.constraint}
        registered.add((constraints["T"], constraints.get("Tidx", ())))
    label_types = [(tf.int32,), (tf.int64,)] if OPS[op] else [()]
    for dtype in DTYPES:
        for tidx in label_types:
            key = ((dtype.as_datatype_enum,), tuple(t.as_datatype_enum for t in tidx))
            assert key in registered, (op, dtype.name, tidx)


def _run(device, fn, y, p):
    """fn's loss and gradient computed on `device` ("/cpu:0" or "/gpu:0")."""
    with tf.device(device):
        p = tf.identity(p)
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = fn(y, p)
        grad = tape.gradient(loss, p)
    # Soft placement would run an op with no kernel there elsewhere, silently.
    where = device.strip("/").upper()
    assert loss.device.endswith(where) and grad.device.endswith(where), (loss.device, grad.device)
    return loss.numpy(), grad.numpy()


@requires_gpu_kernels
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("num_classes", [2, 1000, 50000])
@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-3, "logit_soft_cap": 5.0}], ids=str)
def test_gpu_kernels_match_cpu_kernels(rng, dtype, sparse, from_logits, num_classes, options):
    if options and not from_logits:
        pytest.skip("z-loss and soft cap apply to logits only")
    shape = (37, num_classes)
    p = tf.constant(
        ref.logits(rng, shape, dtype) if from_logits else ref.probabilities(rng, shape, dtype)
    )
    labels = rng.integers(0, num_classes, size=37)
    labels[:3] = -1
    if sparse:
        # Both label widths the GPU kernels are registered for.
        y = tf.constant(labels.astype(np.int32 if num_classes == 1000 else np.int64))

        def fn(y, p):
            return txo.ops.sparse_crossentropy(y, p, from_logits, 0.1, ignore_class=-1, **options)

    else:
        # Soft rows and one-hot rows (whose logits backward reads no labels).
        dense = ref.soft_labels(rng, shape)
        dense[::2] = ref.one_hot(np.maximum(labels[::2], 0), num_classes)
        y = tf.constant(dense)

        def fn(y, p):
            return txo.ops.dense_crossentropy(y, p, from_logits, 0.1, **options)

    cpu = _run("/cpu:0", fn, y, p)
    gpu = _run("/gpu:0", fn, y, p)
    tol = 1e-10 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=tol, atol=tol)
    grad_tol = 1e-2 if dtype in ("float16", "bfloat16") else tol
    np.testing.assert_allclose(
        np.asarray(gpu[1], np.float64), np.asarray(cpu[1], np.float64), rtol=grad_tol, atol=grad_tol
    )
    again = _run("/gpu:0", fn, y, p)
    np.testing.assert_array_equal(again[0], gpu[0])  # no atomics: bitwise repeatable


@requires_gpu_kernels
@pytest.mark.parametrize("sparse", [True, False])
def test_gpu_hessian_vector_products_match_cpu(rng, sparse):
    # The GPU kernels' first-order gradients, then TensorFlow's GPU ops for
    # the composite's second order.
    p = tf.constant(ref.logits(rng, (33, 3000), "float64"))
    labels = rng.integers(0, 3000, size=33)
    y = tf.constant(labels if sparse else ref.soft_labels(rng, (33, 3000)).astype(np.float64))
    v = tf.constant(rng.standard_normal((33, 3000)))
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

    def hessian_v(device):
        with tf.device(device):
            result = training_util.hessian_vector_product(
                lambda z: fn(y, z, True, 0.1), tf.identity(p), v
            )
        assert result.device.endswith(device.strip("/").upper()), result.device
        return result.numpy()

    np.testing.assert_allclose(hessian_v("/gpu:0"), hessian_v("/cpu:0"), rtol=1e-9, atol=1e-14)


@requires_gpu_kernels
def test_gpu_out_of_range_label_gives_nan_row_and_zero_gradient(rng):
    p = tf.constant(ref.logits(rng, (3, 5), "float32"))
    loss, grad = _run(
        "/gpu:0", lambda y, p: txo.ops.sparse_crossentropy(y, p, True), tf.constant([0, 9, 1]), p
    )
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))
    assert np.all(grad[1] == 0)


@pytest.fixture
def without_tf32():
    """float32 matmuls in float32: TensorFloat-32's 10-bit products would
    turn the losses' last-bit differences into larger ones over the steps."""
    was = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(was)


@requires_gpu_kernels
@pytest.mark.parametrize("sparse", [True, False])
def test_gpu_fit_follows_the_builtin_trajectory(without_tf32, sparse):
    name = "SparseCategoricalCrossentropy" if sparse else "CategoricalCrossentropy"
    runs = {}
    for module in (txo, keras):
        runs[module.__name__] = training_util.fit_history(
            getattr(module.losses, name)(from_logits=True),
            getattr(module.metrics, name)(from_logits=True, name="xent"),
            sample_weight=True,
            # Under a strategy Keras leaves XLA off (alone on a GPU it turns it
            # on, and the losses would run their composite, not the kernels).
            strategy=tf.distribute.OneDeviceStrategy("/gpu:0"),
            one_hot=not sparse,
        )
    (ours, model), (theirs, _) = runs["tf_xent_ops"], runs["keras"]
    device = model.weights[0].value.device  # Keras's variable holds a tf.Variable
    assert device.endswith("GPU:0") and not model.jit_compile, (device, model.jit_compile)
    for key in ("loss", "xent"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4)


def _linear_step(device, args, options, scalar):
    """linear_crossentropy's loss, arg-max and gradients w.r.t. hidden,
    kernel and bias, computed on `device`."""
    hidden, kernel, bias, labels, weights = args
    with tf.device(device):
        inputs = [tf.identity(t) for t in (hidden, kernel, bias)]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            if scalar:
                loss, argmax = txo.ops.linear_crossentropy_sum(
                    inputs[0], inputs[1], labels, bias=inputs[2], sample_weight=weights,
                    denominator=7.0, return_argmax=True, chunk_size=24, **options
                )  # fmt: skip
                total = loss
            else:
                loss, argmax = txo.ops.linear_crossentropy(
                    inputs[0], inputs[1], labels, bias=inputs[2], return_argmax=True,
                    chunk_size=24, **options
                )  # fmt: skip
                total = tf.reduce_sum(loss * tf.cast(weights, loss.dtype))
        grads = tape.gradient(total, inputs)
    where = device.strip("/").upper()
    for t in [loss, argmax, *grads]:
        assert t.device.endswith(where), t.device
    return [t.numpy() for t in [loss, argmax, *grads]]


@requires_gpu_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("kernel_layout", ["dv", "vd"])
@pytest.mark.parametrize("scalar", [False, True], ids=["per_position", "scalar"])
@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-3, "logit_soft_cap": 5.0}], ids=str)
def test_gpu_linear_crossentropy_matches_cpu(
    without_tf32, rng, dtype, kernel_layout, scalar, options
):
    n, d, v = 70, 48, 3001  # 70 positions in chunks of 24: a short last chunk
    hidden = tf.constant(rng.standard_normal((n, d)), dtype)
    kernel_shape = (d, v) if kernel_layout == "dv" else (v, d)
    kernel = tf.constant(rng.standard_normal(kernel_shape) / np.sqrt(d), dtype)
    bias = tf.constant(rng.standard_normal(v) * 0.1, dtype)
    labels = rng.integers(0, v, size=n)
    labels[:5] = -1
    weights = tf.constant(rng.uniform(0.0, 2.0, size=n), tf.float32)
    options = dict(options, kernel_layout=kernel_layout, ignore_class=-1, label_smoothing=0.1)
    args = (hidden, kernel, bias, tf.constant(labels), weights)
    cpu = _linear_step("/cpu:0", args, options, scalar)
    gpu = _linear_step("/gpu:0", args, options, scalar)
    tol = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 2e-2}[dtype]
    names = ["loss", "argmax", "d_hidden", "d_kernel", "d_bias"]
    for name, a, b in zip(names, gpu, cpu, strict=True):
        if name == "argmax" and dtype != "float64":
            continue  # near-ties may resolve differently between two matmuls
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol, err_msg=name
        )
    again = _linear_step("/gpu:0", args, options, scalar)
    np.testing.assert_array_equal(again[0], gpu[0])


_DETERMINISM = """
import numpy as np, tensorflow as tf, tf_xent_ops as txo
tf.config.experimental.enable_op_determinism()
p = tf.constant(np.random.default_rng(0).standard_normal((64, 1000)), tf.float32)
y = tf.constant(np.arange(64) % 1000)
results = []
for _ in range(2):
    with tf.device("/gpu:0"):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = txo.ops.sparse_crossentropy(y, p, True, 0.1)
        grad = tape.gradient(loss, p)
    assert loss.device.endswith("GPU:0") and grad.device.endswith("GPU:0")
    results.append((loss.numpy().tobytes(), grad.numpy().tobytes()))
assert results[0] == results[1]
# TensorFlow's own kernel (tf.nn's wrapper would switch to log_softmax).
with tf.device("/gpu:0"):
    try:
        tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=p, labels=y)
        print("built-in kernel ran")
    except tf.errors.UnimplementedError:
        print("built-in kernel refused")
"""


@requires_gpu_kernels
def test_gpu_kernels_run_under_op_determinism():
    # Fixed-order reductions: the ops run, bitwise repeatably, where
    # TensorFlow's own GPU kernel raises UnimplementedError.
    out = run_python(_DETERMINISM, env=python_env(gpu=True)).stdout
    assert "built-in kernel refused" in out, out
