"""Accuracy of the kernels' math, element by element: their vectorized exp
and log, the dense clip masks, and the sparse probability terms that would
cancel.

The CPU kernels use their own AVX-512 exp and log where the build has AVX-512
(xent_cpu_math.h), Eigen's elsewhere. Two ops expose them one element at a
time: the sparse logits gradient with log_sum_exp = 0 and no smoothing is
exp(z_k) for every unlabelled k, and the dense probabilities labels gradient
with row sum 1 and epsilon = 0 is -log(y_k). Both are checked in ulps against
float64 over the whole float range and at the special values.
"""

import numpy as np
import pytest
import tensorflow as tf
from raw_ops import coefficients
from tf_xent_ops._load import library

# The CPU kernels of every instruction-set level this machine runs.
pytestmark = pytest.mark.usefixtures("each_cpu_isa")

# Our AVX-512 exp and log are within 2 ulp; Eigen's, which builds without
# AVX-512 use (the Bazel build's default is portable), are within 2 (exp) and
# 4 (log).
EXP_MAX_ULPS = 2.0
LOG_MAX_ULPS = 4.0


def _ulp_error(got, exact):
    """|got - exact| in units of the float32 spacing at `exact`."""
    exact32 = exact.astype(np.float32)
    spacing = np.spacing(np.abs(exact32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def _as_rows(values, num_classes):
    """Pads to whole rows of `num_classes` (column 0 is a spare)."""
    per_row = num_classes - 1
    n = -(-values.size // per_row)
    padded = np.zeros(n * per_row, np.float32)
    padded[: values.size] = values
    rows = np.zeros((n, num_classes), np.float32)
    rows[:, 1:] = padded.reshape(n, per_row)
    return rows, n


def _kernel_exp(values):
    rows, n = _as_rows(values, 1024)
    grad = library.tf_xent_sparse_xent_grad(
        rows,
        tf.zeros([n], tf.int32),  # column 0 is the label: never checked
        tf.zeros([n]),
        tf.ones([n]),
        from_logits=True,
        ignore_class=0,
        use_ignore_class=False,
        **coefficients(),
    )
    return grad.numpy()[:, 1:].reshape(-1)[: values.size]


def _dense_stats(stat0, stat1):
    """The dense ops' [n, 4] row statistics from their first two columns (the
    last two name no single label)."""
    n = len(stat0)
    return np.stack(
        [stat0, stat1, np.full(n, -1.0, np.float32), np.zeros(n, np.float32)], axis=1
    ).astype(np.float32)


def _kernel_log(values):
    rows, n = _as_rows(values, 1024)
    rows[:, 0] = 0.5  # any value in (0, 1]: the row sum is given, not computed
    stats = _dense_stats(np.ones(n, np.float32), np.zeros(n, np.float32))
    grad = library.tf_xent_dense_xent_labels_grad(
        rows, stats, tf.ones([n]), from_logits=False, **coefficients(epsilon=0.0)
    )
    return -grad.numpy()[:, 1:].reshape(-1)[: values.size]


def test_exp_ulps_over_the_float_range(rng):
    # Every argument whose exp is a normal float, plus random ones.
    grid = np.linspace(-87.3, 88.7, 400_001, dtype=np.float32)
    values = np.concatenate([grid, rng.uniform(-87.3, 88.7, 100_000).astype(np.float32)])
    got = _kernel_exp(values)
    err = _ulp_error(got, np.exp(values.astype(np.float64)))
    worst = int(np.argmax(err))
    assert err[worst] <= EXP_MAX_ULPS, f"exp({values[worst]!r}) = {got[worst]!r}: {err[worst]} ulp"


def test_exp_special_values():
    values = np.array(
        [0.0, -0.0, 1.0, -1.0, 88.72, 88.73, 89.0, 100.0, -88.0, -103.0, -104.0, -150.0],
        np.float32,
    )
    specials = np.array([np.inf, -np.inf, np.nan], np.float32)
    got = _kernel_exp(np.concatenate([values, specials]))
    with np.errstate(over="ignore"):
        exact = np.exp(values.astype(np.float64)).astype(np.float32)
    # Overflow gives inf. Results below the smallest normal float are that
    # value or 0: TensorFlow's threads flush denormals to zero.
    normal = exact >= np.finfo(np.float32).tiny
    np.testing.assert_allclose(got[: values.size][normal], exact[normal], rtol=2.5e-7)
    tiny = got[: values.size][~normal]
    assert np.all((tiny == 0) | (np.abs(tiny - exact[~normal]) <= 1.5e-45))
    assert got[-3] == np.inf and got[-2] == 0.0 and np.isnan(got[-1])


def test_log_ulps_on_zero_to_one(rng):
    # Every binade from the smallest normal float up to 1, and random values.
    exponents = rng.uniform(-126, 0, 400_000)
    values = np.concatenate(
        [
            np.exp2(exponents).astype(np.float32),
            rng.uniform(0.5, 1.0, 100_000).astype(np.float32),
            np.float32(1) - np.arange(1, 2000, dtype=np.float32) * np.float32(2**-24),
        ]
    )
    got = _kernel_log(values)
    err = _ulp_error(got, np.log(values.astype(np.float64)))
    worst = int(np.argmax(err))
    assert err[worst] <= LOG_MAX_ULPS, f"log({values[worst]!r}) = {got[worst]!r}: {err[worst]} ulp"


@pytest.mark.parametrize(
    "value, expected",
    [(0.0, -np.inf), (1.0, 0.0), (np.nan, np.nan)],
)
def test_log_special_values(value, expected):
    got = _kernel_log(np.full(40, value, np.float32))
    np.testing.assert_array_equal(got, np.full(40, expected, np.float32))


# The dense probabilities paths decide whether q_k = y_k / s is inside the
# clip range [eps, 1 - eps] as Keras does, by float32 division; the CPU float
# kernels compare y_k with per-row bounds instead. Elements a few ulps either
# side of every boundary must fall on the same side as the division's.
EPS = np.float32(1e-7)


def _division_mask(y, s):
    q = np.float32(y) / np.float32(s)
    return (q >= EPS) & (q <= np.float32(1) - EPS)


def _around(value, ulps=6):
    """Floats from `ulps` below `value` to `ulps` above it."""
    out = [np.float32(value)]
    for direction in (-np.inf, np.inf):
        v = np.float32(value)
        for _ in range(ulps):
            v = np.nextafter(v, np.float32(direction))
            out.append(v)
    return np.array(out, np.float32)


# Rows of fewer than 32 classes take the chunked path, longer ones the row path.
@pytest.mark.parametrize("ulps", [6, 12])
def test_dense_probs_gradient_clip_mask_equals_division(rng, ulps):
    # (1 / y must not underflow either: the gradient is what is observed.)
    sums = np.concatenate([rng.uniform(0.3, 3.0, 200), [1.0, 0.5, 2.0, 1e-30, 1e30]])
    sums = sums.astype(np.float32)
    rows = []
    for s in sums:
        lo, hi = EPS * s, (np.float32(1) - EPS) * s
        rows.append(np.concatenate([_around(lo, ulps), _around(hi, ulps)]))
    y = np.stack(rows)
    n, c = y.shape
    # With labels of ones, g = 1 and A = 0 the gradient is -[q_k in range] / y_k.
    stats = _dense_stats(sums, np.zeros(n, np.float32))
    grad = library.tf_xent_dense_xent_grad(
        y,
        np.ones_like(y),
        stats,
        tf.ones([n]),
        from_logits=False,
        **coefficients(epsilon=float(EPS)),
    ).numpy()
    expected = _division_mask(y, sums[:, None])
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(grad != 0, expected)


@pytest.mark.parametrize("c", [24, 40])
def test_dense_probs_forward_clip_mask_equals_division(rng, c):
    # Rows whose top entry normalizes to within a few ulps of 1 - eps, and
    # small entries to within a few ulps of eps.
    n = 4000
    top = np.float32(1)
    small = rng.uniform(0.2, 1.0, (n, c - 1)) * 1e-7 * rng.integers(0, 2, (n, c - 1))
    y = np.concatenate([np.full((n, 1), top), small], axis=1).astype(np.float32)
    _, stats = library.tf_xent_dense_xent(
        y, np.ones_like(y), from_logits=False, **coefficients(epsilon=float(EPS))
    )
    stats = stats.numpy()
    expected = _division_mask(y, stats[:, :1]).sum(axis=1).astype(np.float32)
    q = y / stats[:, :1]
    near = np.abs(q - (np.float32(1) - EPS)) <= 4 * np.spacing(np.float32(1))
    assert near.sum() > 10  # the boundary is really exercised
    np.testing.assert_array_equal(stats[:, 1], expected)


# Sparse probabilities are not normalized (Keras log-softmaxes log(clip(p))), so
# a row may sum to Q far below one. Where the label's probability is most of Q,
# the loss log Q - log p_label and the label's gradient 1 / Q - 1 / p_label are
# differences of nearly equal large terms: the kernels take one log of the ratio
# and form the gradient from p_label - Q, which is exact, and keep Q itself (not
# its log) for the backward.
# Given the Q the forward summed, both are then within a few ulps of the exact
# value, whatever Q is.
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("num_classes", [6, 40])  # chunked rows, single rows
def test_sparse_probs_small_losses_keep_their_bits(rng, label_smoothing, num_classes):
    n = 512
    p = rng.uniform(0.0, 1.0, (n, num_classes)) ** 4 * 1e-4
    p[np.arange(n), rng.integers(0, num_classes, n)] = 1.0  # a dominant class
    p *= 10.0 ** rng.uniform(-6.0, 0.0, (n, 1))
    p = p.astype(np.float32)
    # The dominant class in most rows (small losses), any class in the rest.
    labels = np.where(rng.uniform(size=n) < 0.75, p.argmax(1), rng.integers(0, num_classes, n))
    g = rng.uniform(0.5, 2.0, n).astype(np.float32)
    attrs = dict(
        from_logits=False,
        ignore_class=0,
        use_ignore_class=False,
        **coefficients(label_smoothing=label_smoothing, epsilon=float(EPS)),
    )
    loss, row_sum = library.tf_xent_sparse_xent(p, labels, **attrs)
    grad = library.tf_xent_sparse_xent_grad(p, labels, row_sum, g, **attrs).numpy()

    x = p.astype(np.float64)
    clipped = np.clip(x, float(EPS), float(np.float32(1) - EPS))
    # The statistic is the row sum of the clipped probabilities (to its sum's
    # rounding), and the exact values below are those for it.
    np.testing.assert_allclose(row_sum, clipped.sum(1), rtol=2.0**-18)
    q = row_sum.numpy().astype(np.float64)[:, None]
    ls = float(np.float32(label_smoothing))
    t = np.full(x.shape, ls / num_classes)
    t[np.arange(n), labels] += 1.0 - ls
    neg_log_softmax = np.log(q) - np.log(clipped)
    exact_loss = np.sum(t * neg_log_softmax, axis=1)
    err = np.abs(loss.numpy() - exact_loss) / (1.0 + exact_loss)
    assert err.max() <= 2.0**-21, f"loss off by {err.max() / 2.0**-24:.1f} ulp"
    at_label = neg_log_softmax[np.arange(n), labels]
    # Small losses were tried: the dominant class, where the row's scale leaves
    # the clipped classes' mass below 1% of it (most such rows).
    assert np.mean(at_label[labels == p.argmax(1)] < 1e-2) > 0.25

    in_range = (p >= EPS) & (p <= np.float32(1) - EPS)
    exact_grad = np.where(in_range, g[:, None] * (1.0 / q - t / x), 0.0)
    # Within a few ulps of itself, or of g t / p where smoothing makes t / p a
    # rounded term (t is exactly 1 at the label without smoothing).
    rounded_term = np.where(t == 1.0, 0.0, g[:, None] * t / x)
    bound = 2.0**-21 * np.where(in_range, np.abs(exact_grad) + rounded_term, 0.0)
    worst = np.unravel_index(np.argmax(np.abs(grad - exact_grad) - bound), grad.shape)
    assert np.abs(grad - exact_grad)[worst] <= bound[worst], (
        f"gradient [{worst}]: {grad[worst]!r} vs {exact_grad[worst]!r}"
    )
