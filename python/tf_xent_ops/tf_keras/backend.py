"""Backend forms, like `tf_keras.backend.categorical_crossentropy`.

Also what every tf_keras form shares: tf_keras's rules around the math
(`_categorical`, `_sparse_categorical`), the checks of the options
(`_checked_options`) and the one place that calls the ops (`_dense_loss`,
`_sparse_loss`). Options beyond tf_keras's own reach the ops as keywords
through those, so a new loss option is a keyword of the public forms that
take it (and a check in `_checked_options` if it needs one).
"""

import numbers

import numpy as np
import tensorflow as tf
import tf_keras

from tf_xent_ops import backend as keras3_backend
from tf_xent_ops import ops


def _checked_options(options):
    """The options of the tf_keras forms (a dict of keywords; the others are
    left alone) as `ops.checked_options` gives them; raises if one is of the
    wrong type or out of range. The loss and metric classes call it when
    they are made."""
    label_smoothing = options.get("label_smoothing", 0.0)
    axis = options.get("axis", -1)
    if isinstance(label_smoothing, bool) or not isinstance(
        label_smoothing, (numbers.Real, np.ndarray, tf.Tensor)
    ):
        raise TypeError(
            f"`label_smoothing` must be a float in [0, 1]. Received: {label_smoothing!r}"
        )
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1]. Received: {label_smoothing}")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"`axis` must be of type `int`. Received: axis={axis!r}")
    # The float options' ranges and ignore_class, as the Keras 3 forms check them.
    return ops.checked_options(options)


def _dense_loss(target, output, from_logits, axis, **options):
    """The dense op on tensors, in the dtype of `output`."""
    loss = ops.dense_crossentropy(
        target,
        output,
        from_logits=from_logits,
        axis=axis,
        epsilon=tf_keras.backend.epsilon(),
        **options,
    )
    return tf.cast(loss, output.dtype)


def _sparse_loss(target, output, from_logits, axis, ignore_class, **options):
    """The sparse op on tensors, in the dtype of `output`, masked where ignored.

    Labels of another rank than `output`'s less one are read in the order
    of `output`'s positions, as tf_keras flattens them.
    """
    if target.dtype not in (tf.int32, tf.int64):
        target = tf.cast(target, tf.int64)
    rank = output.shape.rank
    if rank and target.shape.rank != rank - 1:
        position_axes = [d for d in range(rank) if d != ops.canonicalize_axis(axis, rank)]
        target = tf.reshape(target, tf.gather(tf.shape(output), position_axes))
    loss = ops.sparse_crossentropy(
        target,
        output,
        from_logits=from_logits,
        ignore_class=ignore_class,
        axis=axis,
        epsilon=tf_keras.backend.epsilon(),
        **options,
    )
    loss = tf.cast(loss, output.dtype)
    if ignore_class is not None:
        loss._keras_mask = tf.logical_not(ops.is_ignored(target, ignore_class))
    return loss


def _as_tensors(target, output):
    """Converts both arguments; raises TypeError on tf_keras symbolic tensors.

    The TypeError makes `add_dispatch_support` wrap the whole call in one
    layer, as tf_keras's own functions do, instead of op by op.
    """
    target = tf.convert_to_tensor(target)
    output = tf.convert_to_tensor(output)
    if tf_keras.backend.is_keras_tensor(target) or tf_keras.backend.is_keras_tensor(output):
        raise TypeError("tf_keras symbolic tensors are handled by the dispatcher.")
    return target, output


def _categorical(target, output, from_logits, axis, **options):
    """The body of the dense forms: shape check, softmax rule, op."""
    target, output = _as_tensors(target, output)
    target.shape.assert_is_compatible_with(output.shape)
    output, from_logits = keras3_backend.resolve_logits(
        output,
        from_logits,
        "categorical_crossentropy",
        options.get("z_loss", 0.0),
        options.get("logit_soft_cap"),
    )
    return _dense_loss(target, output, from_logits, axis, **options)


def _sparse_categorical(target, output, from_logits, axis, ignore_class, **options):
    """The body of the sparse forms: softmax rule, op, mask."""
    target, output = _as_tensors(target, output)
    output, from_logits = keras3_backend.resolve_logits(
        output,
        from_logits,
        "sparse_categorical_crossentropy",
        options.get("z_loss", 0.0),
        options.get("logit_soft_cap"),
    )
    return _sparse_loss(target, output, from_logits, axis, ignore_class, **options)


@tf.__internal__.dispatch.add_dispatch_support
def categorical_crossentropy(target, output, from_logits=False, axis=-1):
    """Categorical crossentropy between an output tensor and a target tensor.

    Drop-in for `tf_keras.backend.categorical_crossentropy`, computed by the
    fused op. The result has the dtype of `output`.

    Args:
        target: A tensor of the same shape as `output`.
        output: A tensor resulting from a softmax (unless `from_logits` is
            True, in which case `output` is expected to be the logits).
        from_logits: Boolean, whether `output` is the result of a softmax, or
            is a tensor of logits.
        axis: Int specifying the channels axis. `axis=-1` corresponds to data
            format `channels_last`, and `axis=1` corresponds to data format
            `channels_first`.

    Returns:
        Output tensor: the loss for each position, `output.shape` without
        `axis`.

    Example:

    >>> import tf_xent_ops.tf_keras as txk
    >>> a = [[1., 0., 0.], [0., 1., 0.], [0., 0., 1.]]
    >>> b = [[.9, .05, .05], [.05, .89, .06], [.05, .01, .94]]
    >>> loss = txk.backend.categorical_crossentropy(a, b)
    >>> [round(float(v), 5) for v in loss]
    [0.10536, 0.11653, 0.06188]
    >>> loss = txk.backend.categorical_crossentropy(a, a)
    >>> [round(float(v), 5) for v in loss]
    [0.0, 0.0, 0.0]
    """
    return _categorical(target, output, from_logits, axis)


@tf.__internal__.dispatch.add_dispatch_support
def sparse_categorical_crossentropy(target, output, from_logits=False, axis=-1, ignore_class=None):
    """Categorical crossentropy with integer targets.

    Drop-in for `tf_keras.backend.sparse_categorical_crossentropy`, computed
    by the fused op. The result has the dtype of `output`.

    Args:
        target: An integer tensor.
        output: A tensor resulting from a softmax (unless `from_logits` is
            True, in which case `output` is expected to be the logits).
        from_logits: Boolean, whether `output` is the result of a softmax, or
            is a tensor of logits.
        axis: Int specifying the channels axis. `axis=-1` corresponds to data
            format `channels_last`, and `axis=1` corresponds to data format
            `channels_first`.
        ignore_class: Optional integer. The ID of a class to be ignored
            during loss computation: its positions get a loss of 0 and are
            masked out (the result's `_keras_mask`).

    Returns:
        Output tensor: the loss for each position, `output.shape` without
        `axis`.

    Example:

    >>> import tf_xent_ops.tf_keras as txk
    >>> loss = txk.backend.sparse_categorical_crossentropy(
    ...     [0, 1, 2], [[.9, .05, .05], [.05, .89, .06], [.05, .01, .94]])
    >>> [round(float(v), 5) for v in loss]
    [0.10536, 0.11653, 0.06188]
    """
    return _sparse_categorical(target, output, from_logits, axis, ignore_class)
