"""The fused projection and loss, `txo.ops.linear_crossentropy` and
`linear_crossentropy_sum`: values and the gradients with respect to the hidden
states, the kernel and the bias against float64 references written from the
definitions (logits = hidden @ kernel + bias, then the sparse cross-entropy),
for every dtype, both kernel layouts, every loss option and chunkings that do
and do not divide the rows; mixed precision; the weighted sum in both
gradient modes; the arg-max; graph mode and XLA; that no [tokens, vocabulary]
tensor is ever made; argument errors; first-order-only gradients."""

import gc
import weakref

import graph_util
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import tf_xent_ops as txo

DTYPES = ["float16", "bfloat16", "float32", "float64"]
LAYOUTS = ["dv", "vd"]
HIDDEN_DIM, VOCABULARY = 12, 150
# Every option at once, ignored positions among the labels.
FULL_OPTIONS = dict(label_smoothing=0.1, ignore_class=-1, z_loss=1e-2, logit_soft_cap=6.0)

# Gradient tolerances relative to the size of the terms an element sums
# (|d(logits)| terms, themselves sums of terms (ref.Gradient.scale), times
# |kernel| or |hidden|): float32 and float64 compute throughout (float32
# meets logits that the matmul rounded an ulp or so off the float64 product:
# 1e-5 is some tens of its ulps). With 16-bit inputs d(logits) is rounded to
# 16 bits, then the matmul's output (for the kernel, each chunk's part, then
# the final cast): about three half-ulps (3 * 2**-11 ~ 1.5e-3 float16, 3 *
# 2**-8 ~ 1.2e-2 bfloat16), and a float16 logit that the matmul rounded to
# the neighbour of the rounded float64 product moves the softmax by up to
# its ulp; with a margin.
GRADIENT_RTOL = {"float16": 4e-3, "bfloat16": 2.5e-2, "float32": 1e-5, "float64": 1e-10}
# The spacing of the 16-bit types relative to a value's magnitude: one logit
# made by the 16-bit matmul may be one such step off the rounded float64
# product (rare for float16, never seen for bfloat16), which moves the loss by
# up to that step times the sum of |d(loss)/d(logits)| (at most 2, and the
# z-loss term's 2 z_loss lse): 4 steps of the row's largest logit.
LOGIT_STEP = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


def _np_dtype(dtype):
    return ref.NUMPY_DTYPES[dtype]


def _loss_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


def _round(x, dtype):
    """Float64 values rounded to `dtype`, as float64."""
    return np.asarray(x, np.float64).astype(_np_dtype(dtype)).astype(np.float64)


# ---------------------------------------------------------------------------
# Inputs and the float64 reference


def _inputs(rng, batch_shape, dtype, layout="dv", kernel_dtype=None, bias=True, ignore=None):
    """hidden [*batch_shape, D], kernel ([D, V] or [V, D]), bias [V] or None
    and int64 labels, some equal to `ignore`. Logits have a standard deviation
    of about 3: soft caps of a few units bend them, and float16 holds their
    exponentials."""
    kernel_dtype = kernel_dtype or dtype
    hidden = rng.standard_normal(tuple(batch_shape) + (HIDDEN_DIM,)).astype(_np_dtype(dtype))
    kernel = rng.standard_normal((HIDDEN_DIM, VOCABULARY)) * (3.0 / np.sqrt(HIDDEN_DIM))
    if layout == "vd":
        kernel = kernel.T
    kernel = np.ascontiguousarray(kernel).astype(_np_dtype(kernel_dtype))
    b = rng.standard_normal(VOCABULARY).astype(_np_dtype(kernel_dtype)) if bias else None
    labels = rng.integers(0, VOCABULARY, size=batch_shape)
    if ignore is not None:
        labels.reshape(-1)[rng.random(labels.size) < 0.2] = ignore
    return hidden, kernel, b, labels


def _upstream(rng, batch_shape, dtype):
    """A per-position upstream gradient in the loss dtype."""
    return rng.uniform(0.5, 2.0, size=batch_shape).astype(_np_dtype(_loss_dtype(dtype)))


def _reference(hidden, kernel, labels, bias=None, layout="dv", upstream=None, **options):
    """Float64 loss (labels' shape), logits [N, V] and gradients (ref.Gradient
    for "hidden", "kernel", "bias", in their shapes) of the fused op.

    The logits are those the op makes: the kernel and bias cast to the dtype
    of `hidden` (mixed precision), the product and the biased logits each
    rounded to it (the float64 product of the rounded inputs, then rounded:
    the matmul accumulates in float32 or wider). The loss and d(loss)/d(logits)
    come from ref.sparse and ref.sparse_gradient of those logits, given in
    the hidden dtype so that the coefficients are rounded as the kernels
    round them; then the chain rule: d(hidden) = dz W^T, d(W) = h^T dz, d(b)
    = sum(dz), each with the size of its terms.
    """
    compute = np.dtype(hidden.dtype).name
    h = hidden.astype(np.float64).reshape(-1, hidden.shape[-1])
    w = _round(kernel.astype(np.float64), compute)
    w_dv = w if layout == "dv" else w.T
    z = _round(h @ w_dv, compute)
    if bias is not None:
        z = _round(z + _round(bias.astype(np.float64), compute), compute)
    y = np.asarray(labels).reshape(-1)
    logits = z.astype(_np_dtype(compute))
    loss = ref.sparse(y, logits, True, **options).reshape(np.shape(labels))
    g = ref.sparse_gradient(y, logits, True, **options)
    u = np.ones(len(y)) if upstream is None else np.asarray(upstream, np.float64).reshape(-1)
    dz, sz = g.value * u[:, None], g.scale * np.abs(u)[:, None]
    d_kernel = ref.Gradient(h.T @ dz, np.abs(h).T @ sz)
    if layout == "vd":
        d_kernel = ref.Gradient(d_kernel.value.T, d_kernel.scale.T)
    grads = {
        "hidden": ref.Gradient(
            (dz @ w_dv.T).reshape(hidden.shape), (sz @ np.abs(w_dv).T).reshape(hidden.shape)
        ),
        "kernel": d_kernel,
        "bias": ref.Gradient(dz.sum(0), sz.sum(0)),
    }
    return loss, z, grads


def _loss_bound(expected, logits, dtype):
    """Per position: ref.tolerance of the loss dtype, plus for 16-bit inputs
    LOGIT_STEP of the row's largest logit (see there)."""
    rtol, atol = ref.tolerance(dtype)
    expected = np.asarray(expected, np.float64)
    bound = rtol * np.abs(expected) + atol
    if dtype in LOGIT_STEP:
        bound = bound + 4 * LOGIT_STEP[dtype] * np.abs(logits).max(-1).reshape(expected.shape)
    return bound


def _assert_loss(actual, expected, logits, dtype):
    bound = _loss_bound(expected, logits, dtype)
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual, np.float64)
    bad = ~(np.abs(actual - expected) <= bound)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} losses off, first at {np.argwhere(bad)[0]}: "
        f"{actual[bad][0]!r} vs {expected[bad][0]!r} (bound {bound[bad][0]!r})"
    )


def _assert_gradient(actual, expected, dtype, name, rtol=None):
    """Element-wise within GRADIENT_RTOL[dtype] of the size of the terms
    (`expected` a ref.Gradient), or one unit in the last place of `actual`'s
    dtype (a tiny value's own rounding)."""
    rtol = GRADIENT_RTOL[dtype] if rtol is None else rtol
    ulp = np.abs(np.spacing(np.asarray(expected.value).astype(actual.dtype))).astype(np.float64)
    bound = np.maximum(rtol * expected.scale, ulp)
    actual = np.asarray(actual, np.float64)
    err = np.abs(actual - expected.value)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"d(loss)/d({name}): {bad.sum()} of {bad.size} off, first at {np.argwhere(bad)[0]}: "
        f"{actual[bad][0]!r} vs {expected.value[bad][0]!r} (bound {bound[bad][0]!r}); "
        f"worst error / term size {np.max(err / np.maximum(expected.scale, 1e-300)):.3g}"
    )


def _run(fn, hidden, kernel, labels, bias=None, upstream=None, **kwargs):
    """fn(hidden, kernel, labels, bias=..., **kwargs) eagerly under a tape:
    (loss, {name: gradient})."""
    h, w = tf.constant(hidden), tf.constant(kernel)
    sources = {"hidden": h, "kernel": w}
    if bias is not None:
        sources["bias"] = tf.constant(bias)
    with tf.GradientTape() as tape:
        tape.watch(list(sources.values()))
        loss = fn(h, w, tf.constant(labels), bias=sources.get("bias"), **kwargs)
    grads = tape.gradient(
        loss,
        sources,
        output_gradients=None if upstream is None else tf.constant(upstream),
    )
    return loss, grads


def _check_against_reference(loss, grads, hidden, kernel, labels, bias, layout, upstream, options):
    dtype = np.dtype(hidden.dtype).name
    expected, logits, expected_grads = _reference(
        hidden, kernel, labels, bias, layout, upstream, **options
    )
    assert loss.dtype == _loss_dtype(dtype)
    assert loss.shape == labels.shape
    _assert_loss(loss.numpy(), expected, logits, dtype)
    for name, grad in grads.items():
        assert grad.dtype == {"hidden": hidden, "kernel": kernel, "bias": bias}[name].dtype, name
        _assert_gradient(grad.numpy(), expected_grads[name], dtype, name)
    ignore_class = options.get("ignore_class")
    if ignore_class is not None:
        ignored = labels == ignore_class
        assert np.all(loss.numpy()[ignored] == 0)
        assert np.all(grads["hidden"].numpy()[ignored] == 0)


# ---------------------------------------------------------------------------
# 1. Values and gradients against the float64 reference

# (batch shape, chunk_size): chunks that do not divide the rows (37 by 8; 35
# by 3), that do (one chunk of all 37; 35 by 7), the default, and one larger
# than the rows.
CHUNKINGS = [((37,), 8), ((37,), 37), ((37,), None), ((37,), 64), ((5, 7), 7), ((5, 7), 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_shape, chunk_size", CHUNKINGS, ids=str)
def test_per_position_matches_reference(rng, dtype, layout, batch_shape, chunk_size):
    hidden, kernel, bias, labels = _inputs(rng, batch_shape, dtype, layout, ignore=-1)
    upstream = _upstream(rng, batch_shape, dtype)
    loss, grads = _run(
        txo.ops.linear_crossentropy, hidden, kernel, labels, bias, upstream,
        kernel_layout=layout, chunk_size=chunk_size, **FULL_OPTIONS,
    )  # fmt: skip
    _check_against_reference(
        loss, grads, hidden, kernel, labels, bias, layout, upstream, FULL_OPTIONS
    )


OPTIONS = [
    dict(),
    dict(label_smoothing=0.2),
    dict(ignore_class=3),  # a class in range: its labels are ignored
    dict(z_loss=5e-2),
    dict(logit_soft_cap=4.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_each_option_matches_reference(rng, dtype, layout, with_bias, options):
    batch_shape = (4, 9)
    hidden, kernel, bias, labels = _inputs(
        rng, batch_shape, dtype, layout, bias=with_bias, ignore=options.get("ignore_class")
    )
    upstream = _upstream(rng, batch_shape, dtype)
    loss, grads = _run(
        txo.ops.linear_crossentropy, hidden, kernel, labels, bias, upstream,
        kernel_layout=layout, chunk_size=8, **options,
    )  # fmt: skip
    assert ("bias" in grads) == with_bias
    _check_against_reference(loss, grads, hidden, kernel, labels, bias, layout, upstream, options)


def test_matches_unfused_sparse_crossentropy(rng):
    """The documented equivalence, on the same float32 inputs: the unfused
    logits and the fused op's loss and gradients agree to float32 precision."""
    hidden, kernel, bias, labels = _inputs(rng, (3, 11), "float32", "vd", ignore=-1)

    def unfused(h, w, y, bias, **options):
        logits = tf.matmul(h, w, transpose_b=True) + bias
        return txo.ops.sparse_crossentropy(y, logits, from_logits=True, **options)

    def fused(h, w, y, bias, **options):
        return txo.ops.linear_crossentropy(h, w, y, bias=bias, kernel_layout="vd", **options)

    upstream = _upstream(rng, (3, 11), "float32")
    a_loss, a_grads = _run(unfused, hidden, kernel, labels, bias, upstream, **FULL_OPTIONS)
    b_loss, b_grads = _run(fused, hidden, kernel, labels, bias, upstream, **FULL_OPTIONS)
    np.testing.assert_allclose(b_loss, a_loss, rtol=1e-5, atol=1e-5)
    for name in a_grads:
        np.testing.assert_allclose(b_grads[name], a_grads[name], rtol=1e-4, atol=1e-5)


def test_kernel_variable_gets_its_gradient(rng):
    """A Keras-style tf.Variable kernel (and bias) is watched by the tape."""
    hidden, kernel, bias, labels = _inputs(rng, (13,), "float32")
    w, b = tf.Variable(kernel), tf.Variable(bias)
    with tf.GradientTape() as tape:
        loss = txo.ops.linear_crossentropy_sum(hidden, w, labels, bias=b, chunk_size=4)
    d_w, d_b = tape.gradient(loss, [w, b])
    _, _, expected = _reference(hidden, kernel, labels, bias)
    _assert_gradient(d_w.numpy(), expected["kernel"], "float32", "kernel")
    _assert_gradient(d_b.numpy(), expected["bias"], "float32", "bias")


@pytest.mark.parametrize("batch_shape", [(), (0,), (0, 3)], ids=str)
@pytest.mark.parametrize("form", ["per_position", "sum_recompute", "sum_in_forward"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_edge_shapes(rng, batch_shape, form, jit_compile):
    """One position (rank-1 hidden, a scalar label) and no positions at all:
    the loss of the shape of the labels (a scalar sum, 0 without positions),
    gradients of the inputs' shapes; also under XLA."""
    hidden, kernel, bias, labels = _inputs(rng, batch_shape, "float64")
    if form == "per_position":
        fn = txo.ops.linear_crossentropy
    else:

        def fn(*args, **kwargs):
            return txo.ops.linear_crossentropy_sum(
                *args, gradient_in_forward=form == "sum_in_forward", **kwargs
            )

    def run():
        return _run(fn, hidden, kernel, labels, bias, chunk_size=4, **FULL_OPTIONS)

    loss, grads = tf.function(run, jit_compile=True)() if jit_compile else run()
    expected, _, expected_grads = _reference(hidden, kernel, labels, bias, **FULL_OPTIONS)
    if form != "per_position":
        expected = expected.sum()
    assert loss.shape == np.shape(expected)
    np.testing.assert_allclose(loss, expected, rtol=1e-10, atol=1e-10)
    for name, grad in grads.items():
        assert grad.shape == expected_grads[name].value.shape, name
        _assert_gradient(grad.numpy(), expected_grads[name], "float64", name)


# ---------------------------------------------------------------------------
# 2. Mixed precision: 16-bit hidden, float32 kernel and bias


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("form", ["per_position", "sum"])
def test_mixed_precision(rng, dtype, layout, form):
    """The matmuls run in the 16-bit dtype (the reference rounds the kernel
    and bias to it); the kernel and bias gradients come back float32, within
    the 16-bit tolerance of the float64 reference (an advantage over a 16-bit
    accumulation shows only at sizes too large for a unit test)."""
    batch_shape = (6, 7)
    hidden, kernel, bias, labels = _inputs(
        rng, batch_shape, dtype, layout, kernel_dtype="float32", ignore=-1
    )
    if form == "per_position":
        upstream = _upstream(rng, batch_shape, dtype)
        loss, grads = _run(
            txo.ops.linear_crossentropy, hidden, kernel, labels, bias, upstream,
            kernel_layout=layout, chunk_size=5, **FULL_OPTIONS,
        )  # fmt: skip
        _check_against_reference(
            loss, grads, hidden, kernel, labels, bias, layout, upstream, FULL_OPTIONS
        )
    else:
        loss, grads = _run(
            txo.ops.linear_crossentropy_sum, hidden, kernel, labels, bias,
            kernel_layout=layout, chunk_size=5, gradient_in_forward=True, **FULL_OPTIONS,
        )  # fmt: skip
        expected, logits, expected_grads = _reference(
            hidden, kernel, labels, bias, layout, **FULL_OPTIONS
        )
        assert loss.dtype == tf.float32 and loss.shape == ()
        bound = _loss_bound(expected, logits, dtype).sum()
        assert abs(float(loss) - expected.sum()) <= bound, (float(loss), expected.sum(), bound)
        for name, grad in grads.items():
            _assert_gradient(grad.numpy(), expected_grads[name], dtype, name)
    assert grads["hidden"].dtype == dtype
    assert grads["kernel"].dtype == tf.float32
    assert grads["bias"].dtype == tf.float32


# ---------------------------------------------------------------------------
# 3. The weighted sum, in both gradient modes


def _sum_run(hidden, kernel, labels, bias, sample_weight, denominator, upstream=None, **kwargs):
    """linear_crossentropy_sum eagerly under a tape, with `sample_weight` and
    `denominator` watched tensors: (loss, gradients)."""
    sources = {
        "hidden": tf.constant(hidden),
        "kernel": tf.constant(kernel),
        "bias": tf.constant(bias),
        "sample_weight": tf.constant(sample_weight),
        "denominator": tf.constant(denominator),
    }
    with tf.GradientTape() as tape:
        tape.watch(list(sources.values()))
        loss = txo.ops.linear_crossentropy_sum(
            sources["hidden"], sources["kernel"], tf.constant(labels),
            bias=sources["bias"], sample_weight=sources["sample_weight"],
            denominator=sources["denominator"], **kwargs,
        )  # fmt: skip
    upstream = None if upstream is None else tf.constant(upstream, loss.dtype)
    return loss, tape.gradient(loss, sources, output_gradients=upstream)


def _sum_reference(hidden, kernel, labels, bias, sample_weight, denominator, layout, options):
    """loss = sum(w * per_position) / denominator with [B] weights broadcast
    over [B, T]: the per-position reference with an upstream gradient of w /
    denominator, and d/dw_b = sum_t per_position / denominator, d/d(denominator)
    = -loss / denominator."""
    w = np.broadcast_to(np.asarray(sample_weight, np.float64)[:, None], labels.shape)
    den = float(denominator)
    per_position, logits, grads = _reference(
        hidden, kernel, labels, bias, layout, upstream=w / den, **options
    )
    loss = np.sum(w * per_position) / den
    grads["sample_weight"] = per_position.sum(1) / den
    grads["denominator"] = -loss / den
    return loss, per_position, logits, grads


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sum_matches_reference_in_both_modes(rng, dtype, layout):
    batch_shape = (5, 7)
    hidden, kernel, bias, labels = _inputs(rng, batch_shape, dtype, layout, ignore=-1)
    acc = _np_dtype(_loss_dtype(dtype))
    sample_weight = rng.uniform(0.0, 2.0, size=batch_shape[:1]).astype(acc)
    denominator = acc(rng.uniform(5.0, 20.0))
    loss_ref, per_position, logits, expected = _sum_reference(
        hidden, kernel, labels, bias, sample_weight, denominator, layout, FULL_OPTIONS
    )
    results = {}
    for in_forward in (False, True):
        loss, grads = _sum_run(
            hidden, kernel, labels, bias, sample_weight, denominator,
            kernel_layout=layout, chunk_size=8, gradient_in_forward=in_forward, **FULL_OPTIONS,
        )  # fmt: skip
        results[in_forward] = loss, grads
        assert loss.dtype == _loss_dtype(dtype) and loss.shape == ()
        # The sum's error is at most the sum of the per-position bounds.
        w = np.broadcast_to(sample_weight[:, None].astype(np.float64), batch_shape)
        per_position_bound = _loss_bound(per_position, logits, dtype)
        bound = np.sum(w * per_position_bound) / denominator
        assert abs(float(loss) - loss_ref) <= bound, (in_forward, float(loss), loss_ref, bound)
        for name in ("hidden", "kernel", "bias"):
            assert grads[name].dtype == dtype
            _assert_gradient(grads[name].numpy(), expected[name], dtype, name)
        # Weight and denominator gradients: losses divided by the denominator.
        np.testing.assert_array_less(
            np.abs(grads["sample_weight"].numpy() - expected["sample_weight"]),
            per_position_bound.sum(1) / denominator * 1.0001 + 1e-300,
        )
        np.testing.assert_allclose(
            grads["denominator"].numpy(), expected["denominator"], rtol=0, atol=bound / denominator
        )
    # The two modes agree with each other far more closely than either with
    # the reference: the same logits, the same d(logits) (an upstream
    # gradient of one), in the same order (16-bit results to within their
    # last place).
    (loss_a, grads_a), (loss_b, grads_b) = results[False], results[True]
    close = dict(rtol=1e-12, atol=1e-12) if dtype == "float64" else dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(loss_b), float(loss_a), **close)
    for name in grads_a:
        a = grads_a[name].numpy().astype(np.float64)
        b = grads_b[name].numpy().astype(np.float64)
        if grads_a[name].dtype == tf.bfloat16:
            ref.assert_within_one_ulp(b, a, dtype)
        else:
            np.testing.assert_allclose(b, a, **close, err_msg=name)


@pytest.mark.parametrize("in_forward", [False, True, None])
def test_zero_denominator_gives_zero_loss_and_gradients(rng, in_forward):
    hidden, kernel, bias, labels = _inputs(rng, (3, 5), "float32", ignore=-1)
    sample_weight = rng.uniform(0.5, 2.0, size=3).astype(np.float32)
    loss, grads = _sum_run(
        hidden, kernel, labels, bias, sample_weight, np.float32(0.0),
        chunk_size=4, gradient_in_forward=in_forward, **FULL_OPTIONS,
    )  # fmt: skip
    assert float(loss) == 0.0
    for name, grad in grads.items():
        assert np.all(grad.numpy() == 0), name


def test_sample_weight_shapes(rng):
    """None, a scalar, [B], [B, 1] and [B, T] weights for [B, T] labels (each
    broadcast as Keras does: size-1 axes appended); more axes than the labels
    and a non-scalar denominator are errors."""
    batch_shape = (4, 6)
    hidden, kernel, bias, labels = _inputs(rng, batch_shape, "float64", ignore=-1)
    per_position, _, _ = _reference(hidden, kernel, labels, bias, **FULL_OPTIONS)
    weights = {
        "none": None,
        "scalar": np.float64(1.5),
        "per_sample": rng.uniform(0, 2, size=(4,)),
        "per_sample_column": rng.uniform(0, 2, size=(4, 1)),
        "per_position": rng.uniform(0, 2, size=batch_shape),
    }
    for kind, w in weights.items():
        # Size-1 axes appended up to the labels' rank, then broadcast.
        full = np.ones(batch_shape)
        if w is not None:
            full = full * np.reshape(w, np.shape(w) + (1,) * (2 - np.ndim(w)))
        loss = txo.ops.linear_crossentropy_sum(
            hidden, kernel, labels, bias=bias, sample_weight=w, denominator=3.0,
            chunk_size=5, **FULL_OPTIONS,
        )  # fmt: skip
        np.testing.assert_allclose(
            float(loss), np.sum(full * per_position) / 3.0, rtol=1e-10, err_msg=kind
        )
    # Before the labels (some -1, which only ignore_class=-1 allows) are checked.
    with pytest.raises(ValueError, match="more axes"):
        txo.ops.linear_crossentropy_sum(
            hidden, kernel, labels, sample_weight=np.ones((4, 6, 1)), chunk_size=5
        )
    with pytest.raises(ValueError, match="denominator"):
        txo.ops.linear_crossentropy_sum(hidden, kernel, labels, denominator=[1.0, 2.0])


def test_unknown_rank_sample_weight_and_denominator(rng):
    """Traced with every rank unknown, a [B] sample weight for [B, T]
    labels gets its size-1 axis appended at run time, and a scalar
    denominator is taken (a non-scalar one raises then)."""
    hidden, kernel, bias, labels = _inputs(rng, (4, 6), "float64", ignore=-1)
    sample_weight = rng.uniform(0, 2, size=(4,))
    unknown = tf.TensorSpec(None, tf.float64)

    @tf.function(input_signature=[unknown, tf.TensorSpec(None, tf.int64), unknown, unknown])
    def call(h, y, w, den):
        return txo.ops.linear_crossentropy_sum(
            h, kernel, y, bias=bias, sample_weight=w, denominator=den, chunk_size=5,
            **FULL_OPTIONS,
        )  # fmt: skip

    per_position, _, _ = _reference(hidden, kernel, labels, bias, **FULL_OPTIONS)
    expected = np.sum(sample_weight[:, None] * per_position) / 3.0
    np.testing.assert_allclose(
        float(call(hidden, labels, sample_weight, np.float64(3.0))), expected, rtol=1e-10
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="more axes"):
        call(hidden, labels, np.ones((4, 6, 1)), np.float64(3.0))
    with pytest.raises(tf.errors.InvalidArgumentError):
        call(hidden, labels, sample_weight, np.array([1.0, 2.0]))


def _op_types(graph):
    return {op.type for g in graph_util.all_graphs(graph) for op in g.get_operations()}


def test_auto_mode(rng, monkeypatch):
    """gradient_in_forward=None computes the gradients in the forward exactly
    when a tape records: eagerly (the gradient op runs during the call), and
    in a tf.function traced under a tape (its forward graph holds the gradient
    op); the results equal those of the explicit modes."""
    batch_shape = (3, 5)
    hidden, kernel, bias, labels = _inputs(rng, batch_shape, "float32", ignore=-1)
    sample_weight = rng.uniform(0.5, 2.0, size=3).astype(np.float32)
    denominator = np.float32(7.0)
    kwargs = dict(chunk_size=4, **FULL_OPTIONS)

    calls = []
    original = txo.ops.sparse_rows_gradient

    def spy(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(txo.ops, "sparse_rows_gradient", spy)
    txo.ops.linear_crossentropy_sum(hidden, kernel, labels, bias=bias, **kwargs)
    assert not calls, "evaluation (no tape) made gradients"
    h = tf.constant(hidden)
    with tf.GradientTape() as tape:
        tape.watch(h)
        txo.ops.linear_crossentropy_sum(h, kernel, labels, bias=bias, **kwargs)
        assert calls, "no gradients made in the forward under a tape"
    monkeypatch.undo()

    def loss_fn(h, w, b, sw, den):
        return txo.ops.linear_crossentropy_sum(
            h, w, labels, bias=b, sample_weight=sw, denominator=den, **kwargs
        )

    traced = tf.function(loss_fn)
    args = [tf.constant(x) for x in (hidden, kernel, bias, sample_weight, denominator)]
    with tf.GradientTape() as tape:
        tape.watch(args)
        loss = traced(*args)
    grads = tape.gradient(loss, args)
    forward_ops = _op_types(traced.get_concrete_function(*args).graph)
    assert "TfXent>SparseXentGrad" in forward_ops
    evaluation_ops = _op_types(tf.function(loss_fn).get_concrete_function(*args).graph)
    assert "TfXent>SparseXent" in evaluation_ops
    assert "TfXent>SparseXentGrad" not in evaluation_ops

    expected_loss, expected_grads = _sum_run(
        hidden, kernel, labels, bias, sample_weight, denominator,
        gradient_in_forward=False, **kwargs,
    )  # fmt: skip
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    names = ["hidden", "kernel", "bias", "sample_weight", "denominator"]
    for grad, name in zip(grads, names, strict=True):
        np.testing.assert_allclose(grad, expected_grads[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("in_forward", [False, True])
@pytest.mark.parametrize(
    "upstream, denominator", [(2.0**15, 2.0**20), (2.0**16, 512.0)], ids=["underflow", "overflow"]
)
def test_float16_loss_scaling(rng, in_forward, upstream, denominator):
    """Mixed float16 training multiplies the upstream gradient by a loss scale
    (Keras's LossScaleOptimizer: 2**15 at first, doubled while gradients stay
    finite) so that 16-bit gradients neither underflow nor lose their low
    bits; the loss divides by the number of tokens, large in a global batch.
    The gradients must be those of the float64 reference within the float16
    tolerance whether or not they are computed in the forward.

    "underflow": d(logits) / 2**20 is mostly below float16's subnormals when
    made before the loss scale is known. "overflow": a loss scale of 2**16
    (Keras's after 2000 finite steps at 2**15; exact in float32, beyond
    float16's 65504) scales well-scaled gradients (the loss is a mean).
    """
    n = 512
    hidden, kernel, bias, labels = _inputs(rng, (n,), "float16", kernel_dtype="float32")
    loss, grads = _sum_run(
        hidden, kernel, labels, bias, np.ones(n, np.float32), np.float32(denominator),
        upstream=np.float32(upstream), chunk_size=128, gradient_in_forward=in_forward,
    )  # fmt: skip
    _, _, expected = _reference(
        hidden, kernel, labels, bias, upstream=np.full(n, upstream / denominator)
    )
    for name in ("hidden", "kernel", "bias"):
        assert np.all(np.isfinite(grads[name].numpy())), name
        _assert_gradient(grads[name].numpy(), expected[name], "float16", name)


@pytest.mark.parametrize("in_forward", [False, True])
def test_float16_chunk_gradient_beyond_float16_range(rng, in_forward):
    """One float16 chunk of 2**17 rows whose labels mostly agree: each kernel
    and bias gradient element sums that many terms of one sign, beyond
    float16's 65504 both when made in the forward (at a scale where each
    row's d(logits) is about 1) and when loss-scaled (2**17: Keras's loss
    scale doubles after every 2000 finite steps). The gradients of the
    float32 variables hold them: the chunk's sums must be float32 too."""
    n, dim, vocabulary = 2**17, 4, 16
    hidden = rng.uniform(0.5, 1.5, (n, dim)).astype(np.float16)
    kernel = (0.1 * rng.standard_normal((dim, vocabulary))).astype(np.float32)
    bias = (0.1 * rng.standard_normal(vocabulary)).astype(np.float32)
    labels = np.where(rng.random(n) < 0.9, 0, rng.integers(1, vocabulary, n))
    upstream = 2.0**17
    loss, grads = _sum_run(
        hidden, kernel, labels, bias, np.ones(n, np.float32), np.float32(n),
        upstream=np.float32(upstream), gradient_in_forward=in_forward,
    )  # fmt: skip
    _, _, expected = _reference(hidden, kernel, labels, bias, upstream=np.full(n, upstream / n))
    assert np.abs(expected["bias"].value).max() > 65504
    for name in ("hidden", "kernel", "bias"):
        assert np.all(np.isfinite(grads[name].numpy())), name
        _assert_gradient(grads[name].numpy(), expected[name], "float16", name)


# ---------------------------------------------------------------------------
# 4. The arg-max


def _hidden_without_ties(rng, hidden, kernel, bias, layout, gap=1e-3):
    """`hidden` with rows redrawn until each position's two largest float64
    logits are `gap` apart (so float32 rounding cannot swap them)."""
    hidden = hidden.copy()
    w = kernel.astype(np.float64) if layout == "dv" else kernel.astype(np.float64).T
    flat = hidden.reshape(-1, hidden.shape[-1])
    while True:
        z = flat.astype(np.float64) @ w + bias.astype(np.float64)
        top2 = np.sort(z, axis=-1)[:, -2:]
        close = top2[:, 1] - top2[:, 0] < gap
        if not close.any():
            return hidden, z.reshape(hidden.shape[:-1] + (z.shape[-1],))
        flat[close] = rng.standard_normal((close.sum(), flat.shape[-1])).astype(flat.dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("label_dtype", ["int32", "int64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_return_argmax(rng, dtype, label_dtype, layout):
    batch_shape = (4, 9)
    hidden, kernel, bias, labels = _inputs(rng, batch_shape, dtype, layout, ignore=-1)
    hidden, z = _hidden_without_ties(rng, hidden, kernel, bias, layout)
    expected = np.argmax(z, axis=-1)
    labels = labels.astype(label_dtype)
    # A soft cap of 0.5 flattens the largest logits (tanh(9) is 1 in
    # float32): the arg-max is of the logits before the cap.
    options = dict(FULL_OPTIONS, logit_soft_cap=0.5)
    calls = {
        "per_position": lambda **kw: txo.ops.linear_crossentropy(
            hidden, kernel, labels, bias=bias, kernel_layout=layout, chunk_size=8, **options, **kw
        ),
        "sum_recompute": lambda **kw: txo.ops.linear_crossentropy_sum(
            hidden, kernel, labels, bias=bias, kernel_layout=layout, chunk_size=8,
            gradient_in_forward=False, **options, **kw,
        ),
        "sum_in_forward": lambda **kw: txo.ops.linear_crossentropy_sum(
            hidden, kernel, labels, bias=bias, kernel_layout=layout, chunk_size=8,
            gradient_in_forward=True, **options, **kw,
        ),
    }  # fmt: skip
    for name, call in calls.items():
        loss, argmax = call(return_argmax=True)
        assert argmax.dtype == label_dtype, name
        assert argmax.shape == batch_shape, name
        np.testing.assert_array_equal(argmax, expected, err_msg=name)
        np.testing.assert_array_equal(loss, call(), err_msg=name)


def test_return_argmax_keeps_the_gradients(rng):
    hidden, kernel, bias, labels = _inputs(rng, (2, 9), "float32", ignore=-1)
    upstream = _upstream(rng, (2, 9), "float32")

    def per_position(h, w, y, bias, **kw):
        loss, _ = txo.ops.linear_crossentropy(h, w, y, bias=bias, return_argmax=True, **kw)
        return loss

    def in_forward(h, w, y, bias, **kw):
        loss, _ = txo.ops.linear_crossentropy_sum(
            h, w, y, bias=bias, return_argmax=True, gradient_in_forward=True, **kw
        )
        return loss

    for fn, u in ((per_position, upstream), (in_forward, None)):
        _, grads = _run(fn, hidden, kernel, labels, bias, u, chunk_size=4, **FULL_OPTIONS)
        _, _, expected = _reference(hidden, kernel, labels, bias, upstream=u, **FULL_OPTIONS)
        for name, grad in grads.items():
            _assert_gradient(grad.numpy(), expected[name], "float32", name)


def test_return_argmax_bfloat16(rng):
    """16-bit logits may tie after rounding: the arg-max is a position of the
    row's largest rounded logit."""
    hidden, kernel, bias, labels = _inputs(rng, (37,), "bfloat16")
    _, argmax = txo.ops.linear_crossentropy(
        hidden, kernel, labels, bias=bias, chunk_size=8, return_argmax=True
    )
    _, z, _ = _reference(hidden, kernel, labels, bias)
    chosen = np.take_along_axis(z, argmax.numpy()[:, None], -1)[:, 0]
    np.testing.assert_array_equal(chosen, z.max(-1))


# ---------------------------------------------------------------------------
# 5. Graph mode and XLA against eager


FORMS = ["per_position", "sum_recompute", "sum_in_forward", "sum_auto"]


def _training_step(form, layout):
    """A step returning (loss, argmax, d_hidden, d_kernel, d_bias)."""

    def step(hidden, kernel, bias, labels, upstream, sample_weight, denominator):
        common = dict(
            bias=bias, kernel_layout=layout, chunk_size=8, return_argmax=True, **FULL_OPTIONS
        )
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel, bias])
            if form == "per_position":
                loss, argmax = txo.ops.linear_crossentropy(hidden, kernel, labels, **common)
            else:
                in_forward = {"sum_recompute": False, "sum_in_forward": True, "sum_auto": None}
                loss, argmax = txo.ops.linear_crossentropy_sum(
                    hidden, kernel, labels, sample_weight=sample_weight,
                    denominator=denominator, gradient_in_forward=in_forward[form], **common,
                )  # fmt: skip
        grads = tape.gradient(
            loss,
            [hidden, kernel, bias],
            output_gradients=upstream if form == "per_position" else None,
        )
        return [loss, argmax] + grads

    return step


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("form", FORMS)
def test_graph_and_xla_match_eager(rng, layout, form):
    batch_shape = (5, 7)
    hidden, kernel, bias, labels = _inputs(rng, batch_shape, "float32", layout, ignore=-1)
    hidden, _ = _hidden_without_ties(rng, hidden, kernel, bias, layout)
    args = [
        tf.constant(hidden),
        tf.constant(kernel),
        tf.constant(bias),
        tf.constant(labels),
        tf.constant(_upstream(rng, batch_shape, "float32")),
        tf.constant(rng.uniform(0.0, 2.0, size=5).astype(np.float32)),
        tf.constant(np.float32(11.0)),
    ]
    step = _training_step(form, layout)
    eager = step(*args)
    # All dimensions unknown when traced: row counts, padding and the kernel
    # gradient's blocks become tensors.
    dynamic_signature = [
        tf.TensorSpec([None, None, None]),
        tf.TensorSpec([None, None]),
        tf.TensorSpec([None]),
        tf.TensorSpec([None, None], tf.int64),
        tf.TensorSpec([None, None]),
        tf.TensorSpec([None]),
        tf.TensorSpec([]),
    ]
    results = {
        "graph": tf.function(step)(*args),
        "graph_dynamic_shapes": tf.function(step, input_signature=dynamic_signature)(*args),
        "xla": tf.function(step, jit_compile=True)(*args),
    }
    names = ["loss", "argmax", "d_hidden", "d_kernel", "d_bias"]
    for mode, result in results.items():
        # The XLA composite computes the same thing in another order.
        close = dict(rtol=2e-5, atol=2e-6) if mode == "xla" else dict(rtol=1e-6, atol=1e-7)
        for name, a, b in zip(names, eager, result, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, (mode, name)
            np.testing.assert_allclose(b, a, **close, err_msg=f"{mode}: {name}")


@pytest.mark.parametrize("chunk_size", [None, 64])
@pytest.mark.parametrize("form", ["per_position", "sum_recompute", "sum_in_forward"])
def test_unknown_rows_are_not_padded_to_a_whole_chunk(rng, monkeypatch, chunk_size, form):
    """With the number of rows unknown when traced (a batch of unknown size)
    the chunk is at most the rows at run time, as when they are known: 37
    rows make 37 rows of logits, not a default chunk of 2**23 // V rows."""
    hidden, kernel, bias, labels = _inputs(rng, (37,), "float32", ignore=-1)
    rows_seen = []  # each chunk's rows of logits, at run time
    original = txo.ops.sparse_rows

    def record(rows):
        rows_seen.append(int(rows))
        return rows

    def spy(logits, *args):
        rows = tf.numpy_function(record, [tf.shape(logits)[0]], tf.int32, stateful=True)
        with tf.control_dependencies([rows]):
            return original(tf.identity(logits), *args)

    monkeypatch.setattr(txo.ops, "sparse_rows", spy)

    def step(h, y):
        kwargs = dict(bias=bias, chunk_size=chunk_size, **FULL_OPTIONS)
        with tf.GradientTape() as tape:
            tape.watch(h)
            if form == "per_position":
                loss = tf.reduce_sum(txo.ops.linear_crossentropy(h, kernel, y, **kwargs))
            else:
                loss = txo.ops.linear_crossentropy_sum(
                    h, kernel, y, gradient_in_forward=form == "sum_in_forward", **kwargs
                )
        return loss, tape.gradient(loss, h)

    signature = [tf.TensorSpec([None, HIDDEN_DIM]), tf.TensorSpec([None], tf.int64)]
    loss, d_hidden = tf.function(step, input_signature=signature)(hidden, labels)
    assert rows_seen == [37]
    expected, _, expected_grads = _reference(hidden, kernel, labels, bias, **FULL_OPTIONS)
    np.testing.assert_allclose(float(loss), expected.sum(), rtol=1e-5)
    _assert_gradient(d_hidden.numpy(), expected_grads["hidden"], "float32", "hidden")


# ---------------------------------------------------------------------------
# 6. No [tokens, vocabulary] tensor

N_ROWS, VOCAB_BIG, DIM_SMALL, CHUNK = 96, 1000, 8, 16


def _step_graph(form, jit_compile):
    """The concrete graph of a training step on N_ROWS x VOCAB_BIG logits."""

    def step(hidden, kernel, bias, labels):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel, bias])
            if form == "unfused":
                logits = tf.matmul(hidden, kernel) + bias
                loss = tf.reduce_mean(txo.ops.sparse_crossentropy(labels, logits, True))
            elif form == "per_position":
                loss = tf.reduce_mean(
                    txo.ops.linear_crossentropy(hidden, kernel, labels, bias=bias, chunk_size=CHUNK)
                )
            else:
                loss = txo.ops.linear_crossentropy_sum(
                    hidden, kernel, labels, bias=bias, chunk_size=CHUNK,
                    gradient_in_forward={"sum_recompute": False, "sum_in_forward": True}[form],
                )  # fmt: skip
        return [loss] + tape.gradient(loss, [hidden, kernel, bias])

    specs = [
        tf.TensorSpec([N_ROWS, DIM_SMALL]),
        tf.TensorSpec([DIM_SMALL, VOCAB_BIG]),
        tf.TensorSpec([VOCAB_BIG]),
        tf.TensorSpec([N_ROWS], tf.int32),
    ]
    return tf.function(step, jit_compile=jit_compile).get_concrete_function(*specs).graph


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("form", ["per_position", "sum_recompute", "sum_in_forward"])
def test_no_tokens_by_vocabulary_tensor(form, jit_compile):
    """Every tensor of the traced step, inside every loop body, holds fewer
    than N x V elements; the walk sees the chunk x V logits (so it looked
    where they are). Dimensions unknown when traced (the kernel gradient's
    blocks of at most hidden_dim rows) cannot be bounded here."""
    tensors = graph_util.tensor_shapes(_step_graph(form, jit_compile))
    big = [(g, op, s) for g, op, s in tensors if graph_util.holds_at_least(s, N_ROWS, VOCAB_BIG)]
    assert not big, big[:5]
    chunk_logits = [
        (g, op)
        for g, op, s in tensors
        if s.is_fully_defined() and s.as_list() == [CHUNK, VOCAB_BIG]
    ]
    assert chunk_logits, "the walk found no chunk x vocabulary tensor"


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_unfused_step_has_the_tokens_by_vocabulary_tensor(jit_compile):
    """The same walk on tf.matmul + sparse_crossentropy finds the logits."""
    tensors = graph_util.tensor_shapes(_step_graph("unfused", jit_compile))
    assert any(s.as_list() == [N_ROWS, VOCAB_BIG] for _, _, s in tensors if s.is_fully_defined())
    assert any(graph_util.holds_at_least(s, N_ROWS, VOCAB_BIG) for _, _, s in tensors)


@pytest.mark.parametrize("form", ["per_position", "sum_recompute", "sum_in_forward"])
def test_eager_tape_keeps_no_chunk_logits(rng, monkeypatch, form):
    """Eagerly, under a tape, the chunk loop runs op by op. The chunks' logits
    must be freed as the loop goes on (at most one chunk's alive when the
    call returns), not kept by the tape until the gradient is taken: kept,
    they add up to the N x V logits the fusion is there to avoid."""
    hidden, kernel, bias, labels = _inputs(rng, (N_ROWS,), "float32")
    alive = []
    original = txo.ops.sparse_rows

    def spy(logits, *args):
        alive.append(weakref.ref(logits))
        return original(logits, *args)

    monkeypatch.setattr(txo.ops, "sparse_rows", spy)

    def call():
        if form == "per_position":
            return txo.ops.linear_crossentropy(hidden, w, labels, bias=bias, chunk_size=4)
        return txo.ops.linear_crossentropy_sum(
            hidden, w, labels, bias=bias, chunk_size=4,
            gradient_in_forward=form == "sum_in_forward",
        )  # fmt: skip

    def count():
        gc.collect()
        return sum(r() is not None for r in alive)

    w = tf.constant(kernel)
    call()
    assert len(alive) == N_ROWS // 4 and count() == 0  # the spy sees every chunk
    alive.clear()
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = call()
    assert len(alive) == N_ROWS // 4
    kept = count()
    tape.gradient(loss, w)
    assert kept <= 1, f"the tape keeps {kept} of {N_ROWS // 4} chunks' logits alive"


# ---------------------------------------------------------------------------
# 7. Errors


def _args(dtype="float32", kernel_dtype=None, layout="dv", n=6):
    rng = np.random.default_rng(0)
    hidden, kernel, bias, labels = _inputs(rng, (n,), dtype, layout, kernel_dtype=kernel_dtype)
    return hidden, kernel, bias, labels


@pytest.mark.parametrize("fn", [txo.ops.linear_crossentropy, txo.ops.linear_crossentropy_sum])
@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(kernel_layout="DV"), ValueError, "kernel_layout"),
        (dict(kernel_layout=None), ValueError, "kernel_layout"),
        (dict(kernel=np.zeros((HIDDEN_DIM, VOCABULARY, 1), np.float32)), ValueError, "rank 2"),
        (dict(kernel=np.zeros((VOCABULARY,), np.float32)), ValueError, "rank 2"),
        (dict(kernel=np.zeros((HIDDEN_DIM + 1, VOCABULARY), np.float32)), ValueError, "hidden_dim"),
        (dict(kernel_layout="vd"), ValueError, "hidden_dim"),  # a [D, V] kernel read as [V, D]
        (dict(bias=np.zeros((VOCABULARY + 1,), np.float32)), ValueError, "bias"),
        (dict(bias=np.zeros((1, VOCABULARY), np.float32)), ValueError, "bias"),
        (dict(bias=np.zeros((VOCABULARY,), np.float64)), TypeError, "bias"),
        (dict(labels=np.zeros((7,), np.int64)), ValueError, "labels"),
        (dict(labels=np.zeros((6, 1), np.int64)), ValueError, "labels"),
        (dict(labels=np.zeros((6,), np.complex64)), TypeError, "integers"),
        (dict(hidden=np.zeros((6, HIDDEN_DIM), np.int32)), TypeError, "hidden"),
        (dict(hidden=np.float32(1.0)), ValueError, "rank"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=-3), ValueError, "chunk_size"),
        (dict(chunk_size=True), ValueError, "chunk_size"),
        (dict(chunk_size=8.0), ValueError, "chunk_size"),
        (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(z_loss=float("inf")), ValueError, "z_loss"),
        (dict(logit_soft_cap=0.0), ValueError, "logit_soft_cap"),
        (dict(logit_soft_cap=-2.0), ValueError, "logit_soft_cap"),
    ],
    ids=str,
)
def test_bad_arguments(fn, change, error, match):
    hidden, kernel, bias, labels = _args()
    kwargs = dict(hidden=hidden, kernel=kernel, labels=labels, bias=bias)
    kwargs.update(change)
    positional = [kwargs.pop(k) for k in ("hidden", "kernel", "labels")]
    with pytest.raises(error, match=match):
        fn(*positional, **kwargs)


@pytest.mark.parametrize("fn", [txo.ops.linear_crossentropy, txo.ops.linear_crossentropy_sum])
@pytest.mark.parametrize(
    "hidden_dtype, kernel_dtype",
    [
        ("float16", "float64"),
        ("bfloat16", "float16"),
        ("float32", "float64"),
        ("float64", "float32"),
        ("float32", "bfloat16"),
    ],
)
def test_bad_dtype_pairs(fn, hidden_dtype, kernel_dtype):
    hidden, kernel, _, labels = _args(hidden_dtype, kernel_dtype)
    with pytest.raises(TypeError, match="kernel"):
        fn(hidden, kernel, labels)


@pytest.mark.parametrize("fn", [txo.ops.linear_crossentropy, txo.ops.linear_crossentropy_sum])
@pytest.mark.parametrize(
    "bad_label, options", [(VOCABULARY, {}), (-1, {}), (-2, dict(ignore_class=-1))]
)
def test_labels_out_of_range_raise_eagerly(fn, bad_label, options):
    hidden, kernel, bias, labels = _args(n=20)
    labels[13] = bad_label
    # The position in the batch, not in the chunk of 4 rows that holds it.
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=f"label value of {bad_label} at position 13 "
    ):
        fn(hidden, kernel, labels, bias=bias, chunk_size=4, **options)


def test_labels_out_of_range_raise_in_graph_mode():
    hidden, kernel, bias, labels = _args(n=20)
    labels[13] = VOCABULARY

    @tf.function
    def call(h):
        return txo.ops.linear_crossentropy(h, kernel, labels, bias=bias, chunk_size=4)

    with pytest.raises(
        tf.errors.InvalidArgumentError, match=f"label value of {VOCABULARY} at position 13 "
    ):
        call(tf.constant(hidden))


# ---------------------------------------------------------------------------
# 8. First order only


def _second_order(form, hidden, kernel, bias, labels, wrt, of="hidden"):
    """d/d(wrt) of sum(d(loss)/d(of)) through nested tapes."""
    sources = {
        "hidden": hidden,
        "kernel": kernel,
        "bias": bias,
        "sample_weight": tf.ones(tf.shape(labels), hidden.dtype),
    }
    with tf.GradientTape() as outer:
        outer.watch(list(sources.values()))
        with tf.GradientTape() as inner:
            inner.watch(list(sources.values()))
            if form == "per_position":
                per_position = txo.ops.linear_crossentropy(
                    hidden, kernel, labels, bias=bias, chunk_size=4
                )
                loss = tf.reduce_sum(per_position * sources["sample_weight"])
            else:
                loss = txo.ops.linear_crossentropy_sum(
                    hidden, kernel, labels, bias=bias, chunk_size=4,
                    sample_weight=sources["sample_weight"],
                    gradient_in_forward=form == "sum_in_forward",
                )  # fmt: skip
        first = tf.reduce_sum(inner.gradient(loss, sources[of]))
    return outer.gradient(first, sources[wrt])


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("form", ["per_position", "sum_recompute", "sum_in_forward"])
@pytest.mark.parametrize(
    "of, wrt", [("hidden", "hidden"), ("kernel", "hidden"), ("hidden", "sample_weight")]
)
def test_second_order_raises(rng, mode, form, of, wrt):
    hidden, kernel, bias, labels = [tf.constant(x) for x in _inputs(rng, (2, 5), "float64")]

    def fn(h, w, b, y):
        return _second_order(form, h, w, b, y, wrt, of)

    if mode == "graph":
        fn = tf.function(fn, autograph=False)
    with pytest.raises(ValueError, match="first-order"):
        fn(hidden, kernel, bias, labels)


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("form", ["per_position", "sum_recompute", "sum_in_forward"])
def test_second_order_through_the_weight_gradient(rng, mode, form):
    """d/d(hidden) of sum(d(loss)/d(sample_weight)): the gradient of
    sum(per-position loss), made of first-order gradients only. Either that
    value or the documented ValueError about first-order gradients; never an
    error from inside the chunk loop (an op without a gradient)."""
    hidden, kernel, bias, labels = [tf.constant(x) for x in _inputs(rng, (2, 5), "float64")]

    def fn(h, w, b, y):
        return _second_order(form, h, w, b, y, "hidden", of="sample_weight")

    if mode == "graph":
        fn = tf.function(fn, autograph=False)
    try:
        result = fn(hidden, kernel, bias, labels)
    except ValueError as e:
        assert "first-order" in str(e)
        return
    assert result is not None, "no gradient: the weight gradient was cut off from the inputs"
    _, _, expected = _reference(hidden.numpy(), kernel.numpy(), labels.numpy(), bias.numpy())
    _assert_gradient(result.numpy(), expected["hidden"], "float64", "hidden")


@pytest.mark.parametrize("fn", [txo.ops.linear_crossentropy, txo.ops.linear_crossentropy_sum])
def test_empty_batch_of_unknown_size_under_xla(fn):
    # As `fit` traces: the batch size unknown when the graph is built.
    @tf.function(
        input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None], tf.int32)],
        jit_compile=True,
    )
    def call(hidden, labels):
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = fn(hidden, tf.ones([4, 5]), labels)
        return loss, tape.gradient(loss, hidden)

    loss, grad = call(tf.zeros([0, 4]), tf.zeros([0], tf.int32))
    assert np.sum(loss) == 0.0 and np.shape(loss) in ((), (0,)) and grad.shape == (0, 4)


def test_ignore_class_beyond_the_labels_dtype():
    """An ignore_class that int32 labels cannot hold matches none of them,
    and the rows padded to whole chunks still take a valid label."""
    hidden, kernel, bias, labels = _args(n=5)
    labels = tf.constant(labels, tf.int32)
    expected = txo.ops.linear_crossentropy(hidden, kernel, labels, bias=bias)
    actual = txo.ops.linear_crossentropy(
        hidden, kernel, labels, bias=bias, ignore_class=2**31, chunk_size=2
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
