"""Small deterministic models and data shared by the training tests and the
multi-worker script."""

import keras
import numpy as np
import reference as ref
import tensorflow as tf
from sklearn.datasets import load_digits


def mirrored_on_two_cpus():
    """MirroredStrategy over the two logical CPUs (conftest), with collective
    keys of its own. Every MirroredStrategy in a process otherwise starts at
    group key 1, instance key 1: the runtime can then pair an all-reduce with
    an earlier strategy's of the same keys, and a shape mismatch aborts every
    later collective in the process."""
    tf.distribute.MirroredStrategy._collective_key_base += 1_000
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def digits(n=128):
    x, y = load_digits(return_X_y=True)
    weights = np.random.default_rng(0).uniform(0.2, 2.0, size=n).astype("float32")
    return (x[:n] / 16.0).astype("float32"), y[:n].astype("int64"), weights


def classifier(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)]
    )


def fit_history(loss, metric, sample_weight=None, epochs=3, strategy=None, one_hot=False):
    """compile + fit of `classifier` on `digits` (labels as class indices, or
    one-hot); returns the history and the model."""
    x, y, w = digits(256)
    if one_hot:
        y = ref.one_hot(y, 10)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = classifier()
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, metrics=[metric])
    history = model.fit(
        x,
        y,
        sample_weight=w if sample_weight else None,
        batch_size=32,
        epochs=epochs,
        shuffle=False,
        verbose=0,
    )
    return history.history, model


def custom_loop(loss_obj, strategy, steps=4, global_batch=32):
    """Trains with strategy.run + apply_gradients; returns the weights.

    Unreduced losses are averaged over the global batch, as the tf.distribute
    guide prescribes; the others are used as Keras returns them (Keras scales
    'sum_over_batch_size' by 1 / num_replicas inside a replica context)."""
    x, y, w = digits(steps * global_batch)
    with strategy.scope():
        model = classifier()
        optimizer = keras.optimizers.SGD(0.5)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(global_batch)

    def replica_step(x, y, w):
        with tf.GradientTape() as tape:
            loss = loss_obj(y, model(x), sample_weight=w)
            if loss.shape.rank:
                loss = tf.reduce_sum(loss) / global_batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    @tf.function
    def step(batch):
        strategy.run(replica_step, args=batch)

    for batch in strategy.experimental_distribute_dataset(dataset):
        step(batch)
    return [np.asarray(v) for v in model.get_weights()]


def hessian_vector_product(loss_fn, z, v):
    """d<v, dL/dz>/dz for L = sum(loss_fn(z)): the Hessian of L times v, by
    differentiating the gradient (what Hessian-free methods and gradient
    penalties do)."""
    with tf.GradientTape() as outer:
        outer.watch(z)
        with tf.GradientTape() as inner:
            inner.watch(z)
            loss = tf.reduce_sum(loss_fn(z))
        along_v = tf.reduce_sum(inner.gradient(loss, z) * v)
    return outer.gradient(along_v, z)
