"""Drop-in replacements for Keras 3's categorical cross-entropy metrics."""

import keras

from tf_xent_ops import losses
from tf_xent_ops import ops

_PACKAGE = "tf_xent_ops"
# The loss classes hold the plain class names in the package's registry, so the
# metrics register as "tf_xent_ops>...Metric".


class _FusedMetric(keras.metrics.MeanMetricWrapper):
    """The mean of one of the fused loss functions with fixed kwargs, as
    Keras's own cross-entropy metrics are `MeanMetricWrapper`s of theirs."""

    def __init__(self, fn, name, dtype, **fn_kwargs):
        losses._require_tensorflow_backend(type(self))
        fn_kwargs = ops.checked_options(fn_kwargs)
        super().__init__(fn, name=name, dtype=dtype, **fn_kwargs)
        self._fn_kwargs = fn_kwargs
        for key, value in fn_kwargs.items():
            setattr(self, key, value)
        # Metric should be minimized during optimization.
        self._direction = "down"

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, **self._fn_kwargs}


@keras.saving.register_keras_serializable(package=_PACKAGE, name="CategoricalCrossentropyMetric")
class CategoricalCrossentropy(_FusedMetric):
    """Computes the crossentropy metric between the labels and predictions.

    Drop-in for `keras.metrics.CategoricalCrossentropy`, computed by the fused
    op. `update_state(y_true, y_pred, sample_weight=None)`, `result()` and
    `reset_state()` behave as in Keras, across replicas too.

    Args:
        name: (Optional) string name of the metric instance.
        dtype: (Optional) data type of the metric result.
        from_logits: (Optional) Whether output is expected to be a logits
            tensor. By default, we consider that output encodes a probability
            distribution.
        label_smoothing: (Optional) Float in `[0, 1]`. When > 0, label values
            are smoothed, meaning the confidence on label values are relaxed.
        axis: (Optional) Defaults to `-1`. The dimension along which entropy
            is computed.
        logit_soft_cap: (Optional) `None` or a float > 0, logits only: the
            cross-entropy of the capped logits
            `logit_soft_cap * tanh(z / logit_soft_cap)`, as the loss with the
            same cap computes it (no z-loss: a metric measures the
            cross-entropy).

    Example:

    >>> import numpy as np
    >>> import tf_xent_ops
    >>> m = tf_xent_ops.metrics.CategoricalCrossentropy()
    >>> m.update_state([[0, 1, 0], [0, 0, 1]],
    ...                [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    >>> round(float(m.result()), 7)
    1.1769392
    >>> m.reset_state()
    >>> m.update_state([[0, 1, 0], [0, 0, 1]],
    ...                [[0.05, 0.95, 0], [0.1, 0.8, 0.1]],
    ...                sample_weight=np.array([0.3, 0.7]))
    >>> round(float(m.result()), 7)
    1.6271976
    """

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


@keras.saving.register_keras_serializable(
    package=_PACKAGE, name="SparseCategoricalCrossentropyMetric"
)
class SparseCategoricalCrossentropy(_FusedMetric):
    """Computes the crossentropy metric between integer labels and predictions.

    Drop-in for `keras.metrics.SparseCategoricalCrossentropy`, computed by the
    fused op, for any class `axis`.

    Args:
        name: (Optional) string name of the metric instance.
        dtype: (Optional) data type of the metric result.
        from_logits: (Optional) Whether output is expected to be a logits
            tensor. By default, we consider that output encodes a probability
            distribution.
        ignore_class: (Optional) integer class ID to ignore: those positions
            are masked out of the mean.
        axis: (Optional) Defaults to `-1`. The dimension along which entropy
            is computed.
        logit_soft_cap: (Optional) `None` or a float > 0, logits only: the
            cross-entropy of the capped logits
            `logit_soft_cap * tanh(z / logit_soft_cap)`, as the loss with the
            same cap computes it (no z-loss: a metric measures the
            cross-entropy).

    Example:

    >>> import numpy as np
    >>> import tf_xent_ops
    >>> m = tf_xent_ops.metrics.SparseCategoricalCrossentropy()
    >>> m.update_state([1, 2], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]])
    >>> round(float(m.result()), 7)
    1.1769392
    >>> m.reset_state()
    >>> m.update_state([1, 2], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]],
    ...                sample_weight=np.array([0.3, 0.7]))
    >>> round(float(m.result()), 7)
    1.6271976
    """

    def __init__(
        self,
        name="sparse_categorical_crossentropy",
        dtype=None,
        from_logits=False,
        ignore_class=None,
        axis=-1,
        logit_soft_cap=None,
    ):
        super().__init__(
            losses.sparse_categorical_crossentropy,
            name,
            dtype,
            from_logits=from_logits,
            ignore_class=ignore_class,
            axis=axis,
            logit_soft_cap=logit_soft_cap,
        )
