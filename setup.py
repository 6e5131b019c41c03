"""Builds the tf_xent_ops op library from source against the installed TensorFlow.

This is the one place that knows how to compile the library: `pip install
--no-build-isolation .` and `make build` (build_ext --inplace) both run it.
Build isolation must be off, or pip would compile against a different
TensorFlow than the one that loads the library.
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

CC_SOURCES = [
    "tf_xent_ops/cc/ops/xent_ops.cc",
    "tf_xent_ops/cc/kernels/xent_op.cc",
    "tf_xent_ops/cc/kernels/xent_functor_cpu_dense.cc",
    "tf_xent_ops/cc/kernels/xent_functor_cpu_sparse.cc",
]
CUDA_SOURCES = ["tf_xent_ops/cc/kernels/xent_functor_gpu.cu.cc"]
# Every source includes some of these: a change to any rebuilds them all.
HEADERS = sorted(
    os.path.relpath(path, os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_xent_ops/cc/kernels/*.h")
    )
)
LIBRARY_NAME = "tf_xent_ops._xent_ops"


def _write_build_info(package_dir, tf_version, cuda_version):
    # The library only loads in the TensorFlow it was built against.
    with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
        f.write(
            f'"""Written by setup.py."""\n\nTF_VERSION = "{tf_version}"\n'
            f"CUDA_VERSION = {cuda_version!r}  # None: built without GPU kernels\n"
            'BUILT_BY = "setup.py"\n'
        )


def _pypi_nvcc(search_path):
    """The nvcc of a CUDA toolkit installed from PyPI into one of `search_path`'s
    folders (`make cuda-toolkit`: nvidia/cu13/bin/nvcc), the newest if several."""
    found = []
    for folder in search_path:
        for nvcc in glob.glob(os.path.join(folder, "nvidia", "cu[0-9]*", "bin", "nvcc")):
            major = os.path.basename(os.path.dirname(os.path.dirname(nvcc)))[2:]
            if major.isdigit():
                found.append((int(major), nvcc))
    return max(found)[1] if found else None


def find_nvcc(environ=os.environ, search_path=sys.path):
    """nvcc from $CUDA_HOME, else PATH, else a toolkit from PyPI in this Python's
    environment; None where there is none or TFXENT_CUDA=0."""
    if environ.get("TFXENT_CUDA", "1") == "0":
        return None
    cuda_home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc", path=environ.get("PATH", os.defpath)) or _pypi_nvcc(search_path)


def _cuda_toolkit(nvcc):
    """The toolkit nvcc belongs to (nvcc may be a wrapper script elsewhere)."""
    dry = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    match = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
    top = match.group(1) if match else os.path.join(os.path.dirname(nvcc), "..")
    return os.path.realpath(top)


# Where toolkits keep the static runtime: NVIDIA's installers and distributions
# (lib64, or the target folder it links to) and PyPI's wheels (lib).
CUDART_STATIC_DIRS = ("lib64", os.path.join("targets", "x86_64-linux", "lib"), "lib")


def cudart_static_dir(toolkit):
    """The folder of `toolkit` that holds libcudart_static.a."""
    for sub in CUDART_STATIC_DIRS:
        folder = os.path.join(toolkit, sub)
        if os.path.exists(os.path.join(folder, "libcudart_static.a")):
            return folder
    raise RuntimeError(
        f"the CUDA toolkit at {toolkit} has no libcudart_static.a in any of "
        f"{', '.join(CUDART_STATIC_DIRS)}: set CUDA_HOME to a complete toolkit, "
        "or TFXENT_CUDA=0 to build without GPU kernels"
    )


def _nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def nvcc_flags(include_root, environ=os.environ):
    """nvcc's flags for the CUDA sources, ahead of `-c SOURCE -o OBJECT`: machine
    code for each of $TFXENT_CUDA_ARCHS (default 80;90) plus PTX of the last."""
    archs = environ.get("TFXENT_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return [
        *("-x", "cu", "-std=c++17", "-O3", "-I" + include_root, "--expt-relaxed-constexpr"),
        *("-Xcompiler", "-fPIC", *gencode),
    ]


# Linked with the static CUDA runtime, which must come ahead of TensorFlow's
# library on the link line: that library exports a CUDA 12 runtime API of its
# own (a stub over libcudart.so.12), to which the linker would otherwise bind
# the calls of nvcc's host code, whatever toolkit compiled it. Hidden, so that
# it binds to nothing else. The runtime's own dependencies go last.
CUDART_HIDDEN = "-Wl,--exclude-libs,libcudart_static.a"
CUDART_DEPENDENCIES = ["-ldl", "-lrt", "-lpthread"]


def cuda_build_config(environ=os.environ, search_path=sys.path):
    """What a build with GPU kernels needs from the toolkit, or None where no
    nvcc is found (find_nvcc). Used here and by Bazel's cuda_configure, so that
    both build paths find and use a toolkit the same way."""
    nvcc = find_nvcc(environ, search_path)
    if nvcc is None:
        return None
    return {
        "nvcc": nvcc,
        "version": _nvcc_version(nvcc),
        "cudart_static_dir": cudart_static_dir(_cuda_toolkit(nvcc)),
        "nvcc_flags": nvcc_flags(".", environ),
    }


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

        cuda = cuda_build_config()
        link_flags = tf.sysconfig.get_link_flags() + shlex.split(self.extra_cflags)
        if cuda:
            # GPU kernels, registered by xent_op.cc.
            cflags.append("-DTFXENT_WITH_CUDA")
            link_flags = [
                f"-L{cuda['cudart_static_dir']}",
                CUDART_HIDDEN,
                "-lcudart_static",
                *link_flags,
                *CUDART_DEPENDENCIES,
            ]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objs = list(pool.map(compile_one, ext.sources))
            if cuda:
                objs += list(
                    pool.map(
                        lambda src: self._compile_cuda(cuda["nvcc"], root, objdir, src, headers),
                        CUDA_SOURCES,
                    )
                )
        self._run([cxx, "-shared", *objs, "-o", out, *link_flags])
        _write_build_info(os.path.dirname(out), tf.__version__, cuda and cuda["version"])

    def _compile_cuda(self, nvcc, root, objdir, src, headers):
        path = os.path.join(root, src)
        obj = os.path.join(objdir, src.replace("/", "_") + ".o")
        newest_input = max(os.path.getmtime(p) for p in [path, *headers])
        if not self.force and os.path.exists(obj) and os.path.getmtime(obj) >= newest_input:
            return obj
        self._run([nvcc, *nvcc_flags(root), "-c", path, "-o", obj])
        return obj

    def run(self):
        inplace = self.inplace  # setuptools clears it while building.
        super().run()
        if inplace:  # setuptools copies only the library back
            package_dir = self.get_finalized_command("build_py").get_package_dir("tf_xent_ops")
            info = os.path.join(self.build_lib, "tf_xent_ops", "_build_info.py")
            shutil.copy(info, package_dir)

    @staticmethod
    def _run(cmd):
        print(" ".join(cmd), flush=True)
        subprocess.check_call(cmd)


# Guarded so that the tests can import the toolkit lookup above; pip's build
# backend runs this file as __main__.
if __name__ == "__main__":
    setup(
        package_dir={"": "python"},
        packages=["tf_xent_ops", "tf_xent_ops.tf_keras"],
        ext_modules=[Extension(LIBRARY_NAME, sources=CC_SOURCES)],
        cmdclass={"build_ext": BuildTfOps},
        zip_safe=False,
    )
