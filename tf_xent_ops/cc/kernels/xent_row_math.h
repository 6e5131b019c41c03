/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The math of the fused cross-entropy ops, written once for every device: the
per-call constants, the compensated sum, the element-wise gradients and the
row losses from a row's reductions. The CPU functors apply these formulas to
Eigen array expressions (whole rows at a time), the CUDA kernels to scalars.

Semantics (per row, t is the smoothed target, ls the label smoothing):
  t_k = (1 - ls) * y_k + ls / C       dense labels y (soft labels allowed)
  t_k = (1 - ls) * [k == y] + ls / C  sparse labels y
  logits:         z'_k = cap * tanh(z_k / cap) with a soft cap, else z_k;
                  loss = sum_k t_k * (lse - z'_k) + z_loss * lse^2,
                  lse = log sum_k exp(z'_k)
  dense probs:    loss = -sum_k t_k * log(clip(y_k / sum_j y_j, eps, 1 - eps))
  sparse probs:   z_k = log(clip(p_k, eps, 1 - eps)), then as logits
The two probability paths differ because Keras's do: the dense one normalizes,
the sparse one feeds log(clip(p)) to a softmax cross-entropy.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_ROW_MATH_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_ROW_MATH_H_

#include <cmath>
#include <cstdint>

#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace tf_xent_ops {

// Element-wise helpers. They are templates over a scalar or, on the CPU, an
// Eigen array expression, so every formula below is written once for the
// scalar, vectorized and CUDA paths. exp and log go through MathImpl and
// cond ? a : b through WhereImpl: the CPU file specializes both for Eigen
// arrays (its own vectorized exp and log, Eigen's select()).
template <typename X, typename Enable = void>
struct MathImpl {
  static TFXENT_HOST_DEVICE auto Exp(const X& x) {
#if !defined(__CUDA_ARCH__)
    using std::exp;
#endif
    return exp(x);
  }
  static TFXENT_HOST_DEVICE auto Log(const X& x) {
#if !defined(__CUDA_ARCH__)
    using std::log;
#endif
    return log(x);
  }
  static TFXENT_HOST_DEVICE X Reciprocal(const X& x) { return X(1) / x; }
};
template <typename X>
TFXENT_HOST_DEVICE auto ExpOf(const X& x) {
  return MathImpl<X>::Exp(x);
}
template <typename X>
TFXENT_HOST_DEVICE auto LogOf(const X& x) {
  return MathImpl<X>::Log(x);
}
// 1 / x, to within an ulp (the CPU's vector version is not a division).
template <typename X>
TFXENT_HOST_DEVICE auto ReciprocalOf(const X& x) {
  return MathImpl<X>::Reciprocal(x);
}

// tanh, for the soft cap. The CPU specializes it for Eigen arrays and for
// scalar floats (one function for both, so a row's capped logits agree
// bitwise whichever path computed them).
template <typename X, typename Enable = void>
struct TanhImpl {
  static TFXENT_HOST_DEVICE auto Tanh(const X& x) {
#if !defined(__CUDA_ARCH__)
    using std::tanh;
#endif
    return tanh(x);
  }
};
template <typename X>
TFXENT_HOST_DEVICE auto TanhOf(const X& x) {
  return TanhImpl<X>::Tanh(x);
}

// cond ? a : b, element-wise.
template <typename Cond, typename Enable = void>
struct WhereImpl {
  template <typename A, typename B>
  static TFXENT_HOST_DEVICE auto Apply(const Cond& cond, const A& a,
                                       const B& b) {
    return cond ? a : b;
  }
};
template <typename Cond, typename A, typename B>
TFXENT_HOST_DEVICE auto Where(const Cond& cond, const A& a, const B& b) {
  return WhereImpl<Cond>::Apply(cond, a, b);
}

// Per-call constants in accumulation precision.
template <typename Tacc>
struct XentConstants {
  Tacc on_weight;   // 1 - ls: the weight of the labelled class (or of y_k).
  Tacc off_weight;  // ls / C: the weight every class gets from smoothing.
  Tacc clip_lo;     // eps
  Tacc clip_hi;     // 1 - eps, rounded in Tacc as Keras does.
  Tacc num_classes;
  Tacc z_loss;  // The weight of lse^2 (0: no z-loss).
  bool capped;  // Whether logits are soft-capped, z' = cap * tanh(z / cap)
                // (only logits are).
  Tacc cap;
  Tacc inv_cap;  // 1 / cap (0 without a cap).

  TFXENT_HOST_DEVICE explicit XentConstants(const XentParams& p)
      : on_weight(Tacc(1) - Tacc(p.label_smoothing)),
        off_weight(p.num_classes > 0
                       ? Tacc(p.label_smoothing) / Tacc(p.num_classes)
                       : Tacc(0)),
        clip_lo(Tacc(p.epsilon)),
        clip_hi(Tacc(1) - Tacc(p.epsilon)),
        num_classes(Tacc(p.num_classes)),
        z_loss(Tacc(p.z_loss)),
        capped(p.from_logits && p.logit_soft_cap > 0.0),
        cap(Tacc(p.logit_soft_cap)),
        inv_cap(capped ? Tacc(1) / Tacc(p.logit_soft_cap) : Tacc(0)) {}

  // tanh(z / cap), computed as tanh(z * (1 / cap)): the capped logit is
  // cap * t and its derivative 1 - t^2.
  template <typename X>
  TFXENT_HOST_DEVICE auto CapTanh(const X& z) const {
    return TanhOf(z * inv_cap);
  }
  // The capped logit z' = cap * tanh(z / cap) (-cap for a -inf logit).
  template <typename X>
  TFXENT_HOST_DEVICE auto SoftCap(const X& z) const {
    return cap * CapTanh(z);
  }
  // A logit as the softmax sees it: capped where there is a cap.
  TFXENT_HOST_DEVICE Tacc Logit(Tacc z) const {
    return capped ? Tacc(SoftCap(z)) : z;
  }
  // The row's z-loss term; 0 without one, even where lse is infinite.
  TFXENT_HOST_DEVICE Tacc ZLoss(Tacc lse) const {
    return z_loss == Tacc(0) ? Tacc(0) : z_loss * lse * lse;
  }
  // The weight of softmax(z') in d loss / d z' of a row whose targets sum to
  // `target_mass`: target_mass + 2 z_loss lse (the z-loss's derivative is
  // 2 z_loss lse softmax).
  TFXENT_HOST_DEVICE Tacc SoftmaxWeight(Tacc target_mass, Tacc lse) const {
    return z_loss == Tacc(0) ? target_mass
                             : target_mass + Tacc(2) * z_loss * lse;
  }

  // Smoothed dense target.
  template <typename X>
  TFXENT_HOST_DEVICE auto DenseTarget(const X& y) const {
    return on_weight * y + off_weight;
  }
  // g * DenseTarget(y) for a scalar g, with g folded into the weights: one
  // FMA per element.
  template <typename X>
  TFXENT_HOST_DEVICE auto ScaledDenseTarget(Tacc g, const X& y) const {
    return (g * on_weight) * y + g * off_weight;
  }
  // Smoothed sparse target for class k of a row labelled `label`.
  TFXENT_HOST_DEVICE Tacc SparseTarget(int64_t k, int64_t label) const {
    return (k == label ? on_weight : Tacc(0)) + off_weight;
  }
  // clip(p, eps, 1 - eps); NaN stays NaN.
  template <typename X>
  TFXENT_HOST_DEVICE auto Clip(const X& p) const {
    return Where(p < clip_lo, clip_lo, Where(p > clip_hi, clip_hi, p));
  }
  // Where tf.clip_by_value passes the gradient through (bounds inclusive).
  template <typename X>
  TFXENT_HOST_DEVICE auto InClipRange(const X& p) const {
    return (p >= clip_lo) && (p <= clip_hi);
  }
  // Where(InClipRange(p), a, b) (NaN is out of range), written with single
  // comparisons, which Eigen vectorizes where it does not vectorize &&.
  template <typename X, typename A, typename B>
  TFXENT_HOST_DEVICE auto WhereInClipRange(const X& p, const A& a,
                                           const B& b) const {
    return Where(p >= clip_lo, Where(p <= clip_hi, a, b), b);
  }
};

// Whether a sparse row takes part in the loss.
template <typename Tidx>
TFXENT_HOST_DEVICE bool IsIgnored(const XentParams& p, Tidx label) {
  return p.use_ignore_class && static_cast<int64_t>(label) == p.ignore_class;
}

// Index of the first label outside [0, num_classes) that is not the ignored
// class, or -1 if all are valid (the CPU op's check, on the host).
template <typename Tidx>
int64_t FindInvalidLabel(const XentParams& p, const Tidx* labels) {
  for (int64_t i = 0; i < p.num_rows; ++i) {
    const int64_t y = static_cast<int64_t>(labels[i]);
    if (IsIgnored(p, labels[i])) continue;
    if (y < 0 || y >= p.num_classes) return i;
  }
  return -1;
}

// Compensated (Kahan) sum. A plain float running sum that adds many terms far
// smaller than itself (clipped probabilities at eps, smoothing mass ls / C,
// exp of far-below-max logits) rounds the same way every time: a bias that
// grows with C (about 1e-4 relative at C = 50k). This keeps the error at a
// few ulps whatever C is, for 3 extra flops per term.
template <typename Tacc>
struct CompensatedSum {
  Tacc sum = Tacc(0);
  Tacc carry = Tacc(0);
  TFXENT_HOST_DEVICE void Add(Tacc x) {
    const Tacc y = x - carry;
    const Tacc t = sum + y;
    carry = (t - sum) - y;
    // Once the sum is infinite the carry is inf - inf: keep the infinity.
    if (carry != carry) carry = Tacc(0);
    sum = t;
  }
  TFXENT_HOST_DEVICE Tacc Total() const { return sum; }
};

// ---------------------------------------------------------------------------
// Element-wise gradients, shared by every device. `g` is the upstream
// gradient of the row's loss.

// d loss / d z_k for logits: g * (softmax_k * sum_t - t_k), as
// (g sum_t) softmax_k - g t_k: where g, sum_t and t_k are per-row scalars
// (sparse labels), that is two operations per element after the exp. The
// scaled form takes g sum_t and g t_k already formed (for dense targets,
// XentConstants::ScaledDenseTarget: one FMA per element); SoftmaxGrad takes
// softmax_k = exp(z_k - lse) formed too (the GPU kernels use their own exp).
template <typename A, typename E, typename GT>
TFXENT_HOST_DEVICE auto SoftmaxGrad(const A& g_sum_t, const E& softmax,
                                    const GT& g_t) {
  return g_sum_t * softmax - g_t;
}
template <typename A, typename Z, typename L, typename GT>
TFXENT_HOST_DEVICE auto ScaledLogitsGrad(const A& g_sum_t, const Z& z,
                                         const L& lse, const GT& g_t) {
  return SoftmaxGrad(g_sum_t, ExpOf(z - lse), g_t);
}
template <typename G, typename Z, typename L, typename S, typename T>
TFXENT_HOST_DEVICE auto LogitsGrad(const G& g, const Z& z, const L& lse,
                                   const S& sum_t, const T& t) {
  return ScaledLogitsGrad(g * sum_t, z, lse, g * t);
}
// The same for soft-capped logits, from t = tanh(z / cap): the gradient
// with respect to z' = cap * t, times dz'/dz = 1 - t^2.
template <typename Tacc, typename A, typename Tanh, typename L, typename GT>
TFXENT_HOST_DEVICE auto CappedLogitsGrad(const XentConstants<Tacc>& c,
                                         const A& g_sum_t, const Tanh& t,
                                         const L& lse, const GT& g_t) {
  return ScaledLogitsGrad(g_sum_t, c.cap * t, lse, g_t) * (Tacc(1) - t * t);
}

// d loss / d p_k for sparse probabilities, z_k = log(clip(p_k)): zero outside
// the clip range, else g (1 / Q - t_k / p_k), Q = sum_j clip(p_j) the row sum
// the forward saves, formed as (g / Q) (p_k - t_k Q) / p_k. At the label p_k
// is most of Q when the loss is small, so the two terms nearly cancel (and are
// both large where Q is far below one); p_k - Q is exact (t_k is 1 there
// without smoothing), where 1 / Q - 1 / p_k would keep a few correct bits.
template <typename Tacc, typename GQ, typename P, typename Q, typename T>
TFXENT_HOST_DEVICE auto SparseProbsGrad(const XentConstants<Tacc>& c,
                                        const GQ& g_over_sum, const P& p,
                                        const Q& row_sum, const T& t) {
  return c.WhereInClipRange(
      p, g_over_sum * ((p - t * row_sum) * ReciprocalOf(p)), Tacc(0));
}

// The clip-range test of dense probabilities: whether q_k = y_k / s, formed
// by division as Keras forms it, lies in [eps, 1 - eps]. Select(y, a, b) is
// a where q_k is in range, else b. (The CPU has an equivalent for float that
// compares y_k with per-row bounds instead of dividing.)
template <typename Tacc, typename S>
struct ClipRangeByDivision {
  using Scalar = Tacc;
  XentConstants<Tacc> c;
  S s;  // The row sum (or, on the CPU, an expression of per-row sums).
  template <typename Y, typename A, typename B>
  TFXENT_HOST_DEVICE auto Select(const Y& y, const A& a, const B& b) const {
    return c.WhereInClipRange(y / s, a, b);
  }
};

// d loss / d y_k for dense probabilities, with q_k = y_k / S, S = sum_j y_j
// and A = sum of t_j over in-range classes: g * (A / S - [q_k in range] t_k /
// y_k). Autodiff of normalize -> clip -> log -> weighted sum, in closed form;
// `range` tests q_k as Keras forms it, so the clip mask matches exactly.
template <typename G, typename Y, typename Range, typename A, typename T>
TFXENT_HOST_DEVICE auto DenseProbsGrad(const G& g, const Y& y,
                                       const Range& range, const A& a_over_s,
                                       const T& t) {
  using Tacc = typename Range::Scalar;
  return g * (a_over_s - range.Select(y, t * ReciprocalOf(y), Tacc(0)));
}

// ---------------------------------------------------------------------------
// Row losses from a row's reductions, shared by every device. m is the row
// max, log_s = log(sum_k exp(z_k - m)).

// w * x, but 0 for a zero weight even where x is infinite (0 * inf is NaN):
// the label's own term at label_smoothing = 1, whose loss is then that of
// the uniform targets alone (inf where the label's logit is -inf).
template <typename Tacc>
TFXENT_HOST_DEVICE Tacc WeightedTerm(Tacc w, Tacc x) {
  return w == Tacc(0) ? Tacc(0) : w * x;
}

// Sparse logits: log_s - (1 - ls)(z_label - m) - (ls / C) sum_k (z_k - m).
template <typename Tacc>
TFXENT_HOST_DEVICE Tacc SparseLogitsLoss(const XentConstants<Tacc>& c,
                                         Tacc log_s, Tacc label_shifted,
                                         Tacc sum_shifted) {
  return log_s - WeightedTerm(c.on_weight, label_shifted) -
         c.off_weight * sum_shifted;
}

// Sparse probabilities, z_k = log(clip(p_k)), Q = sum_k clip(p_k), from Q,
// clip(p_label) and sum_k z_k (used only with smoothing):
//   (1 - ls) log(Q / clip(p_label)) + (ls / C) sum_k (log Q - z_k).
// One log of the ratio, not log Q - log clip(p_label): where the label's
// probability is most of Q (a small loss) the two logs are nearly equal, and
// each errs by ulps of itself, large where Q is far below one.
template <typename Tacc>
TFXENT_HOST_DEVICE Tacc SparseProbsLoss(const XentConstants<Tacc>& c,
                                        Tacc row_sum, Tacc label_clipped,
                                        Tacc sum_log) {
  const Tacc label_term = LogOf(row_sum / label_clipped);
  // Without smoothing sum_log is not formed, nor needed.
  if (c.off_weight == Tacc(0)) return c.on_weight * label_term;
  return WeightedTerm(c.on_weight, label_term) +
         c.off_weight * (c.num_classes * LogOf(row_sum) - sum_log);
}

// Dense logits: sum_t * log_s - sum_k t_k (z_k - m). Also applies to a
// vector of rows on the CPU.
template <typename L, typename S, typename U>
TFXENT_HOST_DEVICE auto DenseLogitsLoss(const L& log_s, const S& sum_t,
                                        const U& sum_t_shifted) {
  return sum_t * log_s - sum_t_shifted;
}

}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_ROW_MATH_H_
