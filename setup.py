"""Builds the tf_xent_ops op library from source against the installed TensorFlow.

This is the one place that knows how to compile the library: `pip install
--no-build-isolation .` and `make build` (build_ext --inplace) both run it.
Build isolation must be off, or pip would compile against a different
TensorFlow than the one that loads the library.
"""

import os
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

CC_SOURCES = [
    "tf_xent_ops/cc/ops/xent_ops.cc",
    "tf_xent_ops/cc/kernels/xent_op.cc",
    "tf_xent_ops/cc/kernels/xent_functor_cpu.cc",
]
HEADERS = ["tf_xent_ops/cc/kernels/xent_functor.h"]
LIBRARY_NAME = "tf_xent_ops._xent_ops"


def _write_build_info(package_dir, tf_version):
    # The library only loads in the TensorFlow it was built against.
    with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
        f.write(f'"""Written by setup.py."""\n\nTF_VERSION = "{tf_version}"\n')


class BuildTfOps(build_ext):
    """Compiles the C++ sources with tf.sysconfig's flags, passed verbatim."""

    user_options = build_ext.user_options + [
        ("extra-cflags=", None, "extra flags for the C++ compiler"),
    ]

    def initialize_options(self):
        super().initialize_options()
        self.extra_cflags = os.environ.get("TFXENT_EXTRA_CFLAGS", "")

    def _arch_flags(self, cxx):
        """SIMD for the CPU kernels (Eigen's packet exp/log). The library is built
        on the machine that runs it, so the default is that machine's ISA; set
        TFXENT_ARCH_FLAGS (e.g. to "" for SSE2 only) for a portable build."""
        flags = shlex.split(os.environ.get("TFXENT_ARCH_FLAGS", "-march=native"))
        # TensorFlow 2.21's bundled Eigen does not compile with AVX512-FP16.
        probe = subprocess.run(
            [cxx, "-mno-avx512fp16", "-x", "c++", "-E", "-", "-o", os.devnull],
            input="",
            capture_output=True,
            text=True,
        )
        if flags and probe.returncode == 0:
            flags.append("-mno-avx512fp16")
        return flags

    def get_ext_filename(self, fullname):
        # A plain op library, not a Python extension: no ABI tag.
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext):
        import tensorflow as tf

        root = os.path.dirname(os.path.abspath(__file__))
        out = self.get_ext_fullpath(ext.name)
        objdir = os.path.join(self.build_temp, "objs")
        os.makedirs(objdir, exist_ok=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cxx = os.environ.get("CXX", "g++")
        cflags = (
            tf.sysconfig.get_compile_flags()
            + ["-I" + root, "-O3", "-fPIC", "-Wall", "-Wno-sign-compare"]
            # TensorFlow's own headers trip these.
            + ["-Wno-deprecated-declarations"]
            + self._arch_flags(cxx)
            + shlex.split(self.extra_cflags)
        )
        headers = [os.path.join(root, h) for h in HEADERS]

        def compile_one(src):
            path = os.path.join(root, src)
            obj = os.path.join(objdir, src.replace("/", "_") + ".o")
            newest_input = max(os.path.getmtime(p) for p in [path, *headers])
            if self.force or not os.path.exists(obj) or os.path.getmtime(obj) < newest_input:
                self._run([cxx, *cflags, "-c", path, "-o", obj])
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objs = list(pool.map(compile_one, ext.sources))
        link_flags = tf.sysconfig.get_link_flags() + shlex.split(self.extra_cflags)
        self._run([cxx, "-shared", *objs, "-o", out, *link_flags])
        _write_build_info(os.path.dirname(out), tf.__version__)

    def run(self):
        inplace = self.inplace  # setuptools clears it while building.
        super().run()
        if inplace:
            import tensorflow as tf

            package_dir = self.get_finalized_command("build_py").get_package_dir("tf_xent_ops")
            _write_build_info(package_dir, tf.__version__)

    @staticmethod
    def _run(cmd):
        print(" ".join(cmd), flush=True)
        subprocess.check_call(cmd)


setup(
    package_dir={"": "python"},
    packages=["tf_xent_ops"],
    ext_modules=[Extension(LIBRARY_NAME, sources=CC_SOURCES)],
    cmdclass={"build_ext": BuildTfOps},
    zip_safe=False,
)
