"""Loads the compiled op library, once, with errors that say what to do."""

import os

import tensorflow as tf

_LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_xent_ops.so")
_REBUILD_HINT = (
    "Rebuild it against the installed TensorFlow: `pip install --no-build-isolation .` "
    "from a source checkout (or `make build` in the repository)."
)


def _load_library():
    try:
        from tf_xent_ops._build_info import TF_VERSION
    except ImportError as e:
        raise ImportError(f"tf_xent_ops: the op library has not been built. {_REBUILD_HINT}") from e
    if TF_VERSION != tf.__version__:
        raise ImportError(
            f"tf_xent_ops: the op library was built against TensorFlow {TF_VERSION}, but "
            f"TensorFlow {tf.__version__} is installed; a custom op library only loads in "
            f"the TensorFlow it was built for. {_REBUILD_HINT}"
        )
    if not os.path.exists(_LIBRARY_PATH):
        raise ImportError(f"tf_xent_ops: {_LIBRARY_PATH} is missing. {_REBUILD_HINT}")
    try:
        return tf.load_op_library(_LIBRARY_PATH)
    except (tf.errors.NotFoundError, OSError) as e:
        raise ImportError(
            f"tf_xent_ops: could not load {_LIBRARY_PATH}: {e}. {_REBUILD_HINT}"
        ) from e


library = _load_library()
