"""int64 indexing, determinism across runs and thread counts, NaN/Inf rows."""

import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from subprocess_util import run_python

import tf_xent_ops as txo


@pytest.mark.slow
def test_more_than_2_31_elements():
    # (2^28 + 16) rows of 8 bfloat16 logits: the last rows start past element
    # 2^31, where 32-bit offsets would wrap.
    num_rows, num_classes = 2**28 + 16, 8
    last = num_rows - 1
    special_logits = tf.constant([0, 0, 0, 0, 0, 0, 0, 5], tf.bfloat16)

    @tf.function
    def run():
        logits = tf.zeros([num_rows, num_classes], tf.bfloat16)
        logits = tf.tensor_scatter_nd_update(logits, [[last]], [special_logits])
        labels = tf.tensor_scatter_nd_update(
            tf.fill([num_rows], tf.constant(3, tf.int32)), [[last]], [7]
        )
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = txo.ops.sparse_crossentropy(labels, logits, from_logits=True)
        grad = tape.gradient(loss, logits)
        return loss[:2], loss[-2:], grad[:1], grad[-1:]

    first_loss, last_loss, first_grad, last_grad = (t.numpy() for t in run())
    np.testing.assert_allclose(first_loss, np.log(8.0), rtol=1e-6)
    expected_last = np.log(7.0 + np.exp(5.0)) - 5.0
    np.testing.assert_allclose(last_loss, [np.log(8.0), expected_last], rtol=1e-6)
    uniform = np.full(8, 1 / 8.0)
    uniform[3] -= 1.0
    np.testing.assert_allclose(first_grad[0].astype(np.float32), uniform, atol=1e-2)
    z = np.array([0, 0, 0, 0, 0, 0, 0, 5.0])
    softmax = np.exp(z) / np.exp(z).sum()
    softmax[7] -= 1.0
    np.testing.assert_allclose(last_grad[0].astype(np.float32), softmax, atol=1e-2)


DETERMINISM = """
import sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
import tf_xent_ops as txo
rng = np.random.default_rng(123)
p = tf.constant((rng.standard_normal((301, 1537)) * 5).astype(np.float32))
y = tf.constant(rng.integers(0, 1537, size=301))
soft = tf.constant(rng.uniform(size=(301, 1537)).astype(np.float32))
outputs = []
for sparse in (True, False):
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = (txo.ops.sparse_crossentropy(y, p, True, 0.1) if sparse
                else txo.ops.dense_crossentropy(soft, p, True, 0.1))
    outputs += [loss.numpy(), tape.gradient(loss, p).numpy()]
np.savez(sys.argv[2], *outputs)
"""


def test_bitwise_identical_across_thread_counts_and_runs(tmp_path):
    results = []
    for threads in (1, 2, 4, 2):
        path = tmp_path / f"out_{threads}_{len(results)}.npz"
        run_python(DETERMINISM, threads, path)
        results.append(np.load(path))
    for other in results[1:]:
        for key in results[0].files:
            np.testing.assert_array_equal(other[key], results[0][key])


@pytest.mark.parametrize("special", [np.nan, np.inf])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("num_classes", [10, 2000])  # chunked rows, single rows
def test_nan_and_inf_stay_in_their_row(rng, special, sparse, num_classes):
    p = ref.logits(rng, (6, num_classes), "float32")
    labels = rng.integers(0, num_classes, size=6)
    y = labels if sparse else ref.one_hot(labels, num_classes)
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

    def loss_and_grad(p):
        p = tf.constant(p)
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = fn(y, p, from_logits=True)
        return loss.numpy(), tape.gradient(loss, p).numpy()

    clean_loss, clean_grad = loss_and_grad(p)
    p[2, num_classes // 2] = special
    loss, grad = loss_and_grad(p)
    assert np.isnan(loss[2]) and np.all(np.isnan(grad[2]))
    others = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(loss[others], clean_loss[others])
    np.testing.assert_array_equal(grad[others], clean_grad[others])


def test_minus_inf_logit_without_target_mass_costs_nothing(rng):
    p = ref.logits(rng, (3, 3000), "float32")
    p[:, 2500] = -np.inf
    labels = np.array([0, 1, 2])
    for loss in (
        txo.ops.sparse_crossentropy(labels, p, from_logits=True),
        txo.ops.dense_crossentropy(ref.one_hot(labels, 3000), p, from_logits=True),
    ):
        np.testing.assert_allclose(loss, ref.sparse(labels, p, True), rtol=1e-5)
