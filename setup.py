"""Builds the tf_xent_ops op library from source against the installed TensorFlow.

This is the one place that knows how to compile and package the library:
`pip install --no-build-isolation .`, `make build` (build_ext --inplace) and
`make wheel` run it, and the Bazel wheel packages Bazel's libraries through
it (TFXENT_PREBUILT_LIBRARIES). Build isolation must be off, or pip would
compile against a different TensorFlow than the one that loads the library.

The op library (_xent_ops.so: ops, OpKernels, GPU kernels) is built for the
x86-64 baseline; the CPU functors are built once per instruction-set level
into _xent_cpu_<level>.so, of which the op library loads the best one the
CPU runs (tf_xent_ops/cc/kernels/xent_cpu_dispatch.h).
"""

import glob
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension
from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CC_SOURCES = [
    "tf_xent_ops/cc/ops/xent_ops.cc",
    "tf_xent_ops/cc/kernels/xent_op.cc",
    "tf_xent_ops/cc/kernels/xent_cpu_dispatch.cc",
]
# The CPU functors and their table: one library per instruction-set level.
CPU_LEVEL_SOURCES = [
    "tf_xent_ops/cc/kernels/xent_functor_cpu_dense.cc",
    "tf_xent_ops/cc/kernels/xent_functor_cpu_sparse.cc",
    "tf_xent_ops/cc/kernels/xent_cpu_kernels_export.cc",
]
CUDA_SOURCES = ["tf_xent_ops/cc/kernels/xent_functor_gpu.cu.cc"]
# Every source includes some of these: a change to any rebuilds them all.
HEADERS = sorted(
    os.path.relpath(path, ROOT)
    for path in glob.glob(os.path.join(ROOT, "tf_xent_ops/cc/kernels/*.h"))
)
LIBRARY_NAME = "tf_xent_ops._xent_ops"
# Each x86-64 level's compiler flags (the names xent_cpu_levels.h knows).
# Generic tuning: the portable levels run on any vendor's CPUs. TensorFlow
# 2.21's bundled Eigen does not compile with AVX512-FP16, which no level but
# native could enable.
X86_CPU_LEVEL_FLAGS = {
    "baseline": ["-march=x86-64", "-mtune=generic"],
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
    "avx512": ["-march=x86-64-v4", "-mtune=generic"],
    "avx512bf16": ["-march=x86-64-v4", "-mavx512bf16", "-mtune=generic"],
    "native": ["-march=native", "-mno-avx512fp16"],
}
PORTABLE_CPU_LEVELS = ("baseline", "avx2", "avx512", "avx512bf16")


def cpu_level_flags(environ=os.environ, machine=None):
    """{level: compiler flags} of the CPU levels to build: $TFXENT_CPU_LEVELS
    (space-separated; "native" alone builds for this machine only), by default
    the portable four on x86-64 and the compiler's default elsewhere."""
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return {"baseline": []}
    levels = environ.get("TFXENT_CPU_LEVELS", " ".join(PORTABLE_CPU_LEVELS)).split()
    unknown = [level for level in levels if level not in X86_CPU_LEVEL_FLAGS]
    if unknown or not levels:
        raise ValueError(
            f"TFXENT_CPU_LEVELS={environ.get('TFXENT_CPU_LEVELS')!r}: each level must be one of "
            f"{', '.join(X86_CPU_LEVEL_FLAGS)}"
        )
    return {level: X86_CPU_LEVEL_FLAGS[level] for level in levels}


def _version():
    with open(os.path.join(ROOT, "python", "tf_xent_ops", "__init__.py")) as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    return match.group(1)


def _tensorflow_series():
    """The installed TensorFlow's major.minor: the library loads in that
    series only (its C++ ABI changes between minor releases)."""
    import tensorflow as tf

    return ".".join(tf.__version__.split(".")[:2])


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
    # The host code goes into the op library, built for the x86-64 baseline
    # whatever the host compiler's default.
    host = ["-Xcompiler", "-march=x86-64"] if platform.machine() in ("x86_64", "AMD64") else []
    return [
        *("-x", "cu", "-std=c++17", "-O3", "-I" + include_root, "--expt-relaxed-constexpr"),
        *("-Xcompiler", "-fPIC", *host, *gencode),
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
    """Compiles the C++ sources with tf.sysconfig's flags, passed verbatim:
    the op library, then one library per CPU level (cpu_level_flags)."""

    user_options = build_ext.user_options + [
        ("extra-cflags=", None, "extra flags for the C++ compiler"),
    ]

    def initialize_options(self):
        super().initialize_options()
        self.extra_cflags = os.environ.get("TFXENT_EXTRA_CFLAGS", "")

    def get_ext_filename(self, fullname):
        # A plain op library, not a Python extension: no ABI tag.
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext):
        import tensorflow as tf

        out = self.get_ext_fullpath(ext.name)
        package_dir = os.path.dirname(out)
        os.makedirs(package_dir, exist_ok=True)
        for old in glob.glob(os.path.join(package_dir, "_xent_cpu_*.so")):
            os.remove(old)  # A level no longer built must not be loaded.
        prebuilt = os.environ.get("TFXENT_PREBUILT_LIBRARIES")
        if prebuilt:  # Bazel's outputs, packaged as they are.
            for name in os.listdir(prebuilt):
                if name.endswith(".so") or name == "_build_info.py":
                    shutil.copy(os.path.join(prebuilt, name), package_dir)
            return
        cxx = os.environ.get("CXX", "g++")
        levels = cpu_level_flags()
        cflags = (
            tf.sysconfig.get_compile_flags()
            + ["-I" + ROOT, "-O3", "-fPIC", "-Wall", "-Wno-sign-compare"]
            # TensorFlow's own headers trip these.
            + ["-Wno-deprecated-declarations"]
            + shlex.split(self.extra_cflags)
        )
        cuda = cuda_build_config()
        # The op library: the baseline's flags, so that nothing outside the
        # levels' libraries needs more than the baseline CPU.
        library_flags = cflags + levels.get("baseline", X86_CPU_LEVEL_FLAGS["baseline"])
        link_flags = tf.sysconfig.get_link_flags() + shlex.split(self.extra_cflags)
        if cuda:
            # GPU kernels, registered by xent_op.cc.
            library_flags.append("-DTFXENT_WITH_CUDA")
            link_flags = [
                f"-L{cuda['cudart_static_dir']}",
                CUDART_HIDDEN,
                "-lcudart_static",
                *link_flags,
                *CUDART_DEPENDENCIES,
            ]
        sources = {"library": [(src, library_flags) for src in ext.sources]}
        for level, flags in levels.items():
            # Hidden and bound to itself: its copies of Eigen's and the
            # standard library's inline functions serve it alone.
            level_flags = cflags + flags + [f'-DTFXENT_CPU_LEVEL="{level}"']
            level_flags += ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
            sources[level] = [(src, level_flags) for src in CPU_LEVEL_SOURCES]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            futures = {
                group: [pool.submit(self._compile, cxx, src, group, flags) for src, flags in jobs]
                for group, jobs in sources.items()
            }
            if cuda:
                futures["library"] += [
                    pool.submit(self._compile_cuda, cuda["nvcc"], src) for src in CUDA_SOURCES
                ]
            objs = {
                group: [f.result() for f in group_futures]
                for group, group_futures in futures.items()
            }
        self._run([cxx, "-shared", *objs["library"], "-o", out, *link_flags, "-ldl"])
        for level in levels:
            level_library = os.path.join(package_dir, f"_xent_cpu_{level}.so")
            self._run(
                [cxx, "-shared", *objs[level], "-o", level_library, "-Wl,-Bsymbolic"]
                + ["-lpthread", *shlex.split(self.extra_cflags)]
            )
        _write_build_info(package_dir, tf.__version__, cuda and cuda["version"])

    def _object(self, src, group):
        objdir = os.path.join(self.build_temp, "objs", group)
        os.makedirs(objdir, exist_ok=True)
        return os.path.join(objdir, src.replace("/", "_") + ".o")

    def _stale(self, src, obj):
        newest_input = max(os.path.getmtime(p) for p in [os.path.join(ROOT, src), *self._headers()])
        return self.force or not os.path.exists(obj) or os.path.getmtime(obj) < newest_input

    @staticmethod
    def _headers():
        return [os.path.join(ROOT, h) for h in HEADERS]

    def _compile(self, cxx, src, group, flags):
        obj = self._object(src, group)
        if self._stale(src, obj):
            self._run([cxx, *flags, "-c", os.path.join(ROOT, src), "-o", obj])
        return obj

    def _compile_cuda(self, nvcc, src):
        obj = self._object(src, "library")
        if self._stale(src, obj):
            self._run([nvcc, *nvcc_flags(ROOT), "-c", os.path.join(ROOT, src), "-o", obj])
        return obj

    def run(self):
        inplace = self.inplace  # setuptools clears it while building.
        super().run()
        if inplace:  # setuptools copies only the op library back
            package_dir = self.get_finalized_command("build_py").get_package_dir("tf_xent_ops")
            for old in glob.glob(os.path.join(package_dir, "_xent_cpu_*.so")):
                os.remove(old)
            built = os.path.join(self.build_lib, "tf_xent_ops")
            for name in ["_build_info.py", *os.listdir(built)]:
                if name == "_build_info.py" or name.startswith("_xent_cpu_"):
                    shutil.copy(os.path.join(built, name), package_dir)

    @staticmethod
    def _run(cmd):
        print(" ".join(cmd), flush=True)
        subprocess.check_call(cmd)


class PlatformWheel(bdist_wheel):
    """Tagged for the platform and any Python 3: the libraries call
    TensorFlow's C++ API, not Python's."""

    def get_tag(self):
        _, _, platform_tag = super().get_tag()
        return "py3", "none", platform_tag


# Guarded so that the tests can import the toolkit lookup above; pip's build
# backend runs this file as __main__.
if __name__ == "__main__":
    tf_series = _tensorflow_series()
    # The local label names the TensorFlow series the libraries are for, and a
    # build for its build machine's CPU alone.
    native = ".native" if "native" in cpu_level_flags() else ""
    setup(
        version=f"{_version()}+tf{tf_series}{native}",
        install_requires=[f"tensorflow=={tf_series}.*", "keras==3.15.1", "numpy"],
        package_dir={"": "python"},
        packages=["tf_xent_ops", "tf_xent_ops.tf_keras"],
        ext_modules=[Extension(LIBRARY_NAME, sources=CC_SOURCES)],
        cmdclass={"build_ext": BuildTfOps, "bdist_wheel": PlatformWheel},
        zip_safe=False,
    )
