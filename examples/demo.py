"""Trains a digits classifier with tf_xent_ops and with the Keras built-ins.

Both runs use the same seed, data and model, under MirroredStrategy over two
logical CPUs. The script prints a side-by-side table of the trajectories,
exports a SavedModel whose `loss` signature runs the fused op, reloads it in a
fresh Python process (after `import tf_xent_ops`) and checks that its outputs
agree. Last, it times the loss alone where the loss is the cost of a step:
forward + backward on 4096 x 1000 logits, ours and Keras's in turns. (On the
digits model the loss is a sliver of each epoch, so epoch times would only
show noise.)

Run it with `make demo`.
"""

import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tf_xent_ops as txo  # noqa: E402

EPOCHS = 6
BATCH_SIZE = 64
# The shape of the loss-alone timing, and how it is timed.
TIMED_ROWS, TIMED_CLASSES = 4096, 1000
TIMED_ROUNDS, CALLS_PER_ROUND = 7, 10

RELOAD_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
import tf_xent_ops  # registers the custom op before the SavedModel is loaded

path, x_path, y_path, out_path = sys.argv[1:]
module = tf.saved_model.load(path)
x, y = np.load(x_path), np.load(y_path)
np.savez(out_path, logits=module.predict(x).numpy(), loss=module.loss(x, y).numpy())
"""


def load_data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype("int64")
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def train(title, loss, metric, train_data, test_data):
    print(f"\n=== {title} ===")
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy", metric]
        )
    history = model.fit(
        *train_data,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        validation_data=test_data,
        verbose=1,
    )
    return model, history.history


def print_table(keras_run, txo_run):
    (_, k), (_, t) = keras_run, txo_run
    print("\nSide by side (same seed, same data; MirroredStrategy over 2 logical CPUs):")
    header = (
        f"{'epoch':>5} | {'keras loss':>10} {'txo loss':>10} | {'keras val':>9} {'txo val':>9}"
        f" | {'keras acc':>9} {'txo acc':>9}"
    )
    print(header)
    print("-" * len(header))
    for e in range(EPOCHS):
        print(
            f"{e + 1:>5} | {k['loss'][e]:>10.5f} {t['loss'][e]:>10.5f}"
            f" | {k['val_loss'][e]:>9.5f} {t['val_loss'][e]:>9.5f}"
            f" | {k['val_accuracy'][e]:>9.4f} {t['val_accuracy'][e]:>9.4f}"
        )
    worst = max(abs(a - b) for a, b in zip(k["loss"], t["loss"], strict=True))
    print(f"largest per-epoch training-loss difference: {worst:.2e}")


class Serving(tf.Module):
    """What gets exported: predictions, and the loss computed by the fused op."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32)])
    def predict(self, x):
        return self.model(x, training=False)

    @tf.function(
        input_signature=[tf.TensorSpec([None, 64], tf.float32), tf.TensorSpec([None], tf.int64)]
    )
    def loss(self, x, y):
        return txo.sparse_categorical_crossentropy(y, self.model(x), from_logits=True)


def export_and_reload(model, x, y):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits_savedmodel")
        serving = Serving(model)
        tf.saved_model.save(serving, path)
        graph = serving.loss.get_concrete_function().graph.as_graph_def()
        assert any(node.op == "TfXent>SparseXent" for node in graph.node)
        x_path, y_path = os.path.join(tmp, "x.npy"), os.path.join(tmp, "y.npy")
        out_path = os.path.join(tmp, "reloaded.npz")
        np.save(x_path, x)
        np.save(y_path, y)
        subprocess.run(
            [sys.executable, "-c", RELOAD_SCRIPT, path, x_path, y_path, out_path], check=True
        )
        reloaded = np.load(out_path)
        logits = serving.predict(x).numpy()
        loss = serving.loss(x, y).numpy()
        print(f"\nExported a SavedModel whose `loss` signature runs TfXent>SparseXent: {path}")
        print("Reloaded it in a fresh Python process (with `import tf_xent_ops`):")
        print(f"  max |logits difference|   = {np.max(np.abs(reloaded['logits'] - logits)):.2e}")
        print(f"  max |loss difference|     = {np.max(np.abs(reloaded['loss'] - loss)):.2e}")
        same_classes = np.mean(reloaded["logits"].argmax(-1) == logits.argmax(-1))
        print(f"  same predicted class for  {same_classes:.0%} of {len(x)} test digits")
        np.testing.assert_allclose(reloaded["logits"], logits, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(reloaded["loss"], loss, rtol=1e-6, atol=1e-6)


def _loss_step(loss_fn):
    """One training step of the loss alone: its value and its gradient with
    respect to the logits, as a model's backward pass would need them."""

    def step(logits, labels):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = loss_fn(labels, logits)
        return loss, tape.gradient(loss, logits)

    return tf.function(step)


def time_loss_alone():
    """Times forward + backward of each loss on the same logits, in turns (a
    batch of calls each, so both see the machine in the same state), and
    prints the median per-call time of each and their ratio."""
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(TIMED_ROWS, TIMED_CLASSES)).astype("float32"))
    labels = tf.constant(rng.integers(0, TIMED_CLASSES, TIMED_ROWS))
    steps = {
        "Keras built-in": _loss_step(keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
        "tf_xent_ops": _loss_step(txo.losses.SparseCategoricalCrossentropy(from_logits=True)),
    }
    per_call = {name: [] for name in steps}
    for step in steps.values():  # trace and warm up
        step(logits, labels)
    for _ in range(TIMED_ROUNDS):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(CALLS_PER_ROUND):
                _, grad = step(logits, labels)
            grad.numpy()
            per_call[name].append((time.perf_counter() - start) / CALLS_PER_ROUND)
    keras_ms, txo_ms = (1e3 * float(np.median(per_call[name])) for name in steps)
    print(
        f"\nThe loss alone, one training step (forward + backward) on {TIMED_ROWS} x "
        f"{TIMED_CLASSES} float32 logits with integer labels, median of {TIMED_ROUNDS} "
        f"rounds of {CALLS_PER_ROUND} calls, in turns:"
    )
    print(f"  Keras built-in SparseCategoricalCrossentropy  {keras_ms:7.2f} ms")
    print(f"  tf_xent_ops SparseCategoricalCrossentropy     {txo_ms:7.2f} ms")
    print(f"  tf_xent_ops is {keras_ms / txo_ms:.1f}x as fast on this machine")


def main():
    train_data, test_data = load_data()
    keras_run = train(
        "Keras built-in SparseCategoricalCrossentropy",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent"),
        train_data,
        test_data,
    )
    txo_run = train(
        "tf_xent_ops SparseCategoricalCrossentropy",
        txo.losses.SparseCategoricalCrossentropy(from_logits=True),
        txo.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent"),
        train_data,
        test_data,
    )
    print_table(keras_run, txo_run)
    export_and_reload(txo_run[0], *test_data)
    time_loss_alone()


if __name__ == "__main__":
    main()
