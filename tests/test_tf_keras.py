"""The tf_keras (Keras 2) forms against tf_keras's built-ins: values,
gradients, reductions, masks, dtypes, ragged inputs, training, tf.distribute,
serialization and saving."""

import inspect
import json
import warnings

import keras
import ml_dtypes
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
import training_util
from subprocess_util import python_env
from subprocess_util import run_python

import tf_xent_ops as txo

tf_keras = pytest.importorskip("tf_keras")
txk = pytest.importorskip("tf_xent_ops.tf_keras")

Reduction = tf_keras.losses.Reduction
REDUCTIONS = [Reduction.AUTO, Reduction.SUM_OVER_BATCH_SIZE, Reduction.SUM, Reduction.NONE]
RTOL, ATOL = 2e-5, 2e-6
NUMPY_16_BIT = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _float64(x):
    if tf.is_tensor(x):
        x = tf.cast(x, tf.float64)  # NumPy cannot take 16-bit scalar tensors
    return np.asarray(x).astype(np.float64)


def _close(actual, expected, rtol=RTOL, atol=ATOL, err_msg=""):
    actual, expected = _float64(actual), _float64(expected)
    assert actual.shape == expected.shape, err_msg
    np.testing.assert_allclose(actual, expected, rtol, atol, err_msg=err_msg)


def _loss_and_gradient(loss_fn, labels, predictions, **kwargs):
    """The loss and its gradient with respect to the predictions, for
    distinct cotangents in (0, 1] per position (for unreduced losses)."""
    p = tf.Variable(predictions)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, p, **kwargs)
        size = tf.cast(tf.size(loss), loss.dtype)
        cotangent = tf.range(tf.constant(1, loss.dtype), 1 + size) / size
        total = tf.reduce_sum(loss * tf.reshape(cotangent, tf.shape(loss)))
    return loss, np.asarray(tf.cast(tape.gradient(total, p), tf.float64))


def _assert_same_loss_and_gradient(ours, theirs, labels, predictions, rtol=RTOL, **kwargs):
    loss, grad = _loss_and_gradient(ours, labels, predictions, **kwargs)
    their_loss, their_grad = _loss_and_gradient(theirs, labels, predictions, **kwargs)
    assert loss.dtype == their_loss.dtype
    _close(loss, their_loss, rtol)
    _close(grad, their_grad, rtol, 4e-6)


# The API.


def _parameters(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(
    "name, extras",
    [
        ("losses.CategoricalCrossentropy", ["z_loss", "logit_soft_cap"]),
        (
            "losses.SparseCategoricalCrossentropy",
            ["axis", "label_smoothing", "z_loss", "logit_soft_cap"],
        ),
        ("metrics.CategoricalCrossentropy", ["logit_soft_cap"]),
        ("metrics.SparseCategoricalCrossentropy", ["label_smoothing", "logit_soft_cap"]),
        ("losses.categorical_crossentropy", ["z_loss", "logit_soft_cap"]),
        (
            "losses.sparse_categorical_crossentropy",
            ["label_smoothing", "z_loss", "logit_soft_cap"],
        ),
        ("backend.categorical_crossentropy", []),
        ("backend.sparse_categorical_crossentropy", []),
    ],
)
def test_signatures_are_tf_keras_then_the_extras(name, extras):
    module, attr = name.split(".")
    ours, theirs = getattr(getattr(txk, module), attr), getattr(getattr(tf_keras, module), attr)
    if inspect.isclass(ours):
        base = tf_keras.losses.Loss if module == "losses" else tf_keras.metrics.MeanMetricWrapper
        assert issubclass(ours, base) and issubclass(theirs, base)
        ours, theirs = ours.__init__, theirs.__init__
    expected = _parameters(theirs)
    assert _parameters(ours)[: len(expected)] == expected
    assert [p[0] for p in _parameters(ours)[len(expected) :]] == extras


def test_reductions_are_tf_keras_ones():
    assert txk.losses.CategoricalCrossentropy().reduction == Reduction.AUTO
    for module in (txk, tf_keras):
        for reduction in ("mean", "mean_with_sample_weight", None):
            with pytest.raises(ValueError, match="Invalid Reduction Key"):
                module.losses.SparseCategoricalCrossentropy(reduction=reduction)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
        (dict(axis=True), ValueError, "axis"),
        (dict(axis=1.0), ValueError, "axis"),
        (dict(ignore_class=1.5), TypeError, "ignore_class"),
    ],
)
def test_bad_options_raise_when_made(kwargs, error, match):
    sparse_only = "ignore_class" in kwargs
    classes = [txk.losses.SparseCategoricalCrossentropy, txk.metrics.SparseCategoricalCrossentropy]
    if not sparse_only:
        classes += [txk.losses.CategoricalCrossentropy, txk.metrics.CategoricalCrossentropy]
    for cls in classes:
        with pytest.raises(error, match=match):
            cls(**kwargs)


def test_bad_input_raises_when_called(rng):
    p = ref.logits(rng, (4, 5), "float32")
    with pytest.raises(ValueError, match="incompatible"):
        txk.losses.CategoricalCrossentropy()(np.ones((4, 6), np.float32), p)
    with pytest.raises(ValueError, match="shape"):
        txk.losses.SparseCategoricalCrossentropy()(np.zeros((3,), np.int64), p)
    with pytest.raises(TypeError, match="Predictions must be"):
        txk.sparse_categorical_crossentropy([0, 1], [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="out of range"):
        txk.losses.SparseCategoricalCrossentropy(axis=2)([0, 1, 2, 3], p)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the valid range"):
        txk.losses.SparseCategoricalCrossentropy()([0, 1, 2, 7], p)


# Values and gradients.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weights", [None, "scalar", "per_sample", "per_sample_column"])
def test_categorical_loss_class(rng, reduction, from_logits, label_smoothing, weights):
    shape = (16, 10)
    p = ref.predictions(rng, shape, from_logits)
    y = ref.soft_labels(rng, shape)
    sw = ref.sample_weight(rng, weights, shape[:1])
    kwargs = dict(from_logits=from_logits, label_smoothing=label_smoothing, reduction=reduction)
    _assert_same_loss_and_gradient(
        txk.losses.CategoricalCrossentropy(**kwargs),
        tf_keras.losses.CategoricalCrossentropy(**kwargs),
        y,
        p,
        sample_weight=sw,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("ignore_class", [None, -1, 3])
@pytest.mark.parametrize("weights", [None, "scalar", "per_sample"])
def test_sparse_loss_class(rng, reduction, from_logits, ignore_class, weights):
    shape = (24, 7)
    p = ref.predictions(rng, shape, from_logits)
    y = rng.integers(0, shape[1], size=shape[:1])
    if ignore_class == -1:
        y[rng.uniform(size=y.shape) < 0.3] = -1
    sw = ref.sample_weight(rng, weights, shape[:1])
    kwargs = dict(from_logits=from_logits, ignore_class=ignore_class, reduction=reduction)
    _assert_same_loss_and_gradient(
        txk.losses.SparseCategoricalCrossentropy(**kwargs),
        tf_keras.losses.SparseCategoricalCrossentropy(**kwargs),
        y,
        p,
        sample_weight=sw,
    )


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("from_logits", [True, False])
def test_categorical_axes_with_smoothing(rng, axis, from_logits):
    # tf_keras smooths with the number of classes along `axis`, as the op does.
    shape = (5, 6, 4)
    p = ref.predictions(rng, shape, from_logits, axis=axis)
    y = ref.soft_labels(rng, shape, axis=axis)
    batch_shape = tuple(d for i, d in enumerate(shape) if i != axis % 3)
    sw = ref.sample_weight(rng, "per_position", batch_shape)
    kwargs = dict(from_logits=from_logits, axis=axis, label_smoothing=0.2)
    _assert_same_loss_and_gradient(
        txk.losses.CategoricalCrossentropy(**kwargs),
        tf_keras.losses.CategoricalCrossentropy(**kwargs),
        y,
        p,
        sample_weight=sw,
    )
    _close(
        txk.categorical_crossentropy(y, p, **kwargs),
        tf_keras.losses.categorical_crossentropy(y, p, **kwargs),
    )


@pytest.mark.parametrize("form", ["loss", "function", "metric"])
def test_negative_axis_with_logits(rng, form):
    """tf_keras fails on logits with a negative axis other than -1, in the
    tf.nn.softmax_cross_entropy_with_logits it calls; ours take it and give
    tf_keras's numbers for the same axis counted from the front."""
    p = ref.predictions(rng, (3, 5, 4), from_logits=True)
    y = ref.soft_labels(rng, (3, 5, 4), axis=1)

    def compute(module, axis):
        if form == "loss":
            return module.losses.CategoricalCrossentropy(from_logits=True, axis=axis)(y, p)
        if form == "function":
            return module.losses.categorical_crossentropy(y, p, from_logits=True, axis=axis)
        metric = module.metrics.CategoricalCrossentropy(from_logits=True, axis=axis)
        metric.update_state(y, p)
        return metric.result()

    with pytest.raises(tf.errors.InvalidArgumentError, match="Requires start <= limit"):
        compute(tf_keras, -2)
    _close(compute(txk, -2), compute(tf_keras, 1))


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("ignore_class", [None, 2])
def test_sparse_axes(rng, axis, from_logits, ignore_class):
    # tf_keras's sparse function and backend form take any axis; its loss
    # class has no `axis`, so ours is compared with a wrapper of its function.
    shape = (4, 6, 5)
    p = ref.predictions(rng, shape, from_logits, axis=axis)
    batch_shape = tuple(d for i, d in enumerate(shape) if i != axis % 3)
    y = rng.integers(0, shape[axis], size=batch_shape)
    kwargs = dict(from_logits=from_logits, ignore_class=ignore_class, axis=axis)
    theirs = tf_keras.__internal__.losses.LossFunctionWrapper(
        tf_keras.losses.sparse_categorical_crossentropy, **kwargs
    )
    _assert_same_loss_and_gradient(txk.losses.SparseCategoricalCrossentropy(**kwargs), theirs, y, p)
    for ours, tf_keras_fn in (
        (txk.sparse_categorical_crossentropy, tf_keras.losses.sparse_categorical_crossentropy),
        (
            txk.backend.sparse_categorical_crossentropy,
            tf_keras.backend.sparse_categorical_crossentropy,
        ),
    ):
        loss, their_loss = ours(y, p, **kwargs), tf_keras_fn(y, p, **kwargs)
        _close(loss, their_loss)
        if ignore_class is not None:
            np.testing.assert_array_equal(loss._keras_mask, their_loss._keras_mask)


@pytest.mark.parametrize(
    "labels_shape, predictions_shape",
    [
        ((6, 1), (6, 5)),
        ((1, 6), (6, 5)),
        ((3, 4, 1), (3, 4, 5)),
        ((12,), (3, 4, 5)),
        ((3, 4), (3, 4, 5)),
    ],
)
@pytest.mark.parametrize("ignore_class", [None, 0])
def test_sparse_label_shapes_as_tf_keras_flattens_them(
    rng, labels_shape, predictions_shape, ignore_class
):
    p = ref.predictions(rng, predictions_shape, from_logits=True)
    y = rng.integers(0, predictions_shape[-1], size=labels_shape)
    for dtype in (np.int32, np.float32):
        kwargs = dict(from_logits=True, ignore_class=ignore_class)
        ours = txk.sparse_categorical_crossentropy(y.astype(dtype), p, **kwargs)
        theirs = tf_keras.losses.sparse_categorical_crossentropy(y.astype(dtype), p, **kwargs)
        _close(ours, theirs)
        for reduction in (Reduction.AUTO, Reduction.NONE):
            _close(
                txk.losses.SparseCategoricalCrossentropy(reduction=reduction, **kwargs)(y, p),
                tf_keras.losses.SparseCategoricalCrossentropy(reduction=reduction, **kwargs)(y, p),
            )


def test_sparse_label_smoothing_equals_tf_keras_dense_one_hot(rng):
    p = ref.logits(rng, (20, 9), "float32")
    y = rng.integers(0, 9, size=20)
    kwargs = dict(from_logits=True, label_smoothing=0.2)
    _close(
        txk.losses.SparseCategoricalCrossentropy(**kwargs)(y, p),
        tf_keras.losses.CategoricalCrossentropy(**kwargs)(ref.one_hot(y, 9), p),
    )
    ours, theirs = (
        txk.metrics.SparseCategoricalCrossentropy(**kwargs),
        tf_keras.metrics.CategoricalCrossentropy(**kwargs),
    )
    ours.update_state(y, p)
    theirs.update_state(ref.one_hot(y, 9), p)
    _close(ours.result(), theirs.result())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("weights", [None, "per_sample"])
def test_keras_mask_on_predictions(rng, reduction, sparse, weights):
    shape = (6, 4, 5)
    p = tf.constant(ref.logits(rng, shape, "float32"))
    p._keras_mask = tf.constant(rng.uniform(size=shape[:2]) < 0.6)
    sw = ref.sample_weight(rng, weights, shape[:2])
    if sparse:
        y = rng.integers(0, 5, size=shape[:2])
        y[rng.uniform(size=y.shape) < 0.3] = -1  # with a mask of its own
        kwargs = dict(from_logits=True, ignore_class=-1, reduction=reduction)
        ours = txk.losses.SparseCategoricalCrossentropy(**kwargs)
        theirs = tf_keras.losses.SparseCategoricalCrossentropy(**kwargs)
    else:
        y = ref.soft_labels(rng, shape)
        ours = txk.losses.CategoricalCrossentropy(from_logits=True, reduction=reduction)
        theirs = tf_keras.losses.CategoricalCrossentropy(from_logits=True, reduction=reduction)
    _close(ours(y, p, sample_weight=sw), theirs(y, p, sample_weight=sw))


@pytest.mark.parametrize("n", [0, 1])
def test_zero_and_one_sample_batches(rng, n):
    p = ref.logits(rng, (n, 6), "float32")
    y = rng.integers(0, 6, size=n)
    for reduction in REDUCTIONS:
        for ours, theirs, labels in (
            (
                txk.losses.SparseCategoricalCrossentropy,
                tf_keras.losses.SparseCategoricalCrossentropy,
                y,
            ),
            (txk.losses.CategoricalCrossentropy, tf_keras.losses.CategoricalCrossentropy, None),
        ):
            labels = ref.one_hot(y, 6) if labels is None else labels
            kwargs = dict(from_logits=True, reduction=reduction)
            _close(ours(**kwargs)(labels, p), theirs(**kwargs)(labels, p))


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_functions(rng, from_logits, label_smoothing):
    shape = (9, 6)
    p = ref.predictions(rng, shape, from_logits)
    y = ref.soft_labels(rng, shape)
    _close(
        txk.categorical_crossentropy(y, p, from_logits, label_smoothing),
        tf_keras.losses.categorical_crossentropy(y, p, from_logits, label_smoothing),
    )
    labels = rng.integers(0, 6, size=9)
    for ignore_class in (None, 2):
        ours = txk.sparse_categorical_crossentropy(labels, p, from_logits, -1, ignore_class)
        theirs = tf_keras.losses.sparse_categorical_crossentropy(
            labels, p, from_logits, -1, ignore_class
        )
        _close(ours, theirs)
        assert (ignore_class is None) == (getattr(ours, "_keras_mask", None) is None)
        if ignore_class is not None:
            np.testing.assert_array_equal(ours._keras_mask, theirs._keras_mask)


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("from_logits", [True, False])
def test_backend_forms(rng, axis, from_logits):
    shape = (3, 7, 5)
    p = ref.predictions(rng, shape, from_logits, axis=axis)
    y = ref.soft_labels(rng, shape, axis=axis)
    _close(
        txk.backend.categorical_crossentropy(y, p, from_logits, axis),
        tf_keras.backend.categorical_crossentropy(y, p, from_logits, axis),
    )
    with pytest.raises(ValueError, match="incompatible"):
        txk.backend.categorical_crossentropy(y[:2], p, from_logits, axis)


def _in_float32(fn, sparse):
    """`fn`, a loss function, computing 16-bit predictions in float32 with
    the loss rounded once to their dtype (dense labels first cast to that
    dtype, as tf_keras's function casts them; a mask kept)."""

    def in_float32(y_true, y_pred, **kwargs):
        if not sparse:
            y_true = tf.cast(tf.cast(y_true, y_pred.dtype), tf.float32)
        loss = fn(y_true, tf.cast(y_pred, tf.float32), **kwargs)
        mask = getattr(loss, "_keras_mask", None)
        loss = tf.cast(loss, y_pred.dtype)
        if mask is not None:
            loss._keras_mask = mask
        return loss

    return in_float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
def test_prediction_dtypes(rng, dtype, sparse, from_logits):
    """tf_keras's losses do not cast the predictions: the loss, its reduction
    and the gradient are in their dtype. Ours too, but 16-bit predictions are
    computed in float32 and the loss rounded once, where tf_keras computes in
    16 bits (but for float16 logits, which tf.nn takes in float32). So ours
    are tf_keras's machinery around the float32 math, rounded once."""
    shape = (12, 33)
    p = tf.constant(ref.predictions(rng, shape, from_logits, dtype))
    labels = rng.integers(0, shape[1], size=shape[:1])
    # Soft labels rounded to 16 bits no longer sum to one, where the logits
    # gradients differ by design (docs/semantics.md): one-hot ones against
    # tf_keras, soft ones too against our own math in float32.
    y = labels if sparse else ref.one_hot(labels, shape[1])
    soft = [] if sparse or dtype == "float64" else [ref.soft_labels(rng, shape)]
    name = "SparseCategoricalCrossentropy" if sparse else "CategoricalCrossentropy"
    fn_name = "sparse_categorical_crossentropy" if sparse else "categorical_crossentropy"
    for reduction in REDUCTIONS:
        kwargs = dict(from_logits=from_logits, reduction=reduction)
        ours = getattr(txk.losses, name)(**kwargs)
        theirs = getattr(tf_keras.losses, name)(**kwargs)
        if dtype == "float64":
            _assert_same_loss_and_gradient(ours, theirs, y, p)
            continue
        assert ours(y, p).dtype == theirs(y, p).dtype == dtype

        def wrapper(fn, kwargs=kwargs):
            return tf_keras.__internal__.losses.LossFunctionWrapper(
                _in_float32(fn, sparse), **kwargs
            )

        # The float32 results may round an ulp of the 16-bit type apart.
        _assert_same_loss_and_gradient(
            ours, wrapper(getattr(tf_keras.losses, fn_name)), y, p, rtol=4 * ref.HALF_ULP[dtype]
        )
        for labels_ in [y] + soft:
            loss, grad = _loss_and_gradient(ours, labels_, p)
            expected, expected_grad = _loss_and_gradient(
                wrapper(getattr(txk.losses, fn_name)), labels_, p
            )
            ref.assert_within_one_ulp(_float64(loss), _float64(expected), dtype)
            ref.assert_within_one_ulp(_float64(grad), _float64(expected_grad), dtype)


def test_16_bit_clipped_probability():
    """A clipped float16 probability: tf_keras's loss class and function clip
    at epsilon rounded to float16 (1.19e-7), -log of which is 15.945; ours
    clip at 1e-7 in float32, 16.118, rounded to float16 (16.125). tf_keras's
    metrics cast the predictions to float32 first, as ours, so they agree."""
    y, p = np.array([0]), np.array([[0.0, 1.0]], np.float16)
    theirs = tf_keras.losses.SparseCategoricalCrossentropy()(y, p)
    ours = txk.losses.SparseCategoricalCrossentropy()(y, p)
    assert theirs.dtype == ours.dtype == tf.float16
    assert float(theirs) == float(np.float16(-np.log(float(np.float16(1e-7)))))
    assert float(ours) == float(np.float16(-np.log(np.float32(1e-7))))
    for cls in (
        tf_keras.metrics.SparseCategoricalCrossentropy,
        txk.metrics.SparseCategoricalCrossentropy,
    ):
        metric = cls()
        metric.update_state(y, p)
        np.testing.assert_allclose(metric.result(), -np.log(np.float32(1e-7)), rtol=1e-6)


def test_epsilon_is_tf_keras_epsilon(rng):
    # tf_keras.backend.set_epsilon sets tf_keras's epsilon, not Keras 3's
    # (which the Keras 3 forms read).
    p = ref.predictions(rng, (8, 6), from_logits=False)
    p[:, 0] = 0.0  # clipped
    y = np.zeros(8, np.int64)
    saved = tf_keras.backend.epsilon()
    tf_keras.backend.set_epsilon(1e-4)
    try:
        for name, labels, expected in (
            ("SparseCategoricalCrossentropy", y, ref.sparse(y, p, False, epsilon=1e-4)),
            (
                "CategoricalCrossentropy",
                ref.one_hot(y, 6),
                ref.dense(ref.one_hot(y, 6), p, False, epsilon=1e-4),
            ),
        ):
            loss = getattr(txk.losses, name)(reduction=Reduction.NONE)(labels, p)
            _close(loss, getattr(tf_keras.losses, name)(reduction=Reduction.NONE)(labels, p))
            _close(loss, expected)
        assert keras.config.epsilon() == saved
        assert not np.allclose(txo.losses.SparseCategoricalCrossentropy(reduction=None)(y, p), loss)
    finally:
        tf_keras.backend.set_epsilon(saved)


def test_one_class_warning_looks_at_the_class_axis(rng):
    # As tf_keras for classes last; tf_keras looks at the last axis for any
    # `axis`, so it warns on [N, C, 1] with axis=1.
    y = ref.one_hot(rng.integers(0, 3, size=(4, 1)), 3, axis=1)
    p = ref.probabilities(rng, (4, 3, 1), "float32", axis=1)
    with pytest.warns(SyntaxWarning, match="num_classes > 1"):
        tf_keras.losses.categorical_crossentropy(y, p, axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        txk.categorical_crossentropy(y, p, axis=1)
    for form in (txk.categorical_crossentropy, tf_keras.losses.categorical_crossentropy):
        with pytest.warns(SyntaxWarning, match="num_classes > 1"):
            form(np.ones((4, 1), np.float32), np.ones((4, 1), np.float32))


# Softmax outputs and logits.


@pytest.mark.parametrize("sparse", [True, False])
def test_logits_of_softmax_and_sigmoid_outputs(rng, sparse):
    """tf_keras takes the logits of an output that carries `_keras_logits`
    (its softmax and sigmoid set them; so does Keras's softmax), and warns if
    told `from_logits=True` on it."""
    logits = tf.constant(ref.logits(rng, (6, 5), "float32") * 10.0)
    labels = rng.integers(0, 5, size=6)
    y = labels if sparse else ref.one_hot(labels, 5)
    name = "SparseCategoricalCrossentropy" if sparse else "CategoricalCrossentropy"
    for activation in (
        tf_keras.activations.softmax,
        tf_keras.activations.sigmoid,
        keras.activations.softmax,
    ):
        outputs = activation(logits)
        assert hasattr(outputs, "_keras_logits")
        ours = getattr(txk.losses, name)()(y, outputs)
        _close(ours, getattr(tf_keras.losses, name)()(y, outputs))
        _close(ours, getattr(tf_keras.losses, name)(from_logits=True)(y, logits))
        for module in (txk, tf_keras):
            with pytest.warns(UserWarning, match="from_logits=True"):
                getattr(module.losses, name)(from_logits=True)(y, outputs)


def test_softmax_op_in_graph(rng):
    logits = ref.logits(rng, (6, 5), "float32") * 10.0
    y = rng.integers(0, 5, size=6)

    @tf.function
    def both(y, logits):
        probs = tf.nn.softmax(logits)
        return (
            txk.losses.SparseCategoricalCrossentropy()(y, probs),
            tf_keras.losses.SparseCategoricalCrossentropy()(y, probs),
            txk.backend.categorical_crossentropy(tf.one_hot(y, 5), probs),
            tf_keras.backend.categorical_crossentropy(tf.one_hot(y, 5), probs),
        )

    ours, theirs, ours_backend, theirs_backend = both(y, logits)
    _close(ours, theirs)
    _close(ours_backend, theirs_backend)
    _close(ours, tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits))


# Ragged inputs.


def _ragged(values, lengths):
    return tf.RaggedTensor.from_row_lengths(values, lengths)


@pytest.mark.parametrize("reduction", [Reduction.AUTO, Reduction.SUM, Reduction.NONE])
def test_ragged_sequences(rng, reduction):
    lengths = [3, 1, 4]
    p = _ragged(ref.logits(rng, (8, 5), "float32"), lengths)
    labels = rng.integers(0, 5, size=8)
    pairs = [
        (
            txk.losses.SparseCategoricalCrossentropy,
            tf_keras.losses.SparseCategoricalCrossentropy,
            _ragged(labels, lengths),
            dict(ignore_class=0),
        ),
        (
            txk.losses.CategoricalCrossentropy,
            tf_keras.losses.CategoricalCrossentropy,
            _ragged(ref.one_hot(labels, 5), lengths),
            dict(label_smoothing=0.1),
        ),
    ]
    for ours, theirs, y, kwargs in pairs:
        kwargs = dict(kwargs, from_logits=True, reduction=reduction)
        loss, their_loss = ours(**kwargs)(y, p), theirs(**kwargs)(y, p)
        assert type(loss) is type(their_loss)
        if isinstance(loss, tf.RaggedTensor):
            np.testing.assert_array_equal(loss.row_lengths(), their_loss.row_lengths())
            loss, their_loss = loss.flat_values, their_loss.flat_values
        _close(loss, their_loss)


def test_ragged_classes_and_metrics(rng):
    # Rows of different numbers of classes: tf_keras computes each on its own.
    lengths = [3, 5, 2]
    p = _ragged(ref.logits(rng, (10, 1), "float32")[:, 0], lengths)
    y = _ragged(
        np.concatenate([ref.one_hot([i % n], n)[0] for i, n in enumerate(lengths)]), lengths
    )
    _close(
        txk.categorical_crossentropy(y, p, from_logits=True),
        tf_keras.losses.categorical_crossentropy(y, p, from_logits=True),
    )
    sequence_lengths = [2, 4]
    logits = _ragged(ref.logits(rng, (6, 4), "float32"), sequence_lengths)
    labels = _ragged(rng.integers(0, 4, size=6), sequence_lengths)
    ours = txk.metrics.SparseCategoricalCrossentropy(from_logits=True)
    theirs = tf_keras.metrics.SparseCategoricalCrossentropy(from_logits=True)
    ours.update_state(labels, logits)
    theirs.update_state(labels, logits)
    _close(ours.result(), theirs.result())


# Metrics.


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_metrics_over_batches(rng, sparse, from_logits, dtype):
    # tf_keras's metrics cast the predictions to the metric's dtype first, so
    # 16-bit predictions are computed in float32 there as here.
    kwargs = dict(from_logits=from_logits)
    if sparse:
        ours = txk.metrics.SparseCategoricalCrossentropy(**kwargs, ignore_class=0)
        theirs = tf_keras.metrics.SparseCategoricalCrossentropy(**kwargs, ignore_class=0)
    else:
        ours = txk.metrics.CategoricalCrossentropy(**kwargs, label_smoothing=0.1)
        theirs = tf_keras.metrics.CategoricalCrossentropy(**kwargs, label_smoothing=0.1)
    for step in range(3):
        p = ref.predictions(rng, (10, 4), from_logits, dtype)
        labels = rng.integers(0, 4, size=10)
        y = labels if sparse else ref.one_hot(labels, 4)
        sw = None if step == 0 else rng.uniform(0, 1, size=10).astype(np.float32)
        ours.update_state(y, p, sample_weight=sw)
        theirs.update_state(y, p, sample_weight=sw)
        assert ours.result().dtype == theirs.result().dtype
        _close(ours.result(), theirs.result())
    ours.reset_state()
    assert float(ours.result()) == 0.0


def _random_configuration(rng):
    """A loss configuration drawn at random: (description, name, kwargs,
    draw), `draw(rng)` giving one batch as (labels, predictions,
    sample_weight, mask). kwargs hold no reduction (metrics take none)."""
    sparse = bool(rng.integers(2))
    from_logits = bool(rng.integers(2))
    dtype = str(rng.choice(["float32", "float64", "float16", "bfloat16"]))
    batch_shape = tuple(int(d) for d in rng.integers(1, 5, size=rng.integers(1, 4)))
    num_classes = int(rng.integers(2, 9))
    # The classes last half of the time, else anywhere.
    position = len(batch_shape) if rng.integers(2) else int(rng.integers(len(batch_shape) + 1))
    if sparse and position < len(batch_shape) and batch_shape[-1] == 1:
        # tf_keras's wrappers would squeeze that dimension off the predictions
        # (labels having one dimension fewer) before the class axis is applied.
        batch_shape = batch_shape[:-1] + (2,)
    shape = batch_shape[:position] + (num_classes,) + batch_shape[position:]
    # With logits, tf.nn's dense op fails on negative axes other than -1.
    negative = rng.integers(2) and (sparse or not from_logits or position == len(batch_shape))
    axis = position - len(shape) if negative else position
    kwargs = dict(from_logits=from_logits)
    if sparse:
        if rng.integers(3) == 0:
            kwargs["ignore_class"] = int(rng.choice([-1, 0]))
        name = "SparseCategoricalCrossentropy"
    else:
        kwargs["label_smoothing"] = float(rng.choice([0.0, 0.2]))
        # Soft labels rounded to 16 bits no longer sum to one, where the
        # logits gradients differ by design (docs/semantics.md).
        soft = bool(rng.integers(2)) and not (from_logits and dtype in NUMPY_16_BIT)
        name = "CategoricalCrossentropy"
    kwargs["axis"] = axis
    per_sample = {1: ["per_sample"], 2: ["per_sample_column"]}.get(len(batch_shape), [])
    weights = rng.choice([None, "scalar", "per_position"] + per_sample)
    masked = bool(rng.integers(3) == 0)

    def draw(rng):
        if sparse:
            labels = rng.integers(0, num_classes, size=batch_shape)
            if "ignore_class" in kwargs:
                labels[rng.uniform(size=labels.shape) < 0.3] = kwargs["ignore_class"]
            if rng.integers(3) == 0:
                labels = labels.astype(np.float32)
        elif soft:
            labels = ref.soft_labels(rng, shape, axis=axis)
        else:
            labels = ref.one_hot(rng.integers(0, num_classes, size=batch_shape), num_classes, axis)
        mask = rng.uniform(size=batch_shape) < 0.7 if masked else None
        sample_weight = ref.sample_weight(rng, weights, batch_shape)
        return (
            labels,
            ref.predictions(rng, shape, from_logits, dtype, axis=axis),
            sample_weight,
            mask,
        )

    description = f"{name}({kwargs}) {dtype}{list(shape)} weights {weights} masked {masked}"
    return description, name, kwargs, draw


def _tf_keras_loss(name, kwargs, dtype):
    """tf_keras's loss for `kwargs` (its sparse class has no `axis`: a
    wrapper of its function instead), computing in float32 for 16-bit
    predictions (see test_prediction_dtypes)."""
    reduction = kwargs.pop("reduction")
    sparse = name.startswith("Sparse")
    fn = getattr(
        tf_keras.losses, "sparse_categorical_crossentropy" if sparse else "categorical_crossentropy"
    )
    if dtype in NUMPY_16_BIT:
        fn = _in_float32(fn, sparse)
    elif not sparse:
        return getattr(tf_keras.losses, name)(reduction=reduction, **kwargs)
    return tf_keras.__internal__.losses.LossFunctionWrapper(fn, reduction=reduction, **kwargs)


@pytest.mark.filterwarnings("ignore:In loss categorical_crossentropy:SyntaxWarning")
def test_random_configurations_match_tf_keras(rng):
    for _ in range(30):
        description, name, kwargs, draw = _random_configuration(rng)
        reduction = REDUCTIONS[rng.integers(len(REDUCTIONS))]
        labels, predictions, sample_weight, mask = draw(rng)
        description += f" labels {labels.dtype}{list(labels.shape)} {reduction}"
        ours = getattr(txk.losses, name)(reduction=reduction, **kwargs)
        theirs = _tf_keras_loss(name, dict(kwargs, reduction=reduction), predictions.dtype.name)

        def with_mask(loss_obj, mask=mask, sample_weight=sample_weight):
            def call(y, p):
                p = tf.convert_to_tensor(p)
                if mask is not None:
                    p._keras_mask = tf.constant(mask)
                return loss_obj(y, p, sample_weight=sample_weight)

            return call

        loss, grad = _loss_and_gradient(with_mask(ours), labels, predictions)
        their_loss, their_grad = _loss_and_gradient(with_mask(theirs), labels, predictions)
        assert loss.dtype == their_loss.dtype, description
        # 16-bit: the float32 results may round an ulp of the type apart.
        rtol = 4 * ref.HALF_ULP.get(predictions.dtype.name, RTOL / 4)
        _close(loss, their_loss, rtol, ATOL, description)
        _close(grad, their_grad, rtol, 4e-6, description)


@pytest.mark.filterwarnings("ignore:In loss categorical_crossentropy:SyntaxWarning")
def test_random_metric_configurations_match_tf_keras(rng):
    for _ in range(15):
        description, name, kwargs, draw = _random_configuration(rng)
        result_dtype = rng.choice([None, "float64"])
        metric_kwargs = dict(kwargs)
        if name.startswith("Sparse"):
            ours = txk.metrics.SparseCategoricalCrossentropy(dtype=result_dtype, **metric_kwargs)
            theirs = tf_keras.metrics.SparseCategoricalCrossentropy(
                dtype=result_dtype, **metric_kwargs
            )
        else:
            ours = txk.metrics.CategoricalCrossentropy(dtype=result_dtype, **metric_kwargs)
            theirs = tf_keras.metrics.CategoricalCrossentropy(dtype=result_dtype, **metric_kwargs)
        for step in range(3):
            if step == 2:
                ours.reset_state()
                theirs.reset_state()
            labels, predictions, sample_weight, _ = draw(rng)
            ours.update_state(labels, predictions, sample_weight=sample_weight)
            theirs.update_state(labels, predictions, sample_weight=sample_weight)
            message = f"{description} dtype {result_dtype} step {step}"
            assert ours.result().dtype == theirs.result().dtype, message
            _close(ours.result(), theirs.result(), err_msg=message)


# The TensorFlow documentation's examples.


@pytest.mark.parametrize("doc_case", ["dense", "sparse"])
def test_tensorflow_documentation_examples(doc_case):
    y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    y_true = [[0, 1, 0], [0, 0, 1]] if doc_case == "dense" else [1, 2]
    name = "CategoricalCrossentropy" if doc_case == "dense" else "SparseCategoricalCrossentropy"
    cls = getattr(txk.losses, name)
    np.testing.assert_allclose(cls()(y_true, y_pred), 1.177, atol=5e-4)
    np.testing.assert_allclose(
        cls()(y_true, y_pred, sample_weight=tf.constant([0.3, 0.7])), 0.814, atol=5e-4
    )
    np.testing.assert_allclose(cls(reduction=Reduction.SUM)(y_true, y_pred), 2.354, atol=5e-4)
    np.testing.assert_allclose(
        cls(reduction=Reduction.NONE)(y_true, y_pred), [0.0513, 2.3026], atol=5e-5
    )
    metric = getattr(txk.metrics, name)()
    metric.update_state(y_true, y_pred)
    np.testing.assert_allclose(metric.result(), 1.1769392, rtol=1e-6)
    metric.reset_state()
    metric.update_state(y_true, y_pred, sample_weight=tf.constant([0.3, 0.7]))
    np.testing.assert_allclose(metric.result(), 1.6271976, rtol=1e-6)
    fn = getattr(
        txk,
        "categorical_crossentropy" if doc_case == "dense" else "sparse_categorical_crossentropy",
    )
    np.testing.assert_allclose(fn(y_true, y_pred), [0.0513, 2.3026], atol=5e-5)


def test_tensorflow_documentation_backend_and_ignore_class_examples():
    a = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    b = [[0.9, 0.05, 0.05], [0.05, 0.89, 0.06], [0.05, 0.01, 0.94]]
    np.testing.assert_allclose(
        txk.backend.categorical_crossentropy(a, b), [0.10536, 0.11653, 0.06188], atol=5e-6
    )
    np.testing.assert_allclose(txk.backend.categorical_crossentropy(a, a), [0, 0, 0], atol=1e-6)
    y_true = [[[0, 2], [-1, -1]], [[0, 2], [-1, -1]]]
    y_pred = [
        [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]]],
        [[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], [[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]]],
    ]
    expected = [[[2.3841855e-07, 2.3841855e-07], [0, 0]], [[2.3841855e-07, 6.9314730e-01], [0, 0]]]
    loss = txk.sparse_categorical_crossentropy(y_true, y_pred, ignore_class=-1)
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-12)


# Training.


def _classifier(seed=1, activation=None):
    tf_keras.utils.set_random_seed(seed)
    return tf_keras.Sequential(
        [
            tf_keras.Input((64,)),
            tf_keras.layers.Dense(16, activation="relu"),
            tf_keras.layers.Dense(10, activation=activation),
        ]
    )


def _fit(
    make_loss, make_metrics, sample_weight=True, strategy=None, one_hot=False, activation=None
):
    """compile + fit + evaluate of `_classifier` on the digits; the losses
    and metrics are made in the strategy's scope. Returns (history, evaluation)."""
    x, y, w = training_util.digits(192)
    if one_hot:
        y = ref.one_hot(y, 10)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = _classifier(activation=activation)
        model.compile(
            optimizer=tf_keras.optimizers.Adam(1e-2), loss=make_loss(), metrics=make_metrics()
        )
    weights = w if sample_weight else None
    history = model.fit(
        x, y, sample_weight=weights, batch_size=32, epochs=2, shuffle=False, verbose=0
    )
    evaluation = model.evaluate(
        x, y, sample_weight=weights, batch_size=64, verbose=0, return_dict=True
    )
    return history.history, evaluation


def _assert_same_training(ours, theirs, rtol=1e-5):
    assert ours[0].keys() == theirs[0].keys()
    for key in ours[0]:
        np.testing.assert_allclose(ours[0][key], theirs[0][key], rtol=rtol, err_msg=key)
        np.testing.assert_allclose(ours[1][key], theirs[1][key], rtol=rtol, err_msg=key)


@pytest.mark.parametrize("form", ["sparse_logits", "dense_softmax", "function"])
def test_fit_and_evaluate_follow_the_builtin(form):
    if form == "sparse_logits":
        args = dict(one_hot=False)

        def make(module):
            return (
                lambda: module.losses.SparseCategoricalCrossentropy(from_logits=True),
                lambda: [module.metrics.SparseCategoricalCrossentropy(from_logits=True, name="x")],
            )

    elif form == "dense_softmax":
        # The loss gets the softmax output (its logits are used, as tf_keras does).
        args = dict(one_hot=True, activation="softmax")

        def make(module):
            return (
                lambda: module.losses.CategoricalCrossentropy(label_smoothing=0.1),
                lambda: [module.metrics.CategoricalCrossentropy(name="x")],
            )

    else:
        args = dict(one_hot=False, sample_weight=False, activation="softmax")

        def make(module):
            return (
                lambda: module.losses.sparse_categorical_crossentropy,
                lambda: [module.losses.sparse_categorical_crossentropy],
            )

    _assert_same_training(_fit(*make(txk), **args), _fit(*make(tf_keras), **args))


def test_functions_and_classes_on_symbolic_tensors(rng):
    """tf_keras's functions dispatch on its symbolic tensors (a Functional
    model's add_loss) and so do ours."""
    x = rng.uniform(size=(16, 8)).astype("float32")
    y = rng.integers(0, 4, size=16)
    results = []
    for module in (txk, tf_keras):
        tf_keras.utils.set_random_seed(3)
        inputs, labels = tf_keras.Input((8,)), tf_keras.Input((), dtype="int64")
        logits = tf_keras.layers.Dense(4)(inputs)
        model = tf_keras.Model([inputs, labels], logits)
        model.add_loss(
            tf.reduce_mean(module.losses.sparse_categorical_crossentropy(labels, logits, True))
        )
        model.add_loss(
            module.losses.CategoricalCrossentropy(from_logits=True)(tf.one_hot(labels, 4), logits)
        )
        model.compile(optimizer=tf_keras.optimizers.SGD(0.1))
        model.fit([x, y], batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(model.evaluate([x, y], verbose=0))
        if module is txk:
            # tf_keras serializes such calls for TensorFlow's and its own API only.
            with pytest.raises(ValueError, match="not publicly exposed"):
                model.get_config()
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_fit_with_float16_outputs():
    """Under mixed_float16 the model's outputs are float16: tf_keras's loss
    computes in float16, ours in float32 (rounded once to float16); the
    trajectories agree to float16's precision."""
    histories = []
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        for module in (txk, tf_keras):
            histories.append(
                _fit(
                    lambda module=module: module.losses.SparseCategoricalCrossentropy(
                        from_logits=True
                    ),
                    list,
                )
            )
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    np.testing.assert_allclose(histories[0][0]["loss"], histories[1][0]["loss"], rtol=2e-3)
    np.testing.assert_allclose(histories[0][1]["loss"], histories[1][1]["loss"], rtol=2e-3)


def test_mirrored_fit_equals_single_device_and_the_builtin():
    def ours():
        return (
            lambda: txk.losses.SparseCategoricalCrossentropy(from_logits=True),
            lambda: [txk.metrics.SparseCategoricalCrossentropy(from_logits=True, name="x")],
        )

    mirrored = _fit(*ours(), strategy=training_util.mirrored_on_two_cpus())
    _assert_same_training(mirrored, _fit(*ours()), rtol=1e-4)
    builtin = _fit(
        lambda: tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        lambda: [tf_keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="x")],
        strategy=training_util.mirrored_on_two_cpus(),
    )
    _assert_same_training(mirrored, builtin, rtol=1e-5)


def _custom_loop(make_loss, strategy, steps=3, global_batch=32):
    """Trains `_classifier` with strategy.run + apply_gradients, the loss
    divided by the global batch (the tf.distribute guide's recipe for SUM and
    NONE); returns the weights."""
    x, y, w = training_util.digits(steps * global_batch)
    with strategy.scope():
        model = _classifier()
        optimizer = tf_keras.optimizers.SGD(0.5)
        loss_obj = make_loss()
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(global_batch)

    def replica_step(x, y, w):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_obj(y, model(x), sample_weight=w)) / global_batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    @tf.function
    def step(batch):
        strategy.run(replica_step, args=batch)

    for batch in strategy.experimental_distribute_dataset(dataset):
        step(batch)
    return model.get_weights()


@pytest.mark.parametrize("reduction", [Reduction.AUTO, Reduction.SUM_OVER_BATCH_SIZE])
def test_custom_loop_under_a_strategy_refuses_averaging_reductions(reduction):
    for module in (txk, tf_keras):
        with pytest.raises(ValueError, match="Please use `tf.keras.losses.Reduction.SUM`"):
            _custom_loop(
                lambda module=module: module.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction=reduction
                ),
                training_util.mirrored_on_two_cpus(),
                steps=1,
            )


@pytest.mark.parametrize("reduction", [Reduction.SUM, Reduction.NONE])
def test_mirrored_custom_loop_equals_single_device_and_the_builtin(reduction):
    def make(module):
        return lambda: module.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=reduction
        )

    mirrored = _custom_loop(make(txk), training_util.mirrored_on_two_cpus())
    single = _custom_loop(make(txk), tf.distribute.get_strategy())
    builtin = _custom_loop(make(tf_keras), training_util.mirrored_on_two_cpus())
    for a, b, c in zip(mirrored, single, builtin, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


# Serialization and saving.


LOSSES = [
    lambda: txk.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=0.1, axis=1, reduction=Reduction.SUM, name="cce"
    ),
    lambda: txk.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1, reduction=Reduction.NONE, axis=1, label_smoothing=0.2
    ),
    lambda: txk.metrics.CategoricalCrossentropy(
        name="m", from_logits=True, label_smoothing=0.1, axis=1
    ),
    lambda: txk.metrics.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1, axis=1, label_smoothing=0.1
    ),
]


@pytest.mark.parametrize("make", LOSSES)
def test_config_round_trip(make):
    obj = make()
    config = obj.get_config()
    clone = type(obj).from_config(dict(config))  # tf_keras's from_config pops "fn"
    assert clone.get_config() == config
    restored = tf_keras.saving.deserialize_keras_object(tf_keras.saving.serialize_keras_object(obj))
    assert type(restored) is type(obj) and restored.get_config() == config
    module = tf_keras.losses if isinstance(obj, tf_keras.losses.Loss) else tf_keras.metrics
    for use_legacy_format in (False, True):
        serialized = module.serialize(obj, use_legacy_format=use_legacy_format)
        restored = module.deserialize(serialized, use_legacy_format=use_legacy_format)
        assert type(restored) is type(obj) and restored.get_config() == config


def test_configs_are_tf_keras_configs_plus_the_extras():
    pairs = [
        (
            txk.losses.CategoricalCrossentropy,
            tf_keras.losses.CategoricalCrossentropy,
            {"z_loss": 0.0, "logit_soft_cap": None},
        ),
        (
            txk.losses.SparseCategoricalCrossentropy,
            tf_keras.losses.SparseCategoricalCrossentropy,
            {"axis": -1, "label_smoothing": 0.0, "z_loss": 0.0, "logit_soft_cap": None},
        ),
        (
            txk.metrics.CategoricalCrossentropy,
            tf_keras.metrics.CategoricalCrossentropy,
            {"logit_soft_cap": None},
        ),
        (
            txk.metrics.SparseCategoricalCrossentropy,
            tf_keras.metrics.SparseCategoricalCrossentropy,
            {"label_smoothing": 0.0, "logit_soft_cap": None},
        ),
    ]
    for ours, theirs, extras in pairs:
        expected = dict(theirs().get_config(), **extras)
        if "fn" in expected:  # the wrapped function's registered name
            expected["fn"] = "tf_xent_ops>" + expected["fn"]
        assert ours().get_config() == expected


def test_registered_names_and_the_two_registries():
    # The Keras 3 forms' names, each registry holding its own Keras's objects.
    registered = [
        ("losses", "CategoricalCrossentropy", "CategoricalCrossentropy"),
        ("losses", "SparseCategoricalCrossentropy", "SparseCategoricalCrossentropy"),
        ("metrics", "CategoricalCrossentropy", "CategoricalCrossentropyMetric"),
        ("metrics", "SparseCategoricalCrossentropy", "SparseCategoricalCrossentropyMetric"),
        ("losses", "categorical_crossentropy", "categorical_crossentropy"),
        ("losses", "sparse_categorical_crossentropy", "sparse_categorical_crossentropy"),
    ]
    assert tf_keras.saving.get_custom_objects() is not keras.saving.get_custom_objects()
    for module, attr, name in registered:
        name = "tf_xent_ops>" + name
        ours = getattr(getattr(txk, module), attr)
        assert tf_keras.saving.get_registered_name(ours) == name
        assert tf_keras.saving.get_registered_object(name) is ours
        assert keras.saving.get_registered_object(name) is getattr(getattr(txo, module), attr)
    loss = tf_keras.losses.get(
        {"class_name": "tf_xent_ops>SparseCategoricalCrossentropy", "config": {"axis": 1}}
    )
    assert isinstance(loss, txk.losses.SparseCategoricalCrossentropy)
    assert loss.get_config()["axis"] == 1
    metric = tf_keras.metrics.get(
        {"class_name": "tf_xent_ops>CategoricalCrossentropyMetric", "config": {}}
    )
    assert isinstance(metric, txk.metrics.CategoricalCrossentropy)
    # tf_keras also resolves a registered loss by its bare name.
    loss = tf_keras.losses.get("tf_xent_ops>CategoricalCrossentropy")
    assert isinstance(loss, txk.losses.CategoricalCrossentropy)


RELOAD = """
import json, sys
import numpy as np
import tensorflow as tf

import tf_xent_ops
# Imported on demand only (tf_keras itself is, by TensorFlow: TF_USE_LEGACY_KERAS=1).
assert "tf_xent_ops.tf_keras" not in sys.modules
data = np.load(sys.argv[2])
results = {}
# A SavedModel that computes the loss needs the ops only.
module = tf.saved_model.load(sys.argv[1] + "/loss_module")
results["loss_module"] = float(module.loss(data["y"], data["logits"]))

import tf_keras
assert tf.keras.models.load_model is tf_keras.models.load_model  # TF_USE_LEGACY_KERAS=1

def load(path):
    model = tf.keras.models.load_model(path)
    evaluation = model.evaluate(data["x"], data["y"], batch_size=64, verbose=0, return_dict=True)
    metric = [m for m in model.metrics if m.name == "x"][0]
    model.fit(data["x"], data["y"], batch_size=32, epochs=1, shuffle=False, verbose=0)
    return {
        "loss": type(model.loss).__module__ + "." + type(model.loss).__name__,
        "loss_config": model.loss.get_config(),
        "metric": type(metric).__module__ + "." + type(metric).__name__,
        "evaluation": evaluation,
        "weights": [w.tolist() for w in model.get_weights()],
    }

# The .keras format imports the classes' module by itself.
results["keras"] = load(sys.argv[1] + "/m.keras")
# The legacy formats look the classes up by their registered names.
import tf_xent_ops.tf_keras
results["h5"] = load(sys.argv[1] + "/m.h5")
results["tf"] = load(sys.argv[1] + "/saved_model")
print(json.dumps(results))
"""


class _LossModule(tf.Module):
    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 10], tf.float32)]
    )
    def loss(self, y, logits):
        return txk.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(
            y, logits
        )


def test_saved_models_reload_in_a_fresh_process(tmp_path):
    """.keras, HDF5 and SavedModel files of a model compiled with our loss
    and metric reload in a fresh process (tf.keras there being tf_keras) with
    our classes, evaluate the same and resume training identically."""
    x, y, _ = training_util.digits(128)
    model = _classifier()
    model.compile(
        optimizer=tf_keras.optimizers.SGD(0.1),
        loss=txk.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        metrics=[txk.metrics.SparseCategoricalCrossentropy(from_logits=True, name="x")],
    )
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HDF5 is legacy
        model.save(tmp_path / "m.h5")
    model.save(tmp_path / "saved_model", save_format="tf")
    tf.saved_model.save(_LossModule(), str(tmp_path / "loss_module"))
    logits = model(x).numpy()
    np.savez(tmp_path / "data.npz", x=x, y=y, logits=logits)
    evaluation = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)

    out = run_python(
        RELOAD, tmp_path, tmp_path / "data.npz", env=python_env(TF_USE_LEGACY_KERAS="1")
    ).stdout
    results = json.loads(out.strip().splitlines()[-1])
    expected_loss = _LossModule().loss(y, logits)
    np.testing.assert_allclose(results.pop("loss_module"), expected_loss, rtol=1e-6)
    for fmt, result in results.items():
        assert result["loss"] == "tf_xent_ops.tf_keras.losses.SparseCategoricalCrossentropy", fmt
        assert result["metric"] == "tf_xent_ops.tf_keras.metrics.SparseCategoricalCrossentropy", fmt
        assert result["loss_config"] == model.loss.get_config(), fmt
        for key in ("loss", "x"):
            np.testing.assert_allclose(result["evaluation"][key], evaluation[key], rtol=1e-6)
        for a, b in zip(result["weights"], model.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=fmt)


WITHOUT_TF_KERAS = """
import importlib
import sys
sys.modules["tf_keras"] = None  # as if tf_keras were not installed
import tf_xent_ops
loss = tf_xent_ops.losses.SparseCategoricalCrossentropy()([1], [[0.05, 0.95]])
assert abs(float(loss) - 0.0513) < 1e-4
assert not hasattr(tf_xent_ops, "no_such_attribute")
for access in (
    lambda: importlib.import_module("tf_xent_ops.tf_keras"),
    lambda: tf_xent_ops.tf_keras,
):
    try:
        access()
    except ImportError as error:
        assert "needs the tf_keras package" in str(error), error
    else:
        raise AssertionError("no ImportError")
print("ok")
"""


def test_package_imports_without_tf_keras():
    assert run_python(WITHOUT_TF_KERAS).stdout.split() == ["ok"]


def test_lazy_attribute():
    assert txo.tf_keras is txk
    assert "tf_keras" not in txo.__all__


# z-loss and soft cap, this project's extras.


@pytest.mark.parametrize("sparse", [True, False])
def test_z_loss_and_soft_cap(rng, sparse):
    p = ref.logits(rng, (6, 4, 30), "float32")
    labels = rng.integers(0, 30, size=(6, 4))
    y = labels if sparse else ref.one_hot(labels, 30)
    options = dict(z_loss=1e-3, logit_soft_cap=4.0)
    expected = (
        ref.sparse(labels, p, True, **options) if sparse else ref.dense(y, p, True, **options)
    )
    loss_cls = (
        txk.losses.SparseCategoricalCrossentropy if sparse else txk.losses.CategoricalCrossentropy
    )
    fn = (
        txk.losses.sparse_categorical_crossentropy
        if sparse
        else txk.losses.categorical_crossentropy
    )
    _close(fn(y, p, from_logits=True, **options), expected, RTOL)
    _close(loss_cls(from_logits=True, **options)(y, p), expected.mean(), RTOL)
    metric_cls = (
        txk.metrics.SparseCategoricalCrossentropy if sparse else txk.metrics.CategoricalCrossentropy
    )
    metric = metric_cls(from_logits=True, logit_soft_cap=4.0)
    metric.update_state(y, p)
    capped = (
        ref.sparse(labels, p, True, logit_soft_cap=4.0)
        if sparse
        else ref.dense(y, p, True, logit_soft_cap=4.0)
    )
    _close(metric.result(), capped.mean(), RTOL)
    with pytest.raises(ValueError, match="`z_loss`"):
        loss_cls(z_loss=1e-3)
    with pytest.raises(ValueError, match="`logit_soft_cap`"):
        metric_cls(from_logits=True, logit_soft_cap=-1.0)
    # A softmax's output stands for its logits, but the options for logits
    # are refused with from_logits=False all the same.
    with pytest.raises(ValueError, match="applies to logits only"):
        fn(y, tf_keras.activations.softmax(tf.constant(p)), z_loss=1e-3)
    # Tensors are saved as the numbers they hold.
    config = loss_cls(from_logits=True, z_loss=tf.constant(0.25)).get_config()
    assert type(config["z_loss"]) is float and config["z_loss"] == 0.25
