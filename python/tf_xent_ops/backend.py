"""Backend forms, like `keras.ops.categorical_crossentropy` on TensorFlow.

Also home of the rule every form shares: predictions that came out of a
softmax (a Keras softmax tags them with `_keras_logits`; a graph tensor made
by a `Softmax` op) are replaced by its logits, as Keras does.
"""

import warnings

import tensorflow as tf

from tf_xent_ops import ops


def resolve_logits(output, from_logits, fn_name, z_loss=0.0, logit_soft_cap=None):
    """Returns (predictions, from_logits), using a softmax's logits when known.
    `z_loss` and `logit_soft_cap` are checked first: options for logits are a
    ValueError with `from_logits=False`, whatever made the probabilities."""
    ops.check_coefficients(from_logits, z_loss=z_loss, logit_soft_cap=logit_soft_cap)
    has_keras_logits = hasattr(output, "_keras_logits")
    from_softmax_op = (
        not has_keras_logits and tf.is_symbolic_tensor(output) and output.op.type == "Softmax"
    )
    if from_logits and (has_keras_logits or from_softmax_op):
        warnings.warn(
            f'"`{fn_name}` received `from_logits=True`, but the `output` argument was '
            "produced by a Softmax activation and thus does not represent logits. "
            "Was this intended?",
            stacklevel=3,
        )
    if has_keras_logits:
        return output._keras_logits, True
    if from_softmax_op:
        if len(output.op.inputs) != 1:
            raise ValueError("Expected 1 input for Softmax.")
        return output.op.inputs[0], True
    return output, from_logits


def categorical_crossentropy(target, output, from_logits=False, axis=-1):
    """Categorical crossentropy between an output tensor and a target tensor.

    Drop-in for `keras.ops.categorical_crossentropy` (TensorFlow backend),
    computed by the fused op. The result has the dtype of `output`.

    Args:
        target: A tensor of the same shape as `output`.
        output: Probabilities (e.g. a softmax output), or logits when
            `from_logits=True`.
        from_logits: Whether `output` is a tensor of logits.
        axis: The class axis.

    Returns:
        The loss for each position: `output.shape` without `axis`.

    Example:

    >>> import tf_xent_ops
    >>> a = [[1., 0., 0.], [0., 1., 0.], [0., 0., 1.]]
    >>> b = [[.9, .05, .05], [.5, .89, .6], [.05, .01, .94]]
    >>> loss = tf_xent_ops.backend.categorical_crossentropy(a, b)
    >>> [round(float(v), 5) for v in loss]
    [0.10536, 0.80467, 0.06188]
    """
    output = tf.convert_to_tensor(output)
    target = tf.convert_to_tensor(target)
    if target.shape.rank is not None and target.shape.rank < 1:
        raise ValueError(
            "Arguments `target` and `output` must be at least rank 1. "
            f"Received: target.shape={target.shape}, output.shape={output.shape}"
        )
    output, from_logits = resolve_logits(output, from_logits, "categorical_crossentropy")
    loss = ops.dense_crossentropy(target, output, from_logits=from_logits, axis=axis)
    return tf.cast(loss, output.dtype)


def sparse_categorical_crossentropy(target, output, from_logits=False, axis=-1):
    """Categorical crossentropy with integer targets.

    Drop-in for `keras.ops.sparse_categorical_crossentropy` (TensorFlow
    backend), computed by the fused op, for any class `axis` (Keras accepts
    only the last). The result has the dtype of `output`.

    Args:
        target: Integer class indices: `output.shape` without `axis`.
        output: Probabilities, or logits when `from_logits=True`.
        from_logits: Whether `output` is a tensor of logits.
        axis: The class axis.

    Returns:
        The loss for each position: `output.shape` without `axis`.

    Example:

    >>> import tf_xent_ops
    >>> loss = tf_xent_ops.backend.sparse_categorical_crossentropy(
    ...     [0, 1, 2], [[.9, .05, .05], [.05, .89, .06], [.05, .01, .94]])
    >>> [round(float(v), 5) for v in loss]
    [0.10536, 0.11653, 0.06188]
    """
    output = tf.convert_to_tensor(output)
    output, from_logits = resolve_logits(output, from_logits, "sparse_categorical_crossentropy")
    loss = ops.sparse_crossentropy(target, output, from_logits=from_logits, axis=axis)
    return tf.cast(loss, output.dtype)
