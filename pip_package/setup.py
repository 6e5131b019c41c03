"""Packages a prebuilt op library (from Bazel) into a wheel.

Run by build_pip_package.sh in a staging directory that holds tf_xent_ops/
with _xent_ops.so and _build_info.py already in it; nothing is compiled here.
"""

import os

from setuptools import setup
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))


class BinaryDistribution(Distribution):
    """The wheel carries a compiled library: tag it for this platform."""

    def has_ext_modules(self):
        return True


def _version():
    with open(os.path.join(HERE, "tf_xent_ops", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split('"')[1]
    raise RuntimeError("no __version__ in tf_xent_ops/__init__.py")


setup(
    name="tf-xent-ops",
    version=_version(),
    description="Fused cross-entropy ops for TensorFlow, with drop-in Keras 3 losses and metrics",
    license="Apache-2.0",
    python_requires=">=3.10",
    install_requires=["tensorflow==2.21.0", "keras==3.15.1", "numpy"],
    extras_require={"tf_keras": ["tf-keras==2.21.0"], "keras_hub": ["keras-hub==0.32.0"]},
    packages=["tf_xent_ops", "tf_xent_ops.tf_keras"],
    package_data={"tf_xent_ops": ["_xent_ops.so"]},
    distclass=BinaryDistribution,
    zip_safe=False,
)
