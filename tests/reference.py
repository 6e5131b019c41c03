"""Float64 NumPy references for the cross-entropy semantics, and input makers.

Written from the definitions (Keras 3.15, TensorFlow backend), not from the
kernels: the dense probability path normalizes, clips to [eps, 1 - eps] and
takes the log; the sparse one clips, takes the log and log-softmaxes.
"""

from typing import NamedTuple

import ml_dtypes
import numpy as np

EPSILON = 1e-7


def as_coefficient(x, dtype):
    """A float argument as the ops carry it: in the loss dtype, so exact with
    float64 predictions and rounded to float32 with the others."""
    exact = dtype == "float64" if isinstance(dtype, str) else np.dtype(dtype) == np.float64
    return float(x) if exact else float(np.float32(x))


NUMPY_DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}
# Half the spacing of 1.0 in the 16-bit types: their rounding of a float32 result.
HALF_ULP = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def _logsumexp(z):
    m = np.max(z, axis=-1, keepdims=True, initial=-np.inf)
    with np.errstate(invalid="ignore"):
        return (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))[..., 0]


def soft_cap(z, logit_soft_cap):
    """z' = cap * tanh(z / cap) (-cap for -inf), or z without a cap."""
    if not logit_soft_cap:
        return z
    return logit_soft_cap * np.tanh(z / logit_soft_cap)


def _z_loss(lse, z_loss):
    return z_loss * lse**2 if z_loss else np.zeros_like(lse)


def _coefficients(predictions, label_smoothing, epsilon, z_loss=0.0, logit_soft_cap=None):
    dtype = np.asarray(predictions).dtype
    return (
        as_coefficient(label_smoothing, dtype),
        as_coefficient(epsilon, dtype),
        as_coefficient(z_loss, dtype),
        as_coefficient(logit_soft_cap, dtype) if logit_soft_cap else 0.0,
    )


def dense(
    labels,
    predictions,
    from_logits,
    label_smoothing=0.0,
    axis=-1,
    epsilon=EPSILON,
    z_loss=0.0,
    logit_soft_cap=None,
):
    """Per-position loss with dense labels; smoothing over the classes on `axis`."""
    ls, epsilon, z_loss, cap = _coefficients(
        predictions, label_smoothing, epsilon, z_loss, logit_soft_cap
    )
    y = np.moveaxis(np.asarray(labels, np.float64), axis, -1)
    p = np.moveaxis(np.asarray(predictions).astype(np.float64), axis, -1)
    t = y * (1.0 - ls) + ls / max(p.shape[-1], 1)
    if from_logits:
        z = soft_cap(p, cap)
        lse = _logsumexp(z)
        # Zero targets carry no mass, even against a -inf logit.
        with np.errstate(invalid="ignore"):
            return np.sum(np.where(t != 0, t * (lse[..., None] - z), 0.0), axis=-1) + _z_loss(
                lse, z_loss
            )
    # An all-zero row normalizes to NaN, as it does in Keras.
    with np.errstate(invalid="ignore"):
        q = np.clip(p / np.sum(p, axis=-1, keepdims=True), epsilon, 1.0 - epsilon)
    return -np.sum(t * np.log(q), axis=-1)


def sparse(
    labels,
    predictions,
    from_logits,
    label_smoothing=0.0,
    ignore_class=None,
    axis=-1,
    epsilon=EPSILON,
    z_loss=0.0,
    logit_soft_cap=None,
):
    """Per-position loss with integer labels."""
    ls, epsilon, z_loss, cap = _coefficients(
        predictions, label_smoothing, epsilon, z_loss, logit_soft_cap
    )
    p = np.moveaxis(np.asarray(predictions).astype(np.float64), axis, -1)
    labels = np.asarray(labels).astype(np.int64).reshape(p.shape[:-1])
    z = soft_cap(p, cap) if from_logits else np.log(np.clip(p, epsilon, 1.0 - epsilon))
    num_classes = p.shape[-1]
    valid = np.ones(labels.shape, bool) if ignore_class is None else labels != ignore_class
    safe = np.where(valid, labels, 0)
    lse = _logsumexp(z)
    neg_log_softmax = lse[..., None] - z
    at_label = np.take_along_axis(neg_log_softmax, safe[..., None], axis=-1)[..., 0]
    loss = (1.0 - ls) * at_label
    if ls and num_classes:  # only then do other classes carry target mass
        loss = loss + ls / num_classes * np.sum(neg_log_softmax, axis=-1)
    if from_logits:
        loss = loss + _z_loss(lse, z_loss)
    return np.where(valid, loss, 0.0)


def log_sum_exp(predictions, axis=-1, logit_soft_cap=None):
    """Per-position log-sum-exp of the (capped) logits along `axis`."""
    cap = as_coefficient(logit_soft_cap, np.asarray(predictions).dtype) if logit_soft_cap else 0
    z = np.moveaxis(np.asarray(predictions).astype(np.float64), axis, -1)
    return _logsumexp(soft_cap(z, cap))


def _log_softmax(z):
    with np.errstate(invalid="ignore"):
        return z - _logsumexp(z)[..., None]


def _clip_mask(q, epsilon):
    # Where tf.clip_by_value passes the gradient through (bounds inclusive).
    with np.errstate(invalid="ignore"):
        return (q >= epsilon) & (q <= 1.0 - epsilon)


def _softmax_scale(softmax, lse):
    # The kernels keep lse (log-sum-exp) as one number of the accumulation
    # type for the backward, so exp(z - lse) carries lse's rounding: a
    # relative error of |lse| ulps, 6e-4 in float32 at |lse| = 1e4.
    return np.abs(softmax) * np.maximum(1.0, np.abs(lse))


class Gradient(NamedTuple):
    """A float64 gradient and, element-wise, the size of the terms it is the
    difference of (softmax * sum(t) and t, say): a computation in lower
    precision errs in proportion to `scale`, not to the gradient itself."""

    value: np.ndarray
    scale: np.ndarray


def _through_cap(gradient, p, cap):
    """The gradient with respect to the logits z from the one with respect to
    z' = cap * tanh(z / cap): times 1 - tanh^2, whose terms (1 and tanh^2)
    have size up to 2, so its rounding is absolute."""
    if not cap:
        return gradient
    tanh = np.tanh(p / cap)
    return Gradient(gradient.value * (1.0 - tanh**2), gradient.scale * (1.0 + tanh**2))


def _logits_gradient(z, t, lse, z_loss):
    """softmax(z) (sum(t) + 2 z_loss lse) - t: the gradient of
    sum(t (lse - z)) + z_loss lse^2 with respect to z, and its scale."""
    with np.errstate(invalid="ignore"):
        weight = t.sum(-1, keepdims=True) + 2.0 * z_loss * lse
        weighted = np.exp(z - lse) * weight
    return Gradient(weighted - t, _softmax_scale(weighted, lse) + np.abs(t))


def dense_gradients(
    labels,
    predictions,
    from_logits,
    label_smoothing=0.0,
    epsilon=EPSILON,
    z_loss=0.0,
    logit_soft_cap=None,
):
    """Gradients of `dense` for [N, C] inputs and an upstream gradient of one
    per row, with respect to the predictions and to the labels, in closed
    form: for logits (z' the capped logits) softmax(z') (sum(t) + 2 z_loss
    lse) - t through the cap, and -(1 - ls) log_softmax(z'); for
    probabilities (q = p / s, m the clip mask, A = sum of t over m)
    A / s - m t / p and -(1 - ls) log(clip(q))."""
    ls, epsilon, z_loss, cap = _coefficients(
        predictions, label_smoothing, epsilon, z_loss, logit_soft_cap
    )
    y = np.asarray(labels, np.float64)
    p = np.asarray(predictions).astype(np.float64)
    on = 1.0 - ls
    t = y * on + ls / max(p.shape[-1], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if from_logits:
            z = soft_cap(p, cap)
            lse = _logsumexp(z)[..., None]
            # lse = m + log(s), s = sum exp(z - m) >= 1: the relative rounding
            # of s is absolute in its log, so -log_softmax errs by the ulps of
            # 1 even where it is near zero (the max of a near-certain row).
            wrt_labels = Gradient(-on * (z - lse), on * (np.abs(lse) + np.abs(z) + 1.0))
            return _through_cap(_logits_gradient(z, t, lse, z_loss), p, cap), wrt_labels
        s = p.sum(-1, keepdims=True)
        q = p / s
        mask = _clip_mask(q, epsilon)
        spread = np.sum(np.where(mask, t, 0.0), -1, keepdims=True) / s
        own = np.where(mask, t / p, 0.0)
        log_q = np.log(np.clip(q, epsilon, 1.0 - epsilon))
        wrt_labels = Gradient(-on * log_q, on * np.maximum(np.abs(log_q), 1.0))
        return Gradient(spread - own, np.abs(spread) + np.abs(own)), wrt_labels


def sparse_gradient(
    labels,
    predictions,
    from_logits,
    label_smoothing=0.0,
    ignore_class=None,
    epsilon=EPSILON,
    z_loss=0.0,
    logit_soft_cap=None,
):
    """Gradient of `sparse` with respect to [N, C] predictions for an upstream
    gradient of one per row: softmax(z) (1 + 2 z_loss lse) - t with respect
    to z, where z is the (capped) logits, then through the cap, or
    log(clip(p)) for probabilities (then times m / p, m the clip mask); zero
    in ignored rows."""
    ls, epsilon, z_loss, cap = _coefficients(
        predictions, label_smoothing, epsilon, z_loss, logit_soft_cap
    )
    p = np.asarray(predictions).astype(np.float64)
    labels = np.asarray(labels).astype(np.int64)
    valid = np.ones(labels.shape, bool) if ignore_class is None else labels != ignore_class
    t = np.full(p.shape, ls / p.shape[-1])
    rows = np.flatnonzero(valid)
    t[rows, labels[rows]] += 1.0 - ls
    with np.errstate(invalid="ignore", divide="ignore"):
        if from_logits:
            z = soft_cap(p, cap)
            gradient = _through_cap(
                _logits_gradient(z, t, _logsumexp(z)[..., None], z_loss), p, cap
            )
            grad, scale = gradient.value, gradient.scale
        else:
            z = np.log(np.clip(p, epsilon, 1.0 - epsilon))
            softmax = np.exp(_log_softmax(z))
            mask = _clip_mask(p, epsilon)
            grad = np.where(mask, (softmax - t) / p, 0.0)
            scale = np.where(mask, (softmax + t) / p, 0.0)
    keep = valid[:, None]
    return Gradient(np.where(keep, grad, 0.0), np.where(keep, scale, 0.0))


class SecondOrder(NamedTuple):
    """Float64 second-order products (each a `Gradient`: value and the size of
    its terms) for [N, C] inputs and an upstream gradient of one per row:
    with g_z, g_y the gradients with respect to the predictions and to the
    labels, `hessian_v` = d<v, g_z>/dz (a Hessian-vector product), `labels_v`
    = d<v, g_z>/dy and `predictions_u` = d<u, g_y>/dz (None where a form has
    no labels to differentiate)."""

    hessian_v: Gradient
    labels_v: Gradient = None
    predictions_u: Gradient = None


def _row_sum(x):
    return np.sum(x, -1, keepdims=True)


def dense_second_order(
    labels, predictions, v, u, from_logits, label_smoothing=0.0, epsilon=EPSILON
):
    """Closed forms, t the smoothed labels and T = sum(t): for logits (s the
    softmax) T s (v - <s, v>), (1 - ls) (<s, v> - v) and (1 - ls) (s sum(u) - u);
    for probabilities (q = p / S, m the clip mask, A = sum of t over m)
    m t v / p^2 - A sum(v) / S^2, (1 - ls) m (sum(v) / S - v / p) and
    (1 - ls) (<m, u> / S - m u / p)."""
    label_smoothing, epsilon, _, _ = _coefficients(predictions, label_smoothing, epsilon)
    y = np.asarray(labels, np.float64)
    p = np.asarray(predictions).astype(np.float64)
    v, u = np.asarray(v, np.float64), np.asarray(u, np.float64)
    on = 1.0 - label_smoothing
    t = y * on + label_smoothing / max(p.shape[-1], 1)
    if from_logits:
        s = np.exp(_log_softmax(p))
        s_v, s_abs_v = _row_sum(s * v), _row_sum(s * np.abs(v))
        mass = _row_sum(t)
        return SecondOrder(
            Gradient(mass * s * (v - s_v), np.abs(mass) * s * (np.abs(v) + s_abs_v)),
            Gradient(on * (s_v - v), on * (s_abs_v + np.abs(v))),
            Gradient(on * (s * _row_sum(u) - u), on * (s * _row_sum(np.abs(u)) + np.abs(u))),
        )
    total = _row_sum(p)
    mask = _clip_mask(p / total, epsilon)
    mass = _row_sum(np.where(mask, t, 0.0))
    own_v = np.where(mask, t * v / p**2, 0.0)
    spread_v = mass * _row_sum(v) / total**2
    hessian_v = Gradient(
        own_v - spread_v, np.abs(own_v) + np.abs(mass) * _row_sum(np.abs(v)) / total**2
    )
    labels_v = Gradient(
        on * np.where(mask, _row_sum(v) / total - v / p, 0.0),
        on * np.where(mask, _row_sum(np.abs(v)) / total + np.abs(v) / p, 0.0),
    )
    masked_u = np.where(mask, u, 0.0)
    predictions_u = Gradient(
        on * (_row_sum(masked_u) / total - masked_u / p),
        on * (_row_sum(np.abs(masked_u)) / total + np.abs(masked_u) / p),
    )
    return SecondOrder(hessian_v, labels_v, predictions_u)


def sparse_second_order(
    labels, predictions, v, from_logits, label_smoothing=0.0, ignore_class=None, epsilon=EPSILON
):
    """Closed forms, zero in ignored rows: for logits s (v - <s, v>) (s the
    softmax); for probabilities (m the clip mask, S the sum of the clipped
    row) m (t v / p^2 - <m, v> / S^2)."""
    label_smoothing, epsilon, _, _ = _coefficients(predictions, label_smoothing, epsilon)
    p = np.asarray(predictions).astype(np.float64)
    v = np.asarray(v, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    valid = np.ones(labels.shape, bool) if ignore_class is None else labels != ignore_class
    if from_logits:
        s = np.exp(_log_softmax(p))
        value = s * (v - _row_sum(s * v))
        scale = s * (np.abs(v) + _row_sum(s * np.abs(v)))
    else:
        t = np.full(p.shape, label_smoothing / p.shape[-1])
        rows = np.flatnonzero(valid)
        t[rows, labels[rows]] += 1.0 - label_smoothing
        mask = _clip_mask(p, epsilon)
        clipped_sum = _row_sum(np.clip(p, epsilon, 1.0 - epsilon))
        masked_v = np.where(mask, v, 0.0)
        value = np.where(mask, t * v / p**2 - _row_sum(masked_v) / clipped_sum**2, 0.0)
        scale = np.where(
            mask, t * np.abs(v) / p**2 + _row_sum(np.abs(masked_v)) / clipped_sum**2, 0.0
        )
    keep = valid[:, None]
    return SecondOrder(Gradient(np.where(keep, value, 0.0), np.where(keep, scale, 0.0)))


def logits(rng, shape, dtype, scale=4.0):
    return (rng.standard_normal(shape) * scale).astype(NUMPY_DTYPES[dtype])


def smooth_predictions(rng, shape, from_logits):
    """Float64 logits, or probabilities far from the clip bounds: inputs where
    finite differences and closed-form derivatives meet no kink nearby."""
    if from_logits:
        return logits(rng, shape, "float64")
    return rng.uniform(0.05, 1.0, size=shape)


def probabilities(rng, shape, dtype, axis=-1):
    """Rows of a softmax, some entries tiny enough to be clipped, not normalized
    exactly (so the dense path's normalization matters)."""
    z = rng.standard_normal(shape) * 6.0
    p = np.exp(z - z.max(axis=axis, keepdims=True))
    p /= p.sum(axis=axis, keepdims=True)
    p *= rng.uniform(0.9, 1.1, size=p.shape)
    return off_the_upper_clip_bound(p, axis).astype(NUMPY_DTYPES[dtype])


def off_the_upper_clip_bound(p, axis=-1):
    """`p` (modified in place) with no row's top entry near 1 - eps.

    A row whose other entries sum to about eps puts its top entry, after
    normalization, within an ulp of the clip bound 1 - eps: which side it
    falls on then depends on the order of the float32 row sum, and the
    gradient jumps. Such rows get a second entry of 1e-4 of the top one.
    Tests that zero entries of probabilities() call this again after.
    """
    top = np.argmax(p, axis=axis)
    p_max = np.take_along_axis(p, np.expand_dims(top, axis), axis)
    crowded = 1.0 - p_max / p.sum(axis=axis, keepdims=True) < 1e-5
    second = np.expand_dims((top + 1) % p.shape[axis], axis)
    bumped = np.where(crowded, 1e-4 * p_max, np.take_along_axis(p, second, axis))
    np.put_along_axis(p, second, bumped, axis)
    return p


def soft_labels(rng, shape, axis=-1):
    """Label distributions (rows sum to one along `axis`)."""
    y = rng.uniform(0.0, 1.0, size=shape) ** 3
    return (y / y.sum(axis=axis, keepdims=True)).astype(np.float32)


def one_hot(labels, num_classes, axis=-1):
    labels = np.asarray(labels)
    y = np.zeros(labels.shape + (num_classes,), np.float32)
    np.put_along_axis(y, labels[..., None], 1.0, axis=-1)
    return np.moveaxis(y, -1, axis)


def assert_within_one_ulp(actual, desired, dtype):
    """Element-wise at most one unit in the last place of `dtype` apart: two
    float32 computations that agree to float32 precision may round to
    neighbouring 16-bit values."""
    desired = np.asarray(desired).astype(NUMPY_DTYPES[dtype])
    ulp = np.abs(np.spacing(desired)).astype(np.float64)
    np.testing.assert_array_less(
        np.abs(np.asarray(actual, np.float64) - desired.astype(np.float64)), ulp * 1.0001
    )


def tolerance(dtype):
    """(rtol, atol) for losses against the float64 reference on the same
    (already rounded) inputs: 16-bit inputs are accumulated in float32."""
    return {"float64": (1e-10, 1e-10)}.get(dtype, (2e-5, 2e-5))


def predictions(rng, shape, from_logits, dtype="float32", axis=-1):
    """Logits, or probabilities along `axis`."""
    if from_logits:
        return logits(rng, shape, dtype)
    return probabilities(rng, shape, dtype, axis=axis)


def sample_weight(rng, kind, batch_shape):
    """Sample weights of one of the shapes Keras takes: None, "scalar",
    "per_sample", "per_sample_column" or "per_position"."""
    if kind is None:
        return None
    if kind == "scalar":
        return np.float32(rng.uniform(0.1, 2.0))
    if kind == "per_sample":
        return rng.uniform(0.0, 2.0, size=batch_shape[:1]).astype(np.float32)
    if kind == "per_sample_column":
        return rng.uniform(0.0, 2.0, size=batch_shape[:1] + (1,)).astype(np.float32)
    if kind == "per_position":
        return rng.uniform(0.0, 2.0, size=batch_shape).astype(np.float32)
    raise ValueError(kind)
