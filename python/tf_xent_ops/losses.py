"""Drop-in replacements for Keras 3's categorical cross-entropy losses."""

import warnings

import keras
import tensorflow as tf

# reduce_weighted_values is the reduction keras.losses.Loss.__call__ applies;
# Keras exports no name for it.
from keras.src.losses import loss as keras_loss

from tf_xent_ops import backend
from tf_xent_ops import ops

_PACKAGE = "tf_xent_ops"


def _require_tensorflow_backend(cls):
    """Raises unless Keras runs on TensorFlow, as keras.layers.TFSMLayer does.

    The fused ops are TensorFlow ops: on another backend a Keras loss or
    metric gets that backend's tensors (JAX tracers under `fit`), which they
    cannot read, so say so when the object is made.
    """
    backend_name = keras.config.backend()
    if backend_name != "tensorflow":
        raise NotImplementedError(
            f"{cls.__module__}.{cls.__qualname__} runs TensorFlow ops, so it needs "
            f"Keras's TensorFlow backend, but Keras is using the {backend_name!r} backend. "
            "Set the KERAS_BACKEND environment variable to 'tensorflow' before Keras is "
            "imported, or use the Keras built-in of the same name."
        )


def _set_keras_mask(x, mask):
    # Keras reads masks from this attribute (keras.src's set_keras_mask).
    x._keras_mask = mask


def warn_if_one_class(y_pred, axis, stacklevel=4):
    """Keras's warning for a class axis of size 1 (where a binary loss was
    meant). Keras looks at the last axis whatever `axis` is; this looks at the
    class axis (a bad `axis` is reported by ops)."""
    rank = y_pred.shape.rank
    try:
        class_axis = ops.canonicalize_axis(axis, rank) if rank else None
    except ValueError:
        return  # ops reports it
    if class_axis is not None and y_pred.shape[class_axis] == 1:
        warnings.warn(
            "In loss categorical_crossentropy, expected y_pred.shape to be "
            "(batch_size, num_classes) with num_classes > 1 along the class axis "
            f"{axis}. Received: y_pred.shape={y_pred.shape}. "
            "Consider using 'binary_crossentropy' if you only have 2 classes.",
            SyntaxWarning,
            stacklevel=stacklevel,
        )


def _categorical(
    y_true, y_pred, from_logits, label_smoothing, axis, z_loss=0.0, logit_soft_cap=None
):
    """The loss in ops.loss_dtype(y_pred.dtype): the shared body of every form."""
    if isinstance(axis, bool):
        raise ValueError(
            f"`axis` must be of type `int`. Received: axis={axis} of type {type(axis)}"
        )
    y_pred = tf.convert_to_tensor(y_pred)
    warn_if_one_class(y_pred, axis)
    y_pred, from_logits = backend.resolve_logits(
        y_pred, from_logits, "categorical_crossentropy", z_loss, logit_soft_cap
    )
    return ops.dense_crossentropy(
        y_true,
        y_pred,
        from_logits=from_logits,
        label_smoothing=label_smoothing,
        axis=axis,
        z_loss=z_loss,
        logit_soft_cap=logit_soft_cap,
    )


def _sparse_categorical(
    y_true,
    y_pred,
    from_logits,
    ignore_class,
    axis,
    label_smoothing,
    z_loss=0.0,
    logit_soft_cap=None,
):
    """The loss in ops.loss_dtype(y_pred.dtype), masked where ignored."""
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.convert_to_tensor(y_true)
    y_pred, from_logits = backend.resolve_logits(
        y_pred, from_logits, "sparse_categorical_crossentropy", z_loss, logit_soft_cap
    )
    loss = ops.sparse_crossentropy(
        y_true,
        y_pred,
        from_logits=from_logits,
        label_smoothing=label_smoothing,
        ignore_class=ignore_class,
        axis=axis,
        z_loss=z_loss,
        logit_soft_cap=logit_soft_cap,
    )
    if ignore_class is not None:
        valid = tf.logical_not(ops.is_ignored(tf.reshape(y_true, tf.shape(loss)), ignore_class))
        _set_keras_mask(loss, valid)
    return loss


@keras.saving.register_keras_serializable(package=_PACKAGE)
def categorical_crossentropy(
    y_true,
    y_pred,
    from_logits=False,
    label_smoothing=0.0,
    axis=-1,
    z_loss=0.0,
    logit_soft_cap=None,
):
    """Computes the categorical crossentropy loss with the fused op.

    Drop-in for `keras.losses.categorical_crossentropy`. Label smoothing uses
    the number of classes along `axis` (Keras uses the last dimension).

    Args:
        y_true: Tensor of one-hot (or soft) true targets.
        y_pred: Tensor of predicted targets.
        from_logits: Whether `y_pred` is expected to be a logits tensor. By
            default, we assume that `y_pred` encodes a probability distribution.
        label_smoothing: Float in [0, 1]. If > `0` then smooth the labels. For
            example, if `0.1`, use `0.1 / num_classes` for non-target labels
            and `0.9 + 0.1 / num_classes` for target labels.
        axis: Defaults to `-1`. The dimension along which the entropy is
            computed.
        z_loss: Float >= 0, logits only. Adds `z_loss * lse**2` to each
            position's loss, `lse` the log-sum-exp of its logits (PaLM's
            z-loss, which keeps the log-partition near zero; Liger-Kernel's
            `lse_square_scale`).
        logit_soft_cap: `None` or a float > 0, logits only. If set, the
            logits `z` become `logit_soft_cap * tanh(z / logit_soft_cap)`
            before the softmax (Gemma 2's final-logit soft-capping;
            keras-hub's `final_logit_soft_cap`).

    Returns:
        Categorical crossentropy loss value, in the dtype of `y_pred`.

    Example:

    >>> import tf_xent_ops
    >>> y_true = [[0, 1, 0], [0, 0, 1]]
    >>> y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    >>> loss = tf_xent_ops.categorical_crossentropy(y_true, y_pred)
    >>> [round(float(v), 4) for v in loss]
    [0.0513, 2.3026]
    """
    y_pred = tf.convert_to_tensor(y_pred)
    loss = _categorical(y_true, y_pred, from_logits, label_smoothing, axis, z_loss, logit_soft_cap)
    return tf.cast(loss, y_pred.dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
def sparse_categorical_crossentropy(
    y_true,
    y_pred,
    from_logits=False,
    ignore_class=None,
    axis=-1,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_soft_cap=None,
):
    """Computes the sparse categorical crossentropy loss with the fused op.

    Drop-in for `keras.losses.sparse_categorical_crossentropy`, plus any class
    `axis` and `label_smoothing` (never building a one-hot).

    Args:
        y_true: Ground truth class indices.
        y_pred: The predicted values.
        from_logits: Whether `y_pred` is expected to be a logits tensor.
        ignore_class: Optional integer. The ID of a class to be ignored during
            loss computation; its positions get 0 loss and are masked out.
        axis: Defaults to `-1`. The dimension along which the entropy is
            computed.
        label_smoothing: Float in [0, 1], as for `categorical_crossentropy`.
        z_loss, logit_soft_cap: As for `categorical_crossentropy`.

    Returns:
        Sparse categorical crossentropy loss value, in the dtype of `y_pred`.

    Example:

    >>> import tf_xent_ops
    >>> y_true = [1, 2]
    >>> y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    >>> loss = tf_xent_ops.sparse_categorical_crossentropy(y_true, y_pred)
    >>> [round(float(v), 4) for v in loss]
    [0.0513, 2.3026]
    """
    y_pred = tf.convert_to_tensor(y_pred)
    loss = _sparse_categorical(
        y_true, y_pred, from_logits, ignore_class, axis, label_smoothing, z_loss, logit_soft_cap
    )
    mask = getattr(loss, "_keras_mask", None)
    loss = tf.cast(loss, y_pred.dtype)
    if mask is not None:
        _set_keras_mask(loss, mask)
    return loss


def _reduce_like_keras_loss(losses, sample_weight, mask, reduction, dtype):
    """What `keras.losses.Loss.__call__` does with the per-sample losses its
    `call()` returns: the mask and sample weights merged (a mask makes
    `"sum_over_batch_size"` average over the valid positions), the reduction,
    and the `1 / num_replicas` scaling of the averaging reductions under
    tf.distribute. It is Keras's own function, so the semantics are Keras's."""
    return keras_loss.reduce_weighted_values(
        losses, sample_weight=sample_weight, mask=mask, reduction=reduction, dtype=dtype
    )


class _FusedLoss(keras.losses.Loss):
    """A Loss whose call() is one of the fused functions with fixed kwargs."""

    def __init__(self, fn, reduction, name, dtype, **fn_kwargs):
        _require_tensorflow_backend(type(self))
        # A bad argument fails when the loss is made, not first inside `fit`.
        fn_kwargs = ops.checked_options(fn_kwargs)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._fn = fn
        self._fn_kwargs = fn_kwargs
        for key, value in fn_kwargs.items():
            setattr(self, key, value)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # keras.losses.Loss.__call__ first casts y_pred and y_true to the loss
        # dtype: a full float32 copy of float16/bfloat16 predictions, and
        # integer labels sent through a float. The fused op reads them as they
        # are; only the O(N) per-sample losses are handed to Keras's reduction.
        in_mask = getattr(y_pred, "_keras_mask", None)
        with tf.name_scope(self.name):
            if not (tf.is_tensor(y_pred) and y_pred.dtype.is_floating):
                y_pred = tf.convert_to_tensor(y_pred, dtype=self.dtype)
            elif self.dtype == "float64" and y_pred.dtype != tf.float64:
                # A float64 loss computes in float64, as Keras's does.
                y_pred = tf.cast(y_pred, tf.float64)
            losses = self.call(y_true, y_pred)
            out_mask = getattr(losses, "_keras_mask", None)
            losses = tf.cast(losses, self.dtype)
            if in_mask is not None and out_mask is not None:
                mask = tf.logical_and(tf.cast(in_mask, tf.bool), tf.cast(out_mask, tf.bool))
            else:
                mask = in_mask if in_mask is not None else out_mask
            return _reduce_like_keras_loss(losses, sample_weight, mask, self.reduction, self.dtype)

    def call(self, y_true, y_pred):
        return self._fn(y_true, y_pred, **self._fn_kwargs)

    def get_config(self):
        return {**super().get_config(), **self._fn_kwargs}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CategoricalCrossentropy(_FusedLoss):
    """Computes the crossentropy loss between the labels and predictions.

    Drop-in for `keras.losses.CategoricalCrossentropy`: same arguments, same
    numbers, one fused op (no normalize / clip / log / multiply chain, no
    stored [N, C] backprop tensor).

    Args:
        from_logits: Whether `y_pred` is expected to be a logits tensor. By
            default, we assume that `y_pred` encodes a probability distribution.
        label_smoothing: Float in [0, 1]. When > 0, label values are smoothed,
            meaning the confidence on label values are relaxed. For example, if
            `0.1`, use `0.1 / num_classes` for non-target labels and
            `0.9 + 0.1 / num_classes` for target labels.
        axis: The axis along which to compute crossentropy (the features
            axis). Defaults to `-1`.
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"` (default), `"mean"`,
            `"mean_with_sample_weight"`, `"none"` or `None`.
        name: Optional name for the loss instance.
        dtype: The dtype of the loss's computations. Defaults to `None`, which
            means using `keras.backend.floatx()`.
        z_loss: Float >= 0, logits only: adds `z_loss * lse**2` to each
            position's loss, `lse` the log-sum-exp of its logits (PaLM's
            z-loss; Liger-Kernel's `lse_square_scale`).
        logit_soft_cap: `None` or a float > 0, logits only: the logits `z`
            become `logit_soft_cap * tanh(z / logit_soft_cap)` first (Gemma
            2; keras-hub's `final_logit_soft_cap`).

    Example:

    >>> import numpy as np
    >>> import tf_xent_ops
    >>> y_true = [[0, 1, 0], [0, 0, 1]]
    >>> y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    >>> cce = tf_xent_ops.losses.CategoricalCrossentropy()
    >>> round(float(cce(y_true, y_pred)), 3)
    1.177
    >>> round(float(cce(y_true, y_pred, sample_weight=np.array([0.3, 0.7]))), 3)
    0.814
    >>> cce = tf_xent_ops.losses.CategoricalCrossentropy(reduction="sum")
    >>> round(float(cce(y_true, y_pred)), 3)
    2.354
    >>> cce = tf_xent_ops.losses.CategoricalCrossentropy(reduction=None)
    >>> [round(float(v), 4) for v in cce(y_true, y_pred)]
    [0.0513, 2.3026]

    Usage with the `compile()` API:

    ```python
    model.compile(optimizer="sgd", loss=tf_xent_ops.losses.CategoricalCrossentropy())
    ```
    """

    def __init__(
        self,
        from_logits=False,
        label_smoothing=0.0,
        axis=-1,
        reduction="sum_over_batch_size",
        name="categorical_crossentropy",
        dtype=None,
        z_loss=0.0,
        logit_soft_cap=None,
    ):
        super().__init__(
            _categorical,
            reduction,
            name,
            dtype,
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            z_loss=z_loss,
            logit_soft_cap=logit_soft_cap,
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SparseCategoricalCrossentropy(_FusedLoss):
    """Computes the crossentropy loss between integer labels and predictions.

    Drop-in for `keras.losses.SparseCategoricalCrossentropy`, plus any class
    `axis` and `label_smoothing` for integer labels (never building a
    one-hot). Positions labelled `ignore_class` get 0 loss and are left out of
    the `"sum_over_batch_size"` average, as in Keras.

    Args:
        from_logits: Whether `y_pred` is expected to be a logits tensor. By
            default, we assume that `y_pred` encodes a probability distribution.
        ignore_class: Optional integer. The ID of a class to be ignored during
            loss computation. This is useful, for example, in segmentation
            problems featuring a "void" class (commonly -1 or 255).
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"` (default), `"mean"`,
            `"mean_with_sample_weight"`, `"none"` or `None`.
        axis: The class axis. Defaults to `-1`.
        name: Optional name for the loss instance.
        dtype: The dtype of the loss's computations. Defaults to `None`, which
            means using `keras.backend.floatx()`.
        label_smoothing: Float in [0, 1]: the labelled class gets
            `1 - label_smoothing + label_smoothing / num_classes`, the others
            `label_smoothing / num_classes`.
        z_loss, logit_soft_cap: As for `CategoricalCrossentropy`.

    Example:

    >>> import numpy as np
    >>> import tf_xent_ops
    >>> y_true = [1, 2]
    >>> y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    >>> scce = tf_xent_ops.losses.SparseCategoricalCrossentropy()
    >>> round(float(scce(y_true, y_pred)), 3)
    1.177
    >>> round(float(scce(y_true, y_pred, sample_weight=np.array([0.3, 0.7]))), 3)
    0.814
    >>> scce = tf_xent_ops.losses.SparseCategoricalCrossentropy(reduction="sum")
    >>> round(float(scce(y_true, y_pred)), 3)
    2.354
    >>> scce = tf_xent_ops.losses.SparseCategoricalCrossentropy(reduction=None)
    >>> [round(float(v), 4) for v in scce(y_true, y_pred)]
    [0.0513, 2.3026]

    With PaLM's z-loss and Gemma 2's soft cap on the final logits:

    >>> scce = tf_xent_ops.losses.SparseCategoricalCrossentropy(
    ...     from_logits=True, z_loss=1e-4, logit_soft_cap=30.0)
    >>> round(float(scce([1], [[1.0, 2.0, 0.5]])), 4)
    0.466

    Usage with the `compile()` API:

    ```python
    model.compile(optimizer="sgd",
                  loss=tf_xent_ops.losses.SparseCategoricalCrossentropy())
    ```
    """

    def __init__(
        self,
        from_logits=False,
        ignore_class=None,
        reduction="sum_over_batch_size",
        axis=-1,
        name="sparse_categorical_crossentropy",
        dtype=None,
        label_smoothing=0.0,
        z_loss=0.0,
        logit_soft_cap=None,
    ):
        super().__init__(
            _sparse_categorical,
            reduction,
            name,
            dtype,
            from_logits=from_logits,
            ignore_class=ignore_class,
            axis=axis,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            logit_soft_cap=logit_soft_cap,
        )
