"""Serialization: configs, registered names, keras.losses.get / metrics.get."""

import keras
import numpy as np
import pytest
import reference as ref

import tf_xent_ops as txo

LOSSES = [
    txo.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=0.1, axis=1, reduction="sum", name="cce"
    ),
    txo.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1, axis=1, label_smoothing=0.2, reduction=None
    ),
    txo.losses.SparseCategoricalCrossentropy(from_logits=True, z_loss=1e-4, logit_soft_cap=30.0),
    txo.losses.CategoricalCrossentropy(from_logits=True, z_loss=0.5, logit_soft_cap=2.5),
]
METRICS = [
    txo.metrics.CategoricalCrossentropy(name="m", from_logits=True, label_smoothing=0.1, axis=1),
    txo.metrics.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1, axis=1),
    txo.metrics.CategoricalCrossentropy(from_logits=True, logit_soft_cap=30.0),
]


@pytest.mark.parametrize("obj", LOSSES + METRICS, ids=lambda o: type(o).__module__ + o.name)
def test_config_round_trip(obj):
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
    assert type(restored) is type(obj)
    assert restored.get_config() == config


def test_config_matches_keras_keys():
    # Keras's keys and values, plus the options Keras does not have.
    ours = txo.losses.CategoricalCrossentropy().get_config()
    theirs = keras.losses.CategoricalCrossentropy().get_config()
    assert ours == {**theirs, "z_loss": 0.0, "logit_soft_cap": None}
    ours_metric = txo.metrics.SparseCategoricalCrossentropy().get_config()
    theirs_metric = keras.metrics.SparseCategoricalCrossentropy().get_config()
    assert ours_metric == {**theirs_metric, "logit_soft_cap": None}
    # A Keras config is one of ours.
    clone = txo.losses.CategoricalCrossentropy.from_config(theirs)
    assert clone.get_config() == ours


def test_registered_names():
    assert (
        keras.saving.get_registered_name(txo.losses.SparseCategoricalCrossentropy)
        == "tf_xent_ops>SparseCategoricalCrossentropy"
    )
    assert (
        keras.saving.get_registered_name(txo.metrics.CategoricalCrossentropy)
        == "tf_xent_ops>CategoricalCrossentropyMetric"
    )


def test_get_by_registered_name(rng):
    # keras.losses.get / keras.metrics.get resolve plain strings against the
    # built-ins only; registered names go through the config (dict) form.
    loss = keras.losses.get(
        {"class_name": "tf_xent_ops>SparseCategoricalCrossentropy", "config": {"axis": 1}}
    )
    assert isinstance(loss, txo.losses.SparseCategoricalCrossentropy) and loss.axis == 1
    metric = keras.metrics.get(
        {"class_name": "tf_xent_ops>CategoricalCrossentropyMetric", "config": {}}
    )
    assert isinstance(metric, txo.metrics.CategoricalCrossentropy)
    fn = keras.saving.get_registered_object("tf_xent_ops>sparse_categorical_crossentropy")
    assert fn is txo.sparse_categorical_crossentropy
    p = ref.logits(rng, (3, 4), "float32")
    np.testing.assert_allclose(
        fn([0, 1, 2], p, from_logits=True),
        # Keras's own function fails on a plain list; ours converts first.
        keras.losses.sparse_categorical_crossentropy(np.array([0, 1, 2]), p, from_logits=True),
        rtol=2e-5,
        atol=2e-6,
    )


def test_deserialized_loss_computes_the_same(rng):
    loss = LOSSES[1]
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    p = ref.logits(rng, (2, 5, 3), "float32")
    y = rng.integers(-1, 5, size=(2, 3))
    np.testing.assert_array_equal(loss(y, p), restored(y, p))
