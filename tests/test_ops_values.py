"""Loss values of the fused ops against float64 NumPy references."""

import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import tf_xent_ops as txo

# The CPU kernels of every instruction-set level this machine runs.
pytestmark = pytest.mark.usefixtures("each_cpu_isa")

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _predictions(rng, shape, dtype, from_logits, axis=-1):
    if from_logits:
        return ref.logits(rng, shape, dtype)
    return ref.probabilities(rng, shape, dtype, axis=axis)


def _assert_close(actual, expected, dtype):
    rtol, atol = ref.tolerance(dtype)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (33, 129), (2, 50000), (0, 5)])
def test_dense_matches_reference(rng, dtype, from_logits, label_smoothing, shape):
    p = _predictions(rng, shape, dtype, from_logits)
    y = ref.soft_labels(rng, shape)
    loss = txo.ops.dense_crossentropy(
        y, p, from_logits=from_logits, label_smoothing=label_smoothing
    )
    assert loss.dtype == (tf.float64 if dtype == "float64" else tf.float32)
    assert loss.shape == shape[:1]
    _assert_close(loss, ref.dense(y, p, from_logits, label_smoothing), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("label_dtype", ["int32", "int64"])
@pytest.mark.parametrize("shape", [(1, 2), (9, 5), (17, 1000), (3, 50000), (0, 4)])
def test_sparse_matches_reference(rng, dtype, from_logits, label_smoothing, label_dtype, shape):
    p = _predictions(rng, shape, dtype, from_logits)
    y = rng.integers(0, shape[1], size=shape[:1]).astype(label_dtype)
    loss = txo.ops.sparse_crossentropy(
        y, p, from_logits=from_logits, label_smoothing=label_smoothing
    )
    _assert_close(loss, ref.sparse(y, p, from_logits, label_smoothing), dtype)


@pytest.mark.parametrize("axis", [-1, 0, 1, 2])
@pytest.mark.parametrize("from_logits", [True, False])
def test_any_axis(rng, axis, from_logits):
    shape = (4, 6, 5)
    p = _predictions(rng, shape, "float32", from_logits, axis=axis)
    dense_y = ref.soft_labels(rng, shape, axis=axis)
    dense_loss = txo.ops.dense_crossentropy(
        dense_y, p, from_logits=from_logits, label_smoothing=0.1, axis=axis
    )
    _assert_close(dense_loss, ref.dense(dense_y, p, from_logits, 0.1, axis=axis), "float32")

    batch_shape = tuple(d for i, d in enumerate(shape) if i != axis % 3)
    sparse_y = rng.integers(0, shape[axis], size=batch_shape)
    sparse_loss = txo.ops.sparse_crossentropy(
        sparse_y, p, from_logits=from_logits, label_smoothing=0.1, axis=axis
    )
    assert sparse_loss.shape == batch_shape
    _assert_close(sparse_loss, ref.sparse(sparse_y, p, from_logits, 0.1, axis=axis), "float32")


@pytest.mark.parametrize("from_logits", [True, False])
def test_sparse_ignore_class(rng, from_logits):
    shape = (40, 7)
    p = _predictions(rng, shape, "float32", from_logits)
    y = rng.integers(-1, shape[1], size=shape[:1])
    y[:3] = -1
    loss = txo.ops.sparse_crossentropy(y, p, from_logits=from_logits, ignore_class=-1)
    expected = ref.sparse(y, p, from_logits, ignore_class=-1)
    _assert_close(loss, expected, "float32")
    assert np.all(loss.numpy()[y == -1] == 0.0)


def test_ignore_class_equal_to_a_valid_class(rng):
    p = ref.logits(rng, (30, 4), "float32")
    y = rng.integers(0, 4, size=30)
    loss = txo.ops.sparse_crossentropy(y, p, from_logits=True, ignore_class=2)
    _assert_close(loss, ref.sparse(y, p, True, ignore_class=2), "float32")


def test_sparse_labels_with_trailing_unit_axis(rng):
    p = ref.logits(rng, (6, 3, 4), "float32")
    y = rng.integers(0, 4, size=(6, 3, 1))
    loss = txo.ops.sparse_crossentropy(y, p, from_logits=True)
    assert loss.shape == (6, 3)
    _assert_close(loss, ref.sparse(y[..., 0], p, True), "float32")


def test_sparse_equals_dense_one_hot_with_smoothing(rng):
    p = ref.logits(rng, (25, 11), "float32")
    y = rng.integers(0, 11, size=25)
    sparse = txo.ops.sparse_crossentropy(y, p, from_logits=True, label_smoothing=0.3)
    dense = txo.ops.dense_crossentropy(ref.one_hot(y, 11), p, from_logits=True, label_smoothing=0.3)
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-6)


def test_rank_one_predictions_give_a_scalar(rng):
    p = ref.logits(rng, (5,), "float32")
    y = ref.soft_labels(rng, (5,))
    loss = txo.ops.dense_crossentropy(y, p, from_logits=True)
    assert loss.shape == ()
    _assert_close(loss, ref.dense(y, p, True), "float32")


def test_extreme_logits_stay_finite(rng):
    p = ref.logits(rng, (8, 10), "float32") * 1e3
    p[0, :] = 1e4
    p[1, 3] = -1e4
    y = rng.integers(0, 10, size=8)
    loss = txo.ops.sparse_crossentropy(y, p, from_logits=True)
    assert np.all(np.isfinite(loss))
    _assert_close(loss, ref.sparse(y, p, True), "float32")


def test_epsilon_follows_keras_config(rng):
    import keras

    p = np.array([[1e-5, 0.5, 0.5 - 1e-5]], np.float32)
    y = np.array([[1.0, 0.0, 0.0]], np.float32)
    old = keras.config.epsilon()
    try:
        keras.config.set_epsilon(1e-3)
        loss = txo.ops.dense_crossentropy(y, p)
    finally:
        keras.config.set_epsilon(old)
    _assert_close(loss, ref.dense(y, p, False, epsilon=1e-3), "float32")


def test_graph_mode_with_unknown_shapes(rng):
    p = ref.logits(rng, (6, 4, 9), "float32")
    y = rng.integers(0, 9, size=(6, 4))

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int64),
            tf.TensorSpec([None, None, None], tf.float32),
        ]
    )
    def f(labels, predictions):
        return txo.ops.sparse_crossentropy(labels, predictions, from_logits=True)

    _assert_close(f(y, p), ref.sparse(y, p, True), "float32")
