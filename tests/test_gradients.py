"""Gradients: numerical checks, and the Keras built-ins' autodiff."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import tf_xent_ops as txo

# The CPU kernels of every instruction-set level this machine runs.
pytestmark = pytest.mark.usefixtures("each_cpu_isa")


def _max_error(f, *xs):
    # float64 inputs: a small step keeps the finite-difference error below 1e-8.
    theoretical, numerical = tf.test.compute_gradient(f, list(xs), delta=1e-6)
    return max(np.max(np.abs(t - n)) for t, n in zip(theoretical, numerical, strict=True))


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_dense_numerical_gradient_wrt_predictions_and_labels(rng, from_logits, label_smoothing):
    shape = (4, 6)
    p = ref.smooth_predictions(rng, shape, from_logits)
    # Labels that do not sum to one: the gradient is the true one, softmax *
    # sum(t) - t (TensorFlow's built-in assumes sum(t) == 1).
    y = rng.uniform(0.0, 1.0, size=shape)

    def f(labels, predictions):
        return txo.ops.dense_crossentropy(
            labels, predictions, from_logits=from_logits, label_smoothing=label_smoothing
        )

    assert _max_error(f, tf.constant(y), tf.constant(p)) < 1e-6


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("ignore_class", [None, 1])
def test_sparse_numerical_gradient(rng, from_logits, label_smoothing, ignore_class):
    shape = (6, 5)
    p = ref.smooth_predictions(rng, shape, from_logits)
    y = tf.constant(rng.integers(0, 5, size=6))

    def f(predictions):
        return txo.ops.sparse_crossentropy(
            y,
            predictions,
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            ignore_class=ignore_class,
        )

    assert _max_error(f, tf.constant(p)) < 1e-6


@pytest.mark.parametrize("axis", [0, 1])
def test_numerical_gradient_any_axis(rng, axis):
    p = tf.constant(ref.logits(rng, (3, 4, 5), "float64"))
    batch_shape = tuple(d for i, d in enumerate((3, 4, 5)) if i != axis)
    y = tf.constant(rng.integers(0, p.shape[axis], size=batch_shape))

    def f(predictions):
        return txo.ops.sparse_crossentropy(y, predictions, True, 0.1, axis=axis)

    assert _max_error(f, p) < 1e-6


def _grads(loss_obj, y, p, sw=None, wrt_labels=False):
    y, p = tf.constant(y), tf.constant(p)
    with tf.GradientTape() as tape:
        tape.watch(p)
        if wrt_labels:
            tape.watch(y)
        loss = loss_obj(y, p, sample_weight=sw)
    return tape.gradient(loss, [p, y] if wrt_labels else p)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
def test_categorical_gradients_match_keras(rng, from_logits, label_smoothing, reduction):
    shape = (12, 9)
    p = (
        ref.logits(rng, shape, "float32")
        if from_logits
        else ref.probabilities(rng, shape, "float32")
    )
    y = ref.soft_labels(rng, shape)
    sw = rng.uniform(0, 2, size=12).astype(np.float32)
    kwargs = dict(from_logits=from_logits, label_smoothing=label_smoothing, reduction=reduction)
    ours = _grads(txo.losses.CategoricalCrossentropy(**kwargs), y, p, sw, wrt_labels=True)
    theirs = _grads(keras.losses.CategoricalCrossentropy(**kwargs), y, p, sw, wrt_labels=True)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("ignore_class", [None, 2])
def test_sparse_gradients_match_keras(rng, from_logits, ignore_class):
    shape = (4, 5, 8)
    p = (
        ref.logits(rng, shape, "float32")
        if from_logits
        else ref.probabilities(rng, shape, "float32")
    )
    y = rng.integers(0, 8, size=shape[:-1])
    kwargs = dict(from_logits=from_logits, ignore_class=ignore_class)
    ours = _grads(txo.losses.SparseCategoricalCrossentropy(**kwargs), y, p)
    theirs = _grads(keras.losses.SparseCategoricalCrossentropy(**kwargs), y, p)
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6)
    if ignore_class is not None:
        assert np.all(ours.numpy()[y == ignore_class] == 0.0)


def test_probability_gradients_with_clipped_entries_match_keras(rng):
    p = ref.probabilities(rng, (8, 6), "float32")
    p[0, :3] = 0.0
    ref.off_the_upper_clip_bound(p[:1])  # the zeros may have crowded the row
    p[1] = [1.0, 0, 0, 0, 0, 0]
    p[2, 4] = 1e-9
    labels = rng.integers(0, 6, size=8)
    one_hot = ref.one_hot(labels, 6)
    for ours_cls, theirs_cls, y, reference in (
        (
            txo.losses.SparseCategoricalCrossentropy,
            keras.losses.SparseCategoricalCrossentropy,
            labels,
            ref.sparse_gradient(labels, p, False),
        ),
        (
            txo.losses.CategoricalCrossentropy,
            keras.losses.CategoricalCrossentropy,
            one_hot,
            ref.dense_gradients(one_hot, p, False)[0],
        ),
    ):
        ours = _grads(ours_cls(), y, p).numpy()
        theirs = _grads(theirs_cls(), y, p).numpy()
        # Clipped entries get no gradient on either side.
        np.testing.assert_array_equal(ours == 0, theirs == 0)
        # Row 0 may sum to far below one (its top entries are zeroed), and its
        # label's gradient is then the difference of two large terms, about
        # 1 / (row sum): each side rounds those, so the two agree to ulps of
        # the terms (the scale; the loss averages 8 rows), not of the result.
        bound = 2e-5 * np.abs(theirs) + 2e-6 + 2.0**-20 * reference.scale / 8
        np.testing.assert_array_less(np.abs(ours - theirs), bound)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sparse", [True, False])
def test_16_bit_gradients(rng, dtype, sparse):
    shape = (6, 40)
    p16 = tf.constant(ref.logits(rng, shape, dtype))
    labels = rng.integers(0, 40, size=6)
    y = labels if sparse else ref.one_hot(labels, 40)
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

    def grad(p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = tf.reduce_sum(fn(y, p, from_logits=True))
        return tape.gradient(loss, p)

    g16 = grad(p16)
    assert g16.dtype == p16.dtype
    g32 = grad(tf.cast(p16, tf.float32))
    # The gradient is formed in float32 and rounded once to the 16-bit type:
    # within half an ulp of the float32 gradient (plus float32's own rounding,
    # since the 16-bit and float32 kernels sum in other orders, which can put
    # the two sides of a rounding midpoint; and half of float16's subnormal
    # spacing). A gradient computed in the 16-bit type would be ulps off.
    half_ulp = ref.HALF_ULP[dtype]
    np.testing.assert_allclose(tf.cast(g16, tf.float32), g32, rtol=half_ulp + 1e-6, atol=2.0**-25)


def test_labels_gradient_is_pruned_when_not_needed(rng):
    p = tf.constant(ref.logits(rng, (4, 3), "float32"))
    y = tf.constant(ref.soft_labels(rng, (4, 3)))

    @tf.function
    def grad(y, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = tf.reduce_sum(txo.ops.dense_crossentropy(y, p, from_logits=True))
        return tape.gradient(loss, p)

    graph = grad.get_concrete_function(y, p).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "TfXent>DenseXentGrad" in op_types
    # The labels' gradient op, if created, has no consumer and is pruned at run time;
    # its value is never requested.
    np.testing.assert_allclose(grad(y, p), _grads_plain(y, p), rtol=2e-5, atol=2e-6)


def _grads_plain(y, p):
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(y, p))
    return tape.gradient(loss, p)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("num_classes", [10, 300])  # chunked rows, single rows
def test_gradient_written_in_place_equals_fresh_buffer(rng, sparse, from_logits, num_classes):
    # Inside a function the logits made there can be overwritten by the
    # gradient op; from a held tensor they cannot. Both must agree bitwise.
    shape = (700, num_classes)
    p = tf.constant(
        ref.logits(rng, shape, "float32")
        if from_logits
        else ref.probabilities(rng, shape, "float32")
    )
    labels = rng.integers(0, num_classes, size=shape[0])
    y = tf.constant(labels if sparse else ref.one_hot(labels, num_classes))
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

    @tf.function
    def made_inside(y, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            q = p * 1.0
            loss = tf.reduce_sum(fn(y, q, from_logits=from_logits))
        return tape.gradient(loss, q)

    @tf.function
    def held(y, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = tf.reduce_sum(fn(y, p, from_logits=from_logits))
        return tape.gradient(loss, p), p

    in_place = made_inside(y, p).numpy()
    fresh, p_after = held(y, p)
    np.testing.assert_array_equal(in_place, fresh.numpy())
    np.testing.assert_array_equal(p_after.numpy(), p.numpy())  # the input is untouched
