"""Every op gives the same bits on every call: the CPU functors wherever their
scratch lies (tests/cpu/functor_determinism.cc), the ops called many times on
the same inputs, into fresh output buffers, and each row wherever it lies in
the batch."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from subprocess_util import ROOT
from subprocess_util import python_env

import tf_xent_ops as txo
from tf_xent_ops import _load

SOURCE = os.path.join(ROOT, "tests", "cpu", "functor_determinism.cc")


def _build_functor_determinism(tmp_path):
    """The program, which loads a CPU level's library itself."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) on this machine")
    out = str(tmp_path / "functor_determinism")
    cmd = [cxx, "-std=c++17", "-O2", "-I" + ROOT]
    cmd += tf.sysconfig.get_compile_flags() + [SOURCE, "-ldl", "-lpthread", "-o", out]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def test_cpu_functors_give_the_same_bits_wherever_their_scratch_lies(tmp_path):
    program = _build_functor_determinism(tmp_path)
    for level in _load.available_cpu_isas():
        library = os.path.join(os.path.dirname(_load._LIBRARY_PATH), f"_xent_cpu_{level}.so")
        run = subprocess.run([program, library], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "mismatches: 0" in run.stdout, (
            level + ": " + run.stdout + run.stderr
        )


CALLS = 12


def _bits(fn, y, p):
    """The bytes of the loss and both gradients of one call."""
    p = tf.identity(p)  # a fresh buffer, as a layer's output would be
    with tf.GradientTape() as tape:
        tape.watch(p)
        if y.dtype.is_floating:
            tape.watch(y)
        loss = fn(y, p)
    grads = tape.gradient(loss, [p, y] if y.dtype.is_floating else [p])
    return b"".join(t.numpy().tobytes() for t in [loss, *grads])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.usefixtures("each_cpu_isa")  # at every instruction-set level
def test_every_op_gives_the_same_bits_on_every_call(rng, dtype, sparse, from_logits):
    results = {}
    options = dict(z_loss=1e-3, logit_soft_cap=5.0) if from_logits else {}
    shapes = [(28, 629), (300, 7), (5, 2051)]
    cases = []
    for shape in shapes:
        if from_logits:
            p = ref.logits(rng, shape, dtype)
        else:
            p = ref.probabilities(rng, shape, "float64")
            p[rng.random(shape) < 0.2] = 0.0
            p = ref.off_the_upper_clip_bound(p).astype(ref.NUMPY_DTYPES[dtype])
        labels = rng.integers(0, shape[1], size=shape[0])
        acc = np.float64 if dtype == "float64" else np.float32
        y = labels if sparse else ref.soft_labels(rng, shape).astype(acc)
        cases.append((tf.constant(y), tf.constant(p)))
    for variant in ({}, options):
        for i, (y, p) in enumerate(cases):
            fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

            def call(y, p, variant=variant, fn=fn):
                return fn(y, p, from_logits, 0.1, **variant)

            # Calls of each case between calls of the others: other buffers
            # allocated and freed in between.
            for _ in range(CALLS):
                for j, (y2, p2) in enumerate(cases):
                    results.setdefault((j, str(variant)), set()).add(_bits(call, y2, p2))
            assert len(results[(i, str(variant))]) == 1, (shapes[i], variant)


def _row_bits(fn, y, p):
    """Per row: the bytes of its loss and of its rows of both gradients."""
    with tf.GradientTape() as tape:
        tape.watch(p)
        if y.dtype.is_floating:
            tape.watch(y)
        loss = fn(y, p)
        total = tf.reduce_sum(loss)  # a cotangent of 1 for every row
    grads = tape.gradient(total, [p, y] if y.dtype.is_floating else [p])
    return [b"".join(t[i].numpy().tobytes() for t in [loss, *grads]) for i in range(len(loss))]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
def test_a_rows_bits_do_not_depend_on_where_it_lies_in_the_batch(
    rng, dtype, sparse, from_logits, each_cpu_isa
):
    # Rows of an odd number of classes start at every offset from SIMD
    # alignment; without the first row, each row starts C elements earlier.
    # Rows of fewer than 32 classes go in chunks of 256 rows: 300 rows make
    # a whole chunk and a part, 299 move every row's place in its chunk.
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy
    variants = [{}, {"label_smoothing": 0.1}]
    if from_logits:
        variants.append({"z_loss": 1e-3, "logit_soft_cap": 5.0})
    for num_classes in (7, 13, 31, 33, 1001):
        shape = (300 if num_classes < 32 else 24, num_classes)
        p = ref.predictions(rng, shape, from_logits, dtype)
        labels = rng.integers(0, num_classes, size=shape[0])
        acc = np.float64 if dtype == "float64" else np.float32
        y = labels if sparse else ref.soft_labels(rng, shape).astype(acc)
        for variant in variants:

            def call(y, p, variant=variant):
                return fn(y, p, from_logits=from_logits, **variant)

            batch = _row_bits(call, tf.constant(y), tf.constant(p))
            shifted = _row_bits(call, tf.constant(y[1:]), tf.constant(p[1:]))
            moved = [i for i in range(1, shape[0]) if batch[i] != shifted[i - 1]]
            assert not moved, (num_classes, variant, moved)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_gradients_do_not_depend_on_where_a_row_lies_in_the_batch(rng, dtype, each_cpu_isa):
    # A 16-bit gradient is computed in float32 and rounded: a row's first and
    # last elements computed on another path than the rest (scalar functions,
    # last bits apart) show only where the two float32 values round apart,
    # for about one such element in 2^13 (float16) or 2^16 (bfloat16). Enough
    # rows of a few classes to meet one on every run.
    shape = (40000, 51)
    p = tf.constant(ref.logits(rng, shape, dtype))
    labels = tf.constant(rng.integers(0, shape[1], size=shape[0]))

    def gradient(labels, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            total = tf.reduce_sum(txo.ops.sparse_crossentropy(labels, p, from_logits=True))
        return tape.gradient(total, p).numpy().view(np.uint16)

    moved = np.any(gradient(labels, p)[1:] != gradient(labels[1:], p[1:]), axis=1)
    assert not moved.any(), np.flatnonzero(moved) + 1


def test_bitwise_identical_in_a_fresh_process_with_other_thread_counts():
    # The same inputs in child processes with 1 and 3 intra-op threads.
    code = """
import sys, numpy as np, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
import tf_xent_ops as txo
rng = np.random.default_rng(0)
p = tf.constant(rng.standard_normal((301, 1537)).astype(np.float16))
y = tf.constant(rng.integers(0, 1537, 301))
with tf.GradientTape() as tape:
    tape.watch(p)
    loss = txo.ops.sparse_crossentropy(y, p, True, 0.1, z_loss=1e-3, logit_soft_cap=5.0)
sys.stdout.write((loss.numpy().tobytes() + tape.gradient(loss, p).numpy().tobytes()).hex())
"""
    outputs = set()
    for threads in (1, 3):
        run = subprocess.run(
            [sys.executable, "-c", code, str(threads)],
            env=python_env(),
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        outputs.add(run.stdout)
    assert len(outputs) == 1
