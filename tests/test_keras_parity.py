"""Values of the losses, functions and metrics against the Keras built-ins."""

import warnings

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import tf_xent_ops as txo

# The CPU kernels of every instruction-set level this machine runs.
pytestmark = pytest.mark.usefixtures("each_cpu_isa")

REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", None, "none"]
RTOL, ATOL = 2e-5, 2e-6


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


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
    ours = txo.losses.CategoricalCrossentropy(**kwargs)(y, p, sample_weight=sw)
    theirs = keras.losses.CategoricalCrossentropy(**kwargs)(y, p, sample_weight=sw)
    _close(ours, theirs)


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
    ours = txo.losses.SparseCategoricalCrossentropy(**kwargs)(y, p, sample_weight=sw)
    theirs = keras.losses.SparseCategoricalCrossentropy(**kwargs)(y, p, sample_weight=sw)
    _close(ours, theirs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
def test_loss_classes_other_prediction_dtypes(rng, dtype, sparse, from_logits):
    # Keras casts predictions to the loss dtype (float32) first; upcasting is
    # exact, so the two agree to float32 rounding.
    shape = (12, 33)
    p = tf.constant(ref.predictions(rng, shape, from_logits, dtype))
    if sparse:
        y = rng.integers(0, shape[1], size=shape[:1])
        cls_ours, cls_theirs = (
            txo.losses.SparseCategoricalCrossentropy,
            (keras.losses.SparseCategoricalCrossentropy),
        )
    else:
        y = ref.soft_labels(rng, shape)
        cls_ours, cls_theirs = (
            txo.losses.CategoricalCrossentropy,
            (keras.losses.CategoricalCrossentropy),
        )
    ours = cls_ours(from_logits=from_logits, reduction=None)(y, p)
    theirs = cls_theirs(from_logits=from_logits, reduction=None)(y, p)
    assert ours.dtype == theirs.dtype == tf.float32
    _close(ours, theirs)


@pytest.mark.parametrize("axis", [-1, 1, 0])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("weights", [None, "per_position"])
def test_categorical_3d_axes(rng, axis, from_logits, weights):
    shape = (5, 6, 4)
    p = ref.predictions(rng, shape, from_logits, axis=axis)
    y = ref.soft_labels(rng, shape, axis=axis)
    batch_shape = tuple(d for i, d in enumerate(shape) if i != axis % 3)
    sw = ref.sample_weight(rng, weights, batch_shape)
    # Keras smooths with the last dimension's size; without smoothing the
    # semantics agree on every axis.
    ours = txo.losses.CategoricalCrossentropy(from_logits=from_logits, axis=axis)(y, p, sw)
    theirs = keras.losses.CategoricalCrossentropy(from_logits=from_logits, axis=axis)(y, p, sw)
    _close(ours, theirs)


@pytest.mark.parametrize("form", ["loss", "function", "metric"])
def test_negative_axis_with_logits(rng, form):
    """Keras 3.15 fails on logits with a negative axis other than -1: the
    tf.nn.softmax_cross_entropy_with_logits it calls (TensorFlow 2.21) moves
    the axis last with a tf.range that the negative index leaves empty. Ours
    take it, and give Keras's numbers for the same axis counted from the front."""
    p = ref.predictions(rng, (3, 5, 4), from_logits=True)
    y = ref.soft_labels(rng, (3, 5, 4), axis=1)
    forms = {
        "loss": lambda module, axis: module.losses.CategoricalCrossentropy(
            from_logits=True, axis=axis
        )(y, p),
        "function": lambda module, axis: module.losses.categorical_crossentropy(
            y, p, from_logits=True, axis=axis
        ),
        "metric": lambda module, axis: module.metrics.CategoricalCrossentropy(
            from_logits=True, axis=axis
        )(y, p),
    }
    with pytest.raises(tf.errors.InvalidArgumentError, match="Requires start <= limit"):
        forms[form](keras, -2)
    _close(forms[form](txo, -2), forms[form](keras, 1))


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("ignore_class", [None, 0])
def test_sparse_segmentation_shapes(rng, from_logits, ignore_class):
    shape = (3, 5, 6, 8)
    p = ref.predictions(rng, shape, from_logits)
    y = rng.integers(0, shape[-1], size=shape[:-1])
    sw = ref.sample_weight(rng, "per_position", shape[:-1])
    kwargs = dict(from_logits=from_logits, ignore_class=ignore_class)
    ours = txo.losses.SparseCategoricalCrossentropy(**kwargs)(y, p, sw)
    theirs = keras.losses.SparseCategoricalCrossentropy(**kwargs)(y, p, sw)
    _close(ours, theirs)


@pytest.mark.parametrize("axis", [0, 1])
def test_sparse_any_axis_equals_keras_on_transposed_input(rng, axis):
    shape = (4, 9, 5)
    p = ref.logits(rng, shape, "float32")
    batch_shape = tuple(d for i, d in enumerate(shape) if i != axis)
    y = rng.integers(0, shape[axis], size=batch_shape)
    loss = txo.losses.SparseCategoricalCrossentropy(from_logits=True, axis=axis)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _close(loss(y, p), keras_loss(y, np.moveaxis(p, axis, -1)))


def test_sparse_label_smoothing_equals_keras_dense_one_hot(rng):
    p = ref.logits(rng, (20, 9), "float32")
    y = rng.integers(0, 9, size=20)
    ours = txo.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.2)(y, p)
    theirs = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2)(
        ref.one_hot(y, 9), p
    )
    _close(ours, theirs)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean"])
@pytest.mark.parametrize("sparse", [True, False])
def test_keras_mask_on_predictions(rng, reduction, sparse):
    shape = (6, 4, 5)
    p = tf.constant(ref.logits(rng, shape, "float32"))
    mask = tf.constant(rng.uniform(size=shape[:2]) < 0.6)
    if sparse:
        y = rng.integers(0, 5, size=shape[:2])
        ours_cls, theirs_cls = (
            txo.losses.SparseCategoricalCrossentropy,
            keras.losses.SparseCategoricalCrossentropy,
        )
    else:
        y = ref.soft_labels(rng, shape)
        ours_cls, theirs_cls = (
            txo.losses.CategoricalCrossentropy,
            keras.losses.CategoricalCrossentropy,
        )
    p._keras_mask = mask
    ours = ours_cls(from_logits=True, reduction=reduction)(y, p)
    theirs = theirs_cls(from_logits=True, reduction=reduction)(y, p)
    _close(ours, theirs)


@pytest.mark.parametrize("n", [0, 1])
def test_zero_and_one_sample_batches(rng, n):
    p = ref.logits(rng, (n, 6), "float32")
    y = rng.integers(0, 6, size=n)
    for reduction in REDUCTIONS:
        ours = txo.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
        theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
        _close(ours(y, p), theirs(y, p))
        dense_ours = txo.losses.CategoricalCrossentropy(from_logits=True, reduction=reduction)
        dense_theirs = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=reduction)
        _close(dense_ours(ref.one_hot(y, 6), p), dense_theirs(ref.one_hot(y, 6), p))


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_functions(rng, from_logits, label_smoothing):
    shape = (9, 6)
    p = ref.predictions(rng, shape, from_logits)
    y = ref.soft_labels(rng, shape)
    _close(
        txo.categorical_crossentropy(y, p, from_logits, label_smoothing),
        keras.losses.categorical_crossentropy(y, p, from_logits, label_smoothing),
    )
    labels = rng.integers(0, 6, size=9)
    for ignore_class in (None, 2):
        _close(
            txo.sparse_categorical_crossentropy(labels, p, from_logits, ignore_class),
            keras.losses.sparse_categorical_crossentropy(labels, p, from_logits, ignore_class),
        )


def test_function_dtype_follows_predictions(rng):
    p = tf.constant(ref.logits(rng, (4, 5), "bfloat16"))
    y = rng.integers(0, 5, size=4)
    assert txo.sparse_categorical_crossentropy(y, p, from_logits=True).dtype == tf.bfloat16
    assert txo.categorical_crossentropy(ref.one_hot(y, 5), p, True).dtype == tf.bfloat16


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
def test_16_bit_functions_round_the_float32_loss_once(rng, dtype, sparse, from_logits):
    # The functions (and the metrics, which call them) give Keras's float32
    # numbers rounded to the predictions' dtype; Keras's compute in that dtype.
    p = ref.predictions(rng, (64, 7), from_logits, dtype)
    labels = rng.integers(0, 7, size=64)
    y = labels if sparse else ref.one_hot(labels, 7)
    name = "sparse_categorical_crossentropy" if sparse else "categorical_crossentropy"
    ours = getattr(txo, name)(y, p, from_logits=from_logits)
    upcast = getattr(txo, name)(y, p.astype(np.float32), from_logits=from_logits)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(ours, tf.cast(upcast, dtype))
    _close(upcast, getattr(keras.losses, name)(y, p.astype(np.float32), from_logits=from_logits))


def test_16_bit_metric_agrees_with_the_loss_class():
    # A clipped float16 probability: Keras's metric clips at epsilon rounded
    # to float16 (1.19e-7) and reports -log(1.19e-7) = 15.945, its loss class
    # (float32 inside) -log(1e-7) = 16.118; ours report 16.118 to float16's
    # rounding (16.125) in both.
    y, p = np.array([0]), np.array([[0.0, 1.0]], np.float16)
    loss = float(keras.losses.SparseCategoricalCrossentropy()(y, p))
    np.testing.assert_allclose(loss, -np.log(np.float32(1e-7)), rtol=1e-6)
    np.testing.assert_allclose(txo.losses.SparseCategoricalCrossentropy()(y, p), loss, rtol=1e-6)
    for cls, expected in [
        (keras.metrics.SparseCategoricalCrossentropy, -np.log(float(np.float16(1e-7)))),
        (txo.metrics.SparseCategoricalCrossentropy, float(np.float16(loss))),
    ]:
        metric = cls()
        metric.update_state(y, p)
        np.testing.assert_allclose(metric.result(), expected, rtol=ref.HALF_ULP["float16"])


def test_one_class_warning_looks_at_the_class_axis(rng):
    # As Keras, for classes last; Keras looks at the last axis for any
    # `axis`, so it warns on [N, C, 1] with axis=1 and not on [N, 1, 3].
    y = ref.one_hot(rng.integers(0, 3, size=(4, 1)), 3, axis=1)
    p = ref.probabilities(rng, (4, 3, 1), "float32", axis=1)
    with pytest.warns(SyntaxWarning, match="y_pred.shape=\\(4, 3, 1\\)"):
        keras.losses.categorical_crossentropy(y, p, axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        txo.categorical_crossentropy(y, p, axis=1)
        txo.losses.CategoricalCrossentropy(axis=1)(y, p)
    ones = np.ones((4, 1, 3), np.float32)
    for form in (txo.categorical_crossentropy, keras.losses.categorical_crossentropy):
        with pytest.warns(SyntaxWarning, match="num_classes > 1"):
            form(np.ones((4, 1), np.float32), np.ones((4, 1), np.float32))
    with pytest.warns(SyntaxWarning, match="along the class axis 1"):
        txo.categorical_crossentropy(ones, ones, axis=1)


def test_sparse_ignore_class_sets_keras_mask(rng):
    p = ref.logits(rng, (8, 5), "float32")
    y = np.array([0, 1, -1, 2, -1, 4, 3, 0])
    loss = txo.sparse_categorical_crossentropy(y, p, from_logits=True, ignore_class=-1)
    np.testing.assert_array_equal(loss._keras_mask.numpy(), y != -1)


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("from_logits", [True, False])
def test_backend_forms(rng, axis, from_logits):
    shape = (3, 7, 5)
    p = ref.predictions(rng, shape, from_logits, axis=axis)
    y = ref.soft_labels(rng, shape, axis=axis)
    _close(
        txo.backend.categorical_crossentropy(y, p, from_logits, axis),
        keras.ops.categorical_crossentropy(y, p, from_logits, axis),
    )
    if axis == -1:
        labels = rng.integers(0, shape[-1], size=shape[:-1])
        _close(
            txo.backend.sparse_categorical_crossentropy(labels, p, from_logits, axis),
            keras.ops.sparse_categorical_crossentropy(labels, p, from_logits, axis),
        )


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
def test_metrics_over_batches(rng, sparse, from_logits):
    kwargs = dict(from_logits=from_logits)
    if sparse:
        ours = txo.metrics.SparseCategoricalCrossentropy(**kwargs, ignore_class=0)
        theirs = keras.metrics.SparseCategoricalCrossentropy(**kwargs, ignore_class=0)
    else:
        ours = txo.metrics.CategoricalCrossentropy(**kwargs, label_smoothing=0.1)
        theirs = keras.metrics.CategoricalCrossentropy(**kwargs, label_smoothing=0.1)
    for step in range(3):
        p = ref.predictions(rng, (10, 4), from_logits)
        labels = rng.integers(0, 4, size=10)
        y = labels if sparse else ref.one_hot(labels, 4)
        sw = None if step == 0 else rng.uniform(0, 1, size=10).astype(np.float32)
        ours.update_state(y, p, sample_weight=sw)
        theirs.update_state(y, p, sample_weight=sw)
        _close(ours.result(), theirs.result())
    ours.reset_state()
    assert float(ours.result()) == 0.0


def test_softmax_logits_shortcut(rng):
    logits = tf.constant(ref.logits(rng, (6, 5), "float32") * 10.0)
    probs = keras.activations.softmax(logits)
    assert hasattr(probs, "_keras_logits")
    y = rng.integers(0, 5, size=6)
    ours = txo.losses.SparseCategoricalCrossentropy()(y, probs)
    theirs = keras.losses.SparseCategoricalCrossentropy()(y, probs)
    _close(ours, theirs)
    _close(ours, keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits))
    with pytest.warns(UserWarning, match="from_logits=True"):
        txo.sparse_categorical_crossentropy(y, probs, from_logits=True)


def test_softmax_op_shortcut_in_graph(rng):
    logits = ref.logits(rng, (6, 5), "float32") * 10.0
    y = ref.one_hot(rng.integers(0, 5, size=6), 5)

    @tf.function
    def both(y, logits):
        probs = tf.nn.softmax(logits)
        return (
            txo.losses.CategoricalCrossentropy()(y, probs),
            keras.losses.CategoricalCrossentropy()(y, probs),
        )

    ours, theirs = both(y, logits)
    _close(ours, theirs)


@pytest.mark.parametrize("doc_case", ["dense", "sparse"])
def test_tensorflow_documentation_examples(doc_case):
    y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    y_true = [[0, 1, 0], [0, 0, 1]] if doc_case == "dense" else [1, 2]
    cls = (
        txo.losses.CategoricalCrossentropy
        if doc_case == "dense"
        else txo.losses.SparseCategoricalCrossentropy
    )
    np.testing.assert_allclose(cls()(y_true, y_pred), 1.177, atol=5e-4)
    np.testing.assert_allclose(cls()(y_true, y_pred, sample_weight=[0.3, 0.7]), 0.814, atol=5e-4)
    np.testing.assert_allclose(cls(reduction="sum")(y_true, y_pred), 2.354, atol=5e-4)
    np.testing.assert_allclose(cls(reduction=None)(y_true, y_pred), [0.0513, 2.303], atol=5e-4)
    metric = (
        txo.metrics.CategoricalCrossentropy()
        if doc_case == "dense"
        else txo.metrics.SparseCategoricalCrossentropy()
    )
    metric.update_state(y_true, y_pred)
    np.testing.assert_allclose(metric.result(), 1.1769392, rtol=1e-6)
    metric.reset_state()
    metric.update_state(y_true, y_pred, sample_weight=[0.3, 0.7])
    np.testing.assert_allclose(metric.result(), 1.6271976, rtol=1e-6)


def test_tensorflow_backend_documentation_examples():
    a = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    b = [[0.9, 0.05, 0.05], [0.5, 0.89, 0.6], [0.05, 0.01, 0.94]]
    np.testing.assert_allclose(
        txo.backend.categorical_crossentropy(a, b), [0.10536, 0.80467, 0.06188], atol=1e-5
    )
    c = [[0.9, 0.05, 0.05], [0.05, 0.89, 0.06], [0.05, 0.01, 0.94]]
    np.testing.assert_allclose(txo.losses.CategoricalCrossentropy()(a, c), 0.0945, atol=1e-4)
    np.testing.assert_allclose(
        txo.backend.categorical_crossentropy(a, a), [0.0, 0.0, 0.0], atol=1e-6
    )


def _random_configuration(rng):
    """A loss configuration drawn at random, as (description, loss classes,
    metric classes, kwargs, draw): the combinations of rank, axis, label form,
    prediction dtype and weights that the grids above leave out. `draw(rng)`
    returns one batch for it, as (labels, predictions, sample_weight); kwargs
    hold no reduction (metrics take none)."""
    sparse = bool(rng.integers(2))
    from_logits = bool(rng.integers(2))
    dtype = str(rng.choice(["float32", "float64", "float16", "bfloat16"]))
    batch_shape = tuple(int(d) for d in rng.integers(1, 5, size=rng.integers(0, 4)))
    num_classes = int(rng.integers(2, 9))
    # Keras's sparse classes take the classes last; its categorical ones any axis.
    position = len(batch_shape) if sparse else int(rng.integers(len(batch_shape) + 1))
    shape = batch_shape[:position] + (num_classes,) + batch_shape[position:]
    axis = position - len(shape) if rng.integers(2) else position
    kwargs = dict(from_logits=from_logits)
    if sparse:
        if rng.integers(3) == 0:
            kwargs["ignore_class"] = int(rng.choice([-1, 0]))
        name = "SparseCategoricalCrossentropy"
    else:
        kwargs.update(axis=axis, label_smoothing=float(rng.choice([0.0, 0.2])))
        soft = bool(rng.integers(2))
        name = "CategoricalCrossentropy"
    # Keras's weights are per position or broadcast to it: [N] for losses of
    # rank 1, [N, 1] for rank 2.
    per_sample = {1: ["per_sample"], 2: ["per_sample_column"]}.get(len(batch_shape), [])
    weights = rng.choice([None, "scalar", "per_position"] + per_sample)

    def draw(rng):
        if sparse:
            labels = rng.integers(0, num_classes, size=batch_shape)
            if "ignore_class" in kwargs:
                labels[rng.uniform(size=labels.shape) < 0.3] = kwargs["ignore_class"]
            if rng.integers(3) == 0:  # Keras squeezes a trailing 1, and casts floats.
                labels = labels[..., None]
            if rng.integers(3) == 0:
                labels = labels.astype(np.float32)
        elif soft:
            labels = ref.soft_labels(rng, shape, axis=axis)
        else:
            labels = ref.one_hot(rng.integers(0, num_classes, size=batch_shape), num_classes, axis)
        sample_weight = ref.sample_weight(rng, weights, batch_shape) if batch_shape else None
        return labels, ref.predictions(rng, shape, from_logits, dtype, axis=axis), sample_weight

    description = f"{name}({kwargs}) predictions {dtype}{list(shape)} sample_weight {weights}"
    losses = (getattr(txo.losses, name), getattr(keras.losses, name))
    metrics = (getattr(txo.metrics, name), getattr(keras.metrics, name))
    return description, losses, metrics, kwargs, draw


def _keras_kwargs(kwargs):
    """Keras's arguments for ours: the classes last. Keras smooths labels by
    the last axis's size (see docs/semantics.md), and with logits the tf.nn op
    it calls fails on a negative axis other than -1."""
    return dict(kwargs, axis=-1) if "axis" in kwargs else kwargs


def _as_keras_gets_it(kwargs, labels, predictions):
    """(kwargs, labels, predictions) for Keras: see _keras_kwargs."""
    if "axis" not in kwargs:
        return kwargs, labels, predictions
    axis = kwargs["axis"]
    return (
        _keras_kwargs(kwargs),
        np.moveaxis(labels, axis, -1),
        np.moveaxis(predictions, axis, -1),
    )


def _loss_and_gradient(cls, kwargs, labels, predictions, sample_weight):
    p = tf.Variable(predictions)
    with tf.GradientTape() as tape:
        loss = cls(**kwargs)(labels, p, sample_weight=sample_weight)
        # Distinct cotangents in (0, 1] per position, for reduction=None.
        size = tf.cast(tf.size(loss), loss.dtype)
        cotangent = tf.range(1.0, 1.0 + size) / size
        total = tf.reduce_sum(loss * tf.reshape(cotangent, tf.shape(loss)))
    return loss, np.asarray(tf.cast(tape.gradient(total, p), tf.float64))


def test_random_configurations_match_keras(rng):
    for _ in range(40):
        description, classes, _, kwargs, draw = _random_configuration(rng)
        kwargs = dict(kwargs, reduction=REDUCTIONS[rng.integers(len(REDUCTIONS))])
        labels, predictions, sample_weight = draw(rng)
        description += f" labels {labels.dtype}{list(labels.shape)} {kwargs['reduction']}"
        ours, our_grad = _loss_and_gradient(classes[0], kwargs, labels, predictions, sample_weight)
        theirs, their_grad = _loss_and_gradient(
            classes[1], *_as_keras_gets_it(kwargs, labels, predictions), sample_weight
        )
        their_grad = np.moveaxis(their_grad, -1, kwargs.get("axis", -1))
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, description
        np.testing.assert_allclose(ours, theirs, RTOL, ATOL, err_msg=description)
        # Keras's gradient goes through its float32 copy, then is rounded
        # back to the predictions' dtype, as ours is: 16-bit gradients may
        # differ by an ulp of that type. The absolute part is float32's
        # cancellation in softmax - t near 1 (its row weight is at most 2:
        # cotangents of at most 1 times weights of at most 2), with the row
        # log-sum-exp's rounding (docs/semantics.md). Infinities (float16
        # gradients of tiny probabilities) must match exactly.
        rtol = 1e-2 if predictions.dtype.itemsize == 2 else 2e-5
        np.testing.assert_allclose(our_grad, their_grad, rtol, 4e-6, err_msg=description)


def test_random_metric_configurations_match_keras(rng):
    """Metrics drawn at random, each over three batches (with a reset
    between the second and the third), against Keras's, the result dtype
    drawn too."""
    for _ in range(20):
        description, _, classes, kwargs, draw = _random_configuration(rng)
        result_dtype = rng.choice([None, "float64"])
        ours = classes[0](dtype=result_dtype, **kwargs)
        theirs = classes[1](dtype=result_dtype, **_keras_kwargs(kwargs))
        for step in range(3):
            if step == 2:
                ours.reset_state()
                theirs.reset_state()
            labels, predictions, sample_weight = draw(rng)
            ours.update_state(labels, predictions, sample_weight=sample_weight)
            # Keras's metrics compute 16-bit predictions in that type, ours
            # in float32 rounded once (docs/semantics.md): Keras gets them
            # upcast, and the values may differ by half an ulp of the type.
            rtol = RTOL + ref.HALF_ULP.get(predictions.dtype.name, 0.0)
            if predictions.dtype.itemsize == 2:
                predictions = predictions.astype(np.float32)
            _, labels, predictions = _as_keras_gets_it(kwargs, labels, predictions)
            theirs.update_state(labels, predictions, sample_weight=sample_weight)
            message = f"{description} dtype {result_dtype} step {step}"
            assert ours.result().dtype == theirs.result().dtype, message
            np.testing.assert_allclose(ours.result(), theirs.result(), rtol, ATOL, err_msg=message)
