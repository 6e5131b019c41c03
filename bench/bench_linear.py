"""CPU benchmark of the fused linear + cross-entropy: one training step.

A step is the loss of `hidden @ kernel + bias` and its gradients with respect
to hidden, kernel and bias, inside one tf.function, for:

    fused (scalar)        linear_crossentropy_sum: the mean, gradient in forward
    fused (per position)  linear_crossentropy, then the mean outside: recompute
    matmul + ours         tf.matmul, bias add, our sparse loss, the mean
    matmul + Keras        tf.matmul, bias add, Keras's built-in loss, the mean
    matmuls alone         the three matmuls of a step with no loss (a reference)

Times: all steps of a dtype run in turns in one process (bench_cpu.time_ms),
medians. Peak memory: one step in a fresh process per case, TensorFlow's
oneDNN allocations through the system allocator and glibc returning large
blocks at once (TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1, MALLOC_MMAP_THRESHOLD_), so
that the peak resident set follows what is live; reported above the inputs
and the gradients the step returns (any implementation holds those).

    python bench/bench_linear.py              # writes bench/results/linear_results.*
    python bench/bench_linear.py --quick      # a small shape, no files
    python bench/bench_linear.py --no-memory  # times only
"""

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from bench_cpu import OUT_DIR  # noqa: E402
from bench_cpu import _status_kib  # noqa: E402
from bench_cpu import time_ms  # noqa: E402

SHAPE = dict(n=4096, v=32768, d=512)
QUICK_SHAPE = dict(n=512, v=4096, d=128)
# (name, hidden dtype, kernel and bias dtype): Keras's mixed_bfloat16 keeps
# float32 variables and computes in bfloat16.
DTYPES = [
    ("float32", "float32", "float32"),
    ("bfloat16", "bfloat16", "bfloat16"),
    ("mixed bfloat16", "bfloat16", "float32"),
]
IMPLS = ["fused (scalar)", "fused (per position)", "matmul + ours", "matmul + Keras"]
MEMORY_ENV = dict(TF_ONEDNN_USE_SYSTEM_ALLOCATOR="1", MALLOC_MMAP_THRESHOLD_="1048576")


def make_inputs(shape, dtypes, rng):
    import tensorflow as tf

    _, hidden_dtype, kernel_dtype = dtypes
    n, v, d = shape["n"], shape["v"], shape["d"]
    hidden = tf.cast(rng.standard_normal((n, d), np.float32), hidden_dtype)
    kernel = tf.cast(rng.standard_normal((d, v), np.float32) / np.sqrt(d), kernel_dtype)
    bias = tf.cast(rng.standard_normal(v, np.float32) * 0.1, kernel_dtype)
    labels = tf.constant(rng.integers(0, v, n), tf.int32)
    return hidden, kernel, bias, labels


def step_fn(impl, chunk_size=None):
    """A tf.function: (hidden, kernel, bias, labels) -> [loss, d_hidden,
    d_kernel, d_bias]."""
    import keras
    import tensorflow as tf

    import tf_xent_ops as txo

    def logits(hidden, kernel, bias):
        # As a Keras Dense layer under mixed precision: variables cast to the
        # compute dtype.
        kernel, bias = tf.cast(kernel, hidden.dtype), tf.cast(bias, hidden.dtype)
        return tf.nn.bias_add(tf.matmul(hidden, kernel), bias)

    def loss(hidden, kernel, bias, labels):
        n = tf.cast(tf.size(labels), tf.float32)
        if impl == "fused (scalar)":
            return txo.ops.linear_crossentropy_sum(
                hidden, kernel, labels, bias=bias, denominator=n, chunk_size=chunk_size
            )
        if impl == "fused (per position)":
            per_position = txo.ops.linear_crossentropy(
                hidden, kernel, labels, bias=bias, chunk_size=chunk_size
            )
            return tf.reduce_sum(per_position) / n
        z = logits(hidden, kernel, bias)
        if impl == "matmul + ours":
            return tf.reduce_mean(txo.ops.sparse_crossentropy(labels, z, from_logits=True))
        if impl == "matmul + Keras":
            per_position = keras.losses.sparse_categorical_crossentropy(labels, z, from_logits=True)
            return tf.reduce_mean(tf.cast(per_position, tf.float32))
        if impl == "matmuls alone":
            return tf.reduce_sum(tf.cast(z, tf.float32)) / n
        raise ValueError(impl)

    @tf.function
    def step(hidden, kernel, bias, labels):
        with tf.GradientTape() as tape:
            tape.watch([hidden, kernel, bias])
            value = loss(hidden, kernel, bias, labels)
        return [value] + tape.gradient(value, [hidden, kernel, bias])

    return step


def check_agree(outs, float32_outs, dtype_name):
    """The fused steps against matmul + ours in float32 (TensorFlow's 16-bit
    bias gradient is itself a few percent off), Keras's against ours."""
    tol = 1e-3 if dtype_name == "float32" else 3e-2
    pairs = [(key, float32_outs) for key in outs if key[0].startswith("fused")]
    pairs.append((("matmul + Keras", None), outs[("matmul + ours", None)]))
    for impl, reference in pairs:
        for index, (a, b) in enumerate(zip(outs[impl], reference, strict=True)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            scale = max(float(np.max(np.abs(b))), 1e-30)
            if np.max(np.abs(a - b)) > tol * scale:
                raise AssertionError(
                    f"{impl[0]} {dtype_name}: output {index} differs by {np.max(np.abs(a - b))} "
                    f"(scale {scale})"
                )


def _float32(x):
    import tensorflow as tf

    return tf.cast(x, tf.float32) if x.dtype.is_floating else x


def run_timing(shape, chunk_sizes):
    """Times every step of each dtype in turns; the chunk sizes, for float32."""
    rows = []
    for dtypes in DTYPES:
        inputs = make_inputs(shape, dtypes, np.random.default_rng(0))
        steps = {(impl, None): step_fn(impl) for impl in IMPLS + ["matmuls alone"]}
        if dtypes[0] == "float32":
            for chunk in chunk_sizes:
                for impl in IMPLS[:2]:
                    steps[(impl, chunk)] = step_fn(impl, chunk)
        float32_outs = steps[("matmul + ours", None)](*(_float32(x) for x in inputs))
        outs = {k: s(*inputs) for k, s in steps.items() if k[0] != "matmuls alone"}
        check_agree(outs, float32_outs, dtypes[0])
        del outs, float32_outs
        times = dict(zip(steps, time_ms(list(steps.values()), *inputs, min_runs=5), strict=True))
        for (impl, chunk), ms in times.items():
            row = dict(
                dtype=dtypes[0],
                impl=impl,
                chunk=chunk,
                ms=ms,
                vs_ours=ms / times[("matmul + ours", None)],
                vs_keras=ms / times[("matmul + Keras", None)],
            )
            rows.append(row)
            print(
                f"{row['dtype']:<15} {impl:<22} {chunk or '':>5} {ms:9.1f} ms  "
                f"x{row['vs_ours']:.2f} of matmul + ours, x{row['vs_keras']:.2f} of matmul + Keras",
                flush=True,
            )
    return rows


def peak_memory_child(spec):
    """In a fresh process: the peak resident set of one step over the one
    before it, less the gradients the step returns."""

    shape, dtype_name, impl, chunk = json.loads(spec)
    dtypes = next(d for d in DTYPES if d[0] == dtype_name)
    inputs = make_inputs(shape, dtypes, np.random.default_rng(0))
    step = step_fn(impl, chunk)
    step.get_concrete_function(*inputs)  # trace without running
    # The first step of a process also sets up TensorFlow's and oneDNN's
    # runtime: do that on a small problem first, so it is not counted.
    step_fn("matmuls alone")(*make_inputs(QUICK_SHAPE, dtypes, np.random.default_rng(1)))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (Linux)
    baseline = _status_kib("VmRSS")
    out = step(*inputs)
    peak = _status_kib("VmHWM")
    returned = sum(t.numpy().nbytes for t in out[1:]) / 2**20
    print(json.dumps({"peak_mib": (peak - baseline) / 1024.0 - returned}))


def peak_memory(shape, dtype_name, impl, chunk):
    spec = json.dumps([shape, dtype_name, impl, chunk])
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", spec],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, **MEMORY_ENV),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--chunk-sizes",
        default="128,512,1024",
        help="float32 chunk sizes timed besides the default",
    )
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child)
        return
    shape = QUICK_SHAPE if args.quick else SHAPE
    chunks = [] if args.quick else [int(c) for c in args.chunk_sizes.split(",") if c]
    rows = run_timing(shape, chunks)
    if not args.no_memory:
        for row in rows:
            if row["impl"] == "matmuls alone":
                continue
            row["mib"] = peak_memory(shape, row["dtype"], row["impl"], row["chunk"])
            print(
                f"peak {row['dtype']:<15} {row['impl']:<22} {row['chunk'] or '':>5} "
                f"{row['mib']:8.1f} MiB",
                flush=True,
            )
    if not args.quick:
        write_outputs(shape, rows)


def write_outputs(shape, rows):
    from bench_cpu import copy_bandwidth

    default_chunk = max(1, 2**23 // shape["v"])
    lines = [
        f"One training step at N={shape['n']} tokens, V={shape['v']}, D={shape['d']} "
        f"(kernel [D, V], with a bias): the loss and its gradients with respect to "
        f"hidden, kernel and bias. Copy bandwidth in this run: "
        f"{copy_bandwidth() / 1e9:.1f} GB/s. Times: medians, all steps of a dtype in "
        "turns in one process. Peak: MiB above the inputs and the returned gradients, "
        "one step in a fresh process (TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1, "
        f"MALLOC_MMAP_THRESHOLD_=1048576). Default chunk: {default_chunk} rows.",
        "",
        "| dtype | step | chunk | ms | x matmul + ours | x matmul + Keras | peak MiB "
        "| matmul + ours peak / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    peaks = {r["dtype"]: r["mib"] for r in rows if r["impl"] == "matmul + ours" and "mib" in r}
    for r in rows:
        mib = f"{r['mib']:.0f}" if "mib" in r else ""
        ratio = (
            f"1/{peaks[r['dtype']] / r['mib']:.1f}" if "mib" in r and r["dtype"] in peaks else ""
        )
        lines.append(
            f"| {r['dtype']} | {r['impl']} | {r['chunk'] or ''} | {r['ms']:.0f} "
            f"| {r['vs_ours']:.2f} | {r['vs_keras']:.2f} | {mib} | {ratio} |"
        )
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "linear_results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(OUT_DIR, "linear_results.json"), "w") as f:
        json.dump({"shape": shape, "rows": rows}, f, indent=1)
    plot(rows)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["chunk"] is None and "mib" in r]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    dtypes = [d[0] for d in DTYPES]
    x = np.arange(len(dtypes))
    width = 0.8 / len(IMPLS)
    for k, impl in enumerate(IMPLS):
        mine = [next(r for r in rows if r["dtype"] == d and r["impl"] == impl) for d in dtypes]
        ax_time.bar(x + (k - 1.5) * width, [r["vs_ours"] for r in mine], width, label=impl)
        ax_mem.bar(x + (k - 1.5) * width, [r["mib"] for r in mine], width, label=impl)
    ax_time.axhline(1.0, color="k", lw=0.8)
    ax_time.set_ylabel("step time / matmul + ours")
    ax_mem.set_ylabel("peak MiB above inputs and gradients")
    ax_mem.set_yscale("log")
    for ax in (ax_time, ax_mem):
        ax.set_xticks(x, dtypes)
    ax_time.legend(fontsize=8)
    fig.suptitle("Fused linear + cross-entropy, one training step, CPU (lower is better)")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT_DIR, "linear_results.png"), dpi=110)


if __name__ == "__main__":
    main()
