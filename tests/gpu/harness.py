"""The GPU functors behind tests/gpu/harness.cu's C ABI, from Python.

Two builds of the same source: `build_cuda` (nvcc, for a GPU) and
`build_emulated` (the host compiler with tests/gpu/emulation/ first on the
include path: CUDA emulated on the CPU, for machines without a GPU). A
`Harness` calls either through buffers of a `Memory`: `HostMemory` (NumPy
arrays, for the emulation) or `TorchMemory` (PyTorch buffers).
Buffers are raw bytes with a NumPy dtype and shape beside them, so 16-bit
types need nothing from the framework.
"""

import ctypes
import os
import subprocess
import weakref

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "tests", "gpu", "harness.cu")
EMULATION = os.path.join(ROOT, "tests", "gpu", "emulation")
KERNELS = os.path.join(ROOT, "tf_xent_ops", "cc", "kernels")
# What the harness includes: the shared headers and the CUDA ones.
HEADERS = sorted(
    os.path.join(KERNELS, name)
    for name in os.listdir(KERNELS)
    if name in ("xent_functor.h", "xent_row_math.h") or name.endswith(".cu.h")
)


def _newer_than(target, sources):
    return os.path.exists(target) and all(
        os.path.getmtime(target) >= os.path.getmtime(s) for s in sources
    )


def _build(cmd, out, sources):
    if _newer_than(out, sources):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    subprocess.run(cmd + ["-o", out + ".tmp"], check=True)
    os.replace(out + ".tmp", out)
    return out


def build_cuda(out, arch="sm_90"):
    """nvcc build for a GPU of compute capability `arch`."""
    cmd = ["nvcc", "-x", "cu", "-std=c++17", "-O3", "-I" + ROOT, "--expt-relaxed-constexpr"]
    cmd += ["-shared", "-Xcompiler", "-fPIC", f"-arch={arch}", SOURCE]
    return _build(cmd, out, [SOURCE] + HEADERS)


def build_emulated(out, sanitize=False, source=SOURCE):
    """Host-compiler build of `source` (the harness by default) against the
    CUDA emulation; with AddressSanitizer and UndefinedBehaviorSanitizer if
    `sanitize` (load it with the runtimes preloaded: `sanitizer_preload`)."""
    api = os.path.join(EMULATION, "emulation_api.cc")
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O2", "-g", "-fPIC", "-shared"]
    cmd += ["-I" + EMULATION, "-I" + ROOT, "-Wall", "-Werror", "-Wno-unknown-pragmas"]
    if sanitize:
        cmd += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        cmd += ["-fno-omit-frame-pointer"]
    cmd += ["-x", "c++", source, api]
    headers = [os.path.join(EMULATION, h) for h in os.listdir(EMULATION)]
    return _build(cmd, out, [source] + HEADERS + headers)


def sanitizer_preload():
    """LD_PRELOAD value with the host compiler's ASan and UBSan runtimes, or
    None if it has none."""
    paths = []
    for lib in ("libasan.so", "libubsan.so"):
        path = subprocess.run(
            [os.environ.get("CXX", "g++"), f"-print-file-name={lib}"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not os.path.isabs(path):
            return None
        paths.append(path)
    return " ".join(paths)


class HostMemory:
    """Buffers in host memory: the emulated harness's 'device'."""

    stream = None

    def put(self, array, offset_bytes=0):
        """A copy of `array` on the device, starting `offset_bytes` past a
        16-byte boundary (to test rows that are not). It ends where its
        allocation ends, so that AddressSanitizer sees a read past the end."""
        array = np.ascontiguousarray(array)
        raw = np.empty(array.nbytes + offset_bytes, np.uint8)
        if raw.ctypes.data % 16:  # malloc's blocks are 16-byte aligned, but in case
            raw = np.empty(array.nbytes + 16 + offset_bytes, np.uint8)
        start = (-raw.ctypes.data) % 16 + offset_bytes
        view = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
        view[...] = array
        return view

    def full(self, shape, dtype, value):
        return self.put(np.full(shape, value, dtype))

    def get(self, buffer):
        return np.array(buffer)

    def pointer(self, buffer):
        return ctypes.c_void_p(buffer.ctypes.data)

    def damaged_guards(self):
        """None: buffers end where their allocations do (AddressSanitizer's
        check of bounds)."""
        return []


class TorchMemory:
    """Buffers held by PyTorch on `device` (raw bytes; dtype and shape kept
    beside them): GPU memory for the nvcc build, or host memory, which the
    emulated build takes too (bench/bench_gpu.py --emulated).

    Each buffer sits between two guard bands of `guard_bytes` bytes of 0xFF
    (NaN in every float type, -1 in every integer type): a kernel that reads
    past a buffer reads NaN or a bad label, one that writes past it changes a
    guard, which `damaged_guards` reports. Where no memory checker can run
    (gVisor) that is the check of bounds on the GPU; under compute-sanitizer,
    guard_bytes=0 lets each buffer end where its allocation does.
    """

    GUARD_BYTE = 0xFF

    def __init__(self, device="cuda", guard_bytes=256):
        import torch

        self.torch, self.device, self.guard_bytes = torch, device, guard_bytes
        self.stream = None
        if device == "cuda":
            self.stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._live = weakref.WeakSet()
        self._damaged = []

    class Buffer:
        def __init__(self, data, dtype, shape, guards=()):
            self.data, self.dtype, self.shape, self.guards = data, dtype, shape, guards

        def __str__(self):
            return f"{self.dtype}{list(self.shape)}"

    def put(self, array, offset_bytes=0):
        """A copy of `array`, starting `offset_bytes` past a 16-byte boundary
        (guard_bytes is a multiple of 16; PyTorch's allocations are aligned)."""
        array = np.ascontiguousarray(array)
        front = self.guard_bytes + offset_bytes
        raw = self.torch.full(
            (front + array.nbytes + self.guard_bytes,),
            self.GUARD_BYTE,
            dtype=self.torch.uint8,
            device=self.device,
        )
        data = raw[front : front + array.nbytes]
        data.copy_(self.torch.from_numpy(array.reshape(-1).view(np.uint8)))
        guards = (raw[:front], raw[front + array.nbytes :]) if self.guard_bytes else ()
        buffer = self.Buffer(data, array.dtype, array.shape, guards)
        self._live.add(buffer)
        return buffer

    def full(self, shape, dtype, value):
        return self.put(np.full(shape, value, dtype))

    def get(self, buffer):
        self._check_guards(buffer)
        return buffer.data.cpu().numpy().view(buffer.dtype).reshape(buffer.shape)

    def _check_guards(self, buffer):
        if any(bool((g != self.GUARD_BYTE).any()) for g in buffer.guards):
            self._damaged.append(str(buffer))

    def damaged_guards(self):
        """The buffers written outside of since the last call: those read
        back (`get`) and those still alive."""
        for buffer in list(self._live):
            self._check_guards(buffer)
        damaged, self._damaged = sorted(set(self._damaged)), []
        return damaged

    def pointer(self, buffer):
        return ctypes.c_void_p(buffer.data.data_ptr())


DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}


class KernelParams(ctypes.Structure):
    """The parameters of a call, as harness.cu's HarnessParams lays them out."""

    _fields_ = [
        ("num_rows", ctypes.c_int64),
        ("num_classes", ctypes.c_int64),
        ("ignore_class", ctypes.c_int64),
        ("use_ignore_class", ctypes.c_int32),
        ("from_logits", ctypes.c_int32),
        ("label_smoothing", ctypes.c_double),
        ("epsilon", ctypes.c_double),
        ("z_loss", ctypes.c_double),
        ("logit_soft_cap", ctypes.c_double),
    ]

    @classmethod
    def make(
        cls,
        n,
        c,
        from_logits,
        label_smoothing=0.0,
        epsilon=1e-7,
        ignore_class=None,
        z_loss=0.0,
        logit_soft_cap=None,
    ):
        """The coefficients as the op passes them: in the loss type (the
        caller rounds them to float32 for every type but float64)."""
        return cls(
            num_rows=n,
            num_classes=c,
            ignore_class=ignore_class or 0,
            use_ignore_class=int(ignore_class is not None),
            from_logits=int(from_logits),
            label_smoothing=label_smoothing,
            epsilon=epsilon,
            z_loss=z_loss,
            logit_soft_cap=logit_soft_cap or 0.0,
        )


def _code(dtype):
    """A DTYPE_CODES key, or already a code."""
    return DTYPE_CODES.get(dtype, dtype)


class Harness:
    """The functors of one build of the harness, over buffers of `memory`.

    Each call launches one functor on memory.stream and raises if the
    launch failed (with the emulation's message where there is one).
    """

    def __init__(self, library_path, memory):
        self.lib = ctypes.CDLL(library_path)
        self.memory = memory
        self.emulated = hasattr(self.lib, "tfxent_emulation_take_error")
        self.stats_per_row = self.lib.tfxent_dense_stats_per_row()

    def set_seed(self, seed):
        """The emulation's fiber order (no effect on a GPU)."""
        if self.emulated:
            self.lib.tfxent_emulation_set_seed(ctypes.c_uint64(seed))

    def _check(self, name, code):
        message = ""
        if self.emulated:
            buffer = ctypes.create_string_buffer(4096)
            self.lib.tfxent_emulation_take_error(buffer, len(buffer))
            message = buffer.value.decode()
        if code != 0 or message:
            raise RuntimeError(f"{name}: CUDA error {code} {message}".strip())

    def _call(self, name, leading, *buffers):
        pointers = tuple(self.memory.pointer(b) for b in buffers)
        self._check(name, getattr(self.lib, name)(*leading, *pointers, self.memory.stream))

    @staticmethod
    def leading_args(dtype, params, index_bits=None):
        """The C calls' arguments before the buffers: the dtype, the label
        width (sparse calls only) and a pointer to `params` (a KernelParams,
        which the caller keeps alive)."""
        bits = () if index_bits is None else (index_bits,)
        return (_code(dtype), *bits, ctypes.byref(params))

    def sparse_forward(self, dtype, index_bits, params, predictions, labels, loss, normalizer):
        leading = self.leading_args(dtype, params, index_bits)
        self._call("tfxent_sparse_forward", leading, predictions, labels, loss, normalizer)

    def sparse_backward(self, dtype, index_bits, params, predictions, labels, normalizer,
                        grad_loss, grad_predictions):  # fmt: skip
        leading = self.leading_args(dtype, params, index_bits)
        buffers = (predictions, labels, normalizer, grad_loss, grad_predictions)
        self._call("tfxent_sparse_backward", leading, *buffers)

    def dense_forward(self, dtype, params, predictions, labels, loss, row_stats):
        leading = self.leading_args(dtype, params)
        self._call("tfxent_dense_forward", leading, predictions, labels, loss, row_stats)

    def dense_backward(self, dtype, params, predictions, labels, row_stats, grad_loss,
                       grad_predictions):  # fmt: skip
        leading = self.leading_args(dtype, params)
        buffers = (predictions, labels, row_stats, grad_loss, grad_predictions)
        self._call("tfxent_dense_backward", leading, *buffers)

    def dense_labels_backward(self, dtype, params, predictions, row_stats, grad_loss, grad_labels):
        leading = self.leading_args(dtype, params)
        buffers = (predictions, row_stats, grad_loss, grad_labels)
        self._call("tfxent_dense_labels_backward", leading, *buffers)
