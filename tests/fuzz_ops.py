"""Property-based fuzzing of the raw ops and the public API (hypothesis).

Each example draws shapes (zero-size and rank 0..4 included), dtypes, values
with NaN/Inf, labels that may be negative, too large or beyond int32, label
smoothing and axes that may be out of range, and an ignore_class that may be a
valid class. An oracle written from the API's contract says whether the call
is valid. A valid call must match the float64 NumPy reference (NaN where the
reference has NaN); an invalid one must raise ValueError, TypeError or
InvalidArgumentError whose message names the problem. Anything else fails.

Run by tests/test_fuzz.py in a child process, so that a crash (a signal, not
an exception) is seen as a failure too:

    python tests/fuzz_ops.py --examples 5000
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import reference as ref  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from raw_ops import coefficients  # noqa: E402
from tf_xent_ops._load import library  # noqa: E402

import tf_xent_ops as txo  # noqa: E402

DTYPES = ["float16", "bfloat16", "float32", "float64"]
ERRORS = (ValueError, TypeError, tf.errors.InvalidArgumentError)


def _values(data, shape, dtype, from_logits):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    scale = data.draw(st.sampled_from([1.0, 10.0, 1e3]), label="scale")
    if from_logits:
        x = rng.standard_normal(shape) * scale
    else:
        x = rng.uniform(0.0, 1.0, size=shape) ** data.draw(st.sampled_from([1, 8]), label="pow")
    specials = data.draw(st.sampled_from([None, np.nan, np.inf, -np.inf]), label="special")
    if specials is not None and x.size:
        x.flat[rng.integers(0, x.size)] = specials
    return x.astype(ref.NUMPY_DTYPES[dtype])


def _shape(data, rank):
    return tuple(data.draw(st.integers(0, 5), label=f"dim{i}") for i in range(rank))


def _check(expected_error, call, reference, what):
    """expected_error: None if valid, else words one of which the message must name."""
    try:
        result = call()
    except ERRORS as e:
        message = str(e).lower()
        if expected_error is None:
            raise AssertionError(f"{what}: valid input raised {e!r}") from e
        if not any(word in message for word in expected_error):
            raise AssertionError(
                f"{what}: message {message!r} names none of {expected_error}"
            ) from e
        return
    if expected_error is not None:
        raise AssertionError(f"{what}: invalid input ({expected_error}) returned {result}")
    expected = reference()
    actual = np.asarray(result, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    finite = np.abs(expected[np.isfinite(expected)])
    atol = 1e-4 * max(1.0, float(finite.max()) if finite.size else 1.0)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=atol, equal_nan=True, err_msg=what)


@st.composite
def _common(draw):
    return dict(
        rank=draw(st.integers(0, 4), label="rank"),
        dtype=draw(st.sampled_from(DTYPES), label="dtype"),
        from_logits=draw(st.booleans(), label="from_logits"),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0, -0.5, 1.5]), label="ls"),
        # 1e39 and 1e35: beyond what float32 losses can carry, fine in float64.
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-3, -1.0, float("nan"), 1e39]), label="z_loss"),
        logit_soft_cap=draw(
            st.sampled_from([None, None, 5.0, 0.0, -2.0, float("inf"), 1e35]), label="cap"
        ),
    )


def _coefficient_error(c):
    """The words one of which the error for bad float arguments must name, or
    None if they are valid."""
    if not 0.0 <= c["label_smoothing"] <= 1.0:
        return ["label_smoothing"]
    if not (np.isfinite(c["z_loss"]) and c["z_loss"] >= 0.0):
        return ["z_loss"]
    cap = c["logit_soft_cap"]
    if cap is not None and not (np.isfinite(cap) and cap > 0.0):
        return ["logit_soft_cap"]
    if not c["from_logits"] and (c["z_loss"] != 0.0 or cap is not None):
        return ["z_loss", "logit_soft_cap"]
    if c["dtype"] != "float64":
        if c["z_loss"] > np.finfo(np.float32).max:
            return ["z_loss"]
        if cap is not None and cap > 1e31:
            return ["logit_soft_cap"]
    return None


def _options(c):
    return dict(z_loss=c["z_loss"], logit_soft_cap=c["logit_soft_cap"])


def _axis(data, rank):
    return data.draw(st.integers(-rank - 1, rank), label="axis")


def _bad_axis(axis, rank):
    return not -rank <= axis < rank


def fuzz_sparse(data):
    c = data.draw(_common())
    rank, dtype, from_logits, ls = c["rank"], c["dtype"], c["from_logits"], c["label_smoothing"]
    shape = _shape(data, rank)
    axis = _axis(data, max(rank, 1))
    p = _values(data, shape, dtype, from_logits)
    ignore_class = data.draw(st.one_of(st.none(), st.integers(-2, 6)), label="ignore_class")
    label_dtype = data.draw(st.sampled_from(["int32", "int64"]), label="label_dtype")
    num_classes = shape[axis] if rank and not _bad_axis(axis, rank) else 1
    label_shape = tuple(d for i, d in enumerate(shape) if i != axis % rank) if rank else ()
    if data.draw(st.booleans(), label="mismatch") and label_shape:
        label_shape = label_shape[:-1] + (label_shape[-1] + 1,)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="label_seed"))
    high = max(num_classes, 1) + 2
    labels = rng.integers(-2, high, size=label_shape)
    if label_dtype == "int64" and labels.size and data.draw(st.booleans(), label="huge"):
        labels.flat[0] = 2**40
    labels = labels.astype(label_dtype)

    if rank == 0:
        error = ["rank"]
    elif _bad_axis(axis, rank):
        error = ["axis"]
    elif _coefficient_error(c):
        error = _coefficient_error(c)
    elif label_shape != tuple(d for i, d in enumerate(shape) if i != axis % rank):
        error = ["shape"]
    elif num_classes == 0 and labels.size:
        error = ["class"]
    else:
        valid = (labels >= 0) & (labels < num_classes)
        if ignore_class is not None:
            valid |= labels == ignore_class
        error = None if valid.all() else ["label value"]

    def call():
        return txo.ops.sparse_crossentropy(
            labels, p, from_logits, ls, ignore_class, axis, **_options(c)
        )

    def reference():
        return ref.sparse(labels, p, from_logits, ls, ignore_class, axis, **_options(c))

    _check(error, call, reference, f"sparse {dtype} {shape} axis={axis} {c}")


def fuzz_dense(data):
    c = data.draw(_common())
    rank, dtype, from_logits, ls = c["rank"], c["dtype"], c["from_logits"], c["label_smoothing"]
    shape = _shape(data, rank)
    axis = _axis(data, max(rank, 1))
    p = _values(data, shape, dtype, from_logits)
    label_shape = shape
    if data.draw(st.booleans(), label="mismatch") and shape:
        label_shape = shape[:-1] + (shape[-1] + 1,)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="label_seed"))
    labels = rng.uniform(0, 1, size=label_shape).astype(np.float32)

    if rank == 0:
        error = ["rank"]
    elif _bad_axis(axis, rank):
        error = ["axis"]
    elif _coefficient_error(c):
        error = _coefficient_error(c)
    elif label_shape != shape:
        error = ["shape"]
    elif shape[axis] == 0 and np.prod([d for i, d in enumerate(shape) if i != axis % rank]) > 0:
        error = ["class"]
    else:
        error = None

    def call():
        return txo.ops.dense_crossentropy(labels, p, from_logits, ls, axis, **_options(c))

    def reference():
        return ref.dense(labels, p, from_logits, ls, axis, **_options(c))

    _check(error, call, reference, f"dense {dtype} {shape} axis={axis} {c}")


def fuzz_raw_grad_ops(data):
    """The gradient ops called directly with arbitrary (often inconsistent) shapes."""
    n = data.draw(st.integers(0, 4), label="n")
    c = data.draw(st.integers(0, 4), label="c")
    dims = {
        name: data.draw(st.sampled_from([(n,), (n + 1,), (n, 2), ()]), label=name)
        for name in ("labels", "lse", "grad")
    }
    predictions = tf.zeros([n, c])
    labels = tf.zeros(dims["labels"], tf.int64)
    lse, grad = tf.zeros(dims["lse"]), tf.ones(dims["grad"])
    consistent = dims["labels"] == dims["lse"] == dims["grad"] == (n,) and (c > 0 or n == 0)
    try:
        out = library.tf_xent_sparse_xent_grad(
            predictions, labels, lse, grad, from_logits=True, **coefficients()
        )
    except ERRORS as e:
        assert not consistent, f"consistent shapes raised {e!r}"
        assert any(w in str(e).lower() for w in ("shape", "rank", "class", "dimension")), str(e)
        return
    assert consistent, f"inconsistent shapes {dims} n={n} c={c} returned"
    assert out.shape == (n, c)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=5000)
    args = parser.parse_args()
    budget = {"fuzz_sparse": 0.45, "fuzz_dense": 0.4, "fuzz_raw_grad_ops": 0.15}
    total = 0
    for name, share in budget.items():
        examples = max(1, int(args.examples * share))
        run = settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(given(data=st.data())(globals()[name]))
        run()
        total += examples
        print(f"{name}: {examples} examples passed", flush=True)
    print(f"fuzz: {total} examples passed")
    print(f"CPU kernels: {txo.cpu_isa()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
