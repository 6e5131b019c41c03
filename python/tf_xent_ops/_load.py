"""Loads the compiled op library, once, with errors that say what to do, and
reports (or, for tests and benchmarks, switches) the CPU kernels' instruction
set."""

import ctypes
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
    if _series(TF_VERSION) != _series(tf.__version__):
        raise ImportError(
            f"tf_xent_ops: the op library was built against TensorFlow {TF_VERSION}, but "
            f"TensorFlow {tf.__version__} is installed; a custom op library only loads in "
            f"the TensorFlow series (major.minor) it was built for. {_REBUILD_HINT}"
        )
    if not os.path.exists(_LIBRARY_PATH):
        raise ImportError(f"tf_xent_ops: {_LIBRARY_PATH} is missing. {_REBUILD_HINT}")
    try:
        return tf.load_op_library(_LIBRARY_PATH)
    except (tf.errors.NotFoundError, OSError) as e:
        raise ImportError(
            f"tf_xent_ops: could not load {_LIBRARY_PATH}: {e}. {_REBUILD_HINT}"
        ) from e


def _series(version):
    return version.split(".")[:2]


def _cpu_api():
    """The op library's C functions that choose the CPU kernels' level
    (tf_xent_ops/cc/kernels/xent_cpu_dispatch.h)."""
    api = ctypes.CDLL(_LIBRARY_PATH)  # The library TensorFlow loaded: no second copy.
    for name, args in [
        ("TfXentCpuIsa", []),
        ("TfXentCpuIsaError", []),
        ("TfXentCpuIsasAvailable", []),
        ("TfXentUseCpuIsa", [ctypes.c_char_p]),
    ]:
        getattr(api, name).restype = ctypes.c_char_p
        getattr(api, name).argtypes = args
    return api


def cpu_isa():
    """The instruction-set level of the CPU kernels in use: "avx512bf16",
    "avx512", "avx2" or "baseline" (or "native" for a library built for its
    build machine alone).

    The best level the CPU supports, unless the environment variable
    `TFXENT_CPU_ISA` (auto, avx512bf16, avx512, avx2 or baseline), read when
    the package is imported, asks for another.

    >>> import tf_xent_ops
    >>> tf_xent_ops.cpu_isa() in ("avx512bf16", "avx512", "avx2", "baseline", "native")
    True
    """
    level = _cpu.TfXentCpuIsa()
    if level is None:
        raise RuntimeError(f"tf_xent_ops: {_cpu.TfXentCpuIsaError().decode()}")
    return level.decode()


def available_cpu_isas():
    """The levels this build has and this CPU runs, best first."""
    return _cpu.TfXentCpuIsasAvailable().decode().split(", ")


def use_cpu_isa(level):
    """Runs the CPU kernels at `level` from now on (for tests and benchmarks
    that compare levels in one process); returns the level in use before."""
    before = cpu_isa()
    error = _cpu.TfXentUseCpuIsa(level.encode())
    if error is not None:
        raise ValueError(f"tf_xent_ops: {error.decode()}")
    return before


library = _load_library()
_cpu = _cpu_api()
try:
    cpu_isa()  # Chooses the level now: a TFXENT_CPU_ISA it cannot honour fails the import.
except RuntimeError as e:
    raise ImportError(str(e)) from None
