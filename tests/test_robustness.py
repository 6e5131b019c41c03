"""int64 indexing, determinism across runs and thread counts and under op
determinism, NaN/Inf rows."""

import json

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from raw_ops import coefficients
from subprocess_util import run_python
from tf_xent_ops._load import library

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
import keras
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


# The op types of a training step's loss and gradient, for Keras's built-in
# and for ours, under op determinism.
OPS_UNDER_DETERMINISM = """
import json
import keras
import tensorflow as tf
tf.config.experimental.enable_op_determinism()
import tf_xent_ops as txo
def op_types(loss, labels):
    @tf.function(autograph=False)
    def step(y, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            value = loss(y, p)
        return value, tape.gradient(value, p)
    spec = tf.TensorSpec([8, 5], tf.float32)
    graph = step.get_concrete_function(labels, spec).graph
    return sorted({op.type for op in graph.get_operations()})
found = {}
for name, labels in (("SparseCategoricalCrossentropy", tf.TensorSpec([8], tf.int64)),
                     ("CategoricalCrossentropy", tf.TensorSpec([8, 5], tf.float32))):
    found[name] = {"keras": op_types(getattr(keras.losses, name)(from_logits=True), labels),
                   "ours": op_types(getattr(txo.losses, name)(from_logits=True), labels)}
print(json.dumps(found))
"""


def test_under_op_determinism_ours_stay_fused_where_keras_unfuses():
    # TensorFlow's fused kernels refuse op determinism on the GPU, so tf.nn's
    # wrappers (which Keras calls) switch to log_softmax, and for sparse labels
    # a gather, on every device: an [N, C] intermediate kept for the backward.
    found = json.loads(run_python(OPS_UNDER_DETERMINISM).stdout.splitlines()[-1])
    sparse, dense = found["SparseCategoricalCrossentropy"], found["CategoricalCrossentropy"]
    assert {"LogSoftmax", "GatherV2"} <= set(sparse["keras"])
    assert "SparseSoftmaxCrossEntropyWithLogits" not in sparse["keras"]
    assert "LogSoftmax" in dense["keras"]
    assert "SoftmaxCrossEntropyWithLogits" not in dense["keras"]
    assert {"TfXent>SparseXent", "TfXent>SparseXentGrad"} <= set(sparse["ours"])
    assert {"TfXent>DenseXent", "TfXent>DenseXentGrad"} <= set(dense["ours"])
    for ours in (sparse["ours"], dense["ours"]):
        assert not {"LogSoftmax", "Softmax", "Exp", "GatherV2"} & set(ours), ours


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


@pytest.mark.parametrize("num_classes", [7, 300])  # chunked rows, single rows
@pytest.mark.parametrize("from_logits", [True, False])
def test_full_smoothing_against_an_impossible_label(rng, num_classes, from_logits):
    # label_smoothing=1 spreads all the target mass evenly: the label's own
    # weight is 0, and a -inf logit (or a 0 probability with epsilon=0) there
    # makes the loss inf, as the dense form and Keras say, not 0 * inf = NaN.
    p = ref.smooth_predictions(rng, (4, num_classes), from_logits)
    labels = rng.integers(0, num_classes, size=4)
    p[0, labels[0]] = -np.inf if from_logits else 0.0
    options = dict(label_smoothing=1.0, epsilon=0.0)
    y = ref.one_hot(labels, num_classes)

    def losses(labels, y, p):
        return (
            txo.ops.sparse_crossentropy(labels, p, from_logits, **options),
            txo.ops.dense_crossentropy(y, p, from_logits, **options),
        )

    for sparse, dense in (
        losses(labels, y, p),
        tf.function(losses, jit_compile=True)(labels, y, p),
    ):
        assert np.isposinf(sparse[0]) and np.isposinf(dense[0]), (sparse, dense)
        np.testing.assert_allclose(sparse[1:], dense[1:], rtol=1e-5)


def test_dense_probabilities_whose_row_sum_has_a_subnormal_reciprocal(rng):
    # Beyond 2^126 a float32 row sum's reciprocal is subnormal, which
    # TensorFlow's threads flush to 0: the forward must still divide by it.
    for num_classes in (8, 40):  # chunked rows, single rows
        p = rng.uniform(0.5, 1.0, size=(3, num_classes)).astype(np.float32)
        p *= np.float32([1.0, 1e37, 3e38 / num_classes])[:, None]
        y = ref.soft_labels(rng, p.shape)
        loss = txo.ops.dense_crossentropy(y, p)
        np.testing.assert_allclose(loss, ref.dense(y, p, False), rtol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_logits_rows_of_every_tail_length(rng, label_smoothing, dtype):
    # The logits kernels take a row in SIMD packets of 16 floats (8 doubles),
    # the last partial packet masked, and the dense forward sets aside the
    # packets whose labels are all zero. Rows here cover every tail length
    # and start alignment, one-hot labels in the first, a middle or the
    # tail packet, labels with mass in a few scattered packets only, and
    # -inf logits without target mass (only where nothing smooths onto them).
    num_rows = 37
    for num_classes in [*range(32, 50), 1000, 2 * 1024 + 13]:
        p = ref.logits(rng, (num_rows, num_classes), "float64")
        labels = rng.integers(0, num_classes, size=num_rows)
        labels[:3] = [0, num_classes - 1, num_classes // 2]
        y = ref.one_hot(labels, num_classes)
        for r in range(3, 12):  # soft labels on a few elements only
            y[r] = 0.0
            y[r, rng.choice(num_classes, size=3, replace=False)] = [0.5, 0.3, 0.2]
        if not label_smoothing:
            minus_inf = rng.random((num_rows, num_classes)) < 0.1
            minus_inf[:, -1] |= y[:, -1] == 0  # always one in the tail
            p[minus_inf & (y == 0)] = -np.inf
        p = p.astype(ref.NUMPY_DTYPES[dtype])
        rtol, atol = ref.tolerance(dtype)
        ls = ref.as_coefficient(label_smoothing, dtype)
        t = y.astype(np.float64) * (1.0 - ls) + ls / num_classes
        z = p.astype(np.float64)
        softmax = np.exp(z - z.max(-1, keepdims=True))
        softmax /= softmax.sum(-1, keepdims=True)
        # z - lse carries the rounding of lse (|lse| up to ~20 here: ulp 2e-6 in
        # float32), which exp passes on to the softmax near 1.
        grad_atol = {"bfloat16": 1e-2, "float32": 5e-6, "float64": 1e-12}[dtype]

        for sparse in (False, True):
            if sparse:
                fn = txo.ops.sparse_crossentropy
                rows = [0, 1, 2, *range(12, num_rows)]  # the one-hot rows
                targets, expected = labels[rows], ref.sparse(labels, p, True, ls)[rows]
            else:
                fn = txo.ops.dense_crossentropy
                rows = list(range(num_rows))
                targets, expected = y, ref.dense(y, p, True, ls)
            p_t = tf.constant(p[rows])
            with tf.GradientTape() as tape:
                tape.watch(p_t)
                loss = fn(targets, p_t, from_logits=True, label_smoothing=ls)
            grad = np.asarray(tf.cast(tape.gradient(loss, p_t), tf.float64))
            case = f"C={num_classes} sparse={sparse}"
            np.testing.assert_allclose(loss, expected, rtol=rtol, atol=atol, err_msg=case)
            expected_grad = softmax[rows] * t[rows].sum(-1, keepdims=True) - t[rows]
            np.testing.assert_allclose(grad, expected_grad, atol=grad_atol, err_msg=case)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_logits_rows_whose_max_is_far_from_their_first_packet(rng, label_smoothing, dtype):
    # The logits forwards shift a block's exp sum by the largest logit of the
    # row's first packet (16 floats, 8 doubles) and find the block's max in
    # the same loop; a block whose max exceeds that shift by more than 64,
    # or whose sum is not finite, is summed again relative to its own max.
    # Rows here put the max 20 to 1e4 above the first packet, anywhere in the
    # row (tail included), the first packet at -inf, everything but the
    # first packet far below it, or the max 87.8 above an otherwise flat row
    # (the sum stays finite, but exp(-87.8) is a denormal, which TensorFlow's
    # threads flush to zero).
    num_rows = 11
    for num_classes in [40, 1000, 2 * 1024 + 13]:
        p = ref.logits(rng, (num_rows, num_classes), "float64", scale=1.0)
        far = rng.integers(16, num_classes, size=num_rows)
        far[9] = num_classes - 1
        for r, gap in enumerate([20.0, 60.0, 63.0, 66.0, 85.0, 100.0, 1e4]):
            p[r, far[r]] += gap
        p[7, :16] = -np.inf  # the first packet all -inf
        p[8, 16:] -= 200.0  # the rest far below the first packet
        p[9, far[9]] += 70.0
        p[9, :16] = -np.inf
        p[10] = -1.0
        p[10, :16] = 0.0
        p[10, far[10]] = 87.8
        labels = far.copy()
        labels[::2] = rng.integers(16, num_classes, size=(num_rows + 1) // 2)
        labels[7] = labels[9] = num_classes - 1  # not on a -inf logit
        y = ref.one_hot(labels, num_classes)
        p = p.astype(ref.NUMPY_DTYPES[dtype])
        rtol, atol = ref.tolerance(dtype)
        ls = ref.as_coefficient(label_smoothing, dtype)
        rows = [0, 1, 2, 3, 4, 5, 6, 8, 10]  # smoothing puts mass on -inf: inf loss
        if not label_smoothing:
            rows += [7, 9]
        z = p.astype(np.float64)[rows]
        softmax = np.exp(z - z.max(-1, keepdims=True))
        softmax /= softmax.sum(-1, keepdims=True)
        t = y[rows].astype(np.float64) * (1.0 - ls) + ls / num_classes
        grad_atol = {"bfloat16": 1e-2, "float32": 5e-6, "float64": 1e-12}[dtype]
        for sparse in (True, False):
            fn = txo.ops.sparse_crossentropy if sparse else txo.ops.dense_crossentropy
            targets = labels if sparse else y
            p_t = tf.constant(p)
            with tf.GradientTape() as tape:
                tape.watch(p_t)
                loss = fn(targets, p_t, from_logits=True, label_smoothing=ls)
            grad = np.asarray(tf.cast(tape.gradient(loss, p_t), tf.float64))
            case = f"C={num_classes} sparse={sparse}"
            expected = ref.dense(y, p, True, ls)
            np.testing.assert_allclose(
                np.asarray(loss)[rows], expected[rows], rtol=rtol, atol=atol, err_msg=case
            )
            np.testing.assert_allclose(grad[rows], softmax - t, atol=grad_atol, err_msg=case)
            if label_smoothing:
                assert np.all(np.isposinf(np.asarray(loss)[[7, 9]])), case


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_dense_logits_rows_with_a_single_nonzero_label(rng, label_smoothing, dtype):
    # The dense logits forward records the class and value of a row's only
    # nonzero label; the backward then forms that row's gradient without
    # reading its labels. Rows here have one nonzero label (1, or another
    # value, negative included) in the first, a middle, the last or the tail
    # packet, or in a later block; two nonzero labels; none; or a NaN label.
    num_rows = 12
    for num_classes in [40, 1000, 2 * 1024 + 13]:
        p = ref.logits(rng, (num_rows, num_classes), "float64")
        y = np.zeros((num_rows, num_classes))
        cols = [0, num_classes // 2, num_classes - 1, num_classes - 3, 1500 % num_classes]
        for r, col in enumerate(cols):
            y[r, col] = 1.0
        for r, value in zip(range(5, 9), [0.7, 2.5, -0.3, 1e-30], strict=True):
            y[r, rng.integers(num_classes)] = value
        y[9, [3, num_classes - 2]] = [0.4, 0.6]  # two: the labels are read
        # Row 10 has no nonzero label; row 11 a single NaN one.
        p[0, 1:6] = -np.inf  # no target mass there (unless smoothed)
        y[11, 5] = np.nan
        p = p.astype(ref.NUMPY_DTYPES[dtype])
        rtol, atol = ref.tolerance(dtype)
        ls = ref.as_coefficient(label_smoothing, dtype)
        z = p.astype(np.float64)
        softmax = np.exp(z - z.max(-1, keepdims=True))
        softmax /= softmax.sum(-1, keepdims=True)
        t = y * (1.0 - ls) + ls / num_classes
        expected_grad = softmax * t.sum(-1, keepdims=True) - t
        grad_atol = {"bfloat16": 1e-2, "float32": 5e-6, "float64": 1e-12}[dtype]
        p_t = tf.constant(p)
        with tf.GradientTape() as tape:
            tape.watch(p_t)
            loss = txo.ops.dense_crossentropy(y, p_t, from_logits=True, label_smoothing=ls)
        grad = np.asarray(tf.cast(tape.gradient(loss, p_t), tf.float64))
        loss = np.asarray(loss)
        rows = list(range(1 if label_smoothing else 0, 11))  # smoothing onto -inf: inf
        case = f"C={num_classes}"
        expected = ref.dense(y, p, True, ls)
        np.testing.assert_allclose(loss[rows], expected[rows], rtol=rtol, atol=atol, err_msg=case)
        np.testing.assert_allclose(grad[rows], expected_grad[rows], atol=grad_atol, err_msg=case)
        assert np.isnan(loss[11]) and np.all(np.isnan(grad[11])), case


def test_dense_logits_single_label_beyond_float32_integers():
    # float32 holds integers exactly only up to 2^24, and the statistics hold
    # the single label's class as a float: 2^24 + 3 would round to 2^24 + 4,
    # where the gradient's -1 would land. (tests/gpu/kernel_checks.py checks
    # the GPU kernels alike.)
    c, k = 2**24 + 6, 2**24 + 3
    p = np.zeros((1, c), np.float32)
    p[0, k], p[0, k + 1] = 5.0, 3.0
    y = np.zeros((1, c), np.float32)
    y[0, k] = 1.0
    p = tf.constant(p)
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss, stats = library.tf_xent_dense_xent(p, y, from_logits=True, **coefficients())
    assert stats.numpy()[0, 2] == -1.0  # no single class: the labels are read
    grad = tape.gradient(loss, p).numpy()[0, k : k + 2]
    lse = np.log(np.exp(5.0) + np.exp(3.0) + (c - 2))
    np.testing.assert_allclose(loss, [lse - 5.0], rtol=1e-6)
    np.testing.assert_allclose(grad, [np.exp(5.0 - lse) - 1.0, np.exp(3.0 - lse)], atol=1e-6)


def test_dense_logits_gradient_with_statistics_that_name_no_class(rng):
    # The statistics are an input of the gradient op: a recorded class that
    # is not one (out of range, NaN, huge) makes the kernel read the labels,
    # never an element outside the row.
    n, c = 5, 300
    p = tf.constant(ref.logits(rng, (n, c), "float32"))
    y = tf.constant(ref.one_hot(rng.integers(0, c, size=n), c))
    _, stats = library.tf_xent_dense_xent(p, y, from_logits=True, **coefficients())
    g = tf.ones([n])
    expected = library.tf_xent_dense_xent_grad(p, y, stats, g, from_logits=True, **coefficients())
    stats = stats.numpy()
    np.testing.assert_array_equal(stats[:, 2], np.argmax(y, -1))  # one-hot: recorded
    stats[:, 2] = [c, -5.0, np.nan, 1e30, -np.inf]
    grad = library.tf_xent_dense_xent_grad(p, y, stats, g, from_logits=True, **coefficients())
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_rows_of_several_blocks_with_far_apart_maxima(rng, label_smoothing, dtype):
    # Rows of logits are reduced in blocks of 1024 classes, each relative to
    # its own max, then combined relative to the row max. Blocks here sit
    # far apart (exp of the gap under- or overflows float32), one block is
    # all -inf, and the row max falls in a different block in each row.
    num_rows, num_classes = 4, 4 * 1024 + 77
    p = ref.logits(rng, (num_rows, num_classes), "float64", scale=2.0)
    offsets = np.array([[0.0, -150.0, 60.0, -30.0, 200.0]])
    for r in range(num_rows):
        for b in range(5):
            p[r, b * 1024 : (b + 1) * 1024] += np.roll(offsets, r)[0, b]
    p[1, 1024:2048] = -np.inf
    p = p.astype(ref.NUMPY_DTYPES[dtype])
    labels = rng.integers(0, num_classes, size=num_rows)
    labels[1] = 0
    soft = ref.soft_labels(rng, (num_rows, num_classes))
    soft[1, 1024:2048] = 0.0  # no target mass on the -inf block
    rtol, atol = ref.tolerance(dtype)

    sparse = txo.ops.sparse_crossentropy(labels, p, True, label_smoothing)
    expected = ref.sparse(labels, p, True, label_smoothing)
    if label_smoothing:  # smoothing puts mass on the -inf block: infinite loss
        assert np.isposinf(sparse[1]) and np.isposinf(expected[1])
        sparse, expected = np.delete(np.asarray(sparse), 1), np.delete(expected, 1)
    np.testing.assert_allclose(sparse, expected, rtol=rtol, atol=atol)
    dense = txo.ops.dense_crossentropy(soft, p, True)
    np.testing.assert_allclose(dense, ref.dense(soft, p, True), rtol=rtol, atol=atol)

    # The gradient uses the forward's row log-sum-exp.
    p_t = tf.constant(p)
    with tf.GradientTape() as tape:
        tape.watch(p_t)
        loss = txo.ops.dense_crossentropy(soft, p_t, True)
    grad = np.asarray(tf.cast(tape.gradient(loss, p_t), tf.float64))
    z = p.astype(np.float64)
    softmax = np.exp(z - np.max(z, -1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    soft = soft.astype(np.float64)  # a float32 sum is off by 1e-7: not a float64 reference
    expected_grad = softmax * soft.sum(-1, keepdims=True) - soft
    # z - lse with |z| ~ 200 carries the rounding of lse: ulp(200) in float32.
    grad_atol = {"bfloat16": 1e-2, "float32": 1e-4, "float64": 1e-10}[dtype]
    np.testing.assert_allclose(grad, expected_grad, atol=grad_atol)


@pytest.mark.parametrize("special", [np.nan, np.inf])
@pytest.mark.parametrize("num_classes", [10, 2000])  # chunked rows, single rows
def test_dense_probabilities_nan_or_inf_without_target_mass(rng, special, num_classes):
    # The forward skips classes without target mass, but not where Keras's
    # 0 * log(...) is NaN: a NaN or +inf anywhere in the row.
    p = ref.probabilities(rng, (5, num_classes), "float32")
    labels = rng.integers(0, num_classes, size=5)
    y = ref.one_hot(labels, num_classes)
    y[3] = 0.0  # a row without any target mass
    clean = txo.ops.dense_crossentropy(y, p).numpy()
    assert clean[3] == 0.0
    p[2, (labels[2] + 1) % num_classes] = special
    p[3, 0] = special
    loss = txo.ops.dense_crossentropy(y, p).numpy()
    keras_loss = keras.losses.categorical_crossentropy(y, p).numpy()
    assert np.all(np.isnan(loss[2:4])) and np.all(np.isnan(keras_loss[2:4]))
    others = [0, 1, 4]
    np.testing.assert_array_equal(loss[others], clean[others])


@pytest.mark.parametrize("epsilon", [1e-7, 1e-3, 1e-12])
@pytest.mark.parametrize("num_classes", [48, 3 * 1024 + 5])  # without and with a tail
def test_smoothed_probabilities_with_special_rows(rng, epsilon, num_classes):
    # With smoothing every class has target mass: the forwards sum the logs of
    # clipped probabilities as the log of their product (eps >= 2^-28) or one
    # by one (smaller eps). Rows: plain, a NaN, a +inf, unnormalized with a
    # zero, all zeros, and probabilities clipped at both ends.
    p = ref.probabilities(rng, (7, num_classes), "float32")
    p[1, 3] = np.nan
    p[2, num_classes - 1] = np.inf
    p[3] *= 7.0
    p[3, 0] = 0.0
    p[4] = 0.0
    p[5, :] = 1e-30
    p[5, 1] = 1.0
    labels = rng.integers(0, num_classes, size=7)
    y = ref.one_hot(labels, num_classes)
    y[6] = ref.soft_labels(rng, (num_classes,))
    old = keras.config.epsilon()
    keras.config.set_epsilon(epsilon)
    try:
        dense = txo.ops.dense_crossentropy(y, p, label_smoothing=0.1).numpy()
        keras_dense = keras.losses.categorical_crossentropy(y, p, label_smoothing=0.1).numpy()
        sparse = txo.ops.sparse_crossentropy(labels, p, label_smoothing=0.1).numpy()
    finally:
        keras.config.set_epsilon(old)
    expected_dense = ref.dense(y, p, False, 0.1, epsilon=epsilon)
    expected_sparse = ref.sparse(labels, p, False, 0.1, epsilon=epsilon)
    # The log of a product rounds once per multiply; a sum of float32 logs (small
    # eps, and Eigen's log in portable builds: 3 ulp) carries each log's rounding.
    rtol = 2e-6 if epsilon >= 2.0**-28 else ref.tolerance("float32")[0]
    for got, expected in [(dense, expected_dense), (sparse, expected_sparse)]:
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        finite = ~np.isnan(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=rtol)
    np.testing.assert_array_equal(np.isnan(dense), np.isnan(keras_dense))
    np.testing.assert_allclose(dense, keras_dense, rtol=1e-4)
