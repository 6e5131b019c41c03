"""Accuracy of the loss functions on 16-bit predictions: ours against Keras's.

Keras 3.15's functions (and its metrics, which call them) compute float16 and
bfloat16 predictions in that type; ours compute in float32 and round the loss
once. Both are measured against float64 (Keras's function on the same rounded
inputs, upcast), per position: the largest relative error where the loss is
above 0.5, the largest absolute error, and the relative error of the mean
(what a metric reports). Inputs are drawn as the tests draw them.

    python bench/accuracy_16bit.py              # 4096 x 32, seeds 0 to 3
    python bench/accuracy_16bit.py --rows 256 --seeds 1
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import reference as ref  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_xent_ops as txo  # noqa: E402

FORMS = [(sparse, from_logits) for sparse in (True, False) for from_logits in (True, False)]


def errors(loss, exact):
    """(max relative error where exact > 0.5, max absolute error, relative
    error of the mean) of `loss` against float64 `exact`."""
    loss = np.asarray(tf.cast(loss, tf.float64))
    big = exact > 0.5
    return (
        float(np.max(np.abs(loss - exact)[big] / exact[big])),
        float(np.max(np.abs(loss - exact))),
        float(abs(loss.mean() - exact.mean()) / exact.mean()),
    )


def measure(dtype, sparse, from_logits, rows, classes, seed):
    """{"ours": errors, "keras": errors} for one form, dtype and seed."""
    rng = np.random.default_rng(seed)
    shape = (rows, classes)
    if from_logits:
        p = ref.logits(rng, shape, dtype)
    else:
        p = ref.probabilities(rng, shape, dtype)
    labels = rng.integers(0, classes, size=rows)
    y = labels if sparse else ref.one_hot(labels, classes)
    name = "sparse_categorical_crossentropy" if sparse else "categorical_crossentropy"
    exact = np.asarray(
        getattr(keras.losses, name)(y, p.astype(np.float64), from_logits=from_logits)
    )
    ours = getattr(txo, name)(y, p, from_logits=from_logits)
    theirs = getattr(keras.losses, name)(y, tf.constant(p), from_logits=from_logits)
    return {"ours": errors(ours, exact), "keras": errors(theirs, exact)}


def worst(dtype, sparse, from_logits, rows, classes, seeds):
    """The largest of each error over the seeds, for ours and Keras's."""
    runs = [measure(dtype, sparse, from_logits, rows, classes, s) for s in range(seeds)]
    return {k: tuple(max(r[k][i] for r in runs) for i in range(3)) for k in ("ours", "keras")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    print(f"{args.rows} x {args.classes}, worst of {args.seeds} seeds")
    print("| dtype | labels | predictions | ours: rel / abs / mean | Keras: rel / abs / mean |")
    print("|---|---|---|---|---|")
    for dtype in ("float16", "bfloat16"):
        for sparse, from_logits in FORMS:
            w = worst(dtype, sparse, from_logits, args.rows, args.classes, args.seeds)
            cells = [" / ".join(f"{e:.1e}" for e in w[k]) for k in ("ours", "keras")]
            labels = "sparse" if sparse else "dense"
            predictions = "logits" if from_logits else "probabilities"
            print(f"| {dtype} | {labels} | {predictions} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
