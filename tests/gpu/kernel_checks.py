"""Correctness of the GPU functors against float64 references.

Runs every functor of a harness build (tests/gpu/harness.py: nvcc on a GPU,
or the CPU emulation of CUDA) on fresh random inputs with special rows, and
compares with tests/reference.py:
  - losses, gradients with respect to the predictions (and, dense, to the
    labels) against float64 references computed from the rounded inputs;
  - every output element written: each output is computed twice, into
    buffers poisoned with NaN and with 7, and must be bitwise equal, which
    also checks that results are reproducible run to run;
  - the backward writing into the predictions' own buffer (as TensorFlow
    lets it) gives bitwise the out-of-place result;
  - special rows: logits of +-1e4, -inf without (and with) target mass, NaN,
    rows of equal logits, all-but-one -inf; clipped and NaN probabilities;
    ignored rows (0 loss, 0 gradient); sparse labels outside [0, C) (NaN loss,
    0 gradient, nothing read through them); rows that start off a 16-byte
    boundary; int32 and int64 labels;
  - no write outside the buffers (on a GPU, guard bands around each buffer;
    on the emulation, AddressSanitizer).

    python tests/gpu/kernel_checks.py --emulated          # CPU emulation
    python bench/bench_gpu.py --check                     # on a GPU
"""

import argparse
import dataclasses
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as gpu_harness  # noqa: E402
import reference as ref  # noqa: E402

DTYPES = ("float16", "bfloat16", "float32", "float64")
IGNORE_CLASS = -1
POISONS = (np.nan, 7.0)
# |out - ref| <= TOLERANCE * scale + FLOOR, element-wise (scale: the size of
# the terms the reference is the difference of; FLOOR: the output type's
# resolution near zero, where flushed denormals and rounding live).
# 16-bit tolerances are an ulp (the reference rounds to the nearer neighbour,
# the kernel may round a float32 value on the other side of the midpoint).
GRADIENT_TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}
GRADIENT_FLOOR = {"float16": 6e-8, "bfloat16": 1e-30, "float32": 1e-30, "float64": 1e-300}


@dataclasses.dataclass(frozen=True)
class Case:
    sparse: bool
    dtype: str
    from_logits: bool
    label_smoothing: float
    num_rows: int
    num_classes: int
    index_bits: int = 64
    offset_bytes: int = 0  # Rows start this far past a 16-byte boundary.
    z_loss: float = 0.0
    logit_soft_cap: float = 0.0  # 0: none

    def __str__(self):
        kind = "sparse" if self.sparse else "dense"
        kind += " logits" if self.from_logits else " probs"
        extra = f" int{self.index_bits}" if self.sparse else ""
        extra += f" +{self.offset_bytes}B" if self.offset_bytes else ""
        extra += f" z_loss={self.z_loss}" if self.z_loss else ""
        extra += f" cap={self.logit_soft_cap}" if self.logit_soft_cap else ""
        return (
            f"{kind} {self.dtype} ls={self.label_smoothing} "
            f"{self.num_rows}x{self.num_classes}{extra}"
        )


# The z-loss and soft cap of the logits cases that have them: z-loss alone at
# every other shape, with a cap at the others.
Z_LOSS, LOGIT_SOFT_CAP = 1e-3, 5.0


def grid(shapes, dtypes=DTYPES, smoothing=(0.0, 0.1)):
    """Every kind of case at each (num_rows, num_classes) of `shapes`: sparse
    and dense, logits and probabilities, and logits with a z-loss (and a soft
    cap at every other shape); 16-bit rows off a 16-byte boundary and int32
    labels at every other shape."""
    cases = []
    for i, (n, c) in enumerate(shapes):
        bits = 32 if i % 2 else 64
        cap = 0.0 if i % 2 else LOGIT_SOFT_CAP
        for dtype in dtypes:
            offset = 2 if i % 2 and dtype in ("float16", "bfloat16") else 0
            for sparse in (True, False):
                for from_logits in (True, False):
                    for ls in smoothing:
                        cases.append(Case(sparse, dtype, from_logits, ls, n, c, bits, offset))
                cases.append(
                    Case(sparse, dtype, True, smoothing[-1], n, c, bits, offset, Z_LOSS, cap)
                )
    return cases


def _rounded(array, dtype):
    return np.asarray(array).astype(ref.NUMPY_DTYPES[dtype])


def _special_logits(rng, z, labels, dense_labels):
    """Rows that stress the reductions, each on its own row (while rows last).
    Labels (dense ones if not None) are moved so that -inf entries carry
    target mass only where said."""
    if dense_labels is None:
        dense_labels = np.zeros_like(z[:0])  # nothing to move
    n, c = z.shape
    if n > 0:
        z[0] = 1e4  # all equal and large
    if n > 1 and c > 1:
        z[1, rng.integers(c)] = -1e4
        z[1, rng.integers(c)] = 1e4  # one class far above the rest
    if n > 2 and c > 2:
        k = rng.integers(c)
        z[2, (np.arange(c) != k) & (rng.random(c) < 0.5)] = -np.inf
        labels[2] = k  # -inf only off the label: no target mass there at ls = 0
        _one_hot_row(dense_labels, 2, k)
    if n > 5:
        z[5, rng.integers(c)] = np.nan
    if n > 6 and c > 1:
        k = rng.integers(c)
        z[6] = -np.inf
        z[6, k] = rng.standard_normal()
        labels[6] = k
        _one_hot_row(dense_labels, 6, k)
    if n > 7:
        z[7] *= 30.0
    if n > 9:
        z[9] = -np.inf  # no finite logit: NaN loss, log-sum-exp and gradient
    return z


def _one_hot_row(y, r, k):
    if r < len(y):
        y[r] = 0.0
        y[r, k] = 1.0


def _special_probabilities(rng, p, labels):
    n, c = p.shape
    if n > 0:
        p[0] = 0.0
        p[0, labels[0]] = 1.0  # clipped at both ends
    if n > 1:
        p[1] = 1.0 / c
    if n > 2 and c > 2:
        p[2] = 0.0
        p[2, rng.choice(c, 2, replace=False)] = (0.25, 0.75)
    if n > 5:
        p[5, rng.integers(c)] = np.nan
    return p


def make_inputs(rng, case):
    """Predictions (in the case's dtype), sparse labels (with an ignored row
    and a row labelled outside [0, C)), dense labels for dense cases (soft,
    some one-hot, one all-zero row; else None) and the upstream gradient."""
    n, c = case.num_rows, case.num_classes
    labels = rng.integers(0, c, size=n)
    dense_labels = None
    if not case.sparse:
        dense_labels = ref.soft_labels(rng, (n, c))
        one_hot_rows = rng.random(n) < 0.3
        dense_labels[one_hot_rows] = ref.one_hot(labels[one_hot_rows], c)
    if case.from_logits:
        predictions = _special_logits(rng, ref.logits(rng, (n, c), "float64"), labels, dense_labels)
    else:
        predictions = _special_probabilities(rng, ref.probabilities(rng, (n, c), "float64"), labels)
    if n > 3:
        labels[3] = IGNORE_CLASS
    if n > 4:
        labels[4] = rng.choice([c, c + 1000, -2, np.iinfo(np.int32).max])
        if dense_labels is not None:
            dense_labels[4] = 0.0
    grad_loss = rng.uniform(0.5, 2.0, size=n)
    if n > 8:
        grad_loss[8] = 0.0
    return _rounded(predictions, case.dtype), labels, dense_labels, grad_loss


def _acc_dtype(dtype):
    return np.float64 if dtype == "float64" else np.float32


class _Failures:
    def __init__(self):
        self.messages = []

    def close(self, what, out, expected, rtol, atol):
        out = np.asarray(out, np.float64)
        try:
            np.testing.assert_allclose(out, expected, rtol=rtol, atol=atol)
        except AssertionError as e:
            self.messages.append(f"{what}: {str(e).strip().splitlines()[2:6]}")

    def within(self, what, out, gradient, dtype):
        """out (of `dtype`) against the reference rounded to `dtype` (where it
        overflows, to inf), element-wise within the tolerance of its scale."""
        out = np.asarray(out, np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            expected = _rounded(gradient.value, dtype).astype(np.float64)
            bound = GRADIENT_TOLERANCE[dtype] * gradient.scale + GRADIENT_FLOOR[dtype]
            bad = ~((np.abs(out - expected) <= bound) | (out == expected))
        bad &= ~(np.isnan(out) & np.isnan(expected))
        if bad.any():
            r, k = np.argwhere(bad)[0]
            self.messages.append(
                f"{what}: {bad.sum()} of {bad.size} elements off, first [{r}, {k}]: "
                f"{out[r, k]!r} vs {expected[r, k]!r} (scale {gradient.scale[r, k]:.3g})"
            )

    def equal(self, what, a, b):
        if a.tobytes() != b.tobytes():
            diff = np.flatnonzero(a.view(np.uint8) != b.view(np.uint8))
            self.messages.append(f"{what}: not bitwise equal ({diff.size} bytes differ)")


class _Runner:
    """One case's buffers and calls."""

    def __init__(self, h, case, inputs):
        self.h, self.m, self.case = h, h.memory, case
        self.predictions, self.labels, self.dense_labels, self.grad_loss = inputs
        self.acc = _acc_dtype(case.dtype)
        n, c = case.num_rows, case.num_classes
        self.x = self.m.put(self.predictions, case.offset_bytes)
        index_dtype = np.int32 if case.index_bits == 32 else np.int64
        self.y = self.m.put(self.labels.astype(index_dtype))
        if not case.sparse:
            self.t = self.m.put(self.dense_labels.astype(self.acc))
        self.g = self.m.put(self.grad_loss.astype(self.acc))
        ignore_class = IGNORE_CLASS if case.sparse else None
        # The coefficients as the op passes them: in the loss type.
        coefficient = functools.partial(ref.as_coefficient, dtype=self.acc)
        self.params = gpu_harness.KernelParams.make(
            n,
            c,
            case.from_logits,
            coefficient(case.label_smoothing),
            coefficient(ref.EPSILON),
            ignore_class,
            coefficient(case.z_loss),
            coefficient(case.logit_soft_cap),
        )
        self.dense_args = (case.dtype, self.params)
        self.sparse_args = (case.dtype, case.index_bits, self.params)

    def forward(self, poison):
        n = self.case.num_rows
        loss = self.m.full((n,), self.acc, poison)
        if self.case.sparse:
            stats = self.m.full((n,), self.acc, poison)
            self.h.sparse_forward(*self.sparse_args, self.x, self.y, loss, stats)
        else:
            stats = self.m.full((n, self.h.stats_per_row), self.acc, poison)
            self.h.dense_forward(*self.dense_args, self.x, self.t, loss, stats)
        return loss, stats

    def backward(self, stats, poison=None, in_place=False):
        """Into a poisoned buffer, or into a copy of the predictions."""
        x = self.m.put(self.predictions, self.case.offset_bytes) if in_place else self.x
        out = x if in_place else self.m.full(self.predictions.shape, self.predictions.dtype, poison)
        if self.case.sparse:
            self.h.sparse_backward(*self.sparse_args, x, self.y, stats, self.g, out)
        else:
            self.h.dense_backward(*self.dense_args, x, self.t, stats, self.g, out)
        return out

    def labels_backward(self, stats, poison):
        out = self.m.full(self.dense_labels.shape, self.acc, poison)
        self.h.dense_labels_backward(*self.dense_args, self.x, stats, self.g, out)
        return out


def run_case(h, rng, case):
    """The failures (strings) of one case; empty if it passes."""
    inputs = make_inputs(rng, case)
    predictions, labels, dense_labels, grad_loss = inputs
    run = _Runner(h, case, inputs)
    f = _Failures()
    m = h.memory

    outputs = [run.forward(poison) for poison in POISONS]
    loss, stats = (m.get(b) for b in outputs[0])
    for name, i in (("loss", 0), ("statistics", 1)):
        f.equal(f"{name} (poisoned NaN vs 7)", m.get(outputs[0][i]), m.get(outputs[1][i]))
    grads = [m.get(run.backward(outputs[0][1], poison)) for poison in POISONS]
    f.equal("gradient (poisoned NaN vs 7)", grads[0], grads[1])
    f.equal("gradient in place vs out of place", m.get(run.backward(outputs[0][1], in_place=True)),
            grads[0])  # fmt: skip
    if not case.sparse:
        label_grads = [m.get(run.labels_backward(outputs[0][1], p)) for p in POISONS]
        f.equal("labels gradient (poisoned NaN vs 7)", label_grads[0], label_grads[1])

    args = (case.from_logits, case.label_smoothing)
    options = dict(z_loss=case.z_loss, logit_soft_cap=case.logit_soft_cap)
    rtol, atol = ref.tolerance(case.dtype)
    c = case.num_classes
    bad = (labels != IGNORE_CLASS) & ((labels < 0) | (labels >= c))
    ignored = labels == IGNORE_CLASS
    if case.from_logits:
        lse = ref.log_sum_exp(predictions, logit_soft_cap=case.logit_soft_cap)
        if case.sparse:
            lse = np.where(ignored, 0.0, np.where(bad, np.nan, lse))
        f.close("log-sum-exp", stats if case.sparse else stats[:, 0], lse, rtol, atol)
    if case.sparse:
        safe = np.where(bad, IGNORE_CLASS, labels)
        expected = np.where(
            bad, np.nan, ref.sparse(safe, predictions, *args, IGNORE_CLASS, **options)
        )
        f.close("loss", loss, expected, rtol, atol)
        gradient = ref.sparse_gradient(safe, predictions, *args, IGNORE_CLASS, **options)
        g = grad_loss[:, None]
        f.within("gradient", grads[0], ref.Gradient(g * gradient.value, g * gradient.scale),
                 case.dtype)  # fmt: skip
        if (grads[0][bad | ignored] != 0).any():
            f.messages.append("gradient: rows with a bad or ignored label are not all zero")
    else:
        f.close("loss", loss, ref.dense(dense_labels, predictions, *args, **options), rtol, atol)
        wrt_p, wrt_y = ref.dense_gradients(dense_labels, predictions, *args, **options)
        g = grad_loss[:, None]
        expected = ref.Gradient(g * wrt_p.value, g * wrt_p.scale)
        f.within("gradient", grads[0], expected, case.dtype)
        if case.from_logits:
            _check_single_labels(f, rng, run, stats, dense_labels, expected)
        acc = "float64" if case.dtype == "float64" else "float32"
        f.within("labels gradient", label_grads[0],
                 ref.Gradient(g * wrt_y.value, g * wrt_y.scale), acc)  # fmt: skip
    for buffer in m.damaged_guards():
        f.messages.append(f"written outside its buffer: {buffer}")
    return f.messages


def _check_single_labels(f, rng, run, stats, dense_labels, expected):
    """Dense logits: the forward names each row's only nonzero label (class
    and value, or -1 and 0), the backward then reads no labels for the row;
    statistics that name no class make it read them (never out of the row)."""
    nonzero = dense_labels != 0
    single = nonzero.sum(1) == 1
    j = np.where(single, nonzero.argmax(1), -1)
    y_j = np.where(single, dense_labels[np.arange(len(j)), np.maximum(j, 0)], 0.0)
    f.equal("single label classes", stats[:, 2].astype(np.float64), j.astype(np.float64))
    f.equal("single label values", stats[:, 3].astype(np.float64), y_j.astype(np.float64))
    tampered = stats.copy()
    c = dense_labels.shape[1]
    tampered[:, 2] = rng.choice([np.nan, -1.0, -7.0, c, c + 0.5, 1e30, np.inf], size=len(j))
    grad = run.m.get(run.backward(run.m.put(tampered), np.nan))
    f.within("gradient from statistics that name no class", grad, expected, run.case.dtype)


def check_a_single_label_beyond_float_integers(h):
    """The failures of a dense logits row of 2^24 + 6 classes, one-hot at
    2^24 + 3, which float32 rounds to 2^24 + 4: the forward must not name that
    class as the row's single label (statistics hold it as a float), and the
    backward must put the label's -1 on its own class."""
    c, k = 2**24 + 6, 2**24 + 3
    x = np.zeros((1, c), np.float32)
    x[0, k], x[0, k + 1] = 5.0, 3.0
    y = np.zeros((1, c), np.float32)
    y[0, k] = 1.0
    m = h.memory
    params = gpu_harness.KernelParams.make(1, c, True)
    predictions, labels = m.put(x), m.put(y)
    loss = m.full((1,), np.float32, np.nan)
    stats = m.full((1, h.stats_per_row), np.float32, np.nan)
    h.dense_forward("float32", params, predictions, labels, loss, stats)
    grad = m.full((1, c), np.float32, np.nan)
    grad_loss = m.put(np.ones(1, np.float32))
    h.dense_backward("float32", params, predictions, labels, stats, grad_loss, grad)
    lse = np.log(np.exp(5.0) + np.exp(3.0) + (c - 2))
    expected = [np.exp(5.0 - lse) - 1.0, np.exp(3.0 - lse)]
    f = _Failures()
    f.close("loss", m.get(loss), [lse - 5.0], 1e-6, 0.0)
    f.close("gradient at the label and after it", m.get(grad)[0, k : k + 2], expected, 0, 1e-6)
    return f.messages


def run(h, cases, seed=None, log=print):
    """Runs `cases`, then check_a_single_label_beyond_float_integers; returns
    the number that failed. Inputs are drawn from `seed` (fresh if None;
    printed, so a failure can be replayed)."""
    seed = int(np.random.SeedSequence().entropy % 2**63) if seed is None else seed
    log(f"kernel checks: {len(cases) + 1} cases, seed {seed}")
    rng = np.random.default_rng(seed)
    h.set_seed(seed)
    failed = 0
    checks = [(case, functools.partial(run_case, h, rng, case)) for case in cases]
    checks.append(
        ("dense one-hot row of 2^24 + 6 classes", functools.partial(
            check_a_single_label_beyond_float_integers, h))
    )  # fmt: skip
    for name, check in checks:
        start = time.perf_counter()
        messages = check()
        failed += bool(messages)
        status = "FAIL" if messages else "ok  "
        log(f"{status} {name}  ({time.perf_counter() - start:.2f} s)")
        for message in messages:
            log(f"       {message}")
    log(f"kernel checks: {failed} of {len(checks)} cases failed (seed {seed})")
    return failed


# Shapes the CPU emulation runs in CI, a few rows each: C crosses the
# kernels' boundaries (a warp's lanes, 16-byte pieces, the largest rows a warp
# computes, several rounds of pieces in flight per thread, odd C).
EMULATED_SHAPES = (
    (9, 2),
    (10, 7),
    (9, 33),
    (12, 256),
    (9, 1000),
    (10, 2048),
    (9, 2051),
    (5, 16397),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulated", action="store_true", help="CUDA emulated on the CPU")
    parser.add_argument(
        "--sanitize", action="store_true", help="the emulation under AddressSanitizer and UBSan"
    )
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    if not args.emulated:
        parser.error("on a GPU, run bench/bench_gpu.py --check")
    name = "-".join(["emulated"] + ["sanitized"] * args.sanitize)
    if args.sanitize and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        # Python is not instrumented: the runtimes must be loaded first.
        preload = gpu_harness.sanitizer_preload()
        if preload is None:
            sys.exit("the host compiler has no AddressSanitizer runtime")
        env = dict(os.environ, LD_PRELOAD=preload)
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1"
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    library = gpu_harness.build_emulated(
        os.path.join(gpu_harness.ROOT, "build", name, "libtfxent_harness.so"),
        args.sanitize,
    )
    h = gpu_harness.Harness(library, gpu_harness.HostMemory())
    sys.exit(1 if run(h, grid(EMULATED_SHAPES), args.seed) else 0)


if __name__ == "__main__":
    main()
