"""Drop-in replacements for tf_keras's categorical cross-entropy metrics."""

import tf_keras

# The decorator tf_keras's metrics put on their constructors: it takes a
# DTensor `mesh` keyword. tf_keras exports no name for it.
from tf_keras.src.dtensor import utils as dtensor_utils

from tf_xent_ops.tf_keras import backend
from tf_xent_ops.tf_keras import losses

_PACKAGE = "tf_xent_ops"
# The loss classes hold the plain class names in the package's registry, so
# the metrics register as "tf_xent_ops>...Metric".


class _FusedMetric(tf_keras.metrics.MeanMetricWrapper):
    """The mean of one of the fused loss functions with fixed options, as
    tf_keras's own cross-entropy metrics are `MeanMetricWrapper`s of theirs:
    `update_state` casts `y_true` and `y_pred` to the metric's dtype, takes
    the flat values of ragged inputs and masks as tf_keras's does.
    `get_config` and `from_config` are `MeanMetricWrapper`'s: the name, the
    dtype and the options."""

    def __init__(self, fn, name, dtype, **options):
        options = backend._checked_options(options)
        super().__init__(fn, name, dtype=dtype, **options)


@tf_keras.saving.register_keras_serializable(package=_PACKAGE, name="CategoricalCrossentropyMetric")
class CategoricalCrossentropy(_FusedMetric):
    """Computes the crossentropy metric between the labels and predictions.

    Drop-in for `tf_keras.metrics.CategoricalCrossentropy`, computed by the
    fused op. `update_state(y_true, y_pred, sample_weight=None)`, `result()`
    and `reset_state()` behave as tf_keras's, across replicas too.

    Args:
        name: (Optional) string name of the metric instance.
        dtype: (Optional) data type of the metric result.
        from_logits: (Optional) Whether output is expected to be a logits
            tensor. By default, we consider that output encodes a probability
            distribution.
        label_smoothing: (Optional) Float in [0, 1]. When > 0, label values
            are smoothed, meaning the confidence on label values are relaxed.
            e.g. `label_smoothing=0.2` means that we will use a value of `0.1`
            for label `0` and `0.9` for label `1`.
        axis: (Optional) The dimension along which entropy is computed.
            Defaults to `-1`.
        logit_soft_cap: (Optional) `None` or a float > 0, logits only: the
            cross-entropy of the capped logits, as the loss with the same cap
            computes it.

    Example:

    >>> import tensorflow as tf
    >>> import tf_xent_ops.tf_keras as txk
    >>> m = txk.metrics.CategoricalCrossentropy()
    >>> _ = m.update_state([[0, 1, 0], [0, 0, 1]],
    ...                    [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    >>> round(float(m.result()), 7)
    1.1769392
    >>> m.reset_state()
    >>> _ = m.update_state([[0, 1, 0], [0, 0, 1]],
    ...                    [[0.05, 0.95, 0], [0.1, 0.8, 0.1]],
    ...                    sample_weight=tf.constant([0.3, 0.7]))
    >>> round(float(m.result()), 7)
    1.6271976

    Usage with the `compile()` API:

    ```python
    model.compile(
        optimizer="sgd",
        loss="categorical_crossentropy",
        metrics=[txk.metrics.CategoricalCrossentropy()])
    ```
    """

    @dtensor_utils.inject_mesh
    def __init__(
        self,
        name="categorical_crossentropy",
        dtype=None,
        from_logits=False,
        label_smoothing=0,
        axis=-1,
        logit_soft_cap=None,
    ):
        super().__init__(
            losses.categorical_crossentropy,
            name,
            dtype,
            from_logits=from_logits,
            label_smoothing=label_smoothing,
            axis=axis,
            logit_soft_cap=logit_soft_cap,
        )


@tf_keras.saving.register_keras_serializable(
    package=_PACKAGE, name="SparseCategoricalCrossentropyMetric"
)
class SparseCategoricalCrossentropy(_FusedMetric):
    """Computes the crossentropy metric between integer labels and predictions.

    Drop-in for `tf_keras.metrics.SparseCategoricalCrossentropy`, computed by
    the fused op, plus `label_smoothing` for integer labels (never building a
    one-hot) after tf_keras's own arguments.

    Args:
        name: (Optional) string name of the metric instance.
        dtype: (Optional) data type of the metric result.
        from_logits: (Optional) Whether output is expected to be a logits
            tensor. By default, we consider that output encodes a probability
            distribution.
        ignore_class: Optional integer. The ID of a class to be ignored during
            metric computation. This is useful, for example, in segmentation
            problems featuring a "void" class (commonly -1 or 255) in
            segmentation maps. By default (`ignore_class=None`), all classes
            are considered.
        axis: (Optional) The dimension along which entropy is computed.
            Defaults to `-1`.
        label_smoothing: (Optional) Float in [0, 1]: the labelled class gets
            `1 - label_smoothing + label_smoothing / num_classes`, the others
            `label_smoothing / num_classes`.
        logit_soft_cap: (Optional) `None` or a float > 0, logits only: the
            cross-entropy of the capped logits, as the loss with the same cap
            computes it.

    Example:

    >>> import tensorflow as tf
    >>> import tf_xent_ops.tf_keras as txk
    >>> m = txk.metrics.SparseCategoricalCrossentropy()
    >>> _ = m.update_state([1, 2],
    ...                    [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    >>> round(float(m.result()), 7)
    1.1769392
    >>> m.reset_state()
    >>> _ = m.update_state([1, 2],
    ...                    [[0.05, 0.95, 0], [0.1, 0.8, 0.1]],
    ...                    sample_weight=tf.constant([0.3, 0.7]))
    >>> round(float(m.result()), 7)
    1.6271976

    Usage with the `compile()` API:

    ```python
    model.compile(
        optimizer="sgd",
        loss="sparse_categorical_crossentropy",
        metrics=[txk.metrics.SparseCategoricalCrossentropy()])
    ```
    """

    @dtensor_utils.inject_mesh
    def __init__(
        self,
        name="sparse_categorical_crossentropy",
        dtype=None,
        from_logits=False,
        ignore_class=None,
        axis=-1,
        label_smoothing=0.0,
        logit_soft_cap=None,
    ):
        super().__init__(
            losses.sparse_categorical_crossentropy,
            name,
            dtype,
            from_logits=from_logits,
            ignore_class=ignore_class,
            axis=axis,
            label_smoothing=label_smoothing,
            logit_soft_cap=logit_soft_cap,
        )
