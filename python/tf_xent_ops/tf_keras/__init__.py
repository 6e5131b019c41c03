"""Drop-in replacements for tf_keras's (Keras 2's) cross-entropy losses.

`tf_xent_ops.tf_keras.losses.CategoricalCrossentropy` in place of
`tf_keras.losses.CategoricalCrossentropy` (`tf.keras` where
`TF_USE_LEGACY_KERAS=1`), and so on for the sparse loss, the metrics, the
functions and the backend forms: tf_keras's own machinery (reductions, masks,
sample weights, `tf.distribute`, saving) around the fused op.

Importing this module needs the `tf_keras` package; `import tf_xent_ops`
does not import it. Import `tf_xent_ops.tf_keras` before loading a model
saved with these losses or metrics: that registers the ops and the classes.
"""

try:
    import tf_keras  # noqa: F401
except ImportError as error:
    raise ImportError(
        "tf_xent_ops.tf_keras needs the tf_keras package (Keras 2), which could not be "
        f"imported: {error}. Install it with `pip install tf-keras` (the version that "
        "matches TensorFlow's, tf-keras==2.21.0 for TensorFlow 2.21), or use the Keras 3 "
        "forms in tf_xent_ops.losses and tf_xent_ops.metrics."
    ) from error

from tf_xent_ops.tf_keras import backend
from tf_xent_ops.tf_keras import losses
from tf_xent_ops.tf_keras import metrics
from tf_xent_ops.tf_keras.losses import categorical_crossentropy
from tf_xent_ops.tf_keras.losses import sparse_categorical_crossentropy

__all__ = [
    "backend",
    "categorical_crossentropy",
    "losses",
    "metrics",
    "sparse_categorical_crossentropy",
]
