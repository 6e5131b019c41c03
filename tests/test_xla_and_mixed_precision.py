"""XLA (jit_compile) falls back to a composite with the op's semantics; 16-bit
predictions reach the op without a float32 copy."""

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import tf_xent_ops as txo

CASES = [
    dict(sparse=True, from_logits=True, label_smoothing=0.0, ignore_class=None),
    dict(sparse=True, from_logits=True, label_smoothing=0.1, ignore_class=-1),
    dict(sparse=True, from_logits=False, label_smoothing=0.2, ignore_class=None),
    dict(sparse=True, from_logits=False, label_smoothing=0.0, ignore_class=2),
    dict(sparse=False, from_logits=True, label_smoothing=0.0),
    dict(sparse=False, from_logits=True, label_smoothing=0.3),
    dict(sparse=False, from_logits=False, label_smoothing=0.1),
]


def _case_inputs(rng, case, dtype="float32", shape=(16, 7)):
    from_logits = case["from_logits"]
    p = ref.logits(rng, shape, dtype) if from_logits else ref.probabilities(rng, shape, dtype)
    p[0, :2] = 0.0  # clipped probabilities / a tie of logits
    if not from_logits:
        ref.off_the_upper_clip_bound(p[:1])  # the zeros may have crowded the row
    if case["sparse"]:
        y = rng.integers(0, shape[-1], size=shape[:-1])
        if case.get("ignore_class") == -1:
            y[:4] = -1
        return y, p
    return ref.soft_labels(rng, shape), p


def _loss_and_grads(case, y, p):
    kwargs = {k: v for k, v in case.items() if k != "sparse"}
    fn = txo.ops.sparse_crossentropy if case["sparse"] else txo.ops.dense_crossentropy
    p = tf.convert_to_tensor(p)
    y = tf.convert_to_tensor(y)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(p)
        if not case["sparse"]:
            tape.watch(y)
        loss = fn(y, p, **kwargs)
        # Distinct upstream gradients per row, in [1, 2).
        n = tf.cast(tf.size(loss), loss.dtype)
        total = tf.reduce_sum(loss * (1.0 + tf.range(n) / n))
    grads = [tape.gradient(total, p)]
    if not case["sparse"]:
        grads.append(tape.gradient(total, y))
    return [loss] + grads


@pytest.mark.parametrize("case", CASES, ids=str)
def test_jit_compile_matches_the_op(rng, case):
    y, p = _case_inputs(rng, case)
    expected = _loss_and_grads(case, y, p)
    compiled = tf.function(_loss_and_grads, jit_compile=True)
    actual = compiled(case, y, p)
    # The labels' gradient is lse - z: float32 logits of magnitude ~15 carry
    # about 1e-6 of absolute uncertainty in each implementation.
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-5)
    graph = compiled.get_concrete_function(case, y, p).graph
    assert not [op for op in graph.get_operations() if op.type.startswith("TfXent>")]


def test_jit_compile_out_of_range_label_gives_nan_row(rng):
    p = ref.logits(rng, (3, 4), "float32")
    f = tf.function(lambda y, p: txo.ops.sparse_crossentropy(y, p, True), jit_compile=True)
    loss = f(tf.constant([0, 9, 1]), p).numpy()
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))


def _digits(n=256):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x[:n] / 16.0).astype("float32"), y[:n].astype("int64")


def _fit(loss, jit_compile, epochs=2, policy=None):
    x, y = _digits()
    keras.utils.set_random_seed(1)
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
        )
        model.compile(optimizer="sgd", loss=loss, jit_compile=jit_compile)
        history = model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model, history.history["loss"]


def test_model_compile_jit_compile_true_trains_like_the_op():
    loss = txo.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    jit_model, jit_history = _fit(loss, jit_compile=True)
    op_model, op_history = _fit(loss, jit_compile=False)
    assert jit_model.jit_compile
    np.testing.assert_allclose(jit_history, op_history, rtol=1e-5)
    for a, b in zip(jit_model.get_weights(), op_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_is_finite(policy):
    loss = txo.losses.SparseCategoricalCrossentropy(from_logits=True)
    model, history = _fit(loss, jit_compile=False, epochs=3, policy=policy)
    assert model.layers[-1].compute_dtype == policy.split("_")[1]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
@pytest.mark.parametrize("sparse", [True, False])
def test_16_bit_predictions_reach_the_op_without_a_float32_copy(rng, dtype, sparse):
    shape = (64, 100)
    logits = tf.constant(ref.logits(rng, shape, "float32"), dtype)
    labels = rng.integers(0, 100, size=64)
    if sparse:
        y, loss_obj = labels, txo.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        y, loss_obj = ref.one_hot(labels, 100), txo.losses.CategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(y, logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = loss_obj(y, logits)
        return loss, tape.gradient(loss, logits)

    loss, grad = step(y, logits)
    assert loss.dtype == tf.float32 and grad.dtype == dtype
    graph = step.get_concrete_function(y, logits).graph
    xent = [op for op in graph.get_operations() if op.type.startswith("TfXent>")]
    assert {op.inputs[0].dtype for op in xent} == {dtype}
    big_float32_casts = [
        op
        for op in graph.get_operations()
        if op.type == "Cast"
        and op.outputs[0].dtype == tf.float32
        and op.outputs[0].shape.num_elements() == shape[0] * shape[1]
        and op.inputs[0].dtype == dtype
    ]
    assert not big_float32_casts
    keras_loss = (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if sparse
        else keras.losses.CategoricalCrossentropy(from_logits=True)
    )
    np.testing.assert_allclose(loss, keras_loss(y, logits), rtol=2e-5)
