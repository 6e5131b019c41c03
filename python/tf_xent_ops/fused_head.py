"""Training a Keras model with its output head fused into the loss.

`fuse_head(model)` changes how `fit` and `evaluate` run the model and nothing
else. While a train or test step runs, the head layer returns its input (the
hidden states) instead of the logits, and the model's `compute_loss` and
`compute_metrics` compute the compiled sparse cross-entropy, and the metrics
that need only each position's loss or arg-max, from those hidden states and
the head's weights with the fused op. Keras's own `train_step` and
`test_step` run around them: the optimizer, loss scaling, the loss tracker
and tf.distribute are Keras's.
"""

import contextlib
import threading

import keras
import tensorflow as tf

# Keras's reduction of per-position losses (sample weights, masks, the
# reduction and tf.distribute's scaling): the one Keras's losses apply.
from keras.src.losses import loss as keras_loss

from tf_xent_ops import _linear_crossentropy
from tf_xent_ops import losses as txo_losses
from tf_xent_ops import ops as txo_ops

# The functions of losses and metrics whose values the fused pass gives
# without logits: the sparse cross-entropy (Keras's and ours) and accuracy.
_CROSSENTROPY_FNS = (
    keras.losses.sparse_categorical_crossentropy,
    keras.metrics.sparse_categorical_crossentropy,
    txo_losses.sparse_categorical_crossentropy,
    txo_losses._sparse_categorical,  # the loss class's
)
_ACCURACY_FNS = (keras.metrics.sparse_categorical_accuracy,)
_STEPS = ("train_step", "test_step", "compute_loss", "compute_metrics")


def fuse_head(model, head=None, *, chunk_size=None):
    """Trains and evaluates `model` with its output head fused into the loss.

    After this call `fit` and `evaluate` never make the `[tokens,
    vocabulary]` logits. The compiled loss, a sparse categorical
    cross-entropy of logits (`keras.losses.SparseCategoricalCrossentropy(
    from_logits=True)` or this package's, with its options), is computed from
    the head's input and weights by `ops.linear_crossentropy_sum`, its
    gradients made in the forward pass while training (with
    `reduction="none"`, by `ops.linear_crossentropy`, whose backward makes
    the logits again); the sparse cross-entropy and accuracy metrics come
    from the same pass. Keras's reductions, `loss_weights`, sample weights,
    masks, loss scaling and tf.distribute apply as without fusion, as do
    the model's other losses (`model.losses`).
    `predict`, `model(x)`, generation and saving are unchanged: they compute
    the logits, and a saved model loads as the plain model.

    The head must make the model's output, with no op after it (a fused
    step raises `ValueError` otherwise), and be a `keras.layers.Dense`
    without activation or a `keras.layers.ReversibleEmbedding` called with
    `reverse=True` (tied or not, with its `logit_soft_cap`). It is found for
    a functional model (keras-hub's causal LMs among them); pass it for a
    subclassed model.

    Args:
        model: A `keras.Model`, compiled before or after this call.
        head: The output head layer; by default the layer that makes a
            functional model's single output.
        chunk_size: Positions per chunk, as for `ops.linear_crossentropy`
            (by default about 2**23 logits a chunk).

    Returns:
        `model`, changed in place.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import tf_xent_ops
    >>> inputs = keras.Input((8,), dtype="int32")
    >>> hidden = keras.layers.Embedding(1000, 16)(inputs)
    >>> logits = keras.layers.Dense(1000)(hidden)
    >>> model = tf_xent_ops.fuse_head(keras.Model(inputs, logits))
    >>> model.compile(
    ...     optimizer="adam",
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...     metrics=["accuracy"])
    >>> x = np.random.randint(0, 1000, (32, 8))
    >>> history = model.fit(x, x, epochs=1, verbose=0)
    >>> sorted(history.history)
    ['accuracy', 'loss']
    >>> model.predict(x[:2], verbose=0).shape  # the logits
    (2, 8, 1000)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    head = _output_head(model) if head is None else head
    _check_head(head)
    _linear_crossentropy.check_chunk_size(chunk_size)
    fused = _FusedHead(model, head, chunk_size)
    # Instance attributes: the model's class, config and saving stay as they are.
    for name in _STEPS:
        object.__setattr__(model, name, getattr(fused, name))
    object.__setattr__(head, "call", fused.head_call)
    # Steps traced before this call would go on computing the logits.
    model.train_function = model.test_function = None
    return model


def _output_head(model):
    """The layer that makes a functional model's single output."""
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1:
        raise ValueError(
            "fuse_head finds the head of a functional model with one output; pass "
            f"`head=` for this {type(model).__name__}."
        )
    return outputs[0]._keras_history.operation


def _check_head(head):
    if not isinstance(head, (keras.layers.Dense, keras.layers.ReversibleEmbedding)):
        raise ValueError(
            "The head must be the keras.layers.Dense or keras.layers.ReversibleEmbedding "
            f"layer that makes the model's output. Received: {head!r}"
        )
    if isinstance(head, keras.layers.Dense) and head.activation not in (
        None,
        keras.activations.linear,
    ):
        raise ValueError(
            "The head Dense layer must have no activation: it makes logits. "
            f"Received activation: {head.activation.__name__}"
        )
    if head.quantization_mode is not None:
        raise ValueError(f"fuse_head does not take quantized heads ({head.quantization_mode}).")


def _is_hidden_states(y_pred):
    return getattr(y_pred, "_tfxent_hidden_states", False)


class _FusedHead:
    """The steps of one model with its head fused into the loss."""

    def __init__(self, model, head, chunk_size):
        self.model, self.head, self.chunk_size = model, head, chunk_size
        # Per thread (tf.distribute runs replicas' steps in threads of their
        # own): whether a fused step runs, and its _Pass.
        self._step = threading.local()

    # The steps: Keras's own, while the head returns the hidden states.

    def train_step(self, data):
        with self._head_returns_hidden_states():
            return type(self.model).train_step(self.model, data)

    def test_step(self, data):
        with self._head_returns_hidden_states():
            return type(self.model).test_step(self.model, data)

    @contextlib.contextmanager
    def _head_returns_hidden_states(self):
        self._step.active, self._step.fused_pass = True, None
        try:
            yield
        finally:
            self._step.active, self._step.fused_pass = False, None

    def head_call(self, inputs, *args, **kwargs):
        """The head's call: the logits, or in a fused step the hidden states
        (tagged). A ReversibleEmbedding's embedding lookup runs as ever."""
        head = self.head
        reverse = kwargs.get("reverse", args[0] if args else False)
        in_step = getattr(self._step, "active", False)
        if not in_step or (isinstance(head, keras.layers.ReversibleEmbedding) and not reverse):
            return type(head).call(head, inputs, *args, **kwargs)
        hidden = tf.identity(inputs)
        hidden._tfxent_hidden_states = True
        return hidden

    # The loss and the metrics, from the hidden states.

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not self._in_fused_step(y_pred):
            return type(self.model).compute_loss(
                self.model, x, y, y_pred, sample_weight, training=training
            )
        # Every value the metrics need is made here, before the optimizer
        # changes the head's weights.
        fused_pass = self._fused_pass(y, y_pred, sample_weight, with_loss=True)
        self._step.fused_pass = fused_pass
        losses = [] if fused_pass.loss is None else [fused_pass.loss]
        losses += [self.model._aggregate_additional_loss(loss) for loss in self.model.losses]
        if not losses:
            raise ValueError("No loss to compute. Provide a `loss` argument in `compile()`.")
        return losses[0] if len(losses) == 1 else tf.add_n(losses)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if not self._in_fused_step(y_pred):
            return type(self.model).compute_metrics(self.model, x, y, y_pred, sample_weight)
        fused_pass = self._step.fused_pass
        if fused_pass is None:  # no compute_loss before: make the pass now
            fused_pass = self._fused_pass(y, y_pred, None, with_loss=False)
        for metric, weighted in self._metrics(y, y_pred):
            own_fn = metric._fn
            values = fused_pass.values[id(metric)]
            object.__setattr__(metric, "_fn", lambda *args, values=values, **kwargs: values)
            try:
                metric.update_state(y, y_pred, sample_weight=sample_weight if weighted else None)
            finally:
                object.__setattr__(metric, "_fn", own_fn)
        return self.model.get_metrics_result()

    def _in_fused_step(self, y_pred):
        """Whether y_pred is the head's hidden states; ValueError for any
        other output of a fused step: Keras's loss would take the hidden
        states, changed by the ops after the head, for logits."""
        if _is_hidden_states(y_pred):
            return True
        if getattr(self._step, "active", False):
            raise ValueError(
                f"With a fused head the output of the head layer {self.head.name!r} must be "
                "the model's output, unchanged: no op may follow it (a scale, a cast, a "
                "slice). Apply such ops to the hidden states before the head."
            )
        return False

    def _fused_pass(self, y, hidden, sample_weight, with_loss):
        """The compiled loss (`with_loss`) and every metric's per-position
        values, made before the optimizer changes the head's weights."""
        labels = _labels(y, hidden)
        metrics = self._metrics(y, hidden)
        want_argmax = any(getattr(m, "_fn", None) in _ACCURACY_FNS for m, _ in metrics)
        rows, argmax, value = {}, None, None
        compiled = self._compiled_loss(y, hidden) if with_loss else None
        if compiled is not None:
            loss, loss_weight, dtype = compiled
            options = self._options(loss, "The compiled loss")
            value, loss_rows, argmax = self._loss(loss, labels, hidden, sample_weight, options)
            rows[_key(options)] = loss_rows
            # As Keras's CompileLoss: cast to its dtype, then weighted.
            value = tf.cast(value, dtype)
            if loss_weight is not None:
                value = keras.ops.multiply(value, loss_weight)
        if want_argmax and argmax is None:
            # The arg-max needs no labels: zeros keep the op's range check off
            # labels that accuracy compares as they are (ignore_class's).
            zeros = tf.zeros_like(labels)
            argmax = self._per_position(hidden, zeros, _PLAIN, return_argmax=True)[1]
        values = {}
        for metric, _ in metrics:
            fn = getattr(metric, "_fn", None)
            if fn in _ACCURACY_FNS:
                values[id(metric)] = tf.cast(tf.equal(argmax, labels), keras.config.floatx())
            elif fn in _CROSSENTROPY_FNS:
                options = self._options(metric, f"The metric {metric.name!r}")
                if _key(options) not in rows:
                    rows[_key(options)] = self._per_position(hidden, labels, options)
                values[id(metric)] = _with_ignore_mask(rows[_key(options)], labels, options)
            else:
                raise ValueError(
                    f"With a fused head the metric {metric.name!r} cannot be computed: it "
                    "needs the logits. fuse_head computes sparse cross-entropy and sparse "
                    "accuracy metrics ('accuracy', keras.metrics.SparseCategoricalAccuracy, "
                    "SparseCategoricalCrossentropy(from_logits=True))."
                )
        return _Pass(value, values)

    def _compiled_loss(self, y, hidden):
        """(loss, its loss_weights entry or None, the loss dtype) as Keras's
        CompileLoss resolves them (a loss or a one-element list or dict, and
        loss_weights alike); None without a compiled loss."""
        compile_loss = self.model._compile_loss
        if compile_loss is None:
            return None
        if not compile_loss.built:
            compile_loss.build(y, hidden)
        flat = compile_loss._flat_losses
        if len(flat) != 1:
            raise ValueError(
                "With a fused head the model must be compiled with one loss, for its one "
                f"output. Received: loss={self.model.loss!r}"
            )
        return flat[0].loss, flat[0].loss_weights, compile_loss.dtype

    def _loss(self, loss, labels, hidden, sample_weight, options):
        """(the reduced loss, its per-position values, arg-max)."""
        mask = _mask(hidden, labels, options["ignore_class"])
        if loss.reduction in (None, "none"):
            rows, argmax = self._per_position(
                hidden, labels, options, return_argmax=True, stop_gradient=False
            )
            value = keras_loss.reduce_weighted_values(
                rows, sample_weight, mask, loss.reduction, loss.dtype
            )
            return value, tf.stop_gradient(rows), argmax
        # Keras's reduction is linear in the per-position losses: the weights
        # it gives them are its gradient with respect to them.
        ones = tf.ones(tf.shape(labels), loss.dtype)
        with tf.GradientTape() as tape:
            tape.watch(ones)
            reduced = keras_loss.reduce_weighted_values(
                ones, sample_weight, mask, loss.reduction, loss.dtype
            )
        value, rows, argmax = _linear_crossentropy.weighted_sum_and_rows(
            **self._arguments(hidden, labels, options),
            sample_weight=tape.gradient(reduced, ones),
            denominator=1.0,
            gradient_in_forward=None,
            return_argmax=True,
        )
        return tf.cast(value, loss.dtype), rows, argmax

    def _metrics(self, y, hidden):
        """The compiled metrics, built, as (metric, whether weighted)."""
        compiled = self.model._compile_metrics
        if compiled is None:
            return []
        if not compiled.built:
            compiled.build(y, hidden)
        return [
            (metric, weighted)
            for lists, weighted in (
                (compiled._flat_metrics, False),
                (compiled._flat_weighted_metrics, True),
            )
            for metric_list in lists
            if metric_list
            for metric in metric_list.metrics
        ]

    def _per_position(self, hidden, labels, options, return_argmax=False, stop_gradient=True):
        """Per-position losses, and with `return_argmax` (losses, arg-max)."""
        result = _linear_crossentropy.linear_crossentropy(
            **self._arguments(hidden, labels, options), return_argmax=return_argmax
        )
        return tf.nest.map_structure(tf.stop_gradient, result) if stop_gradient else result

    def _options(self, obj, what):
        """The options of a sparse cross-entropy of logits, Keras's or ours,
        as the fused op's keywords; ValueError for anything else."""
        fn = getattr(obj, "fn", None) or getattr(obj, "_fn", None)
        kwargs = getattr(obj, "_fn_kwargs", {})
        if fn not in _CROSSENTROPY_FNS or not kwargs.get("from_logits", False):
            raise ValueError(
                f"{what} must be a sparse categorical cross-entropy of logits "
                "(keras.losses.SparseCategoricalCrossentropy(from_logits=True), or "
                "tf_xent_ops's) to be fused with the head. Received: "
                f"{getattr(obj, 'name', obj)!r}"
            )
        if kwargs.get("axis", -1) != -1:
            raise ValueError(f"{what} must have axis=-1 to be fused with the head.")
        options = dict(
            ignore_class=kwargs.get("ignore_class"),
            label_smoothing=kwargs.get("label_smoothing", 0.0),
            z_loss=kwargs.get("z_loss", 0.0),
            logit_soft_cap=kwargs.get("logit_soft_cap"),
        )
        head_cap = getattr(self.head, "logit_soft_cap", None)
        if head_cap is not None:
            if options["logit_soft_cap"] is not None:
                raise ValueError(
                    f"The head caps the logits (logit_soft_cap={head_cap}), and so does "
                    f"{what.lower()} (logit_soft_cap={options['logit_soft_cap']}): cap once."
                )
            options["logit_soft_cap"] = head_cap
        return options

    def _arguments(self, hidden, labels, options):
        """The fused op's arguments for the head, read now (in the step)."""
        head = self.head
        if isinstance(head, keras.layers.Dense):
            kernel, bias, layout = head.kernel, head.bias, "dv"
        elif head.tie_weights:
            kernel, bias, layout = head.embeddings, None, "vd"
        else:
            kernel, bias, layout = head.reverse_embeddings, None, "dv"
        hidden = tf.convert_to_tensor(hidden)
        kernel = tf.convert_to_tensor(kernel)
        bias = None if bias is None else tf.convert_to_tensor(bias)
        reverse_dtype = getattr(head, "reverse_dtype", None)
        if reverse_dtype is not None:
            hidden, kernel = tf.cast(hidden, reverse_dtype), tf.cast(kernel, reverse_dtype)
        return dict(
            hidden=hidden,
            kernel=kernel,
            labels=labels,
            bias=bias,
            kernel_layout=layout,
            chunk_size=self.chunk_size,
            **options,
        )


class _Pass:
    """One step's fused results: the compiled loss and each metric's values."""

    def __init__(self, loss, values):
        self.loss, self.values = loss, values


# The options of the plain cross-entropy (for an arg-max alone).
_PLAIN = dict(ignore_class=None, label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None)


def _key(options):
    return tuple(sorted(options.items()))


def _with_ignore_mask(rows, labels, options):
    """As the sparse cross-entropy functions return them: ignored positions
    masked out."""
    if options["ignore_class"] is None:
        return rows
    rows = tf.identity(rows)
    rows._keras_mask = tf.logical_not(txo_ops.is_ignored(labels, options["ignore_class"]))
    return rows


def _labels(y, hidden):
    """int32 or int64 labels of the hidden states' positions ([..., 1]
    squeezed): the fused op's arg-max comes in their dtype."""
    labels = txo_ops.as_sparse_labels(y)
    if labels.shape.rank == hidden.shape.rank and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, -1)
    return labels


def _mask(hidden, labels, ignore_class):
    """The mask Keras's loss applies: the output's mask and the positions
    whose label is not ignore_class."""
    mask = getattr(hidden, "_keras_mask", None)
    if ignore_class is not None:
        valid = tf.logical_not(txo_ops.is_ignored(labels, ignore_class))
        mask = valid if mask is None else tf.logical_and(tf.cast(mask, tf.bool), valid)
    return mask
