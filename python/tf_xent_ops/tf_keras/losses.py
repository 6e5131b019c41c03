"""Drop-in replacements for tf_keras's categorical cross-entropy losses.

The classes are `tf_keras`'s `LossFunctionWrapper`s of the functions below,
as tf_keras's own are of its functions: its `Loss.__call__` applies masks,
sample weights, the reduction and its `tf.distribute` rules to what the fused
op returns. The functions dispatch, as tf_keras's do: called on tf_keras's
symbolic tensors (in a Functional model) they become a layer. AutoGraph leaves
them as they are, as it leaves tf_keras's (they have no control flow on
tensors).
"""

import functools

import tensorflow as tf
import tf_keras

# tf_keras's own handling of ragged inputs, which its functions dispatch to;
# tf_keras exports no name for it.
from tf_keras.src.losses import _ragged_tensor_apply_loss

from tf_xent_ops import losses as keras3_losses
from tf_xent_ops.tf_keras import backend

_PACKAGE = "tf_xent_ops"
_Reduction = tf_keras.losses.Reduction


def _is_ragged(*tensors):
    return any(isinstance(t, tf.RaggedTensor) for t in tensors)


@tf_keras.saving.register_keras_serializable(package=_PACKAGE)
@tf.autograph.experimental.do_not_convert
@tf.__internal__.dispatch.add_dispatch_support
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

    Drop-in for `tf_keras.losses.categorical_crossentropy` (and
    `tf_keras.metrics.categorical_crossentropy`): `y_true` is cast to the
    dtype of `y_pred`, ragged tensors are taken as tf_keras takes them, and
    the loss has the dtype of `y_pred` (computed in float32 for 16-bit
    predictions, then rounded once).

    Args:
        y_true: Tensor of one-hot true targets.
        y_pred: Tensor of predicted targets.
        from_logits: Whether `y_pred` is expected to be a logits tensor. By
            default, we assume that `y_pred` encodes a probability
            distribution.
        label_smoothing: Float in [0, 1]. If > `0` then smooth the labels. For
            example, if `0.1`, use `0.1 / num_classes` for non-target labels
            and `0.9 + 0.1 / num_classes` for target labels, `num_classes`
            being the size of `axis`.
        axis: Defaults to -1. The dimension along which the entropy is
            computed.
        z_loss: Float >= 0, logits only: adds `z_loss * lse**2` to each
            position's loss, `lse` the log-sum-exp of its logits (PaLM's
            z-loss).
        logit_soft_cap: `None` or a float > 0, logits only: the logits `z`
            become `logit_soft_cap * tanh(z / logit_soft_cap)` first (Gemma 2).

    Returns:
        Categorical crossentropy loss value.

    Example:

    >>> import tf_xent_ops.tf_keras as txk
    >>> y_true = [[0, 1, 0], [0, 0, 1]]
    >>> y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    >>> loss = txk.losses.categorical_crossentropy(y_true, y_pred)
    >>> loss.shape
    TensorShape([2])
    >>> [round(float(v), 4) for v in loss]
    [0.0513, 2.3026]
    """
    if _is_ragged(y_true, y_pred):
        fn = functools.partial(
            categorical_crossentropy,
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            z_loss=z_loss,
            logit_soft_cap=logit_soft_cap,
        )
        return _ragged_tensor_apply_loss(fn, y_true, y_pred)
    if isinstance(axis, bool):
        raise ValueError(
            f"`axis` must be of type `int`. Received: axis={axis} of type {type(axis)}"
        )
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.cast(y_true, y_pred.dtype)
    keras3_losses.warn_if_one_class(y_pred, axis, stacklevel=3)
    return backend._categorical(
        y_true,
        y_pred,
        from_logits,
        axis,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_soft_cap=logit_soft_cap,
    )


@tf_keras.saving.register_keras_serializable(package=_PACKAGE)
@tf.autograph.experimental.do_not_convert
@tf.__internal__.dispatch.add_dispatch_support
def sparse_categorical_crossentropy(
    y_true,
    y_pred,
    from_logits=False,
    axis=-1,
    ignore_class=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_soft_cap=None,
):
    """Computes the sparse categorical crossentropy loss with the fused op.

    Drop-in for `tf_keras.losses.sparse_categorical_crossentropy` (and
    `tf_keras.metrics.sparse_categorical_crossentropy`), plus
    `label_smoothing` for integer labels, without a one-hot. The loss has the
    dtype of `y_pred`; with `ignore_class`, it carries a `_keras_mask` of the
    positions not ignored, as tf_keras's does.

    Args:
        y_true: Ground truth values.
        y_pred: The predicted values.
        from_logits: Whether `y_pred` is expected to be a logits tensor. By
            default, we assume that `y_pred` encodes a probability
            distribution.
        axis: Defaults to -1. The dimension along which the entropy is
            computed.
        ignore_class: Optional integer. The ID of a class to be ignored during
            loss computation. This is useful, for example, in segmentation
            problems featuring a "void" class (commonly -1 or 255) in
            segmentation maps. By default (`ignore_class=None`), all classes
            are considered.
        label_smoothing: Float in [0, 1]: the labelled class gets
            `1 - label_smoothing + label_smoothing / num_classes`, the others
            `label_smoothing / num_classes`, as a one-hot smoothed by
            `categorical_crossentropy` would.
        z_loss, logit_soft_cap: As for `categorical_crossentropy`.

    Returns:
        Sparse categorical crossentropy loss value.

    Example:

    >>> import tf_xent_ops.tf_keras as txk
    >>> y_true = [1, 2]
    >>> y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    >>> loss = txk.losses.sparse_categorical_crossentropy(y_true, y_pred)
    >>> [round(float(v), 4) for v in loss]
    [0.0513, 2.3026]
    >>> loss = txk.losses.sparse_categorical_crossentropy(
    ...     [1, -1], y_pred, ignore_class=-1)
    >>> [round(float(v), 4) for v in loss], loss._keras_mask.numpy().tolist()
    ([0.0513, 0.0], [True, False])
    """
    if _is_ragged(y_true, y_pred):
        fn = functools.partial(
            sparse_categorical_crossentropy,
            from_logits=from_logits,
            axis=axis,
            ignore_class=ignore_class,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            logit_soft_cap=logit_soft_cap,
        )
        return _ragged_tensor_apply_loss(fn, y_true, y_pred, y_pred_extra_dim=True)
    return backend._sparse_categorical(
        y_true,
        y_pred,
        from_logits,
        axis,
        ignore_class,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_soft_cap=logit_soft_cap,
    )


class _FusedLoss(tf_keras.__internal__.losses.LossFunctionWrapper):
    """A `LossFunctionWrapper` of one of the functions above whose options
    are checked when it is made. `get_config` and `from_config` are
    `LossFunctionWrapper`'s: the reduction, the name and the options."""

    def __init__(self, fn, reduction, name, **options):
        options = backend._checked_options(options)
        super().__init__(fn, reduction=reduction, name=name, **options)


@tf_keras.saving.register_keras_serializable(package=_PACKAGE)
class CategoricalCrossentropy(_FusedLoss):
    """Computes the crossentropy loss between the labels and predictions.

    Drop-in for `tf_keras.losses.CategoricalCrossentropy`: same arguments,
    the same `tf_keras.losses.Loss` machinery (reductions, sample weights,
    masks, the `tf.distribute` rules), the loss of one fused op.

    Args:
        from_logits: Whether `y_pred` is expected to be a logits tensor. By
            default, we assume that `y_pred` encodes a probability
            distribution.
        label_smoothing: Float in [0, 1]. When > 0, label values are
            smoothed, meaning the confidence on label values are relaxed. For
            example, if `0.1`, use `0.1 / num_classes` for non-target labels
            and `0.9 + 0.1 / num_classes` for target labels.
        axis: The axis along which to compute crossentropy (the features
            axis). Defaults to -1.
        reduction: Type of `tf_keras.losses.Reduction` to apply to loss.
            Default value is `AUTO`, which is `SUM_OVER_BATCH_SIZE` except
            under a `tf.distribute.Strategy` outside `Model.compile()` /
            `Model.fit()`, where `AUTO` and `SUM_OVER_BATCH_SIZE` raise an
            error: use `SUM` or `NONE` there.
        name: Optional name for the instance. Defaults to
            'categorical_crossentropy'.
        z_loss: Float >= 0, logits only: adds `z_loss * lse**2` to each
            position's loss, `lse` the log-sum-exp of its logits (PaLM's
            z-loss).
        logit_soft_cap: `None` or a float > 0, logits only: the logits `z`
            become `logit_soft_cap * tanh(z / logit_soft_cap)` first (Gemma 2).

    Example:

    >>> import tensorflow as tf
    >>> import tf_keras
    >>> import tf_xent_ops.tf_keras as txk
    >>> y_true = [[0, 1, 0], [0, 0, 1]]
    >>> y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    >>> cce = txk.losses.CategoricalCrossentropy()
    >>> round(float(cce(y_true, y_pred)), 3)
    1.177
    >>> round(float(cce(y_true, y_pred, sample_weight=tf.constant([0.3, 0.7]))), 3)
    0.814
    >>> cce = txk.losses.CategoricalCrossentropy(
    ...     reduction=tf_keras.losses.Reduction.SUM)
    >>> round(float(cce(y_true, y_pred)), 3)
    2.354
    >>> cce = txk.losses.CategoricalCrossentropy(
    ...     reduction=tf_keras.losses.Reduction.NONE)
    >>> [round(float(v), 4) for v in cce(y_true, y_pred)]
    [0.0513, 2.3026]

    Usage with the `compile()` API:

    ```python
    model.compile(optimizer="sgd", loss=txk.losses.CategoricalCrossentropy())
    ```
    """

    def __init__(
        self,
        from_logits=False,
        label_smoothing=0.0,
        axis=-1,
        reduction=_Reduction.AUTO,
        name="categorical_crossentropy",
        z_loss=0.0,
        logit_soft_cap=None,
    ):
        super().__init__(
            categorical_crossentropy,
            reduction,
            name,
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            z_loss=z_loss,
            logit_soft_cap=logit_soft_cap,
        )


@tf_keras.saving.register_keras_serializable(package=_PACKAGE)
class SparseCategoricalCrossentropy(_FusedLoss):
    """Computes the crossentropy loss between integer labels and predictions.

    Drop-in for `tf_keras.losses.SparseCategoricalCrossentropy`, plus any
    class `axis` and `label_smoothing` for integer labels (never building a
    one-hot), after tf_keras's own arguments. Positions labelled
    `ignore_class` get a loss of 0 and are left out of the `AUTO` /
    `SUM_OVER_BATCH_SIZE` average, as in tf_keras.

    Args:
        from_logits: Whether `y_pred` is expected to be a logits tensor. By
            default, we assume that `y_pred` encodes a probability
            distribution.
        ignore_class: Optional integer. The ID of a class to be ignored
            during loss computation. This is useful, for example, in
            segmentation problems featuring a "void" class (commonly -1 or
            255) in segmentation maps. By default (`ignore_class=None`), all
            classes are considered.
        reduction: Type of `tf_keras.losses.Reduction` to apply to loss.
            Default value is `AUTO`, which is `SUM_OVER_BATCH_SIZE` except
            under a `tf.distribute.Strategy` outside `Model.compile()` /
            `Model.fit()`, where `AUTO` and `SUM_OVER_BATCH_SIZE` raise an
            error: use `SUM` or `NONE` there.
        name: Optional name for the instance. Defaults to
            'sparse_categorical_crossentropy'.
        axis: The class axis. Defaults to -1.
        label_smoothing: Float in [0, 1]: the labelled class gets
            `1 - label_smoothing + label_smoothing / num_classes`, the others
            `label_smoothing / num_classes`.
        z_loss, logit_soft_cap: As for `CategoricalCrossentropy`.

    Example:

    >>> import tensorflow as tf
    >>> import tf_keras
    >>> import tf_xent_ops.tf_keras as txk
    >>> y_true = [1, 2]
    >>> y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    >>> scce = txk.losses.SparseCategoricalCrossentropy()
    >>> round(float(scce(y_true, y_pred)), 3)
    1.177
    >>> round(float(scce(y_true, y_pred, sample_weight=tf.constant([0.3, 0.7]))), 3)
    0.814
    >>> scce = txk.losses.SparseCategoricalCrossentropy(
    ...     reduction=tf_keras.losses.Reduction.SUM)
    >>> round(float(scce(y_true, y_pred)), 3)
    2.354
    >>> scce = txk.losses.SparseCategoricalCrossentropy(
    ...     reduction=tf_keras.losses.Reduction.NONE)
    >>> [round(float(v), 4) for v in scce(y_true, y_pred)]
    [0.0513, 2.3026]

    Usage with the `compile()` API:

    ```python
    model.compile(optimizer="sgd",
                  loss=txk.losses.SparseCategoricalCrossentropy())
    ```
    """

    def __init__(
        self,
        from_logits=False,
        ignore_class=None,
        reduction=_Reduction.AUTO,
        name="sparse_categorical_crossentropy",
        axis=-1,
        label_smoothing=0.0,
        z_loss=0.0,
        logit_soft_cap=None,
    ):
        super().__init__(
            sparse_categorical_crossentropy,
            reduction,
            name,
            from_logits=from_logits,
            ignore_class=ignore_class,
            axis=axis,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            logit_soft_cap=logit_soft_cap,
        )
