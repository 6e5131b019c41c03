"""z-loss and logit soft-capping: values and gradients of every form against
float64 references written from the definitions, the XLA composite, higher
orders, the log-sum-exp output, the Keras classes and their argument checks."""

import re

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import tf_xent_ops as txo

# The CPU kernels of every instruction-set level this machine runs.
pytestmark = pytest.mark.usefixtures("each_cpu_isa")

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# Gradient tolerances relative to the size of the terms (ref.Gradient.scale):
# float32 accumulation, rounded once to 16 bits for 16-bit predictions.
GRADIENT_RTOL = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}
OPTIONS = [
    dict(z_loss=1e-3),
    dict(logit_soft_cap=5.0),
    dict(z_loss=2e-2, logit_soft_cap=3.0),
]


def _special_logits(rng, shape, dtype, labels=None):
    """Logits with rows of +-1e4 and rows with -inf (off the label, where
    there are labels; with a cap they become -cap and cost nothing extra)."""
    z = ref.logits(rng, shape, "float64")
    n, c = shape
    z[0] = 1e4
    if n > 1:
        z[1, rng.integers(c)] = -1e4
        z[1, rng.integers(c)] = 1e4
    if n > 2:
        off = np.arange(c) != (labels[2] if labels is not None else 0)
        z[2, off & (rng.random(c) < 0.5)] = -np.inf
    return z.astype(ref.NUMPY_DTYPES[dtype])


def _loss_and_grad(fn, y, p, grad_loss):
    p = tf.constant(p)
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = fn(tf.constant(y), p)
    return loss.numpy(), tape.gradient(loss, p, output_gradients=tf.constant(grad_loss)).numpy()


def _assert_loss(actual, expected, dtype):
    rtol, atol = ref.tolerance(dtype)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _assert_gradient(actual, expected, grad_loss, dtype):
    """Element-wise within the tolerance of the terms' size, rounded to the
    predictions' dtype as the kernels round (so within one unit in its last
    place, which matters among float16's subnormals)."""
    g = grad_loss.astype(np.float64)[:, None]
    rounded = np.asarray(expected.value * g).astype(ref.NUMPY_DTYPES[dtype])
    value = rounded.astype(np.float64)
    ulp = np.abs(np.spacing(rounded)).astype(np.float64)
    bound = np.maximum(GRADIENT_RTOL[dtype] * expected.scale * np.abs(g), ulp)
    actual = np.asarray(actual, np.float64)
    bad = ~((np.abs(actual - value) <= bound) | (actual == value))
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} off, first {np.argwhere(bad)[0]}: "
        f"{actual[bad][0]!r} vs {value[bad][0]!r}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_classes", [7, 300, 2051])  # chunked rows, rows, blocks
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_sparse_matches_reference(rng, dtype, num_classes, options, label_smoothing):
    n = 37
    labels = rng.integers(0, num_classes, size=n)
    labels[5:8] = -1  # ignored
    p = _special_logits(rng, (n, num_classes), dtype, labels)
    grad_loss = rng.uniform(0.5, 2.0, n).astype(np.float64 if dtype == "float64" else np.float32)

    def fn(y, z):
        return txo.ops.sparse_crossentropy(y, z, True, label_smoothing, ignore_class=-1, **options)

    loss, grad = _loss_and_grad(fn, labels, p, grad_loss)
    expected = ref.sparse(labels, p, True, label_smoothing, -1, **options)
    if label_smoothing and not options.get("logit_soft_cap"):
        finite = np.isfinite(expected)  # smoothing puts mass on -inf: inf loss
        _assert_loss(loss[finite], expected[finite], dtype)
        return
    _assert_loss(loss, expected, dtype)
    assert np.all(loss[5:8] == 0) and np.all(grad[5:8] == 0)
    gradient = ref.sparse_gradient(labels, p, True, label_smoothing, -1, **options)
    _assert_gradient(grad, gradient, grad_loss, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_classes", [7, 300, 2051])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_dense_matches_reference(rng, dtype, num_classes, options):
    n = 29
    labels = rng.integers(0, num_classes, size=n)
    y = ref.soft_labels(rng, (n, num_classes))
    y[::3] = ref.one_hot(labels[::3], num_classes)  # single-label rows
    y[2] = ref.one_hot(labels[2:3], num_classes)[0]
    p = _special_logits(rng, (n, num_classes), dtype, labels)
    grad_loss = rng.uniform(0.5, 2.0, n).astype(np.float64 if dtype == "float64" else np.float32)
    acc = np.float64 if dtype == "float64" else np.float32

    def fn(labels, z):
        return txo.ops.dense_crossentropy(labels, z, True, 0.0, **options)

    loss, grad = _loss_and_grad(fn, y.astype(acc), p, grad_loss)
    _assert_loss(loss, ref.dense(y, p, True, **options), dtype)
    wrt_p, wrt_y = ref.dense_gradients(y.astype(acc), p, True, **options)
    _assert_gradient(grad, wrt_p, grad_loss, dtype)

    # With respect to the labels: -(capped logits - lse), no z-loss term.
    yt, pt = tf.constant(y.astype(acc)), tf.constant(p)
    with tf.GradientTape() as tape:
        tape.watch(yt)
        loss = txo.ops.dense_crossentropy(yt, pt, True, 0.0, **options)
    grad_y = tape.gradient(loss, yt, output_gradients=tf.constant(grad_loss)).numpy()
    rtol = GRADIENT_RTOL["float64" if dtype == "float64" else "float32"]
    expected_y = wrt_y.value * grad_loss[:, None]
    finite = np.isfinite(expected_y)
    np.testing.assert_array_equal(grad_y[~finite], expected_y[~finite])  # +inf at -inf logits
    np.testing.assert_array_less(
        np.abs(grad_y[finite] - expected_y[finite]),
        (rtol * wrt_y.scale * grad_loss[:, None])[finite] + 1e-30,
    )


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_any_axis(rng, axis):
    shape = (4, 6, 5)
    p = ref.logits(rng, shape, "float32")
    options = dict(z_loss=1e-2, logit_soft_cap=2.0)
    dense_y = ref.soft_labels(rng, shape, axis=axis)
    loss = txo.ops.dense_crossentropy(dense_y, p, True, 0.1, axis=axis, **options)
    _assert_loss(loss, ref.dense(dense_y, p, True, 0.1, axis=axis, **options), "float32")
    batch_shape = tuple(d for i, d in enumerate(shape) if i != axis % 3)
    sparse_y = rng.integers(0, shape[axis], size=batch_shape)
    loss = txo.ops.sparse_crossentropy(sparse_y, p, True, 0.1, axis=axis, **options)
    _assert_loss(loss, ref.sparse(sparse_y, p, True, 0.1, axis=axis, **options), "float32")


def test_minus_inf_logits_become_minus_cap(rng):
    # A -inf logit caps to -cap: a finite loss even where smoothing gives it
    # target mass (uncapped, that loss is inf).
    p = ref.logits(rng, (3, 40), "float32")
    p[:, :10] = -np.inf
    labels = np.full(3, 20)
    loss = txo.ops.sparse_crossentropy(labels, p, True, 0.1, logit_soft_cap=4.0)
    assert np.all(np.isfinite(loss))
    _assert_loss(loss, ref.sparse(labels, p, True, 0.1, logit_soft_cap=4.0), "float32")
    uncapped = txo.ops.sparse_crossentropy(labels, p, True, 0.1)
    assert np.all(np.isinf(uncapped))


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("num_classes", [7, 300])
def test_xla_composite_matches_the_op(rng, sparse, num_classes):
    p = tf.constant(ref.logits(rng, (17, num_classes), "float32") * 3)
    labels = rng.integers(0, num_classes, size=17)
    labels[:2] = -1
    y = labels if sparse else ref.soft_labels(rng, (17, num_classes))
    options = dict(z_loss=1e-2, logit_soft_cap=4.0, return_lse=True)

    def step(y, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            if sparse:
                loss, lse = txo.ops.sparse_crossentropy(y, p, True, 0.1, -1, **options)
            else:
                loss, lse = txo.ops.dense_crossentropy(y, p, True, 0.1, **options)
        return loss, lse, tape.gradient(loss, p)

    op = tf.function(step)(tf.constant(y), p)
    composite = tf.function(step, jit_compile=True)(tf.constant(y), p)
    for a, b in zip(op, composite, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("sparse", [True, False])
def test_xla_gives_nan_where_the_op_does(rng, sparse):
    """A +inf logit (off the label), NaN and all -inf rows: NaN loss, lse and
    gradient for those rows only, from the op and from XLA's composite (where
    reduce_logsumexp's inf would make a loss of inf)."""
    p = ref.logits(rng, (6, 5), "float32")
    p[0, 3], p[1, 2], p[2] = np.inf, np.nan, -np.inf
    labels = np.array([1, 0, 4, 2, 3, 0])
    y = labels if sparse else ref.soft_labels(rng, p.shape)
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

    def step(y, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            loss, lse = fn(y, p, True, 0.1, z_loss=1e-2, return_lse=True)
        return loss, lse, tape.gradient(loss, p)

    p, y = tf.constant(p), tf.constant(y)
    op, composite = step(y, p), tf.function(step, jit_compile=True)(y, p)
    for loss, lse, grad in (op, composite):
        assert np.isnan(loss[:3]).all() and np.isnan(lse[:3]).all(), (loss, lse)
        assert np.isnan(grad[:3]).any(axis=1).all(), grad
    for a, b in zip(op, composite, strict=True):
        np.testing.assert_allclose(a[3:], b[3:], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("cap", [None, 4.0])
def test_garbage_in_ignored_rows_gets_zero_gradient_on_every_path(rng, from_logits, cap):
    """An ignored row of NaN, inf or all -inf (padding) costs 0 and gets a 0
    gradient from the op, from XLA's composite and at second order."""
    p = ref.smooth_predictions(rng, (5, 4), from_logits)
    p[0] = -np.inf if from_logits else 0.0
    p[1, 1], p[2, 0] = np.nan, np.inf
    labels = tf.constant([-1, -1, -1, 2, 0])
    options = dict(z_loss=1e-2, logit_soft_cap=cap) if from_logits else {}

    def gradients(p):
        with tf.GradientTape() as outer:
            outer.watch(p)
            with tf.GradientTape() as inner:
                inner.watch(p)
                loss = txo.ops.sparse_crossentropy(labels, p, from_logits, 0.1, -1, **options)
            gradient = inner.gradient(loss, p)
            penalty = tf.reduce_sum(gradient**2)
        return loss, gradient, outer.gradient(penalty, p)

    p = tf.constant(p)
    eager, xla = gradients(p), tf.function(gradients, jit_compile=True)(p)
    for op, composite in zip(eager, xla, strict=True):
        assert np.all(op.numpy()[:3] == 0.0) and np.all(composite.numpy()[:3] == 0.0)
        assert np.isfinite(op.numpy()[3:]).all()
        np.testing.assert_allclose(op.numpy()[3:], composite.numpy()[3:], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sparse", [True, False])
def test_gradients_of_gradients_match_finite_differences(rng, sparse):
    # Beyond the first order the composite is differentiated: its Hessian-vector
    # products against finite differences of the op's own gradient.
    p = tf.constant(ref.logits(rng, (4, 9), "float64"))
    labels = rng.integers(0, 9, size=4)
    y = tf.constant(labels if sparse else ref.soft_labels(rng, (4, 9)).astype(np.float64))
    v = tf.constant(rng.standard_normal((4, 9)))
    options = dict(z_loss=0.05, logit_soft_cap=2.5)
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

    def gradient_along_v(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.reduce_sum(fn(y, z, True, 0.1, **options))
        return tf.reduce_sum(tape.gradient(loss, z) * v)

    theoretical, numerical = tf.test.compute_gradient(gradient_along_v, [p], delta=1e-6)
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sparse", [True, False])
def test_first_order_gradient_matches_finite_differences(rng, sparse):
    p = tf.constant(ref.logits(rng, (5, 11), "float64"))
    labels = rng.integers(0, 11, size=5)
    y = tf.constant(labels if sparse else ref.soft_labels(rng, (5, 11)).astype(np.float64))
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy

    def f(z):
        return fn(y, z, True, 0.2, z_loss=0.1, logit_soft_cap=3.0)

    theoretical, numerical = tf.test.compute_gradient(f, [p], delta=1e-6)
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_return_lse(rng, dtype):
    p = ref.logits(rng, (3, 4, 50), dtype)
    labels = rng.integers(0, 50, size=(3, 4))
    labels[0, 0] = -1
    loss, lse = txo.ops.sparse_crossentropy(
        labels, p, True, ignore_class=-1, logit_soft_cap=5.0, return_lse=True
    )
    expected = ref.log_sum_exp(p, logit_soft_cap=5.0)
    expected[0, 0] = 0.0  # ignored
    assert lse.shape == loss.shape == (3, 4)
    _assert_loss(lse, expected, dtype)
    y = ref.soft_labels(rng, p.shape)
    _, lse = txo.ops.dense_crossentropy(y, p, True, z_loss=1e-3, return_lse=True)
    _assert_loss(lse, ref.log_sum_exp(p), dtype)
    # Logged, not trained: no gradient flows through it.
    pt = tf.constant(p)
    with tf.GradientTape() as tape:
        tape.watch(pt)
        _, lse = txo.ops.dense_crossentropy(y, pt, True, return_lse=True)
        total = tf.reduce_sum(lse)
    assert tape.gradient(total, pt) is None


def test_return_lse_needs_logits():
    with pytest.raises(ValueError, match="return_lse"):
        txo.ops.sparse_crossentropy([0], [[0.5, 0.5]], from_logits=False, return_lse=True)


def test_z_loss_logging_example_from_the_docs(rng):
    # The documented way to log the z-loss term: z_loss * lse**2 from
    # return_lse equals the loss with the z-loss minus the loss without.
    p = ref.logits(rng, (64, 100), "float32")
    labels = rng.integers(0, 100, size=64)
    with_z, lse = txo.ops.sparse_crossentropy(labels, p, True, z_loss=1e-3, return_lse=True)
    without = txo.ops.sparse_crossentropy(labels, p, True)
    np.testing.assert_allclose(1e-3 * lse**2, with_z - without, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(from_logits=False, z_loss=0.1), "z_loss"),
        (dict(from_logits=False, logit_soft_cap=30.0), "logit_soft_cap"),
        (dict(from_logits=True, z_loss=-1.0), "z_loss"),
        (dict(from_logits=True, z_loss=float("inf")), "z_loss"),
        (dict(from_logits=True, logit_soft_cap=0.0), "logit_soft_cap"),
        (dict(from_logits=True, logit_soft_cap=-3.0), "logit_soft_cap"),
        (dict(from_logits=True, logit_soft_cap=float("nan")), "logit_soft_cap"),
        (dict(from_logits=True, label_smoothing=1.5), "label_smoothing"),
        (dict(from_logits=False, label_smoothing=-0.1), "label_smoothing"),
    ],
)
def test_bad_arguments_fail_when_the_object_is_made(kwargs, name):
    makers = [txo.losses.CategoricalCrossentropy, txo.losses.SparseCategoricalCrossentropy]
    if "z_loss" not in kwargs:  # the metrics take no z-loss
        metric_kwargs = dict(kwargs)
        makers += [txo.metrics.CategoricalCrossentropy]
        if "label_smoothing" not in kwargs:
            makers += [txo.metrics.SparseCategoricalCrossentropy]
    for make in makers:
        with pytest.raises(ValueError, match=f"`{name}`"):
            make(**(kwargs if "z_loss" in kwargs else metric_kwargs))
    with pytest.raises(ValueError, match=f"`{name}`"):
        txo.losses.SparseCategoricalCrossentropy.from_config(kwargs)


def test_bools_and_strings_are_not_coefficients():
    # float(True) is 1.0: a cap of True would silently be a cap of 1; and
    # float("0.1") would let a string into the config.
    for kwargs, name in (
        (dict(logit_soft_cap=True), "logit_soft_cap"),
        (dict(z_loss=True), "z_loss"),
        (dict(logit_soft_cap="30"), "logit_soft_cap"),
        (dict(z_loss="0.1"), "z_loss"),
        (dict(label_smoothing="0.1"), "label_smoothing"),
    ):
        with pytest.raises(ValueError, match=f"`{name}` must be a number"):
            txo.losses.SparseCategoricalCrossentropy(from_logits=True, **kwargs)
        with pytest.raises(ValueError, match=f"`{name}` must be a number"):
            txo.ops.sparse_crossentropy([0], [[1.0, 2.0]], True, **kwargs)


def test_tensor_coefficients_are_saved_as_numbers():
    # A tensor in the config would be saved as a tensor, which no model loads.
    loss = txo.losses.CategoricalCrossentropy(
        from_logits=True,
        label_smoothing=tf.constant(0.5),
        z_loss=tf.constant(0.25),
        logit_soft_cap=tf.constant(30.0),
    )
    metric = txo.metrics.SparseCategoricalCrossentropy(
        from_logits=True, logit_soft_cap=tf.constant(2.5)
    )
    for obj, expected in (
        (loss, dict(label_smoothing=0.5, z_loss=0.25, logit_soft_cap=30.0)),
        (metric, dict(logit_soft_cap=2.5)),
    ):
        config = obj.get_config()
        for name, value in expected.items():
            assert type(config[name]) is float and config[name] == value, config
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
        assert {k: restored.get_config()[k] for k in expected} == expected


def test_options_for_logits_refuse_softmax_outputs():
    """A softmax's output stands for its logits in every form, yet the user
    said `from_logits=False`: the options for logits are refused as for any
    probabilities, not applied to the logits behind them."""
    probabilities = keras.layers.Softmax()(tf.constant([[1.0, 2.0, 0.5]]))
    assert hasattr(probabilities, "_keras_logits")
    for fn, y in (
        (txo.losses.sparse_categorical_crossentropy, [1]),
        (txo.losses.categorical_crossentropy, [[0.0, 1.0, 0.0]]),
    ):
        for options in (dict(z_loss=0.5), dict(logit_soft_cap=1.0)):
            with pytest.raises(ValueError, match="applies to logits only"):
                fn(y, probabilities, from_logits=False, **options)

    @tf.function
    def from_graph_softmax(z):
        return txo.losses.sparse_categorical_crossentropy([1], tf.nn.softmax(z), z_loss=0.5)

    with pytest.raises(ValueError, match="applies to logits only"):
        from_graph_softmax(tf.constant([[1.0, 2.0, 0.5]]))


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_coefficients_the_loss_dtype_cannot_carry(rng, sparse, dtype):
    """float32 losses (also those of 16-bit predictions) take caps within
    [2^-126, 2^103] and a z-loss that float32 holds; beyond, a ValueError at
    the call (the dtype is not known before), not a cap that silently drops
    to 0 or to none. float64 takes them and computes them."""
    p = tf.constant(ref.logits(rng, (3, 5), "float64").astype(ref.NUMPY_DTYPES[dtype]))
    labels = rng.integers(0, 5, size=3)
    y = labels if sparse else np.eye(5)[labels]
    fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy
    for kwargs in (dict(logit_soft_cap=1e38), dict(logit_soft_cap=1e-39), dict(z_loss=1e39)):
        ((name, value),) = kwargs.items()
        if dtype != "float64":
            with pytest.raises(ValueError, match=re.escape(f"`{name}`={value}")):
                fn(y, p, True, **kwargs)
            continue
        expected = getattr(ref, "sparse" if sparse else "dense")(y, p.numpy(), True, **kwargs)
        np.testing.assert_allclose(fn(y, p, True, **kwargs), expected, rtol=1e-12, atol=1e-13)
    # The ends of float32's range work, and a huge cap is no cap: z' = z
    # to within an ulp of 1 for logits near 0, exactly further out.
    if dtype != "float64":
        for cap in (1.2e-38, 1e31):
            expected = getattr(ref, "sparse" if sparse else "dense")(
                y, p.numpy().astype(np.float64), True, logit_soft_cap=cap
            )
            tolerance = 1e-2 if dtype in ("float16", "bfloat16") else 1e-5
            np.testing.assert_allclose(
                fn(y, p, True, logit_soft_cap=cap), expected, rtol=tolerance, atol=tolerance
            )


@pytest.mark.parametrize("sparse", [True, False])
def test_loss_classes_and_functions(rng, sparse):
    p = ref.logits(rng, (8, 3, 20), "float32")
    labels = rng.integers(0, 20, size=(8, 3))
    y = labels if sparse else ref.one_hot(labels, 20)
    weights = rng.uniform(0, 2, size=(8, 3)).astype(np.float32)
    options = dict(z_loss=1e-3, logit_soft_cap=4.0)
    expected = (
        ref.sparse(labels, p, True, **options) if sparse else ref.dense(y, p, True, **options)
    )
    cls = txo.losses.SparseCategoricalCrossentropy if sparse else txo.losses.CategoricalCrossentropy
    fn = txo.sparse_categorical_crossentropy if sparse else txo.categorical_crossentropy
    _assert_loss(fn(y, p, from_logits=True, **options), expected, "float32")
    loss = cls(from_logits=True, **options)(y, p, sample_weight=weights)
    _assert_loss(loss, np.sum(expected * weights) / expected.size, "float32")
    # The metric: the cross-entropy of the capped logits, without the z-loss.
    metric = (
        txo.metrics.SparseCategoricalCrossentropy if sparse else txo.metrics.CategoricalCrossentropy
    )(from_logits=True, logit_soft_cap=4.0)
    metric.update_state(y, p)
    capped = (
        ref.sparse(labels, p, True, logit_soft_cap=4.0)
        if sparse
        else ref.dense(y, p, True, logit_soft_cap=4.0)
    )
    _assert_loss(metric.result(), capped.mean(), "float32")


def test_fit_with_z_loss_and_soft_cap():
    # Models train through compile/fit with both, and the z-loss pulls the
    # log-partition towards zero: logits that start far from it end nearer
    # than without the z-loss.
    x = np.random.default_rng(3).normal(size=(256, 16)).astype("float32")
    y = (x[:, :4].argmax(1)).astype("int64")

    def train(z_loss):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(8, bias_initializer=keras.initializers.Constant(5.0)),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(0.05),
            loss=txo.losses.SparseCategoricalCrossentropy(
                from_logits=True, z_loss=z_loss, logit_soft_cap=50.0
            ),
            metrics=[
                txo.metrics.SparseCategoricalCrossentropy(from_logits=True, logit_soft_cap=50.0)
            ],
        )
        history = model.fit(x, y, epochs=5, batch_size=32, verbose=0).history
        lse = ref.log_sum_exp(model.predict(x, verbose=0), logit_soft_cap=50.0)
        return history, float(np.mean(lse))

    plain_history, plain_lse = train(0.0)
    history, lse = train(0.1)
    for h in (plain_history, history):
        assert h["loss"][-1] < h["loss"][0]
    # Without a z-loss the cross-entropy is the whole loss (and the metric).
    np.testing.assert_allclose(
        plain_history["loss"], plain_history["sparse_categorical_crossentropy"], rtol=1e-5
    )
    assert lse < plain_lse - 1.0, (lse, plain_lse)
