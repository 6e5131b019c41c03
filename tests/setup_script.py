"""The repository's setup.py as a module, for the tests of its CUDA toolkit
lookup (its setup() call runs only as __main__)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location(
        "tf_xent_ops_setup_script", os.path.join(ROOT, "setup.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
