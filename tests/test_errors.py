"""Bad input gets an exception that names the problem; never a crash."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from raw_ops import coefficients
from tf_xent_ops._load import library

import tf_xent_ops as txo

# The CPU kernels of every instruction-set level this machine runs.
pytestmark = pytest.mark.usefixtures("each_cpu_isa")


def test_sparse_label_out_of_range_names_value_and_range(rng):
    p = ref.logits(rng, (4, 5), "float32")
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"label value of 7 at position 2 .*valid range of \[0, 5\)",
    ):
        txo.ops.sparse_crossentropy([0, 1, 7, 2], p, from_logits=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label value of -1 at position 0"):
        txo.losses.SparseCategoricalCrossentropy(from_logits=True)([-1, 1, 2, 3], p)


def test_label_out_of_range_mentions_ignore_class(rng):
    p = ref.logits(rng, (2, 3), "float32")
    with pytest.raises(tf.errors.InvalidArgumentError, match="is not ignore_class=-1"):
        txo.ops.sparse_crossentropy([-2, 0], p, from_logits=True, ignore_class=-1)


def test_int64_labels_beyond_int32(rng):
    p = ref.logits(rng, (2, 3), "float32")
    with pytest.raises(tf.errors.InvalidArgumentError, match="label value of 4294967296"):
        txo.ops.sparse_crossentropy(np.array([0, 2**32], np.int64), p, from_logits=True)


def test_label_out_of_range_in_gradient_op(rng):
    p = tf.constant(ref.logits(rng, (2, 3), "float32"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the valid range"):
        library.tf_xent_sparse_xent_grad(
            p,
            tf.constant([0, 3], tf.int64),
            tf.zeros([2]),
            tf.ones([2]),
            from_logits=True,
            **coefficients(),
        )


@pytest.mark.parametrize(
    "labels_shape, predictions_shape",
    [((4, 3), (4, 5)), ((4, 5, 1), (4, 5)), ((3,), (4, 5))],
)
def test_dense_shape_mismatch(labels_shape, predictions_shape):
    with pytest.raises(ValueError, match="same shape"):
        txo.categorical_crossentropy(np.zeros(labels_shape), np.ones(predictions_shape))


def test_sparse_shape_mismatch():
    with pytest.raises(ValueError, match="shape of the predictions without the class axis"):
        txo.sparse_categorical_crossentropy(np.zeros((3,), np.int64), np.ones((4, 5)))
    with pytest.raises(ValueError, match="shape of the predictions without the class axis"):
        txo.sparse_categorical_crossentropy(np.zeros((4, 2), np.int64), np.ones((4, 5)))


def test_scalar_predictions():
    with pytest.raises(ValueError, match="rank of at least 1"):
        txo.ops.dense_crossentropy(1.0, 1.0)
    with pytest.raises(ValueError, match="at least rank 1"):
        txo.backend.categorical_crossentropy(1.0, [1.0])


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.5, float("nan")])
def test_label_smoothing_out_of_range(label_smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        txo.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)(
            [[0.0, 1.0]], [[0.3, 0.7]]
        )


@pytest.mark.parametrize("axis", [2, -3, 1.0, True, np.bool_(True), np.float32(1)])
def test_bad_axis(axis):
    with pytest.raises(ValueError, match="axis"):
        txo.ops.sparse_crossentropy([0, 1], [[0.5, 0.5], [0.5, 0.5]], axis=axis)


@pytest.mark.parametrize("axis", [np.int64(1), np.int32(-2)])
def test_numpy_integer_axis_as_keras_takes_it(rng, axis):
    p = ref.logits(rng, (2, 3, 4), "float32")  # classes on axis 1
    labels = rng.integers(0, 3, size=(2, 4))
    y = np.moveaxis(ref.one_hot(labels, 3), -1, 1)
    # Keras's losses take NumPy integers too; the reference is Keras's at axis 1
    # (its axis=-2 fails on its own).
    expected = keras.losses.CategoricalCrossentropy(from_logits=True, axis=1)(y, p)
    for make, y_true in (
        (txo.losses.CategoricalCrossentropy, y),
        (txo.losses.SparseCategoricalCrossentropy, labels),
        (txo.metrics.CategoricalCrossentropy, y),
        (txo.metrics.SparseCategoricalCrossentropy, labels),
    ):
        np.testing.assert_allclose(make(from_logits=True, axis=axis)(y_true, p), expected, 1e-6)
    loss = txo.ops.dense_crossentropy(y, p, from_logits=True, axis=axis)
    np.testing.assert_allclose(np.mean(loss), expected, rtol=1e-6)


def test_integer_predictions():
    with pytest.raises(TypeError, match="Predictions must be"):
        txo.ops.sparse_crossentropy([0], tf.constant([[1, 2]]))


def test_string_labels():
    with pytest.raises(TypeError, match="Sparse labels must be integers"):
        txo.ops.sparse_crossentropy(tf.constant(["a"]), [[0.5, 0.5]])


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_zero_classes(form):
    def call(p, z_loss=0.0):
        if form == "dense":
            return txo.ops.dense_crossentropy(tf.zeros_like(p), p, True, z_loss=z_loss)
        return txo.ops.sparse_crossentropy(tf.zeros(tf.shape(p)[:1], tf.int32), p, True)

    p = tf.zeros((2, 0))
    # Where the shape tells, in Python; else the kernel; XLA's composite gives NaN.
    with pytest.raises(ValueError, match="at least one class along axis 1"):
        call(p)
    unknown = tf.function(call, input_signature=[tf.TensorSpec([None, None])])
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one class"):
        unknown(p)
    for z_loss in (0.0, 1e-3) if form == "dense" else (0.0,):
        xla = tf.function(
            lambda p, z_loss=z_loss: call(p, z_loss),
            input_signature=[tf.TensorSpec([None, None])],
            jit_compile=True,
        )
        assert np.isnan(xla(p).numpy()).all()
    # No rows, no classes: an empty result, as Keras.
    assert call(tf.zeros((0, 0))).shape == (0,)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: library.tf_xent_sparse_xent(
                tf.zeros([2, 3]), tf.zeros([3], tf.int64), **coefficients()
            ),
            "Dimensions must be equal|must have shape",
        ),
        (
            lambda: library.tf_xent_sparse_xent(
                tf.zeros([2, 3, 1]), tf.zeros([2], tf.int64), **coefficients()
            ),
            "must be rank 2|must be 2-D",
        ),
        (
            # Eagerly, the kernel lookup fails first and lists the valid T/Tloss
            # pairs; in a graph, the shape function says it in words.
            lambda: library.tf_xent_sparse_xent(
                tf.zeros([2, 3]), tf.zeros([2], tf.int64), **coefficients(tf.float64)
            ),
            "Tloss",
        ),
        (
            lambda: library.tf_xent_dense_xent(
                tf.zeros([2, 3]), tf.zeros([2, 4]), **coefficients()
            ),
            "Dimensions must be equal|must have shape",
        ),
        (
            lambda: library.tf_xent_dense_xent_grad(
                tf.zeros([2, 3]),
                tf.zeros([2, 3]),
                tf.zeros([2, 3]),
                tf.zeros([2]),
                **coefficients(),
            ),
            "must be 4|must have shape",
        ),
        (
            lambda: library.tf_xent_dense_xent_labels_grad(
                tf.zeros([2, 3]), tf.zeros([2, 2]), tf.zeros([5]), **coefficients()
            ),
            "Dimensions must be equal|must have shape",
        ),
        (
            lambda: library.tf_xent_sparse_xent(
                tf.zeros([2, 3]), tf.zeros([2], tf.int64), **coefficients(label_smoothing=2.0)
            ),
            r"label_smoothing must be in \[0, 1\]",
        ),
        (
            # A cap whose reciprocal float32 flushes to 0 (it would make every
            # logit 0); float64 takes it.
            lambda: library.tf_xent_sparse_xent(
                tf.zeros([2, 3]), tf.zeros([2], tf.int64), **coefficients(logit_soft_cap=1e38)
            ),
            r"logit_soft_cap must be 0 or within \[1.17549e-38, 1.01412e\+31\] for float32",
        ),
        (
            lambda: library.tf_xent_dense_xent(
                tf.zeros([2, 3]), tf.zeros([2, 3]), **coefficients(epsilon=0.9)
            ),
            r"epsilon must be in \[0, 0.5\]",
        ),
        (
            lambda: library.tf_xent_dense_xent(
                tf.zeros([2, 3]), tf.zeros([2, 3]), **coefficients(z_loss=-1.0)
            ),
            "z_loss must be finite and >= 0",
        ),
        (
            lambda: library.tf_xent_sparse_xent(
                tf.zeros([2, 3]),
                tf.zeros([2], tf.int64),
                **coefficients(logit_soft_cap=float("inf")),
            ),
            "logit_soft_cap must be finite and >= 0",
        ),
        (
            lambda: library.tf_xent_sparse_xent(
                tf.zeros([2, 3]),
                tf.zeros([2], tf.int64),
                from_logits=False,
                **coefficients(z_loss=0.1),
            ),
            "apply to logits only",
        ),
        (
            lambda: library.tf_xent_dense_xent(
                tf.zeros([2, 3]),
                tf.zeros([2, 3]),
                **{**coefficients(), "z_loss": tf.zeros([2])},
            ),
            "z_loss must be a scalar|must be rank 0",
        ),
    ],
)
def test_raw_op_validation(call, message):
    errors = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, ValueError)
    with pytest.raises(errors, match=message):
        call()


def test_loss_type_mismatch_in_graph():
    @tf.function
    def f():
        return library.tf_xent_sparse_xent(
            tf.zeros([2, 3]), tf.zeros([2], tf.int64), **coefficients(tf.float64)
        )

    with pytest.raises(ValueError, match="Tloss must be float for predictions of type float"):
        f.get_concrete_function()


def test_raw_op_validation_in_graph_with_unknown_shapes():
    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.int64)])
    def f(p, y):
        return library.tf_xent_sparse_xent(p, y, **coefficients())

    with pytest.raises(tf.errors.InvalidArgumentError, match="must be 2-D"):
        f(tf.zeros([2, 3, 4]), tf.zeros([2], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels must have shape"):
        f(tf.zeros([2, 3]), tf.zeros([4], tf.int64))


def test_nan_propagates_to_its_row_only(rng):
    p = ref.logits(rng, (3, 4), "float32")
    p[1, 2] = np.nan
    loss = txo.ops.sparse_crossentropy([0, 1, 2], p, from_logits=True)
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss.numpy()[[0, 2]]))


@pytest.mark.parametrize(
    "cls",
    [
        txo.losses.CategoricalCrossentropy,
        txo.losses.SparseCategoricalCrossentropy,
        txo.metrics.CategoricalCrossentropy,
        txo.metrics.SparseCategoricalCrossentropy,
    ],
)
def test_keras_objects_need_the_tensorflow_backend(cls, monkeypatch):
    # On JAX, Keras's `fit` hands a loss JAX tracers that no TensorFlow op can
    # read; the objects say so when they are made (and deserialized).
    config = cls().get_config()
    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    message = rf"{cls.__module__}\.{cls.__name__} .*needs Keras's TensorFlow backend.*'jax'"
    with pytest.raises(NotImplementedError, match=message):
        cls()
    with pytest.raises(NotImplementedError, match=message):
        cls.from_config(config)
    # The functions and ops take TensorFlow tensors whatever Keras runs on.
    loss = txo.sparse_categorical_crossentropy([1], [[0.2, 0.8]])
    np.testing.assert_allclose(loss, [-np.log(0.8)], rtol=1e-6)


@pytest.mark.parametrize("ignore_class", [1.5, True, "1"])
def test_ignore_class_must_be_an_int(ignore_class):
    # int() would truncate 1.5 (and True) to class 1 and ignore it.
    p = [[1.0, 2.0, 0.5]]
    with pytest.raises(TypeError, match="`ignore_class` must be an int"):
        txo.ops.sparse_crossentropy([1], p, True, ignore_class=ignore_class)
    for make in (
        txo.losses.SparseCategoricalCrossentropy,
        txo.metrics.SparseCategoricalCrossentropy,
    ):
        with pytest.raises(TypeError, match="`ignore_class` must be an int"):
            make(from_logits=True, ignore_class=ignore_class)
    with pytest.raises(ValueError, match="`ignore_class` must fit in int64"):
        txo.losses.SparseCategoricalCrossentropy(ignore_class=2**70)


@pytest.mark.parametrize("label_dtype", ["int32", "int64"])
def test_ignore_class_beyond_int32_is_compared_in_int64(rng, label_dtype):
    """An ignore_class beyond int32 never matches int32 labels; under XLA
    too, where int32 would have wrapped 2^32 + 1 onto class 1."""
    p = tf.constant(ref.logits(rng, (3, 4), "float32"))
    labels = tf.constant([0, 1, 2], label_dtype)
    loss = txo.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=2**32 + 1, reduction=None
    )

    def forms():
        return txo.ops.sparse_crossentropy(labels, p, True, ignore_class=2**32 + 1), loss(labels, p)

    expected = txo.ops.sparse_crossentropy(labels, p, True)
    for values in (forms(), tf.function(forms, jit_compile=True)()):
        for value in values:
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
