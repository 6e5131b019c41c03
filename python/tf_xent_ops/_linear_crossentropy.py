"""Fused linear + cross-entropy: the loss of `hidden @ kernel + bias` without
the [tokens, vocabulary] logits.

Rows of `hidden` are taken `chunk_size` at a time. For each chunk TensorFlow's
matmul makes the logits and the fused sparse kernels (their composite under
XLA) give the loss and the log-sum-exp; for a gradient the sparse gradient op
writes d(logits) into the chunk's logits buffer, from which the chunk's
d(hidden) = d(logits) @ kernel^T and d(kernel) += hidden^T @ d(logits), added
block by block in place into one float32 (float64) accumulator. The chunk
loops are `tf.while_loop`s inside `tf.custom_gradient`, so an outer tape
records none of their tensors.

Two ways to the gradient: recompute (the backward makes each chunk's logits
again: four matmuls per step; any upstream gradient) and gradient-in-forward
(a scalar loss: the forward computes the gradients, the backward scales them:
three matmuls). docs/design.md has the reasons.
"""

import tensorflow as tf

# Whether a tape records the ops made now: no public API says.
from tensorflow.python.eager import record

from tf_xent_ops import ops

LAYOUTS = ("dv", "vd")
# The default chunk holds about this many logits (the trade of time for
# memory is measured in docs/performance.md).
_CHUNK_LOGITS = 1 << 23
# The kernel gradient is added in blocks of rows of about this many bytes, so
# that no kernel-sized temporary exists.
_BLOCK_BYTES = 16 << 20


def linear_crossentropy(
    hidden,
    kernel,
    labels,
    *,
    bias=None,
    kernel_layout="dv",
    label_smoothing=0.0,
    ignore_class=None,
    z_loss=0.0,
    logit_soft_cap=None,
    chunk_size=None,
    return_argmax=False,
):
    """Cross-entropy of the logits `hidden @ kernel + bias`, never materialized.

    The same loss and gradients as
    `sparse_crossentropy(labels, hidden @ kernel + bias, from_logits=True, ...)`,
    computed `chunk_size` rows at a time: at most `chunk_size x vocabulary`
    logits exist at once, in the forward and in the backward (which makes
    each chunk's logits again). For a loss reduced to a scalar,
    `linear_crossentropy_sum` saves that second matmul while training.

    Args:
        hidden: The last hidden states, `[..., hidden_dim]`: half, bfloat16,
            float32 or float64.
        kernel: `[hidden_dim, vocabulary]` (`kernel_layout="dv"`, a Dense
            layer's kernel) or `[vocabulary, hidden_dim]` (`"vd"`, a tied
            embedding matrix). The dtype of `hidden`, or float32 with 16-bit
            `hidden` (mixed precision: the matmuls run in the 16-bit dtype;
            each chunk's kernel and bias gradient is rounded to it, to
            float32 for float16, and the chunks are summed in float32).
        labels: Integer class indices, shape `hidden.shape[:-1]`.
        bias: Optional `[vocabulary]`, the dtype of `kernel`.
        kernel_layout: `"dv"` or `"vd"`, as above.
        label_smoothing: Float in [0, 1]; the labelled class gets
            `1 - label_smoothing + label_smoothing / vocabulary`.
        ignore_class: Optional label value whose positions get a loss and
            gradients of 0.
        z_loss: Each position's loss adds `z_loss * log_sum_exp(logits)**2`.
        logit_soft_cap: If set, the logits `z` become
            `logit_soft_cap * tanh(z / logit_soft_cap)` first.
        chunk_size: Rows per chunk; by default about 2**23 logits
            (`2**23 // vocabulary` rows). Larger chunks run the matmuls
            faster and hold more memory.
        return_argmax: Also return each position's arg-max class (of the
            logits before any cap), in the labels' dtype, from the same pass.

    Returns:
        The loss for each position, float32 (float64 for float64 `hidden`),
        shape `hidden.shape[:-1]`; with `return_argmax`, (loss, argmax).

    Example:

    >>> import numpy as np
    >>> import tf_xent_ops
    >>> hidden = np.array([[1.0, 0.5], [-1.0, 2.0]], "float32")
    >>> kernel = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], "float32")
    >>> loss = tf_xent_ops.ops.linear_crossentropy(hidden, kernel, [2, 0])
    >>> [round(float(v), 4) for v in loss]
    [0.4294, 0.481]
    >>> logits = hidden @ kernel
    >>> loss = tf_xent_ops.ops.sparse_crossentropy([2, 0], logits, from_logits=True)
    >>> [round(float(v), 4) for v in loss]
    [0.4294, 0.481]
    """
    head = _Head(
        hidden,
        kernel,
        labels,
        bias=bias,
        kernel_layout=kernel_layout,
        label_smoothing=label_smoothing,
        ignore_class=ignore_class,
        z_loss=z_loss,
        logit_soft_cap=logit_soft_cap,
        chunk_size=chunk_size,
    )
    loss, argmax = _per_position(head, return_argmax)
    loss = head.restore_batch_shape(loss)
    if return_argmax:
        return loss, head.restore_batch_shape(argmax)
    return loss


def linear_crossentropy_sum(
    hidden,
    kernel,
    labels,
    *,
    sample_weight=None,
    denominator=1.0,
    bias=None,
    kernel_layout="dv",
    label_smoothing=0.0,
    ignore_class=None,
    z_loss=0.0,
    logit_soft_cap=None,
    chunk_size=None,
    gradient_in_forward=None,
    return_argmax=False,
):
    """`sum(sample_weight * linear_crossentropy(...)) / denominator`, fused.

    Keras's reductions are this scalar: "sum" (denominator 1),
    "sum_over_batch_size" (the number of positions), a mean over a mask or
    sample weights (their sum). Because the loss is one scalar, its gradients
    can be computed in the forward pass, and the backward only scales them by
    the upstream gradient: three matmuls per training step, as without
    fusion, instead of four. That happens when `gradient_in_forward` is True,
    or by default (None) when a gradient tape is recording while the call is
    made (or traced), so that evaluation pays for the loss alone.

    The gradients with respect to `sample_weight` and `denominator` are
    exact too. Gradients are first-order only: differentiating them again
    raises an error.

    Args:
        hidden, kernel, labels, bias, kernel_layout, label_smoothing,
        ignore_class, z_loss, logit_soft_cap, chunk_size: As for
            `linear_crossentropy`.
        sample_weight: Optional per-position weights, broadcastable to the
            labels' shape once size-1 axes are appended (a `[batch]` weight
            for `[batch, sequence]` labels, as in Keras). Defaults to 1.
        denominator: The scalar the weighted sum is divided by; 0 gives a
            loss and gradients of 0, as Keras's means over empty masks.
        gradient_in_forward: None (the default: when a tape records), True
            or False (always recompute the logits in the backward).
        return_argmax: Also return each position's arg-max class.

    Returns:
        The scalar loss, float32 (float64 for float64 `hidden`); with
        `return_argmax`, (loss, argmax).

    Example:

    >>> import numpy as np
    >>> import tensorflow as tf
    >>> import tf_xent_ops
    >>> hidden = tf.constant([[1.0, 0.5], [-1.0, 2.0], [0.0, 1.0]])
    >>> kernel = tf.Variable([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    >>> labels = tf.constant([2, 0, -1])  # -1: padding
    >>> mask = tf.cast(labels != -1, "float32")
    >>> with tf.GradientTape() as tape:
    ...     loss = tf_xent_ops.ops.linear_crossentropy_sum(
    ...         hidden, kernel, labels, ignore_class=-1,
    ...         sample_weight=mask, denominator=tf.reduce_sum(mask))
    >>> round(float(loss), 4)
    0.4552
    >>> tape.gradient(loss, kernel).shape
    TensorShape([2, 3])
    """
    loss, _, argmax = weighted_sum_and_rows(
        hidden,
        kernel,
        labels,
        sample_weight=sample_weight,
        denominator=denominator,
        gradient_in_forward=gradient_in_forward,
        return_argmax=return_argmax,
        bias=bias,
        kernel_layout=kernel_layout,
        label_smoothing=label_smoothing,
        ignore_class=ignore_class,
        z_loss=z_loss,
        logit_soft_cap=logit_soft_cap,
        chunk_size=chunk_size,
    )
    return (loss, argmax) if return_argmax else loss


def weighted_sum_and_rows(
    hidden,
    kernel,
    labels,
    *,
    sample_weight,
    denominator,
    gradient_in_forward,
    return_argmax,
    **head_args,
):
    """`linear_crossentropy_sum`'s loss, each position's loss (without a
    gradient: for metrics) and arg-max (None unless `return_argmax`)."""
    head = _Head(hidden, kernel, labels, **head_args)
    weights = head.position_weights(sample_weight)
    scale = tf.math.divide_no_nan(
        tf.constant(1.0, head.acc_dtype), tf.cast(denominator, head.acc_dtype)
    )
    if scale.shape.rank is None:
        scale = tf.ensure_shape(scale, [])  # checked at run time
    elif scale.shape.rank != 0:
        raise ValueError(f"`denominator` must be a scalar. Received shape: {scale.shape}")
    if gradient_in_forward is None:
        gradient_in_forward = record.could_possibly_record()
    if gradient_in_forward:
        loss, rows, argmax = _scalar_with_gradient_in_forward(head, weights, scale, return_argmax)
    else:
        rows, argmax = _per_position(head, return_argmax)
        loss = tf.reduce_sum(rows * weights) * scale
    rows = head.restore_batch_shape(tf.stop_gradient(rows))
    argmax = None if argmax is None else head.restore_batch_shape(argmax)
    return loss, rows, argmax


def check_chunk_size(chunk_size):
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"`chunk_size` must be None or a positive int. Received: chunk_size={chunk_size!r}"
        )


class _Head:
    """One call's checked inputs, as rows: `hidden` [rows, hidden_dim] padded
    with zero rows to whole chunks (label 0 or ignore_class, weight 0: they
    are computed and never read back), the kernel and bias, and what the ops
    and the restoring of shapes need."""

    def __init__(
        self,
        hidden,
        kernel,
        labels,
        *,
        bias=None,
        kernel_layout="dv",
        label_smoothing=0.0,
        ignore_class=None,
        z_loss=0.0,
        logit_soft_cap=None,
        chunk_size=None,
    ):
        if kernel_layout not in LAYOUTS:
            raise ValueError(
                "`kernel_layout` must be 'dv' (kernel [hidden_dim, vocabulary], a Dense "
                "layer's) or 'vd' (kernel [vocabulary, hidden_dim], a tied embedding). "
                f"Received: kernel_layout={kernel_layout!r}"
            )
        check_chunk_size(chunk_size)
        hidden, kernel = tf.convert_to_tensor(hidden), tf.convert_to_tensor(kernel)
        label_smoothing, z_loss, cap = ops.check_coefficients(
            True, label_smoothing, z_loss, logit_soft_cap, ops.loss_dtype(hidden.dtype)
        )
        bias = None if bias is None else tf.convert_to_tensor(bias)
        labels = ops.as_sparse_labels(labels)
        _check_dtypes(hidden, kernel, bias)
        checks = _check_shapes(hidden, kernel, bias, labels, kernel_layout)
        self.layout = kernel_layout
        self.kernel, self.bias = kernel, bias
        self.compute_dtype = hidden.dtype
        self.acc_dtype = ops.loss_dtype(hidden.dtype)
        self.vocabulary = tf.compat.dimension_value(kernel.shape[1 if kernel_layout == "dv" else 0])
        self.hidden_dim = tf.compat.dimension_value(kernel.shape[0 if kernel_layout == "dv" else 1])
        self.config = ops.sparse_config(
            True, ignore_class, hidden.dtype, label_smoothing, None, z_loss, cap
        )
        with tf.control_dependencies(checks):
            self.batch_shape = tf.shape(labels)
        self.labels_shape = labels.shape
        # Python ints where the number of rows is known, tensors otherwise.
        num_rows = labels.shape.num_elements()
        chunk = chunk_size or max(1, _CHUNK_LOGITS // (self.vocabulary or 1024))
        if num_rows is None:
            num_rows = tf.size(labels)
            # No more than the rows, as when they are known: a batch of
            # unknown size is not padded to a whole default chunk.
            chunk = tf.maximum(1, tf.minimum(chunk, num_rows))
        else:
            chunk = max(1, min(chunk, num_rows))
        self.chunk, self.num_rows = chunk, num_rows
        self.num_chunks = (num_rows + self.chunk - 1) // self.chunk
        if not isinstance(num_rows, int):
            # At least one chunk (one padded row for an empty batch): XLA
            # compiles the loop's body even when it runs no chunk.
            self.num_chunks = tf.maximum(1, self.num_chunks)
        self._padding = self.num_chunks * self.chunk - num_rows
        hidden_dim = self.hidden_dim or tf.shape(kernel)[0 if kernel_layout == "dv" else 1]
        self.hidden = self.pad_rows(tf.reshape(hidden, [-1, hidden_dim]))
        # Padded rows have weight 0; ignored, where the labels' dtype holds
        # ignore_class, they cost nothing either.
        pad_label = self.config["ignore_class"] if self.config["use_ignore_class"] else 0
        if not labels.dtype.min <= pad_label <= labels.dtype.max:
            pad_label = 0
        self.labels = self.pad_rows(tf.reshape(labels, [-1]), pad_label)

    def pad_rows(self, rows, value=0):
        """`rows` [num_rows, ...] with rows of `value` up to whole chunks."""
        if isinstance(self._padding, int) and self._padding == 0:
            return rows
        paddings = [[0, self._padding]] + [[0, 0]] * (rows.shape.rank - 1)
        return tf.pad(rows, paddings, constant_values=tf.cast(value, rows.dtype))

    def position_weights(self, sample_weight):
        """The weights as [rows] in the loss dtype (1 where not given)."""
        if sample_weight is None:
            return tf.ones([self.num_rows], self.acc_dtype)
        w = tf.cast(sample_weight, self.acc_dtype)
        rank = self.labels_shape.rank
        if rank is not None and w.shape.rank is not None:
            if w.shape.rank > rank:
                raise ValueError(
                    f"`sample_weight` of shape {w.shape} has more axes than the labels "
                    f"({self.labels_shape})."
                )
            for _ in range(rank - w.shape.rank):
                w = w[..., None]
        else:
            # A rank known at run time only: the size-1 axes appended then.
            missing = tf.size(self.batch_shape) - tf.rank(w)
            check = tf.debugging.assert_non_negative(
                missing, message="`sample_weight` has more axes than the labels."
            )
            with tf.control_dependencies([check]):
                ones = tf.ones([missing], tf.int32)
            w = tf.reshape(w, tf.concat([tf.shape(w), ones], 0))
        return tf.reshape(tf.broadcast_to(w, self.batch_shape), [-1])

    def restore_batch_shape(self, rows):
        rows = tf.reshape(rows, self.batch_shape)
        rows.set_shape(self.labels_shape)
        return rows

    def unpadded(self, rows):
        return rows[: self.num_rows]

    def compute(self, x):
        return x if x is None or x.dtype == self.compute_dtype else tf.cast(x, self.compute_dtype)


def _check_dtypes(hidden, kernel, bias):
    if hidden.dtype not in (tf.float16, tf.bfloat16, tf.float32, tf.float64):
        raise TypeError(
            "`hidden` must be half, bfloat16, float32 or float64. Received dtype: "
            f"{hidden.dtype.name}"
        )
    mixed = hidden.dtype in (tf.float16, tf.bfloat16) and kernel.dtype == tf.float32
    if kernel.dtype != hidden.dtype and not mixed:
        raise TypeError(
            "`kernel` must have the dtype of `hidden`, or be float32 for 16-bit `hidden` "
            "(mixed precision). Received: "
            f"hidden.dtype={hidden.dtype.name}, kernel.dtype={kernel.dtype.name}"
        )
    if bias is not None and bias.dtype != kernel.dtype:
        raise TypeError(
            f"`bias` must have the dtype of `kernel`. Received: bias.dtype={bias.dtype.name}, "
            f"kernel.dtype={kernel.dtype.name}"
        )


def _check_shapes(hidden, kernel, bias, labels, kernel_layout):
    """Raises ValueError for shapes known to be wrong; returns runtime checks
    for what is not known until then."""
    if kernel.shape.rank != 2:
        raise ValueError(f"`kernel` must have rank 2. Received shape: {kernel.shape}")
    if hidden.shape.rank == 0:
        raise ValueError(f"`hidden` must have a rank of at least 1. Received shape: {hidden.shape}")
    hidden_axis = 0 if kernel_layout == "dv" else 1
    hidden_dim = hidden.shape[-1] if hidden.shape.rank else None
    if not tf.TensorShape([kernel.shape[hidden_axis]]).is_compatible_with([hidden_dim]):
        expected = (
            "[hidden_dim, vocabulary]" if kernel_layout == "dv" else "[vocabulary, hidden_dim]"
        )
        raise ValueError(
            f"`kernel` must be {expected} for kernel_layout={kernel_layout!r}, with hidden_dim "
            f"= hidden.shape[-1]. Received: hidden.shape={hidden.shape}, "
            f"kernel.shape={kernel.shape}"
        )
    vocabulary = kernel.shape[1 - hidden_axis]
    if bias is not None and (
        bias.shape.rank != 1 or not bias.shape.is_compatible_with([vocabulary])
    ):
        raise ValueError(
            f"`bias` must be [vocabulary] = [{vocabulary}]. Received shape: {bias.shape}"
        )
    if hidden.shape.rank is not None and labels.shape.rank is not None:
        if not labels.shape.is_compatible_with(hidden.shape[:-1]):
            raise ValueError(
                "`labels` must have the shape of `hidden` without its last axis. Received: "
                f"labels.shape={labels.shape}, hidden.shape={hidden.shape}"
            )
        if labels.shape.is_fully_defined() and hidden.shape[:-1].is_fully_defined():
            return []
    hidden_shape = tf.shape(hidden, out_type=tf.int64)
    return [
        tf.debugging.assert_equal(
            tf.shape(labels, out_type=tf.int64),
            hidden_shape[:-1],
            message="`labels` must have the shape of `hidden` without its last axis.",
        ),
        tf.debugging.assert_equal(
            tf.shape(kernel, out_type=tf.int64)[hidden_axis],
            hidden_shape[-1],
            message=f"`kernel` ({kernel_layout!r}) must match hidden.shape[-1].",
        ),
    ]


def _check_labels(head):
    """Checks the labels' range over the whole batch, before the chunks: the
    op checks each chunk's on the CPU and would name a position in the chunk.
    None under XLA, which cannot raise, nor where a GPU may run the chunks (the
    GPU kernels give a bad label's row NaN, without a check on the host)."""
    if ops.in_xla_context() or tf.config.list_logical_devices("GPU"):
        return []
    labels = tf.cast(head.labels, tf.int64)
    vocabulary = tf.shape(head.kernel, out_type=tf.int64)[1 if head.layout == "dv" else 0]
    bad = (labels < 0) | (labels >= vocabulary)
    template = (
        "Received a label value of {} at position {} which is outside the valid range of [0, {})"
    )
    if head.config["use_ignore_class"]:
        bad &= tf.logical_not(ops.is_ignored(labels, head.config["ignore_class"]))
        template += f" and is not ignore_class={head.config['ignore_class']}"

    def fail():
        first = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int64)
        message = tf.strings.format(template, (labels[first], first, vocabulary))
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            return tf.constant(False)

    # The message is formed only for a bad label.
    return [tf.cond(tf.reduce_any(bad), fail, lambda: tf.constant(True))]


def _per_position(head, want_argmax):
    """(loss [rows], argmax [rows] or None), with the recompute gradient."""
    inputs = [head.hidden, head.kernel] + ([head.bias] if head.bias is not None else [])

    @tf.custom_gradient
    def fused(*inputs):
        hidden, kernel, bias = _unpack(inputs)
        # No tape records the chunks: eagerly, tf.custom_gradient would
        # otherwise keep every chunk's logits for the outer tape.
        with record.stop_recording():
            kernel_c, bias_c = head.compute(kernel), head.compute(bias)
            out = _chunk_loop(head, hidden, kernel_c, bias_c, loss=True, argmax=want_argmax)
            loss = head.unpadded(out["loss"])

        def grad(grad_loss, *_):
            with record.stop_recording():
                grads = _chunk_loop(
                    head,
                    hidden,
                    kernel_c,
                    bias_c,
                    normalizer=out["normalizer"],
                    grad_rows=head.pad_rows(tf.cast(grad_loss, head.acc_dtype)),
                )
                grads = _gradients(head, grads)
            return _first_order_only(grads, inputs)

        if want_argmax:
            return (loss, head.unpadded(out["argmax"])), grad
        return loss, grad

    result = fused(*inputs)
    return result if want_argmax else (result, None)


def _scalar_with_gradient_in_forward(head, weights, scale, want_argmax):
    """(sum(weights * loss) * scale, loss, argmax or None), the gradients
    of the first computed in the forward and scaled in the backward (the
    others have none)."""
    inputs = [head.hidden, head.kernel] + ([head.bias] if head.bias is not None else [])

    @tf.custom_gradient
    def fused(weights, scale, *inputs):
        hidden, kernel, bias = _unpack(inputs)
        with record.stop_recording():
            grad_rows = weights * scale
            # The backward's factor is unknown here (a float16 loss scale can
            # be 2**15): the gradients are made at a power-of-two scale where
            # float16's range holds them, and rescaled in float32.
            prescale = _power_of_two_near_inverse(grad_rows, head.compute_dtype)
            out = _chunk_loop(
                head,
                hidden,
                head.compute(kernel),
                head.compute(bias),
                loss=True,
                argmax=want_argmax,
                grad_rows=head.pad_rows(grad_rows * prescale),
            )
            loss = head.unpadded(out["loss"])
            weighted_sum = tf.reduce_sum(loss * weights)
            grads = _gradients(head, out)

        def grad(upstream, *_):
            with record.stop_recording():
                upstream = tf.cast(upstream, head.acc_dtype)
                factor = upstream / prescale
                scaled = [upstream * scale * loss, upstream * weighted_sum] + [
                    tf.cast(tf.cast(g, head.acc_dtype) * factor, g.dtype)
                    if g.dtype != head.acc_dtype
                    else g * factor
                    for g in grads
                ]
            return _first_order_only(scaled, [weights, scale, *inputs])

        if want_argmax:
            return (weighted_sum * scale, loss, head.unpadded(out["argmax"])), grad
        return (weighted_sum * scale, loss), grad

    result = fused(weights, scale, *inputs)
    return tuple(result) if want_argmax else (*result, None)


def _power_of_two_near_inverse(grad_rows, compute_dtype):
    """2**k near 1 / max|grad_rows| for float16 (exact to scale by), else 1."""
    one = tf.constant(1.0, grad_rows.dtype)
    if compute_dtype != tf.float16:
        return one
    peak = tf.reduce_max(tf.abs(grad_rows))
    exponent = tf.round(tf.math.log(tf.where(peak > 0, peak, one)) / tf.math.log(2.0))
    return tf.pow(tf.constant(2.0, grad_rows.dtype), -exponent)


def _unpack(inputs):
    hidden, kernel, *bias = inputs
    return hidden, kernel, (bias[0] if bias else None)


def _gradients(head, out):
    """The gradients of a chunk loop's sums, in the inputs' dtypes."""
    grads = [out["d_hidden"], tf.cast(out["d_kernel"], head.kernel.dtype)]
    if head.bias is not None:
        grads.append(tf.cast(out["d_bias"], head.bias.dtype))
    return grads


def _first_order_only(grads, inputs):
    """`grads`, whose own gradients raise: nothing here differentiates them
    (the kernel gradient is added in place; in the forward they were made
    off the tape), and a silent zero would be wrong."""

    @tf.custom_gradient
    def guard(*args):
        def second_order(*_):
            raise ValueError(
                "tf_xent_ops.ops.linear_crossentropy has first-order gradients only: "
                "compute the logits with tf.matmul and use sparse_crossentropy for "
                "higher orders."
            )

        return [tf.identity(g) for g in args[: len(grads)]], second_order

    return guard(*grads, *inputs)


def _chunk_loop(
    head, hidden, kernel, bias, *, loss=False, argmax=False, normalizer=None, grad_rows=None
):
    """One pass over the chunks: each chunk's logits, then their loss and
    normalizer (`loss`), arg-max (`argmax`) and, given `grad_rows`, the
    gradients of sum(grad_rows * loss) w.r.t. the hidden rows (d_hidden), the
    kernel (d_kernel, in the accumulator dtype) and the bias (d_bias), from
    the normalizer computed here or given. Row outputs have the padded rows."""
    chunk, num_rows = head.chunk, head.num_chunks * head.chunk
    state = {}
    if loss:
        state["loss"] = _buffer([num_rows], head.acc_dtype)
        state["normalizer"] = _buffer([num_rows], head.acc_dtype)
    if argmax:
        state["argmax"] = _buffer([num_rows], head.labels.dtype)
    if grad_rows is not None:
        state["d_hidden"] = _buffer([num_rows, tf.shape(hidden)[1]], head.compute_dtype)
        state["d_kernel"] = _buffer(tf.shape(kernel), head.acc_dtype)
        if bias is not None:
            state["d_bias"] = tf.zeros(tf.shape(bias), head.acc_dtype)

    def body(i, state):
        # Each chunk starts once the previous one is done, so that one
        # chunk's buffers exist at a time.
        after = list(state.values())
        start = i * chunk
        hidden_c = _rows(hidden, start, chunk, after)
        labels_c = _rows(head.labels, start, chunk, after)
        logits = tf.matmul(hidden_c, kernel, transpose_b=head.layout == "vd")
        if bias is not None:
            logits = tf.nn.bias_add(logits, bias)
        state = dict(state)
        readers = []
        if loss:
            loss_c, normalizer_c = ops.sparse_rows(logits, labels_c, head.config)
            state["loss"] = _write_rows(state["loss"], start, loss_c)
            state["normalizer"] = _write_rows(state["normalizer"], start, normalizer_c)
            readers.append(loss_c)
        else:
            normalizer_c = _rows(normalizer, start, chunk, after)
        if argmax:
            argmax_c = tf.math.argmax(logits, axis=-1, output_type=head.labels.dtype)
            state["argmax"] = _write_rows(state["argmax"], start, argmax_c)
            readers.append(argmax_c)
        if grad_rows is None:
            return i + 1, state
        grad_c = _rows(grad_rows, start, chunk, after)
        # Last reader of the logits: the gradient op writes into their buffer.
        with tf.control_dependencies(readers):
            d_logits = ops.sparse_rows_gradient(logits, labels_c, normalizer_c, grad_c, head.config)
        if head.layout == "dv":
            # (kernel @ d_logits^T)^T: oneDNN runs this faster than d_logits
            # @ kernel^T for a chunk's few rows.
            d_hidden = tf.transpose(tf.matmul(kernel, d_logits, transpose_b=True))
        else:
            d_hidden = tf.matmul(d_logits, kernel)
        state["d_hidden"] = _write_rows(state["d_hidden"], start, d_hidden)
        hidden_c, d_logits = _product_operands(hidden_c, d_logits)
        state["d_kernel"] = _add_kernel_gradient(state["d_kernel"], hidden_c, d_logits, head)
        if bias is not None:
            state["d_bias"] += tf.cast(_column_sum(d_logits, chunk), head.acc_dtype)
        return i + 1, state

    if isinstance(head.num_chunks, int) and head.num_chunks == 0:
        # No rows: nothing to add to the zeros, and no body to build (XLA
        # would compile it, with a chunk's slice of an empty tensor).
        return state
    # The forwards check the labels first.
    with tf.control_dependencies(_check_labels(head) if loss else []):
        first_chunk = tf.identity(0)
    _, state = tf.while_loop(
        lambda i, _: i < head.num_chunks, body, (first_chunk, state), parallel_iterations=1
    )
    return state


def _product_operands(hidden_c, d_logits):
    """The operands of a chunk's kernel and bias gradients: float32 for
    float16, whose range cannot hold their sums over the chunk's rows (a
    loss-scaled gradient, or the forward's prescaled one, over many rows)."""
    if d_logits.dtype != tf.float16:
        return hidden_c, d_logits
    return tf.cast(hidden_c, tf.float32), tf.cast(d_logits, tf.float32)


def _column_sum(d_logits, chunk):
    """A chunk's bias gradient. For bfloat16 a matmul by ones, which
    accumulates in float32 inside; otherwise reduce_sum, whose tree of sums
    rounds less than a matmul's [1, rows] row (one running sum)."""
    if d_logits.dtype == tf.bfloat16:
        return tf.matmul(tf.ones([1, chunk], d_logits.dtype), d_logits)[0]
    return tf.reduce_sum(d_logits, 0)


def _rows(x, start, size, after):
    """Rows [start, start + size) of `x`, read once `after` exist."""
    rank = x.shape.rank
    with tf.control_dependencies(after):
        # A size fixed per run (a constant under XLA): a dynamic slice.
        rows = tf.slice(x, [start] + [0] * (rank - 1), [size] + [-1] * (rank - 1))
    rows.set_shape([size if isinstance(size, int) else None] + x.shape[1:])
    return rows


# Outputs are written, and the kernel gradient added, in place into buffers
# made for the purpose: Empty is stateful, so every run makes a fresh one
# (never folded into a constant, never shared). XLA has no in-place ops: it
# gets the functional forms, which it may run in place.


def _buffer(shape, dtype):
    """A zero tensor that is written in place."""
    if ops.in_xla_context():
        return tf.zeros(shape, dtype)
    return tf.raw_ops.Empty(shape=tf.cast(shape, tf.int32), dtype=dtype, init=True)


def _write_rows(buffer, start, rows):
    """buffer[start : start + len(rows)] = rows."""
    indices = start + tf.range(rows.shape[0] or tf.shape(rows)[0])  # static for XLA
    if ops.in_xla_context():
        return tf.tensor_scatter_nd_update(buffer, indices[:, None], rows)
    return tf.raw_ops.InplaceUpdate(x=buffer, i=indices, v=rows)


def _add_rows(buffer, start, rows):
    """buffer[start : start + len(rows)] += rows."""
    indices = start + tf.range(rows.shape[0] or tf.shape(rows)[0])
    if ops.in_xla_context():
        return tf.tensor_scatter_nd_add(buffer, indices[:, None], rows)
    return tf.raw_ops.InplaceAdd(x=buffer, i=indices, v=rows)


def _add_kernel_gradient(acc, hidden_c, d_logits, head):
    """acc += hidden_c^T @ d_logits (layout "dv"; its transpose for "vd").

    A block of the kernel's rows at a time (about _BLOCK_BYTES of the
    accumulator): one matmul in the operands' dtype (the compute dtype, or
    float32 for float16), whose sum over the chunk's rows accumulates in
    float32 inside it, cast to the accumulator dtype and added in place.
    Under XLA, or with shapes unknown, one block.
    """
    if head.layout == "dv":
        part = lambda r0, r1: tf.matmul(hidden_c[:, r0:r1], d_logits, transpose_a=True)  # noqa: E731
        num_rows, row_size = head.hidden_dim, head.vocabulary
    else:
        part = lambda r0, r1: tf.matmul(d_logits[:, r0:r1], hidden_c, transpose_a=True)  # noqa: E731
        num_rows, row_size = head.vocabulary, head.hidden_dim
    if ops.in_xla_context() or num_rows is None or row_size is None:
        return acc + tf.cast(part(0, None), acc.dtype)
    block = max(1, _BLOCK_BYTES // (row_size * acc.dtype.size))
    num_blocks = -(-num_rows // block)

    def add_block(j, acc):
        with tf.control_dependencies([acc]):
            r0 = j * block
            update = tf.cast(part(r0, tf.minimum(r0 + block, num_rows)), acc.dtype)
        return j + 1, _add_rows(acc, r0, update)

    _, acc = tf.while_loop(
        lambda j, _: j < num_blocks, add_block, (tf.constant(0), acc), parallel_iterations=1
    )
    return acc
