"""GPU correctness and speed of the CUDA functors, without TensorFlow.

For the lent H100 machine (PyTorch and nvcc, no TensorFlow). Builds
tests/gpu/harness.cu (the op library's own xent_functor_gpu.cu.h behind a C
ABI), then:
  --check   compares with float64 references computed by PyTorch on the GPU,
            on fresh random inputs, outputs poisoned before each run: every
            dtype, sparse and dense, logits and probabilities, smoothing,
            ignored rows, extreme rows (+-1e4, -inf), C from 2 to 256k;
  --bench   times sparse-logits forward and forward+backward with CUDA events
            (median of many runs) next to torch.nn.functional.cross_entropy
            and Liger-Kernel's cross entropy (if importable), against the copy
            bandwidth measured in the same run; writes bench/results/gpu_results.md.

    python bench/bench_gpu.py --check --bench
"""

import argparse
import ctypes
import os
import statistics
import subprocess

import torch
from torch.nn import functional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "build", "harness", "libtfxent_harness.so")
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
EPS = 1e-7


def build_harness():
    os.makedirs(os.path.dirname(LIB), exist_ok=True)
    arch = os.environ.get("TFXENT_CUDA_ARCH", "sm_90")
    cmd = ["nvcc", "-x", "cu", "-std=c++17", "-O3", "-I" + ROOT, "--expt-relaxed-constexpr"]
    cmd += ["-shared", "-Xcompiler", "-fPIC", f"-arch={arch}"]
    subprocess.run(cmd + [os.path.join(ROOT, "tests/gpu/harness.cu"), "-o", LIB], check=True)
    return ctypes.CDLL(LIB)


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class Harness:
    def __init__(self, lib):
        self.lib = lib
        for name in ("tfxent_sparse_forward", "tfxent_sparse_backward"):
            getattr(lib, name).restype = ctypes.c_int
        self.stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def _ok(self, code):
        if code != 0:
            raise RuntimeError(f"CUDA error {code}")

    def sparse(self, x, y, from_logits=True, ls=0.0, ignore=None):
        n, c = x.shape
        loss = torch.full((n,), float("nan"), dtype=acc_dtype(x.dtype), device=x.device)
        lse = torch.full_like(loss, float("nan"))
        common = (DTYPE_CODE[x.dtype], n, c, int(from_logits), ctypes.c_float(ls))
        common += (ctypes.c_float(EPS), int(ignore is not None), ignore or 0)
        self._ok(
            self.lib.tfxent_sparse_forward(
                *common, ptr(x), ptr(y), ptr(loss), ptr(lse), self.stream
            )
        )
        return loss, lse, common

    def sparse_grad(self, x, y, lse, g, common, out=None):
        out = torch.full_like(x, 7.0) if out is None else out  # poisoned
        self._ok(
            self.lib.tfxent_sparse_backward(
                *common, ptr(x), ptr(y), ptr(lse), ptr(g), ptr(out), self.stream
            )
        )
        return out

    def dense(self, x, t, from_logits=True, ls=0.0):
        n, c = x.shape
        loss = torch.full((n,), float("nan"), dtype=acc_dtype(x.dtype), device=x.device)
        per_row = self.lib.tfxent_dense_stats_per_row()
        stats = torch.full((n, per_row), float("nan"), dtype=acc_dtype(x.dtype), device=x.device)
        common = (
            DTYPE_CODE[x.dtype],
            n,
            c,
            int(from_logits),
            ctypes.c_float(ls),
            ctypes.c_float(EPS),
        )
        self._ok(
            self.lib.tfxent_dense_forward(
                *common, ptr(x), ptr(t), ptr(loss), ptr(stats), self.stream
            )
        )
        g = torch.ones(n, dtype=loss.dtype, device=x.device)
        grad = torch.full_like(x, 7.0)
        self._ok(
            self.lib.tfxent_dense_backward(
                *common, ptr(x), ptr(t), ptr(stats), ptr(g), ptr(grad), self.stream
            )
        )
        return loss, grad


def reference(x, t, from_logits, ls, sparse_probs):
    """float64 loss per row and its gradient by autograd (t: dense targets)."""
    x = x.double().requires_grad_(True)
    c = x.shape[1]
    t = t.double() * (1 - ls) + ls / c
    if from_logits:
        z = x
    elif sparse_probs:
        z = torch.log(torch.clamp(x, EPS, 1 - EPS))
    else:
        q = torch.clamp(x / x.sum(1, keepdim=True), EPS, 1 - EPS)
        loss = -(t * torch.log(q)).sum(1)
        loss.sum().backward()
        return loss.detach(), x.grad
    loss = (t * (torch.logsumexp(z, 1, keepdim=True) - z)).sum(1)
    loss.sum().backward()
    return loss.detach(), x.grad


def check(h):
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    failures = 0
    for c in (2, 1000, 32000, 128256, 256000):
        n = max(4, min(4096, 2**25 // c))
        for dtype in DTYPE_CODE:
            for from_logits in (True, False):
                for ls in (0.0, 0.1):
                    x = torch.randn(n, c, device="cuda", generator=gen) * 4
                    if not from_logits:
                        x = torch.softmax(x, 1)
                    else:
                        x[0, :] = 1e4
                        x[1, 0] = -1e4
                        x[2, 1] = float("-inf")
                    x = x.to(dtype)
                    y = torch.randint(0, c, (n,), device="cuda", generator=gen)
                    y[2] = 0 if c > 1 else y[2]
                    y[3] = -1  # ignored
                    loss, lse, common = h.sparse(x, y, from_logits, ls, ignore=-1)
                    grad = h.sparse_grad(x, y, lse, torch.ones_like(loss), common)
                    t = functional.one_hot(y.clamp(min=0), c)
                    ref_loss, ref_grad = reference(x, t, from_logits, ls, sparse_probs=True)
                    ref_loss[3] = 0
                    ref_grad[3] = 0
                    tol = 1e-9 if dtype == torch.float64 else 1e-4
                    gtol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, tol)
                    bad = not torch.allclose(loss.double(), ref_loss, rtol=tol, atol=tol)
                    bad |= not torch.allclose(grad.double(), ref_grad, rtol=gtol, atol=gtol)
                    again, _, _ = h.sparse(x, y, from_logits, ls, ignore=-1)
                    bad |= not torch.equal(again, loss)  # bitwise reproducible
                    failures += bad
                    status = "FAIL" if bad else "ok  "
                    print(f"{status} sparse C={c} {dtype} logits={from_logits} ls={ls}")
    # A label outside [0, C): NaN loss, zero gradient, nothing read out of bounds.
    x = torch.zeros(2, 3, device="cuda")
    y = torch.tensor([0, 7], device="cuda")
    loss, lse, common = h.sparse(x, y)
    grad = h.sparse_grad(x, y, lse, torch.ones_like(loss), common)
    bad_row_ok = bool(torch.isnan(loss[1])) and bool((grad[1] == 0).all())
    print(f"{'ok  ' if bad_row_ok else 'FAIL'} out-of-range label -> {loss.tolist()}")
    assert failures == 0 and bad_row_ok, f"{failures} failing cases"


def time_ms(fn, runs=50):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs():
    """Read + write bytes per second of a 1 GiB device-to-device copy."""
    buffer = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    return 2 * buffer.numel() / time_ms(buffer.clone, 10) / 1e6


def bench(h):
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        liger_cross_entropy = None
    copy_gbs = copy_bandwidth_gbs()
    lines = [
        f"Copy bandwidth measured in the run: {copy_gbs:.0f} GB/s.",
        "",
        "| N x C | dtype | op | ours ms | torch ms | liger ms | ours x floor |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for n, c in ((8192, 32000), (8192, 128256), (4096, 256000)):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(n, c, device="cuda", dtype=dtype)
            y = torch.randint(0, c, (n,), device="cuda")
            g = torch.ones(n, device="cuda")
            elem = x.element_size()
            fwd = time_ms(lambda x=x, y=y: h.sparse(x, y))
            out = torch.empty_like(x)

            def fwd_bwd(x=x, y=y, g=g, out=out):
                loss, lse, common = h.sparse(x, y)
                h.sparse_grad(x, y, lse, g, common, out=out)

            both = time_ms(fwd_bwd)
            xt = x.detach().requires_grad_(True)
            t_fwd = time_ms(lambda xt=xt, y=y: functional.cross_entropy(xt, y))
            t_both = time_ms(lambda xt=xt, y=y: functional.cross_entropy(xt, y).backward())
            l_both = float("nan")
            if liger_cross_entropy is not None:
                l_both = time_ms(lambda xt=xt, y=y: liger_cross_entropy(xt, y).backward())
            for op, ours, torch_ms, liger_ms, nbytes in (
                ("fwd", fwd, t_fwd, float("nan"), n * c * elem),
                ("fwd+bwd", both, t_both, l_both, 2 * n * c * elem),
            ):
                floor = nbytes / copy_gbs / 1e6
                line = (
                    f"| {n} x {c} | {str(dtype)[6:]} | {op} | {ours:.2f} | {torch_ms:.2f}"
                    f" | {liger_ms:.2f} | {ours / floor:.2f} |"
                )
                print(line, flush=True)
                lines.append(line)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "gpu_results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--bench", action="store_true")
    args = parser.parse_args()
    h = Harness(build_harness())
    if args.check:
        check(h)
    if args.bench:
        bench(h)


if __name__ == "__main__":
    main()
