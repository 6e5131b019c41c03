"""A custom training loop under MirroredStrategy with a tf_xent_ops loss.

How each reduction behaves inside `strategy.run` (Keras 3 semantics, which
tf_xent_ops keeps by reducing through keras.losses.Loss):
- "sum_over_batch_size" / "mean": the mean over the replica's batch, scaled by
  1 / num_replicas; the optimizer sums gradients across replicas, so the update
  is that of the mean over the global batch.
- "sum": the replica's sum, not scaled; the summed update is that of the sum
  over the global batch.
- None / "none": per-sample losses; divide their sum by the *global* batch
  size yourself (what tf.nn.compute_average_loss does).
- "mean_with_sample_weight": each replica divides by its own weight sum, then
  scales by 1 / num_replicas; this equals single-device training only when the
  replicas hold equal weight sums.

Run: python examples/distributed_custom_loop.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_xent_ops as txo  # noqa: E402

GLOBAL_BATCH = 32


def train(strategy, reduction, steps=5):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps * GLOBAL_BATCH, 20)).astype("float32")
    y = rng.integers(0, 5, size=steps * GLOBAL_BATCH)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(5)])
        optimizer = keras.optimizers.SGD(0.1)
        loss_fn = txo.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
            if reduction in (None, "none"):
                loss = tf.reduce_sum(loss) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    @tf.function
    def step(batch):
        strategy.run(replica_step, args=batch)

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    for batch in strategy.experimental_distribute_dataset(dataset):
        step(batch)
    return model.get_weights()


def main():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for reduction in ("sum_over_batch_size", "sum", None):
        single = train(tf.distribute.get_strategy(), reduction)
        distributed = train(mirrored, reduction)
        diff = max(np.max(np.abs(a - b)) for a, b in zip(single, distributed, strict=True))
        label = f"reduction={reduction!s:<20}"
        print(f"{label} max |weights(2 replicas) - weights(1 device)| = {diff:.1e}")
        assert diff < 1e-5


if __name__ == "__main__":
    main()
