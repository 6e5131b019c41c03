"""GPU correctness and speed of the CUDA functors, without TensorFlow.

Needs a CUDA GPU, PyTorch and nvcc; not TensorFlow. Loads the
standalone harness (tests/gpu/harness.cu: the op library's own
xent_functor_gpu.cu.h behind a C ABI; built here with nvcc unless --library
names one already built), then:
  --check   tests/gpu/kernel_checks.py on the GPU: every functor, dtype and
            label kind against float64 references, on fresh random inputs
            with special rows, outputs poisoned, bitwise reproducibility,
            C from 2 to 256000 and N up to 32768; then, against PyTorch
            in float64 on the GPU, shapes past 2^31 elements and past the
            grid's rows (LARGE_CHECKS);
  --bench   logits with sparse labels (the large-vocabulary case) and
            with one-hot dense labels, forward and forward+backward, timed
            with CUDA events in one process next to
            torch.nn.functional.cross_entropy and Liger-Kernel's cross
            entropy (sparse labels only; bench/gpu_requirements.txt,
            carried as a wheel), against
            the copy bandwidth measured in the same run; then the large
            shapes again with z-loss and soft cap (PyTorch's loss on the
            capped logits plus its z-loss term, Liger's lse_square_scale and
            softcap), and their cost over the plain loss. Other harness builds
            (--variant NAME=LIBRARY, an earlier version say) are timed beside.
            Writes gpu_results.md and gpu_results.json to --out.
  --emulated  the same on the CPU (the harness built against
            tests/gpu/emulation, PyTorch's CPU tensors, small shapes, host
            timers): a smoke test of this script where there is no GPU.

    python bench/bench_gpu.py --check --bench --out "$OUT"
"""

import argparse
import ctypes
import importlib.metadata
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))

import harness as gpu_harness  # noqa: E402
import kernel_checks  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional  # noqa: E402

# C from 2 to 256000, N up to 32768, at most a few million elements each (so
# that the float64 references on the host stay quick): each shape crosses a
# different boundary of the kernels; 50257 is odd (rows start anywhere).
CHECK_SHAPES = (
    (32768, 2),
    (32768, 5),
    (4099, 1000),
    (41, 50257),
    (17, 128256),
    (9, 256000),
)
# Past what the host references reach: more than 2^31 elements (int64
# offsets), more rows than the grid has blocks (2^20 rows of a block each,
# 2^23 of a warp each: the kernels stride over rows), odd C. Checked against
# PyTorch in float64 on the device; errors as Ours.errors defines them.
LARGE_CHECKS = (
    (8400, 256000, "sparse", "bfloat16"),
    (1050000, 2051, "sparse", "bfloat16"),
    (1050000, 2051, "dense", "bfloat16"),
    (8400000, 5, "sparse", "float32"),
)
LARGE_LOSS_TOLERANCE = 1e-5
LARGE_GRAD_TOLERANCE = {"bfloat16": 1e-2, "float32": 1e-4}
TORCH_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}
# Gemma 2's final-logit soft cap and PaLM's z-loss coefficient.
OPTIONS = {"z_loss": 1e-4, "logit_soft_cap": 30.0}
# The timed cases, (N, C, labels, dtypes, options). The target shapes: logits
# with sparse labels at three vocabulary sizes; one-hot float32 labels (Keras's
# CategoricalCrossentropy: the forward reads them, the backward reads none for
# a one-hot row). Then rows of 2048 classes, the most a warp computes alone:
# float16 too, whose warp sparse forward spilled in v3.2 (docs/performance.md).
# Last, the large shapes with OPTIONS, each beside its plain row: the cost of
# the z-loss and the soft cap's tanh.
BENCH_CASES = (
    (8192, 32000, "sparse", ("bfloat16", "float32"), None),
    (8192, 128256, "sparse", ("bfloat16", "float32"), None),
    (4096, 256000, "sparse", ("bfloat16", "float32"), None),
    (8192, 128256, "dense", ("bfloat16", "float32"), None),
    (65536, 2048, "sparse", ("bfloat16", "float32", "float16"), None),
    (8192, 128256, "sparse", ("bfloat16", "float32"), OPTIONS),
    (4096, 256000, "sparse", ("bfloat16", "float32"), OPTIONS),
    (8192, 128256, "dense", ("bfloat16", "float32"), OPTIONS),
)


class Device:
    """Where the harness runs: "cuda", or "cpu" for the emulated build."""

    def __init__(self, emulated, exact_buffers=False):
        self.name = "cpu" if emulated else "cuda"
        self.emulated = emulated
        self.exact_buffers = exact_buffers

    def memory(self):
        """The checks' buffers, between guard bands unless exact_buffers."""
        if self.exact_buffers:
            return gpu_harness.TorchMemory(self.name, guard_bytes=0)
        return gpu_harness.TorchMemory(self.name)

    def load_harness(self, library):
        """The harness at `library`, or built here (nvcc for this GPU, or
        the host compiler against the emulation)."""
        if library:
            try:
                return gpu_harness.Harness(library, self.memory())
            except OSError as e:
                print(f"could not load {library} ({e}); building it here")
        if self.emulated:
            out = os.path.join(ROOT, "build", "emulated", "libtfxent_harness.so")
            return gpu_harness.Harness(gpu_harness.build_emulated(out), self.memory())
        major, minor = torch.cuda.get_device_capability()
        out = os.path.join(ROOT, "build", "harness", "libtfxent_harness.so")
        path = gpu_harness.build_cuda(out, arch=f"sm_{major}{minor}")
        return gpu_harness.Harness(path, self.memory())

    def synchronize(self):
        if not self.emulated:
            torch.cuda.synchronize()

    def time_ms(self, fn, repeat=20, groups=7):
        """Median over `groups` of the mean time of `repeat` back-to-back
        calls. On a GPU, with CUDA events: the queue stays ahead of the GPU,
        so launch overhead and the host's ctypes calls are hidden as they are
        in a training step."""
        fn()
        self.synchronize()
        times = []
        for _ in range(groups):
            if self.emulated:
                start = time.perf_counter()
                for _ in range(repeat):
                    fn()
                times.append((time.perf_counter() - start) * 1e3 / repeat)
                continue
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / repeat)
        return statistics.median(times)

    def copy_bandwidth_gbs(self):
        """Bytes read plus bytes written per second by a device copy."""
        size = 2**24 if self.emulated else 2**31
        src = torch.empty(size, dtype=torch.uint8, device=self.name)
        dst = torch.empty_like(src)
        return 2 * src.numel() / self.time_ms(lambda: dst.copy_(src), repeat=5) / 1e6

    def stream(self):
        if self.emulated:
            return None
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def torch_loss(x, labels, options=None, reduction="mean"):
    """PyTorch's cross entropy of logits x, with the z-loss and soft cap of
    `options` (OPTIONS' keys) as a PyTorch user writes them: the loss of
    cap * tanh(x / cap) plus z_loss * logsumexp**2 per row."""
    options = options or {}
    cap, z_loss = options.get("logit_soft_cap"), options.get("z_loss", 0.0)
    if not (cap or z_loss):
        return functional.cross_entropy(x, labels, reduction=reduction)
    if cap:
        x = cap * torch.tanh(x / cap)
    loss = functional.cross_entropy(x, labels, reduction="none")
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, dim=1).square()
    return loss.mean() if reduction == "mean" else loss


class Ours:
    """Forward and forward+backward of one harness build, with sparse labels
    (int64 [N]) or dense ones (float32 [N, C]), on preallocated buffers (as
    TensorFlow's allocator hands them out), the C calls' argument lists formed
    once. `options`: OPTIONS' keys, or None for the plain loss."""

    def __init__(self, h, x, labels, stream, options=None):
        n, c = x.shape
        dense = labels.dim() == 2
        # Every tensor whose pointer is passed is kept alive here.
        self.x, self.labels, self.options = x, labels, options
        self.loss, self.dx = x.new_empty(n, dtype=torch.float32), torch.empty_like(x)
        self.g = torch.full_like(self.loss, 1.0 / n)
        self.stats = x.new_empty((n, h.stats_per_row) if dense else n, dtype=torch.float32)
        dtype = str(x.dtype).removeprefix("torch.")
        # The coefficients in the loss type (float32), as the op passes them.
        coefficients = {k: float(np.float32(v)) for k, v in (options or {}).items()}
        self.params = gpu_harness.KernelParams.make(n, c, from_logits=True, **coefficients)
        params = h.leading_args(dtype, self.params, None if dense else 64)
        kind = "dense" if dense else "sparse"
        # The sparse and dense calls take their buffers in the same order.
        self.forward_fn = getattr(h.lib, f"tfxent_{kind}_forward")
        self.backward_fn = getattr(h.lib, f"tfxent_{kind}_backward")

        def pointers(*tensors):
            return tuple(ctypes.c_void_p(t.data_ptr()) for t in tensors)

        self.forward_args = params + pointers(x, labels, self.loss, self.stats) + (stream,)
        self.backward_args = params + pointers(x, labels, self.stats, self.g, self.dx) + (stream,)

    def forward(self):
        if self.forward_fn(*self.forward_args):
            raise RuntimeError("forward failed to launch")

    def both(self):
        self.forward()
        if self.backward_fn(*self.backward_args):
            raise RuntimeError("backward failed to launch")

    def errors(self, torch_labels, chunk_elements=2**27):
        """The largest error, over rows, of our loss and of our gradient's row
        against PyTorch's in float64 (torch_loss, with the same options), each
        relative to the size of its terms:
        |loss - ref| / max(|ref|, 1) and |dx - ref| / max(|ref|, g) (norms of
        the row; g, the upstream gradient, scales the terms softmax and 1).
        In chunks of rows, so that billions of elements fit."""
        self.both()
        n, c = self.x.shape
        step = max(1, chunk_elements // c)
        loss_err = grad_err = 0.0
        for start in range(0, n, step):
            rows = slice(start, start + step)
            xd = self.x[rows].double().requires_grad_(True)
            labels = torch_labels[rows]
            labels = labels.double() if labels.is_floating_point() else labels
            ref = torch_loss(xd, labels, self.options, reduction="none")
            g = self.g[rows].double()
            (ref * g).sum().backward()
            loss = self.loss[rows].double()
            loss_err = max(loss_err, ((loss - ref).abs() / ref.abs().clamp(min=1)).max().item())
            norm = torch.linalg.vector_norm
            off = norm(self.dx[rows].double() - xd.grad, dim=1)
            scale = torch.maximum(norm(xd.grad, dim=1), g)
            grad_err = max(grad_err, (off / scale).max().item())
        return loss_err, grad_err


def _inputs(device, n, c, dtype, kind):
    """Fresh logits x (randn * 4) and labels y; the labels as ours and as
    PyTorch take them: y, or one-hot float32 rows (PyTorch's probabilities in
    the logits' dtype) if `kind` is "dense"."""
    gen = torch.Generator(device=device.name)
    gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(n, c, device=device.name, dtype=dtype, generator=gen) * 4
    y = torch.randint(0, c, (n,), device=device.name, generator=gen)
    if kind == "sparse":
        return x, y, y, y
    one_hot = x.new_zeros((n, c), dtype=torch.float32).scatter_(1, y[:, None], 1.0)
    return x, y, one_hot, one_hot.to(dtype)


def check_large(device, h, log=print):
    """The shapes whose offsets and grids only the GPU's memory holds
    (LARGE_CHECKS), against PyTorch in float64 on the device; returns the
    number that failed."""
    failed = 0
    for n, c, kind, dtype_name in LARGE_CHECKS:
        start = time.perf_counter()
        x, _, ours_labels, torch_labels = _inputs(device, n, c, TORCH_DTYPES[dtype_name], kind)
        loss_err, grad_err = Ours(h, x, ours_labels, device.stream()).errors(torch_labels)
        ok = loss_err <= LARGE_LOSS_TOLERANCE and grad_err <= LARGE_GRAD_TOLERANCE[dtype_name]
        failed += not ok
        log(
            f"{'ok  ' if ok else 'FAIL'} large {kind} {dtype_name} {n}x{c} ({n * c / 2**31:.2f} "
            f"x 2^31 elements): err loss {loss_err:.1e} grad {grad_err:.1e}  "
            f"({time.perf_counter() - start:.1f} s)"
        )
        del x, ours_labels, torch_labels
        if not device.emulated:
            torch.cuda.empty_cache()
    return failed


def _liger():
    """Liger-Kernel's cross entropy and version, or (None, None): a peer
    that fails to import leaves its column empty rather than stop the run."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        return liger_cross_entropy, importlib.metadata.version("liger-kernel")
    except Exception as e:  # any failure of a peer's import
        print(f"Liger-Kernel not importable ({e!r}): its column stays empty")
        return None, None


def bench(device, h, variants, cases, out_dir):
    """Times every build, PyTorch and Liger on each (N, C, labels, dtypes,
    options) of `cases`; labels "sparse" or "dense" (one-hot); options
    OPTIONS' keys or None."""
    liger_cross_entropy, liger_version = _liger()
    copy_gbs = device.copy_bandwidth_gbs()
    name = "CPU (emulated harness)" if device.emulated else torch.cuda.get_device_name()
    print(f"{name}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows = []
    builds = {"ours": h, **variants}
    for n, c, kind, dtype_names, options in cases:
        for dtype_name in dtype_names:
            x, y, ours_labels, torch_labels = _inputs(device, n, c, TORCH_DTYPES[dtype_name], kind)
            ours = {b: Ours(builds[b], x, ours_labels, device.stream(), options) for b in builds}
            loss_err, grad_err = ours["ours"].errors(torch_labels)
            times = {}
            for b in builds:
                times[f"{b} fwd"] = device.time_ms(ours[b].forward)
                times[f"{b} fwd+bwd"] = device.time_ms(ours[b].both)
            del ours
            times["torch fwd"] = device.time_ms(
                lambda x=x, t=torch_labels, o=options: torch_loss(x, t, o)
            )
            xt = x.detach().clone().requires_grad_(True)

            def torch_both(xt=xt, t=torch_labels, o=options):
                xt.grad = None
                torch_loss(xt, t, o).backward()

            times["torch fwd+bwd"] = device.time_ms(torch_both)
            del xt, torch_both
            # Liger-Kernel takes class indices only.
            if liger_cross_entropy is not None and not device.emulated and kind == "sparse":
                xl = x.detach().clone().requires_grad_(True)

                liger_options = {}
                if options:  # Liger's names for them
                    liger_options = {
                        "lse_square_scale": options["z_loss"],
                        "softcap": options["logit_soft_cap"],
                    }

                def liger_both(xl=xl, y=y, o=liger_options):
                    xl.grad = None
                    liger_cross_entropy(xl, y, **o).backward()

                try:
                    times["liger fwd+bwd"] = device.time_ms(liger_both)
                except Exception as e:  # a peer's failure is reported, not fatal
                    print(f"Liger-Kernel failed at {n}x{c} {dtype_name}: {e!r}")
                del xl, liger_both
            logits_bytes = n * c * x.element_size()
            labels_bytes = ours_labels.numel() * 4 if kind == "dense" else 0
            del x, y, ours_labels, torch_labels
            if not device.emulated:
                torch.cuda.empty_cache()
            row = {
                "shape": [n, c],
                "labels": kind,
                "dtype": dtype_name,
                "options": options or {},
                "times_ms": times,
                # Floors at the measured copy bandwidth: one read of the
                # logits (and dense labels) for the forward; forward+backward
                # adds one write of the gradient (what a kernel that writes it
                # during the forward, as Liger's does, moves).
                "floor_fwd_ms": (logits_bytes + labels_bytes) / copy_gbs / 1e6,
                "floor_fwd_bwd_ms": (2 * logits_bytes + labels_bytes) / copy_gbs / 1e6,
                "loss_rel_err": loss_err,
                "grad_rel_err": grad_err,
            }
            rows.append(row)
            print(_line(row), flush=True)
            # Written after every row: a call cut short keeps what it measured.
            table = _write(out_dir, {
                "device": name,
                "copy_gbs": copy_gbs,
                "liger_version": liger_version,
                "torch_version": torch.__version__,
                "builds": list(builds),
                "rows": rows,
            })  # fmt: skip
    print(table)


def _write(out_dir, result):
    """gpu_results.json and gpu_results.md (returned) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_results.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out_dir, "gpu_results.md"), "w") as f:
        f.write(table)
    return table


def _labels(row):
    """The labels' kind, and the options where the row has them."""
    names = {"z_loss": "z-loss", "logit_soft_cap": "cap"}
    options = row.get("options") or {}
    return ", ".join([row["labels"]] + [f"{names[k]} {v:g}" for k, v in options.items()])


def _line(row):
    t = row["times_ms"]
    parts = [f"{row['shape'][0]}x{row['shape'][1]} {_labels(row)} {row['dtype']}:"]
    parts += [f"{k} {v:.3f}" for k, v in t.items()]
    parts += [f"err loss {row['loss_rel_err']:.1e} grad {row['grad_rel_err']:.1e}"]
    return "  ".join(parts)


def markdown(result):
    """The tables of docs/performance.md: times, multiples of the floor,
    speed-ups; then what the z-loss and soft cap add to each loss."""
    names = result["builds"]
    lines = [
        f"{result['device']}, copy bandwidth {result['copy_gbs']:.0f} GB/s (read + write), "
        f"torch {result['torch_version']}, Liger-Kernel {result['liger_version']}.",
        "",
        "| N x C | labels | dtype | op | ours ms | x floor | torch ms | liger ms | vs torch "
        "| vs liger |" + "".join(f" {n} ms |" for n in names[1:]),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(names) - 1),
    ]
    for row in result["rows"]:
        t = row["times_ms"]
        for op, floor in (("fwd", row["floor_fwd_ms"]), ("fwd+bwd", row["floor_fwd_bwd_ms"])):
            ours = t[f"ours {op}"]
            torch_ms = t[f"torch {op}"]
            liger_ms = t.get(f"liger {op}")  # forward+backward, sparse labels only
            liger = (
                ("-", "-") if liger_ms is None else (f"{liger_ms:.3f}", f"{liger_ms / ours:.2f}x")
            )
            line = (
                f"| {row['shape'][0]} x {row['shape'][1]} | {_labels(row)} | {row['dtype']} "
                f"| {op} | {ours:.3f} | {ours / floor:.2f} | {torch_ms:.3f} | {liger[0]} "
                f"| {torch_ms / ours:.2f}x | {liger[1]} |"
            )
            line += "".join(f" {t[f'{n} {op}']:.3f} |" for n in names[1:])
            lines.append(line)
    return "\n".join(lines + _options_cost(result["rows"])) + "\n"


def _options_cost(rows):
    """Table lines: each row with options beside the plain row of its shape,
    labels and dtype, and what the options add to ours, PyTorch's and
    Liger's times."""
    plain = {(tuple(r["shape"]), r["labels"], r["dtype"]): r for r in rows if not r.get("options")}
    lines = []
    for row in rows:
        base = plain.get((tuple(row["shape"]), row["labels"], row["dtype"]))
        if not row.get("options") or base is None:
            continue
        for op in ("fwd", "fwd+bwd"):
            n, c = row["shape"]
            line = f"| {n} x {c} | {_labels(row)} | {row['dtype']} | {op} |"
            for peer in ("ours", "torch", "liger"):
                before = base["times_ms"].get(f"{peer} {op}")
                after = row["times_ms"].get(f"{peer} {op}")
                if before is None or after is None:
                    line += " - | - | - |"
                else:
                    line += f" {before:.3f} | {after:.3f} | {after / before - 1:+.0%} |"
            lines.append(line)
    if not lines:
        return []
    head = "| N x C | labels | dtype | op |" + "".join(
        f" {peer} plain ms | {peer} options ms | cost |" for peer in ("ours", "torch", "liger")
    )
    return ["", head, "|---|---|---|---|" + "---:|" * 9, *lines]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--emulated", action="store_true", help="on the CPU, small shapes")
    parser.add_argument("--small", action="store_true", help="check the small shapes only")
    parser.add_argument("--library", help="a harness built already (else built here)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=LIBRARY")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--exact-buffers",
        action="store_true",
        help="no guard bands: each buffer ends where its allocation does (for compute-sanitizer)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    device = Device(args.emulated, args.exact_buffers)
    h = device.load_harness(args.library)
    print(f"harness ready in {time.perf_counter() - start:.1f} s", flush=True)
    failed = 0
    if args.check:
        shapes = CHECK_SHAPES
        if args.small or args.emulated:
            shapes = kernel_checks.EMULATED_SHAPES[: 2 if args.emulated else None]
        cases = kernel_checks.grid(shapes)
        failed = kernel_checks.run(h, cases, args.seed, log=lambda s: print(s, flush=True))
        if not (args.small or args.emulated):
            failed += check_large(device, h, log=lambda s: print(s, flush=True))
    if args.bench:
        variants = {}
        for spec in args.variant:
            name, path = spec.split("=", 1)
            try:
                variants[name] = gpu_harness.Harness(path, device.memory())
            except OSError as e:  # a variant is a comparison, not the result
                print(f"variant {name} not loaded ({e}): left out")
        cases = BENCH_CASES
        if args.emulated:
            both = ("bfloat16", "float32")
            cases = [
                (16, 300, "sparse", (*both, "float16"), None),
                (8, 1000, "sparse", both, None),
                (8, 1000, "dense", both, None),
                (8, 1000, "sparse", both, OPTIONS),
                (8, 1000, "dense", both, OPTIONS),
            ]
        bench(device, h, variants, cases, args.out)
    print(f"done in {time.perf_counter() - start:.1f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
