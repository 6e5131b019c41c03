"""The fused cross-entropy ops on tensors of any rank, with their gradients.

These are the thin layer over the C++ op library: they move the class axis
last, flatten to rows, call the op and reshape back. Losses come back in
float32 (float64 for float64 predictions), whatever the prediction dtype:
16-bit predictions are read directly by the kernels and accumulated in float32.
"""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

# No public API tells whether a trace is being compiled by XLA (jit_compile=True,
# TPU); this is the check TensorFlow's own ops use.
from tensorflow.python.ops import control_flow_util

from tf_xent_ops._load import library

_SPARSE_ATTRS = ("from_logits", "ignore_class", "use_ignore_class")
_LABEL_DTYPES = (tf.int32, tf.int64)
# The ops' scalar inputs after their tensors, in this order.
_COEFFICIENTS = ("label_smoothing", "epsilon", "z_loss", "logit_soft_cap")


def loss_dtype(dtype):
    """The dtype of losses computed from predictions of `dtype`."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def _is_integer(value):
    """Whether `value` is a Python or NumPy integer (a bool is not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def canonicalize_axis(axis, rank):
    """Returns `axis` (a Python or NumPy integer, as Keras takes) as an int in
    [0, rank), raising ValueError if it is out of range or not an integer."""
    if not _is_integer(axis):
        raise ValueError(f"`axis` must be an int. Received: axis={axis!r}")
    axis = int(axis)
    if not -rank <= axis < rank:
        raise ValueError(
            f"`axis`={axis} is out of range for predictions of rank {rank}; "
            f"expected an axis in [{-rank}, {rank})."
        )
    return axis % rank


def check_coefficients(
    from_logits, label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None, dtype=None
):
    """Checks the float arguments of every form, raising ValueError that names
    the argument; returns them as Python floats (`logit_soft_cap` 0.0 for
    None). The loss and metric classes call this when they are made, the ops
    with `dtype`, the loss dtype, which bounds `z_loss` and `logit_soft_cap`."""
    for name, value in (("z_loss", z_loss), ("logit_soft_cap", logit_soft_cap)):
        # float(True) is 1.0: a cap of True would silently be a cap of 1.
        if isinstance(value, (bool, np.bool_)):
            raise ValueError(f"`{name}` must be a number, not a bool. Received: {name}={value}")
    for name, value in (
        ("label_smoothing", label_smoothing),
        ("z_loss", z_loss),
        ("logit_soft_cap", logit_soft_cap),
    ):
        # float("0.1") is 0.1, but a string is no number to Keras's math.
        if isinstance(value, (str, bytes)):
            raise ValueError(f"`{name}` must be a number, not a string. Received: {name}={value!r}")
    try:
        label_smoothing, z_loss = float(label_smoothing), float(z_loss)
        cap = None if logit_soft_cap is None else float(logit_soft_cap)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "`label_smoothing`, `z_loss` and `logit_soft_cap` must be numbers. Received: "
            f"label_smoothing={label_smoothing!r}, z_loss={z_loss!r}, "
            f"logit_soft_cap={logit_soft_cap!r}"
        ) from e
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1]. Received: {label_smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"`z_loss` must be finite and >= 0. Received: z_loss={z_loss}")
    if cap is not None and not (math.isfinite(cap) and cap > 0.0):
        raise ValueError(
            "`logit_soft_cap` must be None or finite and > 0. "
            f"Received: logit_soft_cap={logit_soft_cap}"
        )
    if not from_logits:
        for name, value, default in (("z_loss", z_loss, 0.0), ("logit_soft_cap", cap, None)):
            if value != default:
                raise ValueError(
                    f"`{name}` applies to logits only, but `from_logits=False`. "
                    f"Received: {name}={value}"
                )
    if dtype is not None:
        _check_range(tf.as_dtype(dtype), z_loss, cap)
    return label_smoothing, z_loss, cap or 0.0


def checked_options(options):
    """The keyword options of a loss or metric (`from_logits` False unless
    given), checked as `check_coefficients` and `check_ignore_class` check
    them, with `label_smoothing`, `z_loss` and `logit_soft_cap` (where given) as
    Python floats: a tensor there would be saved in the config as a tensor,
    which no saved model loads."""
    check_ignore_class(options.get("ignore_class"))
    label_smoothing, z_loss, cap = check_coefficients(
        options.get("from_logits", False),
        options.get("label_smoothing", 0.0),
        options.get("z_loss", 0.0),
        options.get("logit_soft_cap"),
    )
    checked = dict(options)
    if "label_smoothing" in checked:
        checked["label_smoothing"] = label_smoothing
    if "z_loss" in checked:
        checked["z_loss"] = z_loss
    if "logit_soft_cap" in checked:
        checked["logit_soft_cap"] = cap or None
    return checked


def check_ignore_class(ignore_class):
    """`ignore_class` as a Python int (or None): TypeError for anything but an
    integer (1.5 or True would be truncated to a class), ValueError outside
    int64, where the op's attribute and the labels live."""
    if ignore_class is None:
        return None
    if not _is_integer(ignore_class):
        raise TypeError(f"`ignore_class` must be an int or None. Received: {ignore_class!r}")
    if not -(2**63) <= ignore_class < 2**63:
        raise ValueError(f"`ignore_class` must fit in int64. Received: {ignore_class}")
    return int(ignore_class)


def is_ignored(labels, ignore_class):
    """Where integer `labels` equal `ignore_class`, compared in int64 as the
    kernels compare: int32 labels never equal an ignore_class beyond int32
    (which, cast to int32, would wrap onto a real class)."""
    return tf.equal(tf.cast(labels, tf.int64), ignore_class)


def _epsilon(epsilon):
    """The clip bound of probabilities: `keras.config.epsilon()` at call time
    unless given."""
    epsilon = keras.config.epsilon() if epsilon is None else float(epsilon)
    if not 0.0 <= epsilon <= 0.5:
        raise ValueError(f"`epsilon` must be in [0, 0.5]. Received: epsilon={epsilon}")
    return epsilon


def soft_cap_range(dtype):
    """The caps that losses computed in `dtype` can apply: normal, with
    `z / cap` flushed to 0 (as subnormals are) only for logits within an ulp
    of 1 of 0."""
    info = np.finfo(dtype.as_numpy_dtype)
    return float(info.tiny), float(info.eps / info.tiny)


def _check_range(dtype, z_loss, logit_soft_cap):
    """ValueError for coefficients that `dtype`, the loss dtype, cannot carry."""
    if z_loss > float(dtype.max):
        raise ValueError(
            f"`z_loss`={z_loss} overflows {dtype.name}, the dtype of these losses "
            f"(at most {dtype.max:.4g}; float64 predictions take more)."
        )
    low, high = soft_cap_range(dtype)
    if logit_soft_cap and not low <= logit_soft_cap <= high:
        raise ValueError(
            f"`logit_soft_cap`={logit_soft_cap} is outside [{low:.4g}, {high:.4g}], the caps "
            f"that {dtype.name} losses can apply (float64 predictions take a wider range)."
        )


def _coefficients(dtype, label_smoothing, epsilon, z_loss, logit_soft_cap):
    """The ops' scalar coefficient inputs in the loss dtype: float64 keeps
    every bit of the Python floats (a `float` attribute would round them to
    float32), float32 is what the kernels compute with."""
    values = (label_smoothing, _epsilon(epsilon), z_loss, logit_soft_cap)
    return {name: tf.constant(v, dtype) for name, v in zip(_COEFFICIENTS, values, strict=True)}


def _check_predictions(predictions, axis):
    """The predictions as a floating tensor, and `axis` in [0, rank) (or -1
    where the rank is unknown, which only axis=-1 allows)."""
    predictions = tf.convert_to_tensor(predictions)
    if not predictions.dtype.is_floating:
        raise TypeError(
            "Predictions must be half, bfloat16, float32 or float64. "
            f"Received dtype: {predictions.dtype.name}"
        )
    rank = predictions.shape.rank
    if rank is None:
        if not _is_integer(axis) or axis != -1:
            raise ValueError(
                f"Predictions of unknown rank need `axis=-1` to find the class axis. "
                f"Received: axis={axis!r}; give the predictions a known rank "
                "(e.g. a TensorSpec with a shape) to use another axis."
            )
        return predictions, -1
    if rank < 1:
        raise ValueError(f"Predictions must have a rank of at least 1. Received shape: {rank}")
    return predictions, canonicalize_axis(axis, rank)


def _check_has_classes(predictions, axis):
    """ValueError for rows of no classes, where the shape tells (the kernels
    raise it too; XLA's composite cannot)."""
    shape = predictions.shape
    if shape.rank is None:
        return
    rows = _positions(shape, axis).num_elements()
    if shape[axis] == 0 and rows:
        raise ValueError(
            f"Predictions must have at least one class along axis {axis}. Received shape: {shape}"
        )


def in_xla_context():
    """Whether ops created now will be compiled by XLA, where the custom op has
    no kernel; the losses then use `_composite_*`, with the same semantics."""
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def _class_axis_last(x, axis):
    rank = x.shape.rank
    if axis == -1 or axis == rank - 1:
        return x
    perm = [d for d in range(rank) if d != axis] + [axis]
    return tf.transpose(x, perm)


def _as_rows(x):
    """Flattens [..., C] to [N, C]; returns it and the leading shape (None when
    `x` is already [N, C]: no reshapes, in either direction, for the usual case)."""
    if x.shape.rank == 2:
        return x, None
    shape = tf.shape(x, out_type=tf.int64)
    batch_shape = shape[:-1]
    rows = tf.reshape(x, tf.stack([tf.reduce_prod(batch_shape), shape[-1]]))
    return rows, batch_shape


def _positions(shape, axis):
    """The shape of the positions: `shape` without the class axis."""
    return shape[:axis].concatenate(shape[axis + 1 :])


def _unsettled_positions(a, b):
    """Whether compatible position shapes `a` and `b` may still differ once
    the op has checked that they hold as many positions: where two or more
    axes are unknown (the count settles one)."""
    unknown = sum(x is None or y is None for x, y in zip(a.as_list(), b.as_list(), strict=True))
    return unknown > 1


def _assert_same_shape(a, b, message):
    """A runtime check that `a` and `b` have the same shape, where the shapes
    known when the graph is built do not tell."""
    return tf.debugging.assert_equal(
        tf.shape(a, out_type=tf.int64), tf.shape(b, out_type=tf.int64), message=message
    )


def dense_crossentropy(
    labels,
    predictions,
    from_logits=False,
    label_smoothing=0.0,
    axis=-1,
    *,
    z_loss=0.0,
    logit_soft_cap=None,
    return_lse=False,
    epsilon=None,
):
    """Cross-entropy with dense (one-hot or soft) labels along `axis`.

    Same as `keras.losses.categorical_crossentropy` on the TensorFlow backend,
    except that label smoothing uses the number of classes along `axis` and
    the result is in `loss_dtype(predictions.dtype)`.

    Args:
        labels: Tensor of the same shape as `predictions`.
        predictions: Logits (`from_logits=True`) or probabilities.
        from_logits: Whether `predictions` are logits.
        label_smoothing: Float in [0, 1].
        axis: The class axis (with predictions of unknown rank, only -1).
        z_loss: Logits only: each position's loss adds
            `z_loss * log_sum_exp(logits)**2` (PaLM's z-loss).
        logit_soft_cap: Logits only: if set, the logits `z` become
            `logit_soft_cap * tanh(z / logit_soft_cap)` first (Gemma 2).
        return_lse: Logits only: also return each position's log-sum-exp of
            the (capped) logits, from the same pass, without a gradient.
        epsilon: Probabilities only: they are clipped to
            [epsilon, 1 - epsilon]. Defaults to `keras.config.epsilon()`.

    Returns:
        The loss for each position, `predictions.shape` without `axis`; with
        `return_lse`, the pair (loss, lse).

    Example:

    >>> import tf_xent_ops
    >>> loss = tf_xent_ops.ops.dense_crossentropy(
    ...     [[0.0, 1.0, 0.0]], [[1.0, 2.0, 0.5]], from_logits=True)
    >>> round(float(loss[0]), 4)
    0.4644
    """
    predictions, axis = _check_predictions(predictions, axis)
    label_smoothing, z_loss, cap = check_coefficients(
        from_logits, label_smoothing, z_loss, logit_soft_cap, loss_dtype(predictions.dtype)
    )
    _check_return_lse(return_lse, from_logits)
    acc_dtype = loss_dtype(predictions.dtype)
    labels = tf.cast(tf.convert_to_tensor(labels), acc_dtype)
    known = labels.shape.rank is not None and predictions.shape.rank is not None
    if known and (
        labels.shape.rank != predictions.shape.rank
        or not labels.shape.is_compatible_with(predictions.shape)
    ):
        raise ValueError(
            "Labels and predictions must have the same shape. "
            f"Received: labels.shape={labels.shape}, predictions.shape={predictions.shape}"
        )
    _check_has_classes(predictions, axis)
    pred_rows, batch_shape = _as_rows(_class_axis_last(predictions, axis))
    # The op checks [N, C] against [N, C], which settles one unknown axis
    # of the positions, not two.
    unsettled = not known or _unsettled_positions(
        _positions(labels.shape, axis), _positions(predictions.shape, axis)
    )
    if unsettled and not in_xla_context():  # XLA drops checks
        check = _assert_same_shape(
            labels, predictions, "Labels and predictions must have the same shape."
        )
        with tf.control_dependencies([check]):
            labels = tf.identity(labels)
    if predictions.shape.rank is not None:
        if labels.shape.rank is None:
            # Labels of unknown rank take the predictions' shape (checked
            # above), so that their class axis moves last as the predictions'.
            labels = tf.reshape(labels, tf.shape(predictions))
        label_rows, _ = _as_rows(_class_axis_last(labels, axis))
    else:
        label_rows = tf.reshape(labels, tf.shape(pred_rows))  # axis=-1
    coefficients = _coefficients(acc_dtype, label_smoothing, epsilon, z_loss, cap)
    if in_xla_context():
        loss, lse = _composite_dense(
            pred_rows, label_rows, from_logits=bool(from_logits), **coefficients
        )
    else:
        loss, row_stats = library.tf_xent_dense_xent(
            pred_rows, label_rows, from_logits=bool(from_logits), **coefficients
        )
        lse = row_stats[:, 0] if return_lse else None
    return _per_position(loss, lse, return_lse, batch_shape, predictions.shape, axis)


def sparse_crossentropy(
    labels,
    predictions,
    from_logits=False,
    label_smoothing=0.0,
    ignore_class=None,
    axis=-1,
    *,
    z_loss=0.0,
    logit_soft_cap=None,
    return_lse=False,
    epsilon=None,
):
    """Cross-entropy with integer class labels along `axis`, without a one-hot.

    With `label_smoothing` = 0 the same as
    `keras.losses.sparse_categorical_crossentropy` on the TensorFlow backend.
    Positions whose label equals `ignore_class` get a loss and gradient of 0.
    Labels outside [0, num_classes) raise InvalidArgumentError on the CPU.

    Args:
        labels: Integer tensor of `predictions.shape` without `axis` (or with a
            size-1 dimension at `axis`, which is squeezed).
        predictions: Logits (`from_logits=True`) or probabilities.
        from_logits: Whether `predictions` are logits.
        label_smoothing: Float in [0, 1]; the labelled class gets
            `1 - label_smoothing + label_smoothing / num_classes`.
        ignore_class: Optional label value to ignore.
        axis: The class axis (with predictions of unknown rank, only -1).
        z_loss: Logits only: each position's loss adds
            `z_loss * log_sum_exp(logits)**2` (PaLM's z-loss; 0 where ignored).
        logit_soft_cap: Logits only: if set, the logits `z` become
            `logit_soft_cap * tanh(z / logit_soft_cap)` first (Gemma 2).
        return_lse: Logits only: also return each position's log-sum-exp of
            the (capped) logits, from the same pass, without a gradient (0
            where ignored).
        epsilon: Probabilities only: they are clipped to
            [epsilon, 1 - epsilon]. Defaults to `keras.config.epsilon()`.

    Returns:
        The loss for each position, `predictions.shape` without `axis`; with
        `return_lse`, the pair (loss, lse).

    Example:

    >>> import tf_xent_ops
    >>> loss = tf_xent_ops.ops.sparse_crossentropy(
    ...     [1], [[1.0, 2.0, 0.5]], from_logits=True)
    >>> round(float(loss[0]), 4)
    0.4644

    The z-loss term, for logging, from the log-sum-exp of the same pass:

    >>> loss, lse = tf_xent_ops.ops.sparse_crossentropy(
    ...     [1], [[1.0, 2.0, 0.5]], from_logits=True, z_loss=1e-4, return_lse=True)
    >>> round(float(1e-4 * lse[0] ** 2), 7)
    0.0006073
    """
    predictions, axis = _check_predictions(predictions, axis)
    label_smoothing, z_loss, cap = check_coefficients(
        from_logits, label_smoothing, z_loss, logit_soft_cap, loss_dtype(predictions.dtype)
    )
    _check_return_lse(return_lse, from_logits)
    labels = as_sparse_labels(labels)
    rank = predictions.shape.rank
    pred_rows, batch_shape = _as_rows(_class_axis_last(predictions, axis))
    if rank is not None and labels.shape.rank is not None:
        if labels.shape.rank == rank and labels.shape[axis] == 1:
            labels = tf.squeeze(labels, axis=axis)
        expected = _positions(predictions.shape, axis)
        if labels.shape.rank != rank - 1 or not labels.shape.is_compatible_with(expected):
            raise ValueError(
                "Sparse labels must have the shape of the predictions without the class axis "
                f"(axis={axis}). Received: labels.shape={labels.shape}, "
                f"predictions.shape={predictions.shape}"
            )
        if _unsettled_positions(labels.shape, expected) and not in_xla_context():
            labels = _checked_label_positions(labels, predictions, axis, size_one_axis=False)
        label_rows = labels if labels.shape.rank == 1 else tf.reshape(labels, [-1])
    else:
        # Labels of [..., 1] hold as many elements as [...]: flat, both are
        # one label per row.
        if not in_xla_context():
            labels = _checked_label_positions(labels, predictions, axis, size_one_axis=True)
        label_rows = tf.reshape(labels, [-1])
    _check_has_classes(predictions, axis)
    config = sparse_config(
        from_logits, ignore_class, predictions.dtype, label_smoothing, epsilon, z_loss, cap
    )
    loss, lse = sparse_rows(pred_rows, label_rows, config)
    return _per_position(loss, lse, return_lse, batch_shape, predictions.shape, axis)


def _shapes_equal(a, b):
    """Whether shape vectors `a` and `b` are equal, lengths too (padded with
    different values, vectors of different lengths never compare equal)."""
    length = tf.maximum(tf.size(a), tf.size(b))
    a = tf.pad(a, [[0, length - tf.size(a)]], constant_values=-1)
    b = tf.pad(b, [[0, length - tf.size(b)]], constant_values=-2)
    return tf.reduce_all(tf.equal(a, b))


def _checked_label_positions(labels, predictions, axis, size_one_axis):
    """`labels`, after a runtime check that they have the shape of the
    predictions without the class axis (or with it of size 1, if
    `size_one_axis`), where the shapes do not tell when the graph is built."""
    shape = tf.shape(predictions, out_type=tf.int64)
    index = axis if axis >= 0 else tf.size(shape) - 1
    before, after = shape[:index], shape[index + 1 :]
    label_shape = tf.shape(labels, out_type=tf.int64)
    matches = _shapes_equal(label_shape, tf.concat([before, after], 0))
    if size_one_axis:
        with_one = tf.concat([before, tf.ones([1], tf.int64), after], 0)
        matches = tf.logical_or(matches, _shapes_equal(label_shape, with_one))
    check = tf.debugging.Assert(
        matches,
        [
            "Sparse labels must have the shape of the predictions without the class axis. "
            "Labels' shape:",
            label_shape,
            "predictions' shape:",
            shape,
        ],
    )
    with tf.control_dependencies([check]):
        return tf.identity(labels)


def as_sparse_labels(labels):
    """Integer labels as int32 or int64 (other integer, float and bool labels
    become int64, as Keras casts them); TypeError for anything else."""
    labels = tf.convert_to_tensor(labels)
    if labels.dtype not in _LABEL_DTYPES:
        if not (labels.dtype.is_integer or labels.dtype.is_floating or labels.dtype.is_bool):
            raise TypeError(f"Sparse labels must be integers. Received dtype: {labels.dtype.name}")
        labels = tf.cast(labels, tf.int64)
    return labels


def sparse_config(from_logits, ignore_class, dtype, label_smoothing, epsilon, z_loss, cap):
    """The attributes and coefficient inputs of the sparse ops, for
    `sparse_rows` and `sparse_rows_gradient` (checked arguments)."""
    ignore_class = check_ignore_class(ignore_class)
    return dict(
        from_logits=bool(from_logits),
        ignore_class=0 if ignore_class is None else ignore_class,
        use_ignore_class=ignore_class is not None,
        **_coefficients(loss_dtype(dtype), label_smoothing, epsilon, z_loss, cap),
    )


def sparse_rows(predictions, labels, config):
    """(loss, normalizer) of [N, C] rows: the op, or its composite under XLA."""
    if in_xla_context():
        return _composite_sparse(predictions, labels, **config)
    return library.tf_xent_sparse_xent(predictions, labels, **config)


def sparse_rows_gradient(predictions, labels, normalizer, grad_loss, config):
    """The gradient of `sparse_rows`'s loss weighted by `grad_loss`, with
    respect to the predictions, from the normalizer it returned."""
    if in_xla_context():
        # Symbolic (XLA runs graphs): no tape, which may be stopped here.
        loss, _ = _composite_sparse(predictions, labels, **config)
        return tf.gradients(loss, predictions, grad_ys=grad_loss)[0]
    return library.tf_xent_sparse_xent_grad(predictions, labels, normalizer, grad_loss, **config)


def _check_return_lse(return_lse, from_logits):
    if return_lse and not from_logits:
        raise ValueError(
            "`return_lse=True` returns the log-sum-exp of logits, but `from_logits=False`."
        )


def _per_position(loss, lse, return_lse, batch_shape, predictions_shape, axis):
    loss = _restore_batch_shape(loss, batch_shape, predictions_shape, axis)
    if not return_lse:
        return loss
    return loss, tf.stop_gradient(_restore_batch_shape(lse, batch_shape, predictions_shape, axis))


def _capped_logits(z, logit_soft_cap):
    """z' = cap * tanh(z / cap) where the cap (a scalar tensor) is > 0."""
    safe_cap = tf.where(logit_soft_cap > 0, logit_soft_cap, tf.ones_like(logit_soft_cap))
    return tf.where(logit_soft_cap > 0, safe_cap * tf.tanh(z / safe_cap), z)


def _nan_where_not_finite(lse):
    """NaN where a row's log-sum-exp is +-inf (a +inf logit, or all -inf), else
    0: added to the loss and the lse, as the op gives NaN there (reduce_logsumexp
    gives inf, and lse - z a loss of inf). Carries no gradient."""
    return tf.where(tf.math.is_finite(lse), tf.zeros_like(lse), tf.constant(np.nan, lse.dtype))


def _z_loss_term(lse, z_loss):
    """z_loss * lse^2; 0 without a z-loss, even where lse is infinite."""
    return tf.where(z_loss > 0, z_loss * tf.square(lse), tf.zeros_like(lse))


def _composite_dense(
    predictions, labels, from_logits, label_smoothing, epsilon, z_loss, logit_soft_cap
):
    """TensorFlow-op version of TfXent>DenseXent, for XLA: the loss and the
    log-sum-exp (for logits). Autodiff of the loss gives the op's gradients."""
    z = tf.cast(predictions, labels.dtype)
    num_classes = tf.cast(tf.shape(z)[-1], z.dtype)
    t = labels * (1.0 - label_smoothing) + label_smoothing / num_classes
    if from_logits:
        z = _capped_logits(z, logit_soft_cap)
        lse = tf.reduce_logsumexp(z, axis=-1)
        not_finite = _nan_where_not_finite(lse)
        lse += not_finite
        neg_log_softmax = lse[:, None] - z
    else:
        q = tf.clip_by_value(z / tf.reduce_sum(z, axis=-1, keepdims=True), epsilon, 1.0 - epsilon)
        neg_log_softmax = -tf.math.log(q)
        lse = tf.zeros_like(q[:, 0])
    # Zero targets contribute nothing, even against a -inf logit.
    loss = tf.reduce_sum(tf.math.multiply_no_nan(neg_log_softmax, t), axis=-1)
    if from_logits:
        # NaN also where the row has no target mass.
        loss += _z_loss_term(lse, z_loss) + not_finite
    # Rows without classes, which the op refuses: NaN, since XLA cannot raise.
    loss = tf.where(num_classes > 0, loss, tf.constant(float("nan"), loss.dtype))
    return loss, lse


def _composite_sparse(
    predictions,
    labels,
    from_logits,
    label_smoothing,
    epsilon,
    z_loss,
    logit_soft_cap,
    ignore_class,
    use_ignore_class,
):
    """TensorFlow-op version of TfXent>SparseXent, for XLA: the loss and the
    log-sum-exp (for logits; 0 where ignored). XLA cannot raise on a bad
    label, so such rows get NaN (never an out-of-bounds read)."""
    acc_dtype = loss_dtype(predictions.dtype)
    ignored = (
        is_ignored(labels, ignore_class) if use_ignore_class else tf.zeros_like(labels, tf.bool)
    )
    z = tf.cast(predictions, acc_dtype)
    if use_ignore_class:
        # Ignored rows read as zeros, as the op never reads them: NaN or inf
        # there would make the masked loss's gradient 0 * NaN.
        z = tf.where(ignored[:, None], tf.zeros([], acc_dtype), z)
    if from_logits:
        z = _capped_logits(z, logit_soft_cap)
    else:
        z = tf.math.log(tf.clip_by_value(z, epsilon, 1.0 - epsilon))
    num_classes = tf.shape(z, out_type=labels.dtype)[-1]
    in_range = (labels >= 0) & (labels < num_classes)
    safe_labels = tf.where(in_range, labels, tf.zeros_like(labels))
    lse = tf.reduce_logsumexp(z, axis=-1)
    if from_logits:
        lse += _nan_where_not_finite(lse)
    neg_log_softmax = lse[:, None] - z
    # No label term at label_smoothing = 1, even against a -inf logit (0 * inf).
    loss = tf.math.multiply_no_nan(
        tf.gather(neg_log_softmax, safe_labels, batch_dims=1), 1.0 - label_smoothing
    )
    # Other classes carry target mass only with smoothing (a -inf logit there
    # would make 0 * inf).
    smoothing = label_smoothing / tf.cast(num_classes, acc_dtype)
    loss += tf.where(
        label_smoothing > 0,
        smoothing * tf.reduce_sum(neg_log_softmax, axis=-1),
        tf.zeros_like(loss),
    )
    if from_logits:
        loss += _z_loss_term(lse, z_loss)
    loss = tf.where(in_range | ignored, loss, tf.constant(float("nan"), acc_dtype))
    lse = tf.where(ignored, tf.zeros_like(lse), lse if from_logits else tf.zeros_like(lse))
    return tf.where(ignored, tf.zeros_like(loss), loss), lse


def _restore_batch_shape(loss, batch_shape, predictions_shape, axis):
    if batch_shape is not None:
        loss = tf.reshape(loss, batch_shape)
    if predictions_shape.rank is not None:
        loss.set_shape(_positions(predictions_shape, axis))
    return loss


def _skipped(op, index):
    """Whether eager autodiff told us input `index` needs no gradient."""
    skip = getattr(op, "skip_input_indices", None)
    return skip is not None and index in skip


def _coefficient_inputs(op):
    """An op's coefficient inputs (its last four), by name."""
    return dict(zip(_COEFFICIENTS, op.inputs[-len(_COEFFICIENTS) :], strict=True))


def _sparse_attrs(op):
    return {name: op.get_attr(name) for name in _SPARSE_ATTRS}


# The coefficient inputs get no gradient (None): they are hyperparameters.
_NO_COEFFICIENT_GRADIENTS = [None] * len(_COEFFICIENTS)


@tf.RegisterGradient("TfXent>SparseXent")
def _sparse_xent_grad(op, grad_loss, _):
    # The normalizer output is an internal statistic: no gradient flows from it.
    predictions, labels = op.inputs[:2]
    grad = library.tf_xent_sparse_xent_grad(
        predictions,
        labels,
        op.outputs[1],
        grad_loss,
        **_coefficient_inputs(op),
        **_sparse_attrs(op),
    )
    return [grad, None] + _NO_COEFFICIENT_GRADIENTS


@tf.RegisterGradient("TfXent>DenseXent")
def _dense_xent_grad(op, grad_loss, _):
    predictions, labels = op.inputs[:2]
    row_stats = op.outputs[1]
    kwargs = dict(from_logits=op.get_attr("from_logits"), **_coefficient_inputs(op))
    grad_predictions = None
    if not _skipped(op, 0):
        grad_predictions = library.tf_xent_dense_xent_grad(
            predictions, labels, row_stats, grad_loss, **kwargs
        )
    grad_labels = None
    if not _skipped(op, 1):
        # A separate op, so graphs that never use it prune it.
        grad_labels = library.tf_xent_dense_xent_labels_grad(
            predictions, row_stats, grad_loss, **kwargs
        )
    return [grad_predictions, grad_labels] + _NO_COEFFICIENT_GRADIENTS


# The fused ops compute first-order gradients. Higher orders (Hessian-vector
# products, gradient penalties, MAML) differentiate the composite loss instead,
# whose first-order gradients are the ops' (tested), so the math lives in one
# place. The row statistics get no gradient: the composite recomputes them, so
# the predictions' gradient below already holds what flows through them.
def _backprop_through_gradient(loss_fn, sources, wrt, grad_loss, grad_gradient):
    """Backpropagates `grad_gradient`, the gradient with respect to
    d<grad_loss, loss_fn(*sources)>/d sources[wrt], to `sources` and `grad_loss`."""
    with tf.GradientTape() as outer:
        outer.watch(sources + [grad_loss])
        with tf.GradientTape() as inner:
            inner.watch(sources[wrt])
            loss = loss_fn(*sources)
        gradient = inner.gradient(loss, sources[wrt], output_gradients=grad_loss)
    return outer.gradient(gradient, sources + [grad_loss], output_gradients=grad_gradient)


@tf.RegisterGradient("TfXent>SparseXentGrad")
def _sparse_xent_grad_grad(op, grad_gradient):
    predictions, labels, _, grad_loss = op.inputs[:4]
    kwargs = dict(**_sparse_attrs(op), **_coefficient_inputs(op))
    grad_predictions, grad_grad_loss = _backprop_through_gradient(
        lambda z: _composite_sparse(z, labels, **kwargs)[0],
        [predictions],
        0,
        grad_loss,
        grad_gradient,
    )
    return [grad_predictions, None, None, grad_grad_loss] + _NO_COEFFICIENT_GRADIENTS


@tf.RegisterGradient("TfXent>DenseXentGrad")
def _dense_xent_grad_grad(op, grad_gradient):
    predictions, labels, _, grad_loss = op.inputs[:4]
    kwargs = dict(from_logits=op.get_attr("from_logits"), **_coefficient_inputs(op))
    grad_predictions, grad_labels, grad_grad_loss = _backprop_through_gradient(
        lambda z, y: _composite_dense(z, y, **kwargs)[0],
        [predictions, labels],
        0,
        grad_loss,
        grad_gradient,
    )
    return [grad_predictions, grad_labels, None, grad_grad_loss] + _NO_COEFFICIENT_GRADIENTS


@tf.RegisterGradient("TfXent>DenseXentLabelsGrad")
def _dense_xent_labels_grad_grad(op, grad_gradient):
    predictions, _, grad_loss = op.inputs[:3]
    kwargs = dict(from_logits=op.get_attr("from_logits"), **_coefficient_inputs(op))
    # The loss is linear in the labels, so their gradient does not depend on
    # them and any labels stand in for the ones the op never saw.
    labels = tf.zeros_like(predictions, dtype=grad_loss.dtype)
    grad_predictions, _, grad_grad_loss = _backprop_through_gradient(
        lambda z, y: _composite_dense(z, y, **kwargs)[0],
        [predictions, labels],
        1,
        grad_loss,
        grad_gradient,
    )
    return [grad_predictions, None, grad_grad_loss] + _NO_COEFFICIENT_GRADIENTS


# The fused projection and loss, in its own module (it uses the helpers above).
from tf_xent_ops._linear_crossentropy import linear_crossentropy  # noqa: E402, F401
from tf_xent_ops._linear_crossentropy import linear_crossentropy_sum  # noqa: E402, F401
