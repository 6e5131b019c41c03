"""The raw ops' scalar coefficient inputs, for tests that call the ops directly."""

import tensorflow as tf


def coefficients(
    dtype=tf.float32, label_smoothing=0.0, epsilon=1e-7, z_loss=0.0, logit_soft_cap=0.0
):
    """The keyword arguments label_smoothing, epsilon, z_loss and
    logit_soft_cap of a raw op, as scalars of the loss dtype `dtype`."""
    values = dict(
        label_smoothing=label_smoothing,
        epsilon=epsilon,
        z_loss=z_loss,
        logit_soft_cap=logit_soft_cap,
    )
    return {name: tf.constant(value, dtype) for name, value in values.items()}
