"""fuse_head: Keras models trained through fit with the head fused into the
loss follow the unfused model step for step (losses, metrics, weights), under
Keras's reductions, sample weights, masks, ignore_class, tf.distribute, XLA
and mixed precision; predict, save/load and keras-hub's generate still work;
and the traced train step holds no [tokens, vocabulary] tensor."""

import contextlib
import json
import os
import subprocess
import sys

import graph_util
import keras
import numpy as np
import pytest
import tensorflow as tf
import training_util

import tf_xent_ops as txo

V, D, T, B = 300, 16, 12, 64


def _dense_model(seed, bias=True):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((T,), dtype="int32")
    hidden = keras.layers.Embedding(V, D)(inputs)
    hidden = keras.layers.Dense(D, activation="tanh")(hidden)
    return keras.Model(inputs, keras.layers.Dense(V, use_bias=bias, name="logits")(hidden))


def _regularized_head_model():
    """A model whose head carries a regularization loss."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((T,), dtype="int32")
    hidden = keras.layers.Embedding(V, D)(inputs)
    head = keras.layers.Dense(V, kernel_regularizer=keras.regularizers.L2(1e-2))
    return keras.Model(inputs, head(hidden))


class TiedModel(keras.Model):
    """A subclassed model whose head is its tied, capped embedding."""

    def __init__(self, tie_weights=True, logit_soft_cap=3.0, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.ReversibleEmbedding(
            V, D, tie_weights=tie_weights, logit_soft_cap=logit_soft_cap
        )
        self.mix = keras.layers.Dense(D, activation="tanh")

    def call(self, x):
        return self.embedding(self.mix(self.embedding(x)), reverse=True)


def _tied_model(seed, **kwargs):
    keras.utils.set_random_seed(seed)
    model = TiedModel(**kwargs)
    model(np.zeros((1, T), "int32"))
    return model


def _data(rng, weights="positions"):
    x = rng.integers(0, V, (B, T))
    y = rng.integers(0, V, (B, T))
    if weights == "positions":
        return x, y, (rng.random((B, T)) > 0.2).astype("float32")
    return x, y, None


def _train_both(build, compile_kwargs, data, head=None, epochs=2, strategy=None, **fit_kwargs):
    """Fits the plain and the fused model from the same weights on the same
    batches; returns (history, evaluate results, weights) of each."""
    x, y, sample_weight = data
    results = []
    for fused in (False, True):
        scope = strategy.scope() if (strategy and fused) else contextlib.nullcontext()
        with scope:
            model = build()
            if fused:
                txo.fuse_head(model, head(model) if head else None)
            model.compile(**compile_kwargs())
        history = model.fit(
            x, y, sample_weight=sample_weight, batch_size=16, epochs=epochs,
            shuffle=False, verbose=0, **fit_kwargs,
        )  # fmt: skip
        evaluated = model.evaluate(x, y, sample_weight=sample_weight, verbose=0, return_dict=True)
        results.append((history.history, evaluated, [w.numpy() for w in model.weights], model))
    return results


def _assert_same_training(results, rtol=1e-5, weights_rtol=1e-4):
    (plain_history, plain_eval, plain_weights, _), (history, evaluated, weights, _) = results
    assert history.keys() == plain_history.keys()
    for key in history:
        np.testing.assert_allclose(
            history[key], plain_history[key], rtol=rtol, atol=1e-7, err_msg=key
        )
    assert evaluated.keys() == plain_eval.keys()
    for key in evaluated:
        np.testing.assert_allclose(
            evaluated[key], plain_eval[key], rtol=rtol, atol=1e-7, err_msg=key
        )
    for w, plain_w in zip(weights, plain_weights, strict=True):
        np.testing.assert_allclose(w, plain_w, rtol=weights_rtol, atol=1e-6)


def _compile(
    loss=None, metrics=("accuracy",), weighted_metrics=("accuracy",), learning_rate=0.5, **kwargs
):
    def make():
        return dict(
            optimizer=keras.optimizers.SGD(learning_rate),
            loss=loss() if loss else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            # Metric objects are made per model: compile keeps their state.
            metrics=[m() if callable(m) else m for m in metrics],
            weighted_metrics=list(weighted_metrics),
            **kwargs,
        )

    return make


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weights", ["positions", None])
def test_dense_head_trains_as_unfused(rng, bias, weights):
    results = _train_both(lambda: _dense_model(1, bias), _compile(), _data(rng, weights))
    _assert_same_training(results)


@pytest.mark.parametrize(
    "loss",
    [
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"),
        lambda: keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
        lambda: txo.losses.SparseCategoricalCrossentropy(
            from_logits=True, label_smoothing=0.1, z_loss=1e-3, ignore_class=3
        ),
    ],
    ids=["sum", "mean_with_sample_weight", "keras ignore_class", "ours smoothing z-loss"],
)
def test_reductions_and_loss_options(rng, loss):
    x, y, sample_weight = _data(rng)
    y[:, :3] = np.where(rng.random((B, 3)) < 0.5, 0, 3)  # some ignored labels
    metrics = [
        "accuracy",
        lambda: keras.metrics.SparseCategoricalCrossentropy(name="keras_ce", from_logits=True),
        lambda: txo.metrics.SparseCategoricalCrossentropy(
            name="ce", from_logits=True, ignore_class=3
        ),
    ]
    # "sum" adds up B * T positions: a smaller step keeps training stable.
    learning_rate = 0.5 / (B * T) if loss().reduction == "sum" else 0.5
    compile_kwargs = _compile(loss, metrics=metrics, learning_rate=learning_rate)
    results = _train_both(lambda: _dense_model(1), compile_kwargs, (x, y, sample_weight))
    _assert_same_training(results)


@pytest.mark.parametrize(
    "loss_weights", [0.5, [0.5], {"logits": 0.5}], ids=["scalar", "list", "dict"]
)
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "none"])
def test_loss_weights(rng, loss_weights, reduction):
    """compile's loss_weights scale the fused loss and its gradients as
    Keras's CompileLoss scales the unfused one."""
    loss = lambda: keras.losses.SparseCategoricalCrossentropy(  # noqa: E731
        from_logits=True, reduction=reduction
    )
    # "none" adds up the positions' gradients: a smaller step, as for "sum".
    learning_rate = 0.5 / (B * T) if reduction == "none" else 0.5
    compile_kwargs = _compile(loss, loss_weights=loss_weights, learning_rate=learning_rate)
    _assert_same_training(_train_both(lambda: _dense_model(1), compile_kwargs, _data(rng)))


@pytest.mark.parametrize("label_dtype", ["uint8", "int16", "uint16", "float32"])
def test_accuracy_with_other_label_dtypes(rng, label_dtype):
    """Labels of any integer (or float) dtype: accuracy compares the arg-max
    with them as Keras's does."""
    x, y, sample_weight = _data(rng)
    y = (y % 256).astype(label_dtype)
    _assert_same_training(_train_both(lambda: _dense_model(1), _compile(), (x, y, sample_weight)))


@pytest.mark.parametrize("compiled_loss", ["none_with_ignore_class", "no_loss"])
def test_accuracy_with_labels_out_of_range(rng, compiled_loss):
    """Accuracy over labels the plain op rejects (ignore_class's -100): from
    the loss's own pass (reduction "none" included), or, without a compiled
    loss (a regularization loss alone), from a pass of its own."""
    x, y, sample_weight = _data(rng)
    y[:, -3:] = -100
    build = _regularized_head_model
    if compiled_loss == "no_loss":
        compile_kwargs = _compile(loss=lambda: None)
    else:
        loss = lambda: keras.losses.SparseCategoricalCrossentropy(  # noqa: E731
            from_logits=True, ignore_class=-100, reduction="none"
        )
        compile_kwargs = _compile(loss, learning_rate=0.5 / (B * T))
        build = lambda: _dense_model(1)  # noqa: E731 (Keras adds no scalar to "none")
    _assert_same_training(_train_both(build, compile_kwargs, (x, y, sample_weight)))


class OpAfterHead(keras.Model):
    def __init__(self, after, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(V, D)
        self.head = keras.layers.Dense(V, name="the_head")
        self.after = after

    def call(self, x):
        return self.after(self.head(self.embedding(x)))


@pytest.mark.parametrize(
    "after",
    [lambda z: z * 1.0, lambda z: keras.ops.cast(z, "float16"), lambda z: z[:, 1:]],
    ids=["scale", "cast", "slice"],
)
def test_op_after_the_head_raises(rng, after):
    """An op after the head would leave Keras's loss the hidden states to
    read as logits: a fused step raises, naming the head."""
    x, y, _ = _data(rng)
    model = OpAfterHead(after)
    model(x[:1])
    txo.fuse_head(model, model.head)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    for run in (model.fit, model.evaluate):
        with pytest.raises(ValueError, match="'the_head' must be the model's output"):
            run(x, y, verbose=0)
    assert model.predict(x[:2], verbose=0).shape[-1] == V  # unfused calls as ever


@pytest.mark.parametrize("tie_weights", [True, False])
def test_reversible_embedding_head_with_soft_cap(rng, tie_weights):
    results = _train_both(
        lambda: _tied_model(1, tie_weights=tie_weights),
        _compile(),
        _data(rng),
        head=lambda model: model.embedding,
    )
    _assert_same_training(results)


def test_regularization_losses_are_added(rng):
    _assert_same_training(_train_both(_regularized_head_model, _compile(), _data(rng)))


def test_mirrored_strategy_trains_as_single_device(rng):
    """Under MirroredStrategy (two CPU replicas) the fused model follows the
    plain model trained on one device: Keras's 1/replicas scaling applies."""
    strategy = training_util.mirrored_on_two_cpus()
    results = _train_both(lambda: _dense_model(1), _compile(), _data(rng), strategy=strategy)
    _assert_same_training(results, rtol=1e-4)


def test_jit_compile(rng):
    results = _train_both(lambda: _dense_model(1), _compile(jit_compile=True), _data(rng))
    _assert_same_training(results, rtol=1e-4)


def test_mixed_precision(rng):
    """mixed_bfloat16: float32 variables, bfloat16 logits in both models (the
    fused kernel gradient accumulates in float32 across chunks)."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        results = _train_both(lambda: _dense_model(1), _compile(), _data(rng), epochs=1)
    finally:
        keras.config.set_dtype_policy("float32")
    (plain_history, _, plain_weights, _), (history, _, weights, _) = results
    np.testing.assert_allclose(history["loss"], plain_history["loss"], rtol=2e-2)
    for w, plain_w in zip(weights, plain_weights, strict=True):
        np.testing.assert_allclose(w, plain_w, rtol=0.1, atol=2e-2)


def test_predict_returns_logits_and_save_reloads_in_a_fresh_process(rng, tmp_path):
    x, y, sample_weight = _data(rng)
    (_, _, _, plain), (_, _, _, model) = _train_both(
        lambda: _dense_model(1), _compile(), (x, y, sample_weight)
    )
    logits = model.predict(x, verbose=0)
    assert logits.shape == (B, T, V)
    np.testing.assert_allclose(logits, plain.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    path = str(tmp_path / "model.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import json, sys, keras, numpy as np, tf_xent_ops\n"
        f"model = keras.saving.load_model({path!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, model.predict(x, verbose=0))\n"
        "print(json.dumps(type(model).__name__))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == "Functional"
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), logits, rtol=1e-5, atol=1e-6)


def test_train_step_holds_no_tokens_by_vocabulary_tensor(rng):
    """The traced train step, loops included, has no tensor of B*T*V elements
    (the unfused one has: the check can fail)."""
    x, y, _ = _data(rng)
    for fused in (False, True):
        model = _dense_model(1)
        if fused:
            txo.fuse_head(model, chunk_size=32)
        model.compile(**_compile()())
        model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
        spec = tf.TensorSpec([16, T], tf.int64)
        graph = tf.function(model.train_step).get_concrete_function((spec, spec)).graph
        shapes = [shape for _, _, shape in graph_util.tensor_shapes(graph)]
        logits_sized = [s for s in shapes if graph_util.holds_at_least(s, 16 * T, V)]
        if fused:
            assert not logits_sized, logits_sized[:5]
            assert [32, V] in [s.as_list() for s in shapes if s.is_fully_defined()]  # seen
        else:
            assert logits_sized


@pytest.mark.parametrize(
    "model, message",
    [
        (
            lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, "softmax")]),
            "activation",
        ),
        (lambda: keras.Sequential([keras.Input((3,)), keras.layers.Activation("relu")]), "Dense"),
    ],
)
def test_bad_heads(model, message):
    with pytest.raises(ValueError, match=message):
        txo.fuse_head(model())


@pytest.mark.parametrize(
    "compile_kwargs, message",
    [
        (dict(loss="sparse_categorical_crossentropy"), "of logits"),
        (dict(loss=keras.losses.SparseCategoricalCrossentropy()), "of logits"),
        (dict(loss=keras.losses.MeanSquaredError()), "of logits"),
        (
            dict(
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=2)],
            ),
            "needs the logits",
        ),
    ],
)
def test_losses_and_metrics_it_cannot_fuse(rng, compile_kwargs, message):
    x, y, _ = _data(rng)
    model = txo.fuse_head(_dense_model(1))
    model.compile(optimizer="sgd", **compile_kwargs)
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, epochs=1, verbose=0)


def test_cap_in_both_head_and_loss(rng):
    x, y, _ = _data(rng)
    model = _tied_model(1)
    txo.fuse_head(model, model.embedding)
    model.compile(
        optimizer="sgd",
        loss=txo.losses.SparseCategoricalCrossentropy(from_logits=True, logit_soft_cap=5.0),
    )
    with pytest.raises(ValueError, match="cap once"):
        model.fit(x, y, epochs=1, verbose=0)


# keras-hub's causal LMs: a one-line change.


def _hub():
    return pytest.importorskip("keras_hub")


def _gpt2(seed):
    hub = _hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.GPT2Backbone(
        vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
        max_sequence_length=32,
    )  # fmt: skip
    return hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _gemma(seed):
    hub = _hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.GemmaBackbone(
        vocabulary_size=V, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=32, intermediate_dim=64, head_dim=16, final_logit_soft_cap=30.0,
        attention_logit_soft_cap=50.0, use_post_ffw_norm=True, use_post_attention_norm=True,
        query_head_dim_normalize=True, use_sliding_window_attention=False,
    )  # fmt: skip
    return hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


@pytest.mark.parametrize("build", [_gpt2, _gemma], ids=["GPT2CausalLM", "GemmaCausalLM"])
def test_keras_hub_causal_lm(rng, build):
    """Trained through fit with keras-hub's own compile defaults plus the one
    line `fuse_head(causal_lm)`, the model follows the unfused one, and
    generates the same tokens afterwards."""
    ids = rng.integers(0, V, (32, 17))
    padding_mask = np.ones((32, 16), bool)
    padding_mask[:8, 10:] = False
    x = {"token_ids": ids[:, :-1], "padding_mask": padding_mask}
    y = ids[:, 1:]
    models = []
    for fused in (False, True):
        causal_lm = build(1)
        if fused:
            txo.fuse_head(causal_lm)
        causal_lm.compile(optimizer=keras.optimizers.Adam(1e-3), sampler="greedy")
        history = causal_lm.fit(
            x, y, sample_weight=padding_mask, batch_size=8, epochs=2, shuffle=False, verbose=0
        )
        models.append((causal_lm, history.history))
    (plain, plain_history), (fused_lm, history) = models
    for key in history:
        np.testing.assert_allclose(history[key], plain_history[key], rtol=1e-5, err_msg=key)
    prompt = {"token_ids": ids[:2, :16].astype("int32"), "padding_mask": padding_mask[:2] * 0}
    prompt["padding_mask"][:, :6] = True
    generated = fused_lm.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(
        generated["token_ids"], plain.generate(prompt, stop_token_ids=None)["token_ids"]
    )
