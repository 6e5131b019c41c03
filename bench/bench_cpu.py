"""CPU benchmark: tf_xent_ops against the Keras built-ins, side by side.

For each case both losses are called as a user calls them (the Loss object,
inside a tf.function, forward or forward + gradient with respect to the
predictions, which for forward + backward are made inside the step as a
layer's output is), on the same inputs, after checking that they agree. Every
case is timed in each of three passes over the grid (see run_timing); reported:
the median over passes of the median milliseconds of the whole step; for
forward + backward also the median
of the same step without the loss (the producer: making the logits and
returning an [N, C] tensor), which is taken off both to give the loss's own
time; the speed-up over the built-in of the step and of the loss (the median
over passes of each pass's ratio: see timing_row); and the
multiple of the floor of the loss's time: the bytes that must move (read the
predictions, and dense labels, once; write the gradient once) over the copy
bandwidth measured in this run. Peak
memory of forward + backward is measured per case in a fresh subprocess: the
peak resident set (VmHWM, reset after setup) over the resident set before it.
Our kernels are timed at every instruction-set level the build has and the
CPU runs (tf_xent_ops.cpu_isa(); switched call by call, in the same turns);
the main columns are the best level's, and each other level gets its own.

    python bench/bench_cpu.py                 # default grid, writes bench/results/
    python bench/bench_cpu.py --quick         # a few cases
    python bench/bench_cpu.py --memory-only   # only the memory column
    python bench/bench_cpu.py --passes 1      # one pass: faster, noisier
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

SHAPES = [(65536, 10), (4096, 1000), (1024, 32768), (256, 131072)]
# The z-loss and soft cap of the rows that have them (PaLM's z-loss weight,
# Gemma 2's final-logit cap), and the shapes they are timed at.
OPTIONS = dict(z_loss=1e-4, logit_soft_cap=30.0)
OPTION_SHAPES = [(4096, 1000), (1024, 32768)]
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _case(n, c, dtype, labels, from_logits, ls, direction, **options):
    return dict(
        n=n,
        c=c,
        dtype=dtype,
        labels=labels,
        from_logits=from_logits,
        ls=ls,
        direction=direction,
        **options,
    )


def case_grid(quick):
    cases = []
    for n, c in SHAPES:
        for dtype in ("float32", "bfloat16"):
            for labels in ("sparse", "dense"):
                for from_logits in (True, False):
                    for ls in (0.0, 0.1):
                        if labels == "sparse" and not from_logits and ls:
                            continue  # Keras has no sparse smoothing to compare with
                        for direction in ("fwd", "fwd+bwd"):
                            cases.append(_case(n, c, dtype, labels, from_logits, ls, direction))
    # Logits with a z-loss and a soft cap, against the same loss plain (the
    # rows above) and against Keras's loss on capped logits plus the z-loss.
    for n, c in OPTION_SHAPES:
        for dtype in ("float32", "bfloat16"):
            for labels in ("sparse", "dense"):
                for direction in ("fwd", "fwd+bwd"):
                    cases.append(_case(n, c, dtype, labels, True, 0.0, direction, options=OPTIONS))
    if quick:
        cases = [
            k
            for k in cases
            if k["dtype"] == "float32" and k["direction"] == "fwd+bwd" and k["ls"] == 0.0
        ]
    return cases


def case_name(k):
    kind = "logits" if k["from_logits"] else "probs"
    ls = f" ls={k['ls']}" if k["ls"] else ""
    options = " z-loss+cap" if k.get("options") else ""
    return f"{k['labels']} {kind}{ls}{options} {k['dtype']} {k['direction']}"


def make_inputs(k, rng):
    import ml_dtypes

    n, c = k["n"], k["c"]
    z = rng.standard_normal((n, c), dtype=np.float32) * 3
    if not k["from_logits"]:
        z = np.exp(z - z.max(-1, keepdims=True))
        z /= z.sum(-1, keepdims=True)
    pred = z.astype(ml_dtypes.bfloat16) if k["dtype"] == "bfloat16" else z
    y = rng.integers(0, c, size=n)
    if k["labels"] == "dense":
        dense = np.zeros((n, c), np.float32)
        dense[np.arange(n), y] = 1.0
        y = dense
    return y, pred


def loss_fns(k):
    import keras

    import tf_xent_ops as txo

    kwargs = dict(from_logits=k["from_logits"])
    if k.get("options"):
        return _loss_fns_with_options(k, kwargs)
    if k["labels"] == "sparse":
        ours = txo.losses.SparseCategoricalCrossentropy(**kwargs, label_smoothing=k["ls"])
        if k["ls"]:
            # The built-in needs a one-hot for smoothing: that is its cost.
            dense = keras.losses.CategoricalCrossentropy(**kwargs, label_smoothing=k["ls"])

            def theirs(y, p):
                return dense(keras.ops.one_hot(y, k["c"]), p)

        else:
            theirs = keras.losses.SparseCategoricalCrossentropy(**kwargs)
    else:
        ours = txo.losses.CategoricalCrossentropy(**kwargs, label_smoothing=k["ls"])
        theirs = keras.losses.CategoricalCrossentropy(**kwargs, label_smoothing=k["ls"])
    return ours, theirs


def _loss_fns_with_options(k, kwargs):
    """Ours with a z-loss and a soft cap, and what a Keras user writes for
    them: Keras's loss on the capped logits, plus the mean z-loss term."""
    import keras

    import tf_xent_ops as txo

    z_loss, cap = k["options"]["z_loss"], k["options"]["logit_soft_cap"]
    sparse = k["labels"] == "sparse"
    cls = "SparseCategoricalCrossentropy" if sparse else "CategoricalCrossentropy"
    ours = getattr(txo.losses, cls)(**kwargs, **k["options"])
    keras_loss = getattr(keras.losses, cls)(**kwargs)

    def theirs(y, logits):
        capped = cap * keras.ops.tanh(logits / cap)
        lse = keras.ops.logsumexp(keras.ops.cast(capped, "float32"), axis=-1)
        return keras_loss(y, capped) + z_loss * keras.ops.mean(lse**2)

    return ours, theirs


def compiled(loss_fn, direction):
    import tensorflow as tf

    @tf.function
    def run(y, p, one):
        if direction == "fwd":
            return loss_fn(y, p), tf.zeros([])
        # As in a training step, the fwd+bwd steps make the logits inside the
        # step (a layer's output), not hold them from outside: same for both
        # losses. `one` is an input, so Grappler cannot fold the multiply away.
        if direction == "producer":
            # The fwd+bwd step without the loss: making the logits, and
            # returning an [N, C] tensor as the gradient is returned.
            return tf.zeros([]), p * one
        with tf.GradientTape() as tape:
            tape.watch(p)
            logits = p * one
            loss = loss_fn(y, logits)
        return loss, tape.gradient(loss, logits)

    ones = {}

    def call(y, p):
        if p.dtype not in ones:
            ones[p.dtype] = tf.ones([], p.dtype)
        return run(y, p, ones[p.dtype])

    call.get_concrete_function = lambda y, p: run.get_concrete_function(y, p, tf.ones([], p.dtype))
    return call


def cpu_levels():
    """Our CPU kernels' instruction-set levels this build has and this CPU
    runs, best first."""
    from tf_xent_ops import _load

    return _load.available_cpu_isas()


def at_level(fn, level):
    """`fn`, run with our CPU kernels at `level`."""
    from tf_xent_ops import _load

    def call(*args):
        if _load.cpu_isa() != level:  # an atomic read; switching takes a lock
            _load.use_cpu_isa(level)
        return fn(*args)

    return call


def time_ms(fns, *args, min_runs=10, min_seconds=0.7, max_runs=100, batch=5):
    """Median milliseconds of each of `fns` on `args`. They run in turns, a
    batch of calls each (the first untimed: it meets the memory the other
    function left, while a training loop calls the same step again and
    again), so that a slow spell of this shared machine falls on all alike."""
    for fn in fns:
        fn(*args)  # trace and warm up
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_runs or time.perf_counter() - start < min_seconds:
        for fn, fn_times in zip(fns, times, strict=True):
            fn(*args)[0].numpy()
            for _ in range(batch):
                t0 = time.perf_counter()
                out = fn(*args)
                _ = out[0].numpy()
                fn_times.append((time.perf_counter() - t0) * 1e3)
        if len(times[0]) >= max_runs:
            break
    return [statistics.median(t) for t in times]


def copy_bandwidth():
    """Bytes moved per second by a large copy (read + write), this run."""
    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def floor_bytes(k):
    elem = 2 if k["dtype"] == "bfloat16" else 4
    nc = k["n"] * k["c"]
    moved = nc * elem  # read the predictions once
    if k["labels"] == "dense":
        moved += nc * 4  # and the float32 labels
    if k["direction"] == "fwd+bwd":
        moved += nc * elem  # write the gradient once
    return moved


def check_agree(k, ours_out, theirs_out):
    tol = 2e-2 if k["dtype"] == "bfloat16" else 1e-4
    for a, b in zip(ours_out, theirs_out, strict=True):
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32)
        scale = max(1.0, float(np.max(np.abs(b))))
        if np.max(np.abs(a - b)) > tol * scale:
            raise AssertionError(f"{case_name(k)}: results differ by {np.max(np.abs(a - b))}")


def run_timing(cases, passes=3):
    """Times every case `passes` times, a pass over the whole grid at a time:
    this shared machine has slow spells minutes long, and a case's median
    over passes spread across the run is less at their mercy than one long
    measurement."""
    import tensorflow as tf

    levels = cpu_levels()
    bandwidths, samples = [], [[] for _ in cases]
    for pass_index in range(passes):
        bandwidths.append(copy_bandwidth())
        print(
            f"pass {pass_index + 1}/{passes}: copy bandwidth "
            f"{bandwidths[-1] / 1e9:.1f} GB/s; threads: {os.cpu_count()}; "
            f"our levels: {', '.join(levels)}",
            flush=True,
        )
        rng = np.random.default_rng(0)
        for k, case_samples in zip(cases, samples, strict=True):
            y, p = make_inputs(k, rng)
            y, p = tf.constant(y), tf.constant(p)
            ours, theirs = (compiled(f, k["direction"]) for f in loss_fns(k))
            ours_at = [at_level(ours, level) for level in levels]
            if pass_index == 0:
                for ours_at_level in ours_at:
                    check_agree(k, ours_at_level(y, p), theirs(y, p))
            # fwd+bwd steps make the logits (p * 1) first, for both losses:
            # that producer's time, measured alone, is taken off to give the
            # loss's.
            fns = [*ours_at, theirs]
            if k["direction"] == "fwd+bwd":
                fns.append(compiled(None, "producer"))
            times = time_ms(fns, y, p)
            case_samples.append(times + [0.0] * (len(levels) + 2 - len(times)))
            print(
                f"{k['n']:>6}x{k['c']:<6} {case_name(k):<36} ours "
                + " ".join(f"{lv} {t:8.2f} ms" for lv, t in zip(levels, times, strict=False))
                + f"  built-in {times[len(levels)]:8.2f} ms",
                flush=True,
            )
    at_level(lambda: None, levels[0])()  # back to the default level
    bandwidth = statistics.median(bandwidths)
    rows = [
        timing_row(k, case_samples, bandwidth, levels)
        for k, case_samples in zip(cases, samples, strict=True)
    ]
    for row in rows:
        print(
            f"{row['n']:>6}x{row['c']:<6} {row['name']:<36} ours {row['ours_ms']:8.2f} ms"
            f"  built-in {row['builtin_ms']:8.2f} ms  producer {row['producer_ms']:6.2f} ms"
            f"  speed-up: step {row['step_speedup']:5.2f}x loss {row['speedup']:5.2f}x"
            f"  ours/floor {row['ours_x_floor']:5.2f}  loss speed-up by level: "
            + " ".join(f"{lv} {x:5.2f}x" for lv, x in row["speedup_by_isa"].items())
        )
    return rows, bandwidth


def loss_speedup(ours_ms, theirs_ms, producer_ms):
    """The built-in loss's time over ours, each the step's less its producer's;
    infinite where our step took no longer than the producer alone (a loss
    lost in the noise of a tiny case)."""
    ours_loss_ms = ours_ms - producer_ms
    return (theirs_ms - producer_ms) / ours_loss_ms if ours_loss_ms > 0 else float("inf")


def timing_row(k, samples, bandwidth, levels):
    """A table row from a case's (ours at each of `levels`, built-in,
    producer) ms of each pass. The ms columns are medians over passes; the
    speed-ups are the medians of each pass's own ratios, whose timings ran in
    turns in the same minute, so that a slow spell of the machine falls on
    both sides of a ratio (a ratio of medians can pair our time from one pass
    with the built-in's from another). The unsuffixed columns are the best
    level's."""
    medians = [statistics.median(col) for col in zip(*samples, strict=True)]
    theirs_ms, producer_ms = medians[-2], medians[-1]
    floor_ms = floor_bytes(k) / bandwidth * 1e3
    by_level = dict(
        ours_ms_by_isa={},
        step_speedup_by_isa={},
        speedup_by_isa={},
        ours_x_floor_by_isa={},
    )
    for i, level in enumerate(levels):
        by_level["ours_ms_by_isa"][level] = medians[i]
        by_level["step_speedup_by_isa"][level] = statistics.median(s[-2] / s[i] for s in samples)
        by_level["speedup_by_isa"][level] = statistics.median(
            loss_speedup(s[i], s[-2], s[-1]) for s in samples
        )
        by_level["ours_x_floor_by_isa"][level] = (medians[i] - producer_ms) / floor_ms
    best = levels[0]
    return dict(
        k,
        name=case_name(k),
        ours_ms=medians[0],
        builtin_ms=theirs_ms,
        producer_ms=producer_ms,
        step_speedup=by_level["step_speedup_by_isa"][best],
        speedup=by_level["speedup_by_isa"][best],
        ours_x_floor=by_level["ours_x_floor_by_isa"][best],
        builtin_x_floor=(theirs_ms - producer_ms) / floor_ms,
        levels=list(levels),
        passes=[[s[0], s[-2], s[-1]] for s in samples],
        passes_by_isa=[list(s) for s in samples],
        **by_level,
    )


def peak_memory_child(spec):
    """In a fresh process: peak RSS growth of one forward + backward."""
    import tensorflow as tf

    k, impl = json.loads(spec)
    y, p = make_inputs(k, np.random.default_rng(0))
    y, p = tf.constant(y), tf.constant(p)
    fn = compiled(loss_fns(k)[0 if impl == "ours" else 1], "fwd+bwd")
    fn.get_concrete_function(y, p)  # trace without running
    # Setting up the inputs already set the lifetime peak: reset it (Linux).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _status_kib("VmRSS")
    out = fn(y, p)
    peak = _status_kib("VmHWM")
    del out
    print(json.dumps({"peak_mib": (peak - baseline) / 1024.0}))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory(k, impl):
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps([k, impl])],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def memory_cases(cases):
    keep = {
        (k["n"], k["c"], k["dtype"], k["labels"], k["from_logits"], k["ls"])
        for k in cases
        if not k.get("options")
    }
    return [
        dict(n=n, c=c, dtype=d, labels=lab, from_logits=fl, ls=ls, direction="fwd+bwd")
        for (n, c, d, lab, fl, ls) in sorted(keep)
        if ls == 0.0 and n * c >= 2**24
    ]


def write_outputs(rows, memory, bandwidth):
    os.makedirs(OUT_DIR, exist_ok=True)
    levels = rows[0]["levels"] if rows else []
    others = levels[1:]
    lines = [
        f"Copy bandwidth measured in the run: {bandwidth / 1e9:.1f} GB/s. "
        "Floor = bytes that must move / that bandwidth. Step: the whole timed step; "
        "producer: the fwd+bwd step without the loss (making the logits), taken off "
        "the step to give the loss's own time, on which the loss speed-up and the "
        "floor multiples are computed. Times: medians over the passes; speed-ups: "
        "medians of each pass's own ratio (its timings ran in turns). Ours at "
        + (
            f"the {levels[0]} level (the default here); then each other level's ms and "
            "loss speed-up."
            if levels
            else "the default level."
        ),
        "",
        "| N x C | case | ours ms | built-in ms | producer ms | speed-up (step) "
        "| speed-up (loss) | ours x floor | built-in x floor |"
        + "".join(f" {lv} ms | {lv} speed-up (loss) |" for lv in others),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(others),
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} x {r['c']} | {r['name']} | {r['ours_ms']:.2f} | {r['builtin_ms']:.2f}"
            f" | {r['producer_ms']:.2f} | {r['step_speedup']:.2f}x | {r['speedup']:.2f}x"
            f" | {r['ours_x_floor']:.1f} | {r['builtin_x_floor']:.1f} |"
            + "".join(
                f" {r['ours_ms_by_isa'][lv]:.2f} | {r['speedup_by_isa'][lv]:.2f}x |"
                for lv in others
            )
        )
    if memory:
        lines += [
            "",
            "Peak memory of forward + backward (MiB over the process baseline, fresh process):",
            "",
            "| N x C | case | ours MiB | built-in MiB | saved MiB |",
            "|---|---|---:|---:|---:|",
        ]
        for m in memory:
            lines.append(
                f"| {m['n']} x {m['c']} | {m['name']} | {m['ours_mib']:.0f} | "
                f"{m['builtin_mib']:.0f} | {m['builtin_mib'] - m['ours_mib']:.0f} |"
            )
    with open(os.path.join(OUT_DIR, "cpu_results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(OUT_DIR, "cpu_results.json"), "w") as f:
        json.dump({"bandwidth": bandwidth, "rows": rows, "memory": memory}, f, indent=1)
    if rows:
        plot(rows)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["direction"] == "fwd+bwd" and r["dtype"] == "float32"]
    labels = [f"{r['n']}x{r['c']}\n{r['name'].replace(' float32 fwd+bwd', '')}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows)), 5))
    series = [("Keras built-in", [r["builtin_x_floor"] for r in rows])]
    for level in rows[0].get("levels", []) if rows else []:
        series.append((f"tf_xent_ops, {level}", [r["ours_x_floor_by_isa"][level] for r in rows]))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("time / memory-bandwidth floor (lower is better)")
    ax.set_title(
        "CPU cross-entropy, float32, forward + backward (the loss's time: step minus producer)"
    )
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT_DIR, "cpu_results.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child")
    parser.add_argument("--passes", type=int, default=3, help="passes over the grid")
    parser.add_argument(
        "--only",
        help="time only the cases whose 'NxC name' this regular expression finds (no files)",
    )
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child)
        return
    cases = case_grid(args.quick)
    if args.only:
        cases = [k for k in cases if re.search(args.only, f"{k['n']}x{k['c']} {case_name(k)}")]
        run_timing(cases, args.passes)
        return
    if args.memory_only:  # keep the timing rows of the last full run
        with open(os.path.join(OUT_DIR, "cpu_results.json")) as f:
            previous = json.load(f)
        rows, bandwidth = previous["rows"], previous["bandwidth"]
    else:
        rows, bandwidth = run_timing(cases, args.passes)
    memory = []
    if args.no_memory and os.path.exists(os.path.join(OUT_DIR, "cpu_results.json")):
        with open(os.path.join(OUT_DIR, "cpu_results.json")) as f:
            memory = json.load(f)["memory"]  # keep the last measured column
    if not args.no_memory:
        for k in memory_cases(cases):
            m = dict(k, name=case_name(k))
            m["ours_mib"], m["builtin_mib"] = peak_memory(k, "ours"), peak_memory(k, "builtin")
            memory.append(m)
            print(
                f"peak {k['n']}x{k['c']} {m['name']}: ours {m['ours_mib']:.0f} MiB, "
                f"built-in {m['builtin_mib']:.0f} MiB",
                flush=True,
            )
    write_outputs(rows, memory, bandwidth)


if __name__ == "__main__":
    main()
