"""Trains a small causal language model twice: plain, then with its head fused.

The text is the source of Python's standard library (it ships with Python);
words and punctuation are tokens, the 32768 most frequent make the vocabulary.
The model is keras-hub's GPT2CausalLM with a small backbone; its output head
is the tied token embedding, so each step's logits are [batch * sequence,
32768]. Each run is a fresh process, from the same seed, on the same batches:
one as keras-hub builds it, one after `tf_xent_ops.fuse_head(causal_lm)`. The
script prints the two loss curves side by side, the median step time and the
peak memory of each run (resident set above what it held before `fit`), draws
them into docs/lm_demo.png, and lets the fused model generate a few tokens.

Run it with `make demo-lm`.
"""

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

VOCABULARY = 32768
SEQUENCE, BATCH, STEPS = 128, 16, 60
CORPUS_CHARACTERS = 6_000_000
# Peak memory follows what is live: oneDNN's buffers through the system
# allocator, and glibc giving large blocks back at once.
MEMORY_ENV = dict(TF_ONEDNN_USE_SYSTEM_ALLOCATOR="1", MALLOC_MMAP_THRESHOLD_="1048576")
PNG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "lm_demo.png")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def corpus_tokens():
    """The standard library's source as word and punctuation tokens."""
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")))
    text, size = [], 0
    for path in paths:
        if size >= CORPUS_CHARACTERS:
            break
        with open(path, encoding="utf-8", errors="replace") as f:
            text.append(f.read())
        size += len(text[-1])
    return _TOKEN.findall("\n".join(text))


def token_ids(tokens):
    """Ids by frequency (0 for the rest) and the vocabulary itself."""
    counts = collections.Counter(tokens)
    vocabulary = ["<unk>"] + [word for word, _ in counts.most_common(VOCABULARY - 1)]
    index = {word: i for i, word in enumerate(vocabulary)}
    return np.array([index.get(t, 0) for t in tokens], np.int32), vocabulary


def batches(ids, seed=0):
    """STEPS batches of (x, y): windows of SEQUENCE + 1 tokens, shifted."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - SEQUENCE - 1, (STEPS, BATCH))
    windows = ids[starts[..., None] + np.arange(SEQUENCE + 1)]
    return windows[..., :-1], windows[..., 1:]


def build_model():
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=512,
        max_sequence_length=SEQUENCE,
    )
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    causal_lm.compile(
        optimizer=keras.optimizers.Adam(1e-3), sampler="greedy", weighted_metrics=["accuracy"]
    )
    return causal_lm


def train(fused, ids):
    """One run, in this (fresh) process: losses, step times, peak MiB."""
    import keras
    import tensorflow as tf

    import tf_xent_ops as txo

    causal_lm = build_model()
    if fused:
        txo.fuse_head(causal_lm)
    x, y = batches(ids)
    dataset = tf.data.Dataset.from_tensor_slices(
        ({"token_ids": x, "padding_mask": np.ones_like(x, bool)}, y)
    )

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses, self.times = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)
            self.losses.append(float(logs["loss"]))

    record = Record()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (Linux)
    before = _status_kib("VmRSS")
    causal_lm.fit(dataset, epochs=1, verbose=0, callbacks=[record])
    peak_mib = (_status_kib("VmHWM") - before) / 1024
    result = dict(losses=record.losses, times=record.times, peak_mib=peak_mib)
    if fused:
        first = x[0, :1]  # the first sequence of the first batch
        prompt = {"token_ids": first, "padding_mask": np.zeros_like(first, bool)}
        prompt["padding_mask"][:, :16] = True
        generated = causal_lm.generate(prompt, stop_token_ids=None)
        result["prompt"] = first[0, :16].tolist()
        result["generated"] = np.asarray(generated["token_ids"])[0, 16:32].tolist()
    return result


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def run_in_fresh_process(fused, ids_path):
    out = subprocess.run(
        [sys.executable, __file__, "--run", "fused" if fused else "plain", ids_path],
        capture_output=True,
        text=True,
        env=dict(os.environ, **MEMORY_ENV),
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_step_ms(run):
    """The median step after the first five (tracing, warm-up)."""
    return 1e3 * statistics.median(run["times"][5:])


def report(plain, fused, vocabulary):
    step_ms = {"plain": median_step_ms(plain), "fused": median_step_ms(fused)}
    print(f"{'step':>5} {'plain loss':>11} {'fused loss':>11}")
    for step in range(0, STEPS, 10):
        print(f"{step:>5} {plain['losses'][step]:>11.4f} {fused['losses'][step]:>11.4f}")
    print(f"{STEPS - 1:>5} {plain['losses'][-1]:>11.4f} {fused['losses'][-1]:>11.4f}")
    saved = plain["peak_mib"] - fused["peak_mib"]
    print(
        f"median step: plain {step_ms['plain']:.0f} ms, fused {step_ms['fused']:.0f} ms; "
        f"peak memory: plain {plain['peak_mib']:.0f} MiB, fused {fused['peak_mib']:.0f} MiB "
        f"({saved:.0f} MiB saved, {saved / plain['peak_mib']:.0%})"
    )
    words = lambda ids: " ".join(vocabulary[i] for i in ids)  # noqa: E731
    print(f"prompt: {words(fused['prompt'])}\nfused model continues: {words(fused['generated'])}")
    plot(plain, fused, step_ms)


def plot(plain, fused, step_ms):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_time, ax_mem) = plt.subplots(
        1, 3, figsize=(13, 4), gridspec_kw=dict(width_ratios=[3, 1, 1])
    )
    ax_loss.plot(plain["losses"], label="plain (logits materialized)")
    ax_loss.plot(fused["losses"], "--", label="fused head (tf_xent_ops.fuse_head)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    names = ["plain", "fused"]
    ax_time.bar(names, [step_ms[n] for n in names], color=["C0", "C1"])
    ax_time.set_ylabel("median step (ms)")
    ax_mem.bar(names, [plain["peak_mib"], fused["peak_mib"]], color=["C0", "C1"])
    ax_mem.set_ylabel("peak memory during fit (MiB)")
    fig.suptitle(
        f"GPT-2-style LM, vocabulary {VOCABULARY}, {BATCH}x{SEQUENCE} tokens a step, two CPU cores"
    )
    fig.tight_layout()
    fig.savefig(PNG, dpi=100)
    print(f"wrote {os.path.relpath(PNG)}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", nargs=2, metavar=("KIND", "IDS"))
    args = parser.parse_args()
    if args.run:
        kind, ids_path = args.run
        print(json.dumps(train(kind == "fused", np.load(ids_path))))
        return
    import tempfile

    ids, vocabulary = token_ids(corpus_tokens())
    print(f"{len(ids)} tokens of Python's standard library, vocabulary {VOCABULARY}")
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.npy")
        np.save(ids_path, ids)
        plain = run_in_fresh_process(False, ids_path)
        fused = run_in_fresh_process(True, ids_path)
    report(plain, fused, vocabulary)


if __name__ == "__main__":
    main()
