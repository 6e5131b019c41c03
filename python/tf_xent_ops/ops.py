"""The fused cross-entropy ops on tensors of any rank, with their gradients.

These are the thin layer over the C++ op library: they move the class axis
last, flatten to rows, call the op and reshape back. Losses come back in
float32 (float64 for float64 predictions), whatever the prediction dtype:
16-bit predictions are read directly by the kernels and accumulated in float32.
"""

import keras
import numpy as np
import tensorflow as tf

# No public API tells whether a trace is being compiled by XLA (jit_compile=True,
# TPU); this is the check TensorFlow's own ops use.
from tensorflow.python.ops import control_flow_util

from tf_xent_ops._load import library

_COMMON_ATTRS = ("from_logits", "label_smoothing", "epsilon")
_SPARSE_ATTRS = _COMMON_ATTRS + ("ignore_class", "use_ignore_class")
_LABEL_DTYPES = (tf.int32, tf.int64)


def loss_dtype(dtype):
    """The dtype of losses computed from predictions of `dtype`."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def canonicalize_axis(axis, rank):
    """Returns `axis` in [0, rank), raising ValueError if it is out of range."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"`axis` must be an int. Received: axis={axis!r}")
    if not -rank <= axis < rank:
        raise ValueError(
            f"`axis`={axis} is out of range for predictions of rank {rank}; "
            f"expected an axis in [{-rank}, {rank})."
        )
    return axis % rank


def _float_attr(x):
    """`x` as an op's `float` attribute holds it (there are no double
    attributes), so that the composites compute with the kernels' values."""
    return float(np.float32(x))


def _check_label_smoothing(label_smoothing):
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1]. Received: {label_smoothing}")
    return _float_attr(label_smoothing)


def _check_predictions(predictions):
    predictions = tf.convert_to_tensor(predictions)
    if not predictions.dtype.is_floating:
        raise TypeError(
            "Predictions must be half, bfloat16, float32 or float64. "
            f"Received dtype: {predictions.dtype.name}"
        )
    if predictions.shape.rank is None or predictions.shape.rank < 1:
        raise ValueError(
            f"Predictions must have a known rank of at least 1. Received shape: {predictions.shape}"
        )
    return predictions


def in_xla_context():
    """Whether ops created now will be compiled by XLA, where the custom op has
    no kernel; the losses then use `_composite_*`, with the same semantics."""
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def _class_axis_last(x, axis):
    rank = x.shape.rank
    if axis == rank - 1:
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


def dense_crossentropy(labels, predictions, from_logits=False, label_smoothing=0.0, axis=-1):
    """Cross-entropy with dense (one-hot or soft) labels along `axis`.

    Same as `keras.losses.categorical_crossentropy` on the TensorFlow backend,
    except that label smoothing uses the number of classes along `axis` and
    the result is in `loss_dtype(predictions.dtype)`.

    Args:
        labels: Tensor of the same shape as `predictions`.
        predictions: Logits (`from_logits=True`) or probabilities.
        from_logits: Whether `predictions` are logits.
        label_smoothing: Float in [0, 1].
        axis: The class axis.

    Returns:
        The loss for each position, `predictions.shape` without `axis`.

    Example:

    >>> import tf_xent_ops
    >>> loss = tf_xent_ops.ops.dense_crossentropy(
    ...     [[0.0, 1.0, 0.0]], [[1.0, 2.0, 0.5]], from_logits=True)
    >>> round(float(loss[0]), 4)
    0.4644
    """
    predictions = _check_predictions(predictions)
    rank = predictions.shape.rank
    axis = canonicalize_axis(axis, rank)
    labels = tf.cast(tf.convert_to_tensor(labels), loss_dtype(predictions.dtype))
    if labels.shape.rank != rank or not labels.shape.is_compatible_with(predictions.shape):
        raise ValueError(
            "Labels and predictions must have the same shape. "
            f"Received: labels.shape={labels.shape}, predictions.shape={predictions.shape}"
        )
    label_smoothing = _check_label_smoothing(label_smoothing)
    pred_rows, batch_shape = _as_rows(_class_axis_last(predictions, axis))
    label_rows, _ = _as_rows(_class_axis_last(labels, axis))
    attrs = dict(
        from_logits=bool(from_logits),
        label_smoothing=label_smoothing,
        epsilon=_float_attr(keras.config.epsilon()),
    )
    if in_xla_context():
        loss = _composite_dense(pred_rows, label_rows, **attrs)
    else:
        loss, _ = library.tf_xent_dense_xent(pred_rows, label_rows, **attrs)
    return _restore_batch_shape(loss, batch_shape, predictions.shape, axis)


def sparse_crossentropy(
    labels, predictions, from_logits=False, label_smoothing=0.0, ignore_class=None, axis=-1
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
        axis: The class axis.

    Returns:
        The loss for each position, `predictions.shape` without `axis`.

    Example:

    >>> import tf_xent_ops
    >>> loss = tf_xent_ops.ops.sparse_crossentropy(
    ...     [1], [[1.0, 2.0, 0.5]], from_logits=True)
    >>> round(float(loss[0]), 4)
    0.4644
    """
    predictions = _check_predictions(predictions)
    rank = predictions.shape.rank
    axis = canonicalize_axis(axis, rank)
    labels = tf.convert_to_tensor(labels)
    if labels.dtype not in _LABEL_DTYPES:
        if not (labels.dtype.is_integer or labels.dtype.is_floating or labels.dtype.is_bool):
            raise TypeError(f"Sparse labels must be integers. Received dtype: {labels.dtype.name}")
        labels = tf.cast(labels, tf.int64)
    if labels.shape.rank == rank and labels.shape[axis] == 1:
        labels = tf.squeeze(labels, axis=axis)
    expected = predictions.shape[:axis].concatenate(predictions.shape[axis + 1 :])
    if labels.shape.rank != rank - 1 or not labels.shape.is_compatible_with(expected):
        raise ValueError(
            "Sparse labels must have the shape of the predictions without the class axis "
            f"(axis={axis}). Received: labels.shape={labels.shape}, "
            f"predictions.shape={predictions.shape}"
        )
    label_smoothing = _check_label_smoothing(label_smoothing)
    pred_rows, batch_shape = _as_rows(_class_axis_last(predictions, axis))
    attrs = dict(
        from_logits=bool(from_logits),
        label_smoothing=label_smoothing,
        epsilon=_float_attr(keras.config.epsilon()),
        ignore_class=0 if ignore_class is None else int(ignore_class),
        use_ignore_class=ignore_class is not None,
    )
    label_rows = labels if labels.shape.rank == 1 else tf.reshape(labels, [-1])
    if in_xla_context():
        loss = _composite_sparse(pred_rows, label_rows, **attrs)
    else:
        loss, _ = library.tf_xent_sparse_xent(
            pred_rows, label_rows, Tloss=loss_dtype(predictions.dtype), **attrs
        )
    return _restore_batch_shape(loss, batch_shape, predictions.shape, axis)


def _composite_dense(predictions, labels, from_logits, label_smoothing, epsilon):
    """TensorFlow-op version of TfXent>DenseXent's loss, for XLA. Autodiff of it
    gives the op's gradients."""
    z = tf.cast(predictions, labels.dtype)
    num_classes = tf.cast(tf.shape(z)[-1], z.dtype)
    t = labels * (1.0 - label_smoothing) + label_smoothing / num_classes
    if from_logits:
        neg_log_softmax = tf.reduce_logsumexp(z, axis=-1, keepdims=True) - z
    else:
        q = tf.clip_by_value(z / tf.reduce_sum(z, axis=-1, keepdims=True), epsilon, 1.0 - epsilon)
        neg_log_softmax = -tf.math.log(q)
    # Zero targets contribute nothing, even against a -inf logit.
    return tf.reduce_sum(tf.math.multiply_no_nan(neg_log_softmax, t), axis=-1)


def _composite_sparse(
    predictions, labels, from_logits, label_smoothing, epsilon, ignore_class, use_ignore_class
):
    """TensorFlow-op version of TfXent>SparseXent's loss, for XLA. XLA cannot
    raise on a bad label, so such rows get NaN (never an out-of-bounds read)."""
    acc_dtype = loss_dtype(predictions.dtype)
    z = tf.cast(predictions, acc_dtype)
    if not from_logits:
        z = tf.math.log(tf.clip_by_value(z, epsilon, 1.0 - epsilon))
    num_classes = tf.shape(z, out_type=labels.dtype)[-1]
    ignored = tf.equal(labels, ignore_class) if use_ignore_class else tf.zeros_like(labels, tf.bool)
    in_range = (labels >= 0) & (labels < num_classes)
    safe_labels = tf.where(in_range, labels, tf.zeros_like(labels))
    neg_log_softmax = tf.reduce_logsumexp(z, axis=-1, keepdims=True) - z
    loss = (1.0 - label_smoothing) * tf.gather(neg_log_softmax, safe_labels, batch_dims=1)
    if label_smoothing:
        loss += (
            label_smoothing
            / tf.cast(num_classes, acc_dtype)
            * tf.reduce_sum(neg_log_softmax, axis=-1)
        )
    loss = tf.where(in_range | ignored, loss, tf.constant(float("nan"), acc_dtype))
    return tf.where(ignored, tf.zeros_like(loss), loss)


def _restore_batch_shape(loss, batch_shape, predictions_shape, axis):
    if batch_shape is not None:
        loss = tf.reshape(loss, batch_shape)
    loss.set_shape(predictions_shape[:axis].concatenate(predictions_shape[axis + 1 :]))
    return loss


def _attrs(op, names):
    # Eager ops hand back the Python values they were given, not the rounded
    # ones their kernels ran with.
    attrs = {name: op.get_attr(name) for name in names}
    for name in ("label_smoothing", "epsilon"):
        attrs[name] = _float_attr(attrs[name])
    return attrs


def _skipped(op, index):
    """Whether eager autodiff told us input `index` needs no gradient."""
    skip = getattr(op, "skip_input_indices", None)
    return skip is not None and index in skip


@tf.RegisterGradient("TfXent>SparseXent")
def _sparse_xent_grad(op, grad_loss, _):
    # The log_sum_exp output is an internal statistic: no gradient flows from it.
    predictions, labels = op.inputs
    grad = library.tf_xent_sparse_xent_grad(
        predictions, labels, op.outputs[1], grad_loss, **_attrs(op, _SPARSE_ATTRS)
    )
    return [grad, None]


@tf.RegisterGradient("TfXent>DenseXent")
def _dense_xent_grad(op, grad_loss, _):
    predictions, labels = op.inputs
    stats = op.outputs[1]
    attrs = _attrs(op, _COMMON_ATTRS)
    grad_predictions = None
    if not _skipped(op, 0):
        grad_predictions = library.tf_xent_dense_xent_grad(
            predictions, labels, stats, grad_loss, **attrs
        )
    grad_labels = None
    if not _skipped(op, 1):
        # A separate op, so graphs that never use it prune it.
        grad_labels = library.tf_xent_dense_xent_labels_grad(predictions, stats, grad_loss, **attrs)
    return [grad_predictions, grad_labels]


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
    predictions, labels, _, grad_loss = op.inputs
    attrs = _attrs(op, _SPARSE_ATTRS)
    grad_predictions, grad_grad_loss = _backprop_through_gradient(
        lambda z: _composite_sparse(z, labels, **attrs), [predictions], 0, grad_loss, grad_gradient
    )
    return [grad_predictions, None, None, grad_grad_loss]


@tf.RegisterGradient("TfXent>DenseXentGrad")
def _dense_xent_grad_grad(op, grad_gradient):
    predictions, labels, _, grad_loss = op.inputs
    attrs = _attrs(op, _COMMON_ATTRS)
    grad_predictions, grad_labels, grad_grad_loss = _backprop_through_gradient(
        lambda z, y: _composite_dense(z, y, **attrs),
        [predictions, labels],
        0,
        grad_loss,
        grad_gradient,
    )
    return [grad_predictions, grad_labels, None, grad_grad_loss]


@tf.RegisterGradient("TfXent>DenseXentLabelsGrad")
def _dense_xent_labels_grad_grad(op, grad_gradient):
    predictions, _, grad_loss = op.inputs
    attrs = _attrs(op, _COMMON_ATTRS)
    # The loss is linear in the labels, so their gradient does not depend on
    # them and any labels stand in for the ones the op never saw.
    labels = tf.zeros_like(predictions, dtype=grad_loss.dtype)
    grad_predictions, _, grad_grad_loss = _backprop_through_gradient(
        lambda z, y: _composite_dense(z, y, **attrs),
        [predictions, labels],
        1,
        grad_loss,
        grad_gradient,
    )
    return [grad_predictions, None, grad_grad_loss]
