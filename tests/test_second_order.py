"""Gradients of the gradients: Hessian-vector products, mixed partials with
respect to dense labels, gradient penalties, third order. The fused ops give
first-order gradients; beyond that the losses must still differentiate as the
Keras built-ins do (TensorFlow's own kernels support second order)."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from training_util import hessian_vector_product

import tf_xent_ops as txo

# The CPU kernels of every instruction-set level this machine runs.
pytestmark = pytest.mark.usefixtures("each_cpu_isa")


def _second_order(loss_fn, labels, predictions, v, u=None):
    """d<v, g_z>/dz, and where `u` is given d<v, g_z>/dy and d<u, g_y>/dz, for
    g_z, g_y the gradients of sum(loss_fn(labels, predictions))."""
    z = tf.constant(predictions)
    y = tf.constant(labels)
    watched = [z, y] if y.dtype.is_floating else [z]
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(watched)
        with tf.GradientTape(persistent=True) as inner:
            inner.watch(watched)
            loss = tf.reduce_sum(loss_fn(y, z))
        g_z = inner.gradient(loss, z)
        along_v = tf.reduce_sum(tf.cast(g_z, tf.float64) * v)
        if u is not None:
            along_u = tf.reduce_sum(inner.gradient(loss, y) * u)
    hessian_v = outer.gradient(along_v, z).numpy()
    if u is None:
        return hessian_v
    return hessian_v, outer.gradient(along_v, y).numpy(), outer.gradient(along_u, z).numpy()


def _assert_close(actual, expected, rtol):
    """Element-wise within `rtol` of the size of the terms `expected` (a
    ref.Gradient) is the sum of: where they cancel, their rounding remains."""
    np.testing.assert_array_less(np.abs(actual - expected.value), rtol * expected.scale + 1e-300)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_dense_second_order_matches_float64_reference(rng, from_logits, label_smoothing):
    shape = (5, 7)
    p = ref.smooth_predictions(rng, shape, from_logits)
    # Labels that do not sum to one: the products are the true ones.
    y = rng.uniform(0.0, 1.0, size=shape)
    v, u = rng.standard_normal(shape), rng.standard_normal(shape)

    def loss_fn(labels, predictions):
        return txo.ops.dense_crossentropy(labels, predictions, from_logits, label_smoothing)

    ours = _second_order(loss_fn, y, p, v, u)
    expected = ref.dense_second_order(y, p, v, u, from_logits, label_smoothing)
    for name, actual, reference in zip(expected._fields, ours, expected, strict=True):
        assert actual.dtype == np.float64, name
        _assert_close(actual, reference, 1e-10)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("ignore_class", [None, 2])
def test_sparse_second_order_matches_float64_reference(
    rng, from_logits, label_smoothing, ignore_class
):
    shape = (6, 5)
    p = ref.smooth_predictions(rng, shape, from_logits)
    labels = rng.integers(0, 5, size=6)
    labels[:2] = 2  # ignored rows, when ignore_class is set
    v = rng.standard_normal(shape)

    def loss_fn(y, predictions):
        return txo.ops.sparse_crossentropy(
            y, predictions, from_logits, label_smoothing, ignore_class
        )

    ours = _second_order(loss_fn, labels, p, v)
    expected = ref.sparse_second_order(
        labels, p, v, from_logits, label_smoothing, ignore_class
    ).hessian_v
    _assert_close(ours, expected, 1e-10)
    if ignore_class is not None:
        assert np.all(ours[:2] == 0.0)


@pytest.mark.parametrize("sparse", [True, False])
def test_second_order_through_the_upstream_gradient(rng, sparse):
    """A loss of the losses (here their squares) makes the first-order
    gradient's upstream depend on the predictions too: d<v, g>/dz of
    sum(loss^2) is 2 <g_i, v_i> g_i + 2 loss_i H_i v_i, row by row."""
    shape = (4, 6)
    p = ref.logits(rng, shape, "float64")
    labels = rng.integers(0, 6, size=4)
    y = labels if sparse else ref.soft_labels(rng, shape).astype(np.float64)
    v = rng.standard_normal(shape)
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

    ours = _second_order(lambda y_, z: fn(y_, z, True) ** 2, y, p, v)
    if sparse:
        loss = ref.sparse(labels, p, True)[:, None]
        g = ref.sparse_gradient(labels, p, True)
        hessian_v = ref.sparse_second_order(labels, p, v, True).hessian_v
    else:
        loss = ref.dense(y, p, True)[:, None]
        g = ref.dense_gradients(y, p, True)[0]
        hessian_v = ref.dense_second_order(y, p, v, v, True).hessian_v
    along_v = np.sum(g.value * v, -1, keepdims=True)
    along_v_scale = np.sum(g.scale * np.abs(v), -1, keepdims=True)
    expected = ref.Gradient(
        2.0 * along_v * g.value + 2.0 * loss * hessian_v.value,
        2.0 * (along_v_scale * np.abs(g.value) + np.abs(along_v) * g.scale)
        + 2.0 * loss * hessian_v.scale,
    )
    _assert_close(ours, expected, 1e-10)


def _hessian_v(loss_obj, y, p, v, sample_weight=None):
    p = tf.constant(p)
    with tf.GradientTape() as outer:
        outer.watch(p)
        with tf.GradientTape() as inner:
            inner.watch(p)
            loss = loss_obj(y, p, sample_weight=sample_weight)
        along_v = tf.reduce_sum(inner.gradient(loss, p) * v)
    return outer.gradient(along_v, p)


def _probabilities_with_zeros(rng, shape):
    # Zeros are clipped for sure; other entries are far from the bounds (the
    # products grow as 1 / p^2, so a clip decided the other way by a
    # different summation order would not be a last-bit difference). Two
    # entries of each row are kept, so no normalized entry comes near 1 - eps.
    p = rng.uniform(0.05, 1.0, size=shape)
    zeroed = rng.random(shape) < 0.2
    kept = rng.integers(0, shape[-1], size=shape[:-1])[..., None]
    np.put_along_axis(zeroed, kept, False, -1)
    np.put_along_axis(zeroed, (kept + 1) % shape[-1], False, -1)
    p[zeroed] = 0.0
    return p.astype(np.float32)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", None])
def test_hessian_vector_products_match_keras(rng, sparse, from_logits, reduction):
    # The last axis: Keras 3.15's sparse forms take no other, and its
    # categorical ones smooth over the labels' last dimension (docs/semantics.md).
    shape = (3, 8, 4)
    p = ref.logits(rng, shape, "float32") if from_logits else _probabilities_with_zeros(rng, shape)
    labels = rng.integers(0, 4, size=shape[:-1])
    v = rng.standard_normal(shape).astype(np.float32)
    sample_weight = rng.uniform(0.0, 2.0, size=shape[:-1]).astype(np.float32)
    kwargs = dict(from_logits=from_logits, reduction=reduction)
    if sparse:
        ours = txo.losses.SparseCategoricalCrossentropy
        theirs = keras.losses.SparseCategoricalCrossentropy
        y = labels
        kwargs["ignore_class"] = int(labels.flat[0])
    else:
        ours, theirs = txo.losses.CategoricalCrossentropy, keras.losses.CategoricalCrossentropy
        y = ref.soft_labels(rng, shape)
        kwargs["label_smoothing"] = 0.1
    expected = _hessian_v(theirs(**kwargs), y, p, v, sample_weight).numpy()
    np.testing.assert_allclose(
        _hessian_v(ours(**kwargs), y, p, v, sample_weight),
        expected,
        rtol=1e-4,
        atol=1e-4 * np.max(np.abs(expected)),
    )


@pytest.mark.parametrize("sparse", [True, False])
def test_third_order_matches_keras(rng, sparse):
    p = tf.constant(ref.logits(rng, (4, 5), "float64"))
    labels = rng.integers(0, 5, size=4)
    y = labels
    if not sparse:
        # Summing to one in float64: TensorFlow's kernel, under Keras's dense
        # form, assumes it.
        y = ref.soft_labels(rng, (4, 5)).astype(np.float64)
        y /= y.sum(-1, keepdims=True)
    v, w = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    ours_fn = (
        txo.losses.sparse_categorical_crossentropy
        if sparse
        else txo.losses.categorical_crossentropy
    )
    keras_fn = (
        keras.losses.sparse_categorical_crossentropy
        if sparse
        else keras.losses.categorical_crossentropy
    )

    def third(fn):
        with tf.GradientTape() as t3:
            t3.watch(p)
            with tf.GradientTape() as t2:
                t2.watch(p)
                with tf.GradientTape() as t1:
                    t1.watch(p)
                    loss = tf.reduce_sum(fn(y, p, from_logits=True))
                along_v = tf.reduce_sum(t1.gradient(loss, p) * v)
            along_w = tf.reduce_sum(t2.gradient(along_v, p) * w)
        return t3.gradient(along_w, p).numpy()

    np.testing.assert_allclose(third(ours_fn), third(keras_fn), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sparse", [True, False])
def test_16_bit_hessian_vector_products(rng, dtype, sparse):
    shape = (6, 12)
    p16 = ref.logits(rng, shape, dtype, scale=2.0)
    labels = rng.integers(0, 12, size=6)
    v = rng.standard_normal(shape)
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy
    y = labels if sparse else ref.one_hot(labels, 12)
    ours = _second_order(lambda y_, z: fn(y_, z, True), y, p16, v)
    assert ours.dtype == p16.dtype  # the gradient of a 16-bit input is 16-bit
    expected = ref.sparse_second_order(labels, p16, v, True).hessian_v
    # s (v - <s, v>) formed in float32 from the rounded inputs, with v (an
    # upstream gradient of a 16-bit tensor) rounded to 16 bits, and the
    # product rounded once: half an ulp of each term and of the result, and
    # float16's subnormal spacing.
    half_ulp = ref.HALF_ULP[dtype]
    bound = 2 * half_ulp * expected.scale + half_ulp * np.abs(expected.value) + 2.0**-24
    np.testing.assert_array_less(np.abs(ours.astype(np.float64) - expected.value), bound)


@pytest.mark.parametrize("use_tf_gradients", [False, True])
def test_gradient_penalty_training_step_matches_keras(rng, use_tf_gradients):
    """Double backprop as in input-gradient regularization: the loss plus the
    squared norm of its gradient with respect to the inputs, differentiated
    with respect to the weights, in a tf.function (with tapes or with
    tf.gradients, which call the gradient functions in another way)."""
    x = tf.constant(rng.standard_normal((16, 10)), tf.float32)
    y = tf.constant(rng.integers(0, 4, size=16))
    layer = keras.layers.Dense(4)
    layer.build((None, 10))
    layer.kernel.assign(rng.standard_normal((10, 4)).astype(np.float32))

    def weight_gradients(loss_obj):
        @tf.function
        def step(x):
            if use_tf_gradients:
                loss = loss_obj(y, layer(x))
                (g_x,) = tf.gradients(loss, x)
                total = loss + tf.reduce_sum(g_x**2)
                return tf.gradients(total, layer.trainable_variables)
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    loss = loss_obj(y, layer(x))
                total = loss + tf.reduce_sum(inner.gradient(loss, x) ** 2)
            return outer.gradient(total, layer.trainable_variables)

        return [g.numpy() for g in step(x)]

    ours = weight_gradients(txo.losses.SparseCategoricalCrossentropy(from_logits=True))
    theirs = weight_gradients(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sparse", [True, False])
def test_second_order_under_xla_equals_the_op(rng, sparse):
    """jit_compile=True runs the composite throughout; without it the fused op
    runs forward and backward, and the composite only beyond."""
    p = tf.constant(ref.logits(rng, (5, 9), "float32"))
    labels = rng.integers(0, 9, size=5)
    y = tf.constant(labels if sparse else ref.soft_labels(rng, (5, 9)))
    v = tf.constant(rng.standard_normal((5, 9)).astype(np.float32))
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

    def hessian_v():
        return hessian_vector_product(lambda z: fn(y, z, True, 0.1), p, v)

    compiled = tf.function(hessian_v, jit_compile=True)()
    np.testing.assert_allclose(compiled, tf.function(hessian_v)(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["jacobian", "hessians"])
def test_full_hessian_matches_float64_reference(rng, method):
    """The whole Hessian, through GradientTape.jacobian (vectorized with pfor)
    or tf.hessians: block diagonal, diag(s) - s s^T for each row."""
    shape = (3, 6)
    p = ref.logits(rng, shape, "float64")
    labels = tf.constant(rng.integers(0, 6, size=3))

    def loss(z):
        return tf.reduce_sum(txo.ops.sparse_crossentropy(labels, z, True, 0.2))

    @tf.function
    def hessian(z):
        if method == "hessians":
            return tf.hessians(loss(z), z)[0]
        with tf.GradientTape() as outer:
            outer.watch(z)
            with tf.GradientTape() as inner:
                inner.watch(z)
                value = loss(z)
            gradient = inner.gradient(value, z)
        return outer.jacobian(gradient, z)

    softmax = np.exp(p - p.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    expected = np.zeros(shape + shape)
    for r, s in enumerate(softmax):
        expected[r, :, r, :] = np.diag(s) - np.outer(s, s)
    np.testing.assert_allclose(hessian(tf.constant(p)), expected, rtol=1e-10, atol=1e-12)
