"""float64 predictions get float64 coefficients (label smoothing, epsilon,
z-loss, soft cap), and the functions take tensors of unknown rank where the
class axis can still be found."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import tf_xent_ops as txo

# The CPU kernels of every instruction-set level this machine runs.
pytestmark = pytest.mark.usefixtures("each_cpu_isa")


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("predictions_dtype", ["float64", "float32"])
def test_float64_matches_keras_to_float64_precision(rng, sparse, from_logits, predictions_dtype):
    # Keras computes with the Python floats in float64; so do the ops (float
    # attributes would have rounded 0.35 and 1e-7 to float32: 1e-8 off). A
    # float64 loss given float32 predictions computes in float64 too.
    shape = (16, 9)
    if from_logits:
        p = ref.logits(rng, shape, "float64")
    else:
        p = ref.probabilities(rng, shape, "float64")
        p[:4, :3] = 1e-9  # clipped at epsilon
        ref.off_the_upper_clip_bound(p)
    p = tf.constant(p.astype(predictions_dtype))
    labels = rng.integers(0, 9, size=16)
    y = labels if sparse else ref.one_hot(labels, 9).astype(np.float64)
    kwargs = dict(from_logits=from_logits, label_smoothing=0.35, dtype="float64")
    if sparse and from_logits:
        # Keras's sparse loss has no smoothing: compare the one-hot form.
        ours_cls = txo.losses.SparseCategoricalCrossentropy
        theirs_cls, theirs_y = keras.losses.CategoricalCrossentropy, ref.one_hot(labels, 9)
    elif sparse:
        # Sparse probabilities are not normalized (Keras's sparse form): no
        # smoothing to compare there, but epsilon's clip.
        del kwargs["label_smoothing"]
        ours_cls = txo.losses.SparseCategoricalCrossentropy
        theirs_cls, theirs_y = keras.losses.SparseCategoricalCrossentropy, labels
    else:
        ours_cls = txo.losses.CategoricalCrossentropy
        theirs_cls, theirs_y = keras.losses.CategoricalCrossentropy, y
    for reduction in ("sum", None):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(p)
            ours = ours_cls(reduction=reduction, **kwargs)(y, p)
            theirs = theirs_cls(reduction=reduction, **kwargs)(theirs_y.astype(np.float64), p)
        assert ours.dtype == tf.float64
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
        if reduction == "sum":
            np.testing.assert_allclose(
                tape.gradient(ours, p), tape.gradient(theirs, p), rtol=1e-6, atol=1e-12
            )


def test_float64_coefficients_are_exact_in_the_ops(rng):
    p = ref.logits(rng, (5, 7), "float64")
    labels = rng.integers(0, 7, size=5)
    options = dict(z_loss=0.123456789012345, logit_soft_cap=2.718281828459045)
    for ls in (0.35, 0.1):
        loss = txo.ops.sparse_crossentropy(labels, p, True, ls, **options)
        np.testing.assert_allclose(
            loss, ref.sparse(labels, p, True, ls, **options), rtol=1e-13, atol=1e-13
        )
        # float32 rounding of the coefficients would show at 1e-8.
        rounded = {k: float(np.float32(v)) for k, v in options.items()}
        assert (
            np.max(np.abs(loss - ref.sparse(labels, p, True, float(np.float32(ls)), **rounded)))
            > 1e-10
        )
    xla = tf.function(
        lambda: txo.ops.sparse_crossentropy(labels, p, True, 0.35, **options), jit_compile=True
    )()
    np.testing.assert_allclose(
        xla, ref.sparse(labels, p, True, 0.35, **options), rtol=1e-13, atol=1e-13
    )


UNKNOWN = tf.TensorSpec(None, tf.float32)


@pytest.mark.parametrize("with_class_dim", [False, True])
def test_sparse_with_unknown_ranks(rng, with_class_dim):
    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64), UNKNOWN])
    def loss_and_grad(y, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss = txo.sparse_categorical_crossentropy(y, p, from_logits=True, label_smoothing=0.1)
        return loss, tape.gradient(loss, p)

    p = ref.logits(rng, (3, 4, 6), "float32")
    labels = rng.integers(0, 6, size=(3, 4))
    y = labels[..., None] if with_class_dim else labels
    loss, grad = loss_and_grad(tf.constant(y), tf.constant(p))
    assert loss.shape == (3, 4) and grad.shape == p.shape
    np.testing.assert_allclose(loss, ref.sparse(labels, p, True, 0.1), rtol=2e-5, atol=2e-5)
    expected = ref.sparse_gradient(labels.reshape(-1), p.reshape(-1, 6), True, 0.1)
    np.testing.assert_allclose(grad.numpy().reshape(-1, 6), expected.value, rtol=1e-4, atol=1e-6)
    # Valid values fed, then labels of the wrong shape, also of as many
    # elements: an error that says so.
    for wrong in (labels[:2], labels.T, labels.reshape(2, 6)):
        with pytest.raises(tf.errors.InvalidArgumentError, match="labels must have the shape"):
            loss_and_grad(tf.constant(wrong), tf.constant(p))


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_label_shape_checked_where_only_the_rank_is_known(rng, sparse, jit_compile):
    """[None, None] batches (sequences in `fit`): labels of the transposed
    shape hold as many positions but are refused, as tf.nn's ops refuse them."""
    label_spec = tf.TensorSpec([None, None], tf.int64 if sparse else tf.float32)
    if not sparse:
        label_spec = tf.TensorSpec([None, None, 5])

    @tf.function(
        input_signature=[label_spec, tf.TensorSpec([None, None, 5])], jit_compile=jit_compile
    )
    def f(y, p):
        if sparse:
            return txo.ops.sparse_crossentropy(y, p, from_logits=True)
        return txo.ops.dense_crossentropy(y, p, from_logits=True)

    p = ref.logits(rng, (2, 3, 5), "float32")
    labels = rng.integers(0, 5, size=(2, 3))
    y = labels if sparse else np.eye(5, dtype=np.float32)[labels]
    expected = ref.sparse(labels, p, True) if sparse else ref.dense(y, p, True)
    np.testing.assert_allclose(f(tf.constant(y), tf.constant(p)), expected, rtol=2e-5, atol=2e-5)
    if jit_compile:
        return  # XLA drops the check: it cannot raise.
    wrong = labels.T if sparse else np.swapaxes(y, 0, 1)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="must have the same shape|labels must have the shape"
    ):
        f(tf.constant(wrong), tf.constant(p))


def test_dense_with_unknown_ranks(rng):
    @tf.function(input_signature=[UNKNOWN, UNKNOWN])
    def f(y, p):
        return txo.ops.dense_crossentropy(y, p, from_logits=True, z_loss=1e-3)

    p = ref.logits(rng, (2, 5, 7), "float32")
    y = ref.soft_labels(rng, p.shape)
    loss = f(tf.constant(y), tf.constant(p))
    np.testing.assert_allclose(loss, ref.dense(y, p, True, z_loss=1e-3), rtol=2e-5, atol=2e-5)
    # The same number of elements in another shape is still a mismatch.
    with pytest.raises(tf.errors.InvalidArgumentError, match="same shape"):
        f(tf.constant(y.reshape(2, 7, 5)), tf.constant(p))


def test_the_keras_forms_with_unknown_ranks(rng):
    @tf.function(input_signature=[UNKNOWN, UNKNOWN])
    def f(y, p):
        return (
            txo.categorical_crossentropy(y, p, from_logits=True),
            txo.backend.categorical_crossentropy(y, p, from_logits=True),
        )

    p = ref.logits(rng, (4, 7), "float32")
    y = ref.soft_labels(rng, p.shape)
    for loss in f(tf.constant(y), tf.constant(p)):
        np.testing.assert_allclose(loss, ref.dense(y, p, True), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("axis", [0, 1, -2])
def test_unknown_rank_with_another_axis_says_to_give_the_rank(axis):
    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64), UNKNOWN])
    def f(y, p):
        return txo.ops.sparse_crossentropy(y, p, from_logits=True, axis=axis)

    with pytest.raises(ValueError, match="unknown rank.*axis=-1.*known rank"):
        f.get_concrete_function()


def test_unknown_rank_on_one_side_only(rng):
    # Predictions of known rank, labels of unknown rank (and the other way).
    p = ref.logits(rng, (6, 5), "float32")
    labels = rng.integers(0, 5, size=6)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int32), tf.TensorSpec([None, 5])])
    def known_predictions(y, p):
        return txo.ops.sparse_crossentropy(y, p, from_logits=True)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), UNKNOWN])
    def known_labels(y, p):
        return txo.ops.sparse_crossentropy(y, p, from_logits=True)

    for f in (known_predictions, known_labels):
        loss = f(tf.constant(labels, tf.int32), tf.constant(p))
        np.testing.assert_allclose(loss, ref.sparse(labels, p, True), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("axis", [0, 1, -2])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_dense_labels_of_unknown_rank_with_another_axis(rng, axis, jit_compile):
    # Predictions of known rank put the classes on `axis`; labels of unknown
    # rank must move theirs last with them, not be read flat.
    p = tf.constant(ref.logits(rng, (2, 3, 4), "float32"))
    y = tf.constant(ref.soft_labels(rng, (2, 3, 4)))

    def step(y, p):
        with tf.GradientTape() as tape:
            tape.watch([y, p])
            loss = txo.ops.dense_crossentropy(y, p, True, 0.1, axis, logit_soft_cap=3.0)
        return (loss, *tape.gradient(loss, [y, p]))

    traced = tf.function(
        step, input_signature=[UNKNOWN, tf.TensorSpec(p.shape)], jit_compile=jit_compile
    )
    for a, b in zip(step(y, p), traced(y, p), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    expected = ref.dense(y.numpy(), p.numpy(), True, 0.1, axis, logit_soft_cap=3.0)
    np.testing.assert_allclose(traced(y, p)[0], expected, rtol=2e-5, atol=2e-5)
