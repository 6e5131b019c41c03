"""tf_xent_ops: fused cross-entropy ops for TensorFlow and drop-in Keras 3 losses.

Importing the package loads the op library (once) and registers the ops'
gradients and the Keras serializable classes. A SavedModel that uses the ops
needs `import tf_xent_ops` before it is loaded.
"""

from tf_xent_ops import backend
from tf_xent_ops import losses
from tf_xent_ops import metrics
from tf_xent_ops import ops
from tf_xent_ops._load import cpu_isa
from tf_xent_ops.fused_head import fuse_head
from tf_xent_ops.losses import categorical_crossentropy
from tf_xent_ops.losses import sparse_categorical_crossentropy

__version__ = "0.2.0"

__all__ = [
    "backend",
    "categorical_crossentropy",
    "cpu_isa",
    "fuse_head",
    "losses",
    "metrics",
    "ops",
    "sparse_categorical_crossentropy",
]


def __getattr__(name):
    # tf_xent_ops.tf_keras (the tf_keras, Keras 2, forms) is imported on first
    # use, so that the package does not need tf_keras.
    if name == "tf_keras":
        import importlib

        return importlib.import_module("tf_xent_ops.tf_keras")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
