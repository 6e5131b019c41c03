"""Trains a digits classifier with tf_xent_ops and with the Keras built-ins.

Both runs use the same seed, data and model, under MirroredStrategy over two
logical CPUs. The script prints a side-by-side table, exports a SavedModel
whose `loss` signature runs the fused op, reloads it in a fresh Python process
(after `import tf_xent_ops`) and checks that its outputs agree.

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


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


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
    timer = EpochTimer()
    history = model.fit(
        *train_data,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        validation_data=test_data,
        callbacks=[timer],
        verbose=1,
    )
    return model, history.history, timer.seconds


def print_table(keras_run, txo_run):
    (_, k, k_time), (_, t, t_time) = keras_run, txo_run
    print("\nSide by side (same seed, same data; MirroredStrategy over 2 logical CPUs):")
    header = (
        f"{'epoch':>5} | {'keras loss':>10} {'txo loss':>10} | {'keras val':>9} {'txo val':>9}"
        f" | {'keras acc':>9} {'txo acc':>9} | {'keras s':>7} {'txo s':>7}"
    )
    print(header)
    print("-" * len(header))
    for e in range(EPOCHS):
        print(
            f"{e + 1:>5} | {k['loss'][e]:>10.5f} {t['loss'][e]:>10.5f}"
            f" | {k['val_loss'][e]:>9.5f} {t['val_loss'][e]:>9.5f}"
            f" | {k['val_accuracy'][e]:>9.4f} {t['val_accuracy'][e]:>9.4f}"
            f" | {k_time[e]:>7.2f} {t_time[e]:>7.2f}"
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


if __name__ == "__main__":
    main()
