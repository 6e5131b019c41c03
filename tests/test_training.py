"""compile/fit, tf.distribute, SavedModel and .keras with the fused losses."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
import training_util
from subprocess_util import python_env
from subprocess_util import run_python

import tf_xent_ops as txo

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("sample_weight", [False, True])
def test_fit_follows_the_builtin_trajectory(sample_weight):
    ours, _ = training_util.fit_history(
        txo.losses.SparseCategoricalCrossentropy(from_logits=True),
        txo.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent"),
        sample_weight,
    )
    theirs, _ = training_util.fit_history(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent"),
        sample_weight,
    )
    for key in ("loss", "xent"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5)


def _segmentation_model(channels_first):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(5, 1)(x)
    if channels_first:
        x = keras.layers.Permute((3, 1, 2))(x)  # [B, classes, H, W]
    return keras.Model(inputs, x)


def test_fit_segmentation_head_with_class_axis_1(rng):
    x = rng.uniform(size=(16, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 5, size=(16, 8, 8))
    histories = []
    for loss, channels_first in (
        (txo.losses.SparseCategoricalCrossentropy(from_logits=True, axis=1), True),
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), False),
        (txo.losses.CategoricalCrossentropy(from_logits=True, axis=1), True),
    ):
        model = _segmentation_model(channels_first)
        model.compile(optimizer="sgd", loss=loss)
        y = (
            ref.one_hot(labels, 5, axis=1)
            if isinstance(loss, txo.losses.CategoricalCrossentropy)
            else labels
        )
        histories.append(model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0))
    for history in histories[1:]:
        np.testing.assert_allclose(history.history["loss"], histories[0].history["loss"], rtol=1e-5)


def test_fit_ignore_class_on_padded_sequences(rng):
    vocab, steps = 12, 7
    x = rng.integers(1, vocab, size=(32, steps))
    y = rng.integers(0, 4, size=(32, steps))
    lengths = rng.integers(2, steps + 1, size=32)
    padding = np.arange(steps)[None, :] >= lengths[:, None]
    y[padding] = -1
    histories = []
    for loss_cls in (
        txo.losses.SparseCategoricalCrossentropy,
        keras.losses.SparseCategoricalCrossentropy,
    ):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [keras.Input((steps,)), keras.layers.Embedding(vocab, 8), keras.layers.Dense(4)]
        )
        model.compile(optimizer="adam", loss=loss_cls(from_logits=True, ignore_class=-1))
        histories.append(model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0))
    np.testing.assert_allclose(
        histories[0].history["loss"], histories[1].history["loss"], rtol=1e-5
    )


def test_mirrored_fit_equals_single_device():
    args = (
        txo.losses.SparseCategoricalCrossentropy(from_logits=True),
        txo.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent"),
    )
    single, single_model = training_util.fit_history(*args, sample_weight=True)
    mirrored, mirrored_model = training_util.fit_history(
        *args, sample_weight=True, strategy=training_util.mirrored_on_two_cpus()
    )
    for key in ("loss", "xent"):
        np.testing.assert_allclose(mirrored[key], single[key], rtol=1e-5)
    for a, b in zip(mirrored_model.get_weights(), single_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# 'mean_with_sample_weight' divides by each replica's own weight sum, so it
# equals single-device training only when replicas hold equal weight sums
# (true of Keras's built-in as well); it is compared with the built-in below.
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean", None, "none"])
def test_mirrored_custom_loop_equals_single_device(reduction):
    loss = txo.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    single = training_util.custom_loop(loss, tf.distribute.get_strategy())
    mirrored = training_util.custom_loop(loss, training_util.mirrored_on_two_cpus())
    for a, b in zip(mirrored, single, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean_with_sample_weight", "sum_over_batch_size"])
def test_mirrored_custom_loop_equals_builtin(reduction):
    ours = training_util.custom_loop(
        txo.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction),
        training_util.mirrored_on_two_cpus(),
    )
    theirs = training_util.custom_loop(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction),
        training_util.mirrored_on_two_cpus(),
    )
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mirrored_metric_aggregates_across_replicas():
    x, y, w = training_util.digits(96)
    results = []
    for strategy in (tf.distribute.get_strategy(), training_util.mirrored_on_two_cpus()):
        with strategy.scope():
            model = training_util.classifier()
            model.compile(
                loss=txo.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[txo.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent")],
            )
        results.append(
            model.evaluate(x, y, sample_weight=w, batch_size=32, verbose=0, return_dict=True)
        )
    np.testing.assert_allclose(results[1]["xent"], results[0]["xent"], rtol=1e-5)
    np.testing.assert_allclose(results[1]["loss"], results[0]["loss"], rtol=1e-5)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
def test_multi_worker_mirrored_equals_single_device(tmp_path, reduction):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    out = tmp_path / "weights.npz"
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = python_env(TF_CONFIG=json.dumps(tf_config))
        processes.append(
            subprocess.Popen(
                [sys.executable, os.path.join(HERE, "multi_worker_train.py"), str(out), reduction],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert all(p.returncode == 0 for p in processes), "\n".join(o[-3000:] for o in outputs)
    loss = txo.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    single = training_util.custom_loop(loss, tf.distribute.get_strategy())
    multi = np.load(out)
    for i, expected in enumerate(single):
        np.testing.assert_allclose(multi[f"arr_{i}"], expected, rtol=1e-4, atol=1e-6)


class _LossModule(tf.Module):
    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, None], tf.float32)]
    )
    def loss(self, y, logits):
        return txo.sparse_categorical_crossentropy(y, logits, from_logits=True, label_smoothing=0.1)


RELOAD = """
import sys
import numpy as np
import tensorflow as tf
if sys.argv[2] == "import":
    import tf_xent_ops
module = tf.saved_model.load(sys.argv[1])
data = np.load(sys.argv[3])
np.save(sys.argv[4], module.loss(data["y"], data["logits"]).numpy())
"""


def _save_loss_module(tmp_path, rng):
    module = _LossModule()
    graph = module.loss.get_concrete_function().graph.as_graph_def()
    assert "TfXent>SparseXent" in {node.op for node in graph.node}
    path = str(tmp_path / "loss_module")
    tf.saved_model.save(module, path)
    y, logits = rng.integers(0, 6, size=10), ref.logits(rng, (10, 6), "float32")
    np.savez(tmp_path / "data.npz", y=y, logits=logits)
    return path, module.loss(y, logits).numpy()


def test_saved_model_with_the_op_reloads_in_a_fresh_process(tmp_path, rng):
    path, expected = _save_loss_module(tmp_path, rng)
    run_python(RELOAD, path, "import", tmp_path / "data.npz", tmp_path / "out.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_saved_model_without_import_names_the_op(tmp_path, rng):
    path, _ = _save_loss_module(tmp_path, rng)
    result = run_python(
        RELOAD, path, "no-import", tmp_path / "data.npz", tmp_path / "out.npy", check=False
    )
    assert result.returncode != 0
    assert "Op type not registered 'TfXent>SparseXent'" in result.stderr


EXPORTED = """
import sys
import numpy as np
import tensorflow as tf
import tf_xent_ops
reloaded = tf.saved_model.load(sys.argv[1])
np.save(sys.argv[3], reloaded.serve(np.load(sys.argv[2])).numpy())
"""


def test_model_export_reloads_in_a_fresh_process(tmp_path):
    x, y, _ = training_util.digits(64)
    model = training_util.classifier()
    model.compile(optimizer="sgd", loss=txo.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    model.export(str(tmp_path / "exported"), verbose=False)
    np.save(tmp_path / "x.npy", x)
    run_python(EXPORTED, tmp_path / "exported", tmp_path / "x.npy", tmp_path / "out.npy")
    # One batch of 64 on both sides: predict's default batches of 32 take another
    # matmul blocking on some CPUs, 1e-7 apart. A reload that lost or mixed up the
    # weights is 1e-1 apart.
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"),
        model.predict(x, batch_size=len(x), verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


RESUME = """
import sys
import numpy as np
import keras
import tf_xent_ops
import training_util
model = keras.models.load_model(sys.argv[1])
x, y, w = training_util.digits(128)
assert type(model.loss).__module__ == "tf_xent_ops.losses", type(model.loss)
model.fit(x, y, sample_weight=w, batch_size=32, epochs=1, shuffle=False, verbose=0)
np.savez(sys.argv[2], *model.get_weights())
"""


def test_keras_file_round_trip_resumes_training_identically(tmp_path):
    x, y, w = training_util.digits(128)
    model = training_util.classifier()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=txo.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        metrics=[txo.metrics.SparseCategoricalCrossentropy(from_logits=True)],
    )
    model.fit(x, y, sample_weight=w, batch_size=32, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    model.fit(x, y, sample_weight=w, batch_size=32, epochs=1, shuffle=False, verbose=0)
    run_python(RESUME, tmp_path / "m.keras", tmp_path / "resumed.npz")
    resumed = np.load(tmp_path / "resumed.npz")
    for i, expected in enumerate(model.get_weights()):
        np.testing.assert_allclose(resumed[f"arr_{i}"], expected, rtol=1e-5, atol=1e-7)


def test_distributed_custom_loop_example_runs():
    example = os.path.join(os.path.dirname(HERE), "examples", "distributed_custom_loop.py")
    result = subprocess.run(
        [sys.executable, example], env=python_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("max |weights") == 3
