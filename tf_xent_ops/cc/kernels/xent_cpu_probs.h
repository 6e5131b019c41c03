/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The CPU's probability paths: Keras's clip mask of dense probabilities, decided
exactly without a division per element (ClipRangeOfRow), packets of clipped
values and targets, the sum of clipped logs as the log of a product, and the
dense forward's one loop over a row (DenseProbsRowSums).
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_CPU_PROBS_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_CPU_PROBS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "tf_xent_ops/cc/kernels/xent_cpu_math.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_rows.h"

namespace tf_xent_ops {
namespace {

// The clip-range test fl(y / s) in [lo, hi] of a row of dense probabilities
// with sum s, without dividing: as bounds on y. Division rounds to nearest
// (ties to even), so fl(y / s) >= lo exactly when y / s is above the
// midpoint m between lo and the float below it (or at m, when the tie goes
// to lo): when y >= y_lo, the least float beyond m * s (or at it). The same
// for hi. m * s is exact in double (25 + 24 significant bits). Rows where a
// bound would not be a normal float (tiny or non-finite sums, eps = 0) and
// double rows divide instead.
template <typename Tacc>
class ClipRangeOfRow {
 public:
  using Scalar = Tacc;

  ClipRangeOfRow(const XentConstants<Tacc>& c, Tacc s) : by_division_{c, s} {
    if constexpr (std::is_same_v<Tacc, float>) {
      bounded_ =
          Bound(c.clip_lo, -1, s, &y_lo_) && Bound(c.clip_hi, 1, s, &y_hi_);
    }
  }

  template <typename Y, typename A, typename B>
  auto Select(const Y& y, const A& a, const B& b) const {
    return Where(y >= y_lo_, Where(y <= y_hi_, a, b), b);
  }
  // Whether y / s is in range, for one y.
  bool InRange(Tacc y) const {
    return bounded_ ? (y >= y_lo_ && y <= y_hi_)
                    : by_division_.c.InClipRange(y / by_division_.s);
  }
  // All bits set in the lanes of a packet of y whose y / s is in range.
  template <typename Packet>
  Packet InRangeMask(const Packet& y) const {
    namespace ei = Eigen::internal;
    const Packet lo =
        ei::pset1<Packet>(bounded_ ? y_lo_ : by_division_.c.clip_lo);
    const Packet hi =
        ei::pset1<Packet>(bounded_ ? y_hi_ : by_division_.c.clip_hi);
    const Packet v =
        bounded_ ? y : ei::pdiv(y, ei::pset1<Packet>(by_division_.s));
    return ei::pand(ei::pcmp_le(lo, v), ei::pcmp_le(v, hi));
  }
  bool bounded() const { return bounded_; }
  const ClipRangeByDivision<Tacc, Tacc>& by_division() const {
    return by_division_;
  }

 private:
  // The y bound for clip bound `v` (direction -1: lower, 1: upper).
  static bool Bound(float v, int direction, float s, float* out) {
    const float kMin = std::numeric_limits<float>::min();
    if (!(v >= kMin && v < 1.0f && s >= kMin &&
          s <= std::numeric_limits<float>::max())) {
      return false;
    }
    const float beyond = std::nextafter(v, direction < 0 ? 0.0f : 2.0f);
    const double m = (static_cast<double>(v) + beyond) / 2;  // exact
    const double ms = m * s;                                 // exact
    const bool tie_to_v = (Bits(v) & 1) == 0;
    // Lower: least y with y > ms (y >= ms if ties go to v). Upper: greatest
    // y with y < ms (y <= ms if ties go to v).
    float y = static_cast<float>(ms);
    const float inward =
        direction < 0 ? std::numeric_limits<float>::max() : 0.0f;
    if (direction < 0 ? static_cast<double>(y) < ms || (!tie_to_v && y == ms)
                      : static_cast<double>(y) > ms || (!tie_to_v && y == ms)) {
      y = std::nextafter(y, inward);
    }
    *out = y;
    return std::isnormal(y);
  }
  static uint32_t Bits(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    return bits;
  }

  ClipRangeByDivision<Tacc, Tacc> by_division_;
  Tacc y_lo_ = Tacc(0), y_hi_ = Tacc(0);
  bool bounded_ = false;
};

// c.DenseTarget of a packet of unsmoothed labels y.
template <typename Packet, typename Tacc>
Packet DenseTargetPacket(const XentConstants<Tacc>& c, const Packet& y) {
  namespace ei = Eigen::internal;
  return ei::padd(ei::pmul(ei::pset1<Packet>(c.on_weight), y),
                  ei::pset1<Packet>(c.off_weight));
}

// c.Clip of a packet: NaN stays NaN, as Eigen's pmax(a, b) and pmin(a, b)
// return a where either is NaN (std::max's and std::min's rule).
template <typename Packet, typename Tacc>
Packet ClipPacket(const XentConstants<Tacc>& c, const Packet& q) {
  namespace ei = Eigen::internal;
  return ei::pmin(ei::pmax(q, ei::pset1<Packet>(c.clip_lo)),
                  ei::pset1<Packet>(c.clip_hi));
}

// sum_k log(clip(x_k)) over a row: the log of a product (LogOfProduct) where
// eps allows it, else a sum of logs.
template <typename Tacc>
Tacc ClippedLogSum(const ConstRow<Tacc>& x, const XentConstants<Tacc>& c) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<Tacc>::type;
  constexpr int64_t kSize = ei::packet_traits<Tacc>::size;
  if (!LogOfProduct<Tacc>::Accepts(c.clip_lo)) {
    return BlockedSum(LogOf(c.Clip(x)));
  }
  const int64_t n = x.size(), full = n - n % kSize;
  LogOfProduct<Tacc> product;
  for (int64_t i = 0; i < full; i += kSize) {
    product.Multiply(ClipPacket(c, ei::ploadu<Packet>(x.data() + i)));
  }
  Tacc tail = Tacc(0);
  for (int64_t i = full; i < n; ++i) tail += LogOf(c.Clip(x[i]));
  return static_cast<Tacc>(product.Log() + tail);
}

// Whether any lane of v is nonzero (NaN is).
template <typename Packet>
bool AnyNonzero(const Packet& v) {
  namespace ei = Eigen::internal;
  return ei::predux_any(
      ei::pandnot(ei::ptrue(v), ei::pcmp_eq(v, ei::pzero(v))));
}
#if defined(EIGEN_VECTORIZE_AVX512)
// One compare into a mask register, where Eigen's masks are vectors.
inline bool AnyNonzero(const Eigen::internal::Packet16f& v) {
  return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0;
}
#endif

// Over a row of dense probabilities x with sum s and (unsmoothed) labels y:
// sum_k t_k log(clip(x_k / s)) and the sum of t_k over the k whose x_k / s is
// in the clip range. The clip mask (which decides the whole row's gradient
// near 1 - eps) is Keras's, formed by division (see ClipRangeOfRow); the log
// takes x_k times 1 / s, within an ulp of x_k / s, as vector division costs
// about as much as the log. The logs are the cost of this pass, so it takes
// as few as it can, in one loop with the in-range sum:
// - Without smoothing it skips packets without target mass: with one-hot
//   labels, all but one packet of the row. Skipping adds exact zeros only
//   when every log is finite: a finite nonzero s and eps > 0 (else NaN and
//   -inf must reach the sum, as 0 * log(...) carries them in Keras).
// - With smoothing every class has target mass. The sum is split as
//   off_weight * sum_k log(clip(q_k)) + on_weight * sum_k y_k log(clip(q_k)):
//   the first is the log of a product (LogOfProduct; clip(q) >= eps), the
//   second skips packets where y is 0 (NaN and -inf cannot hide there: a
//   non-finite log makes the first sum NaN too).
// Quotient gives x_k / s (RowQuotient below).
template <typename Tacc, typename Quotient>
void DenseProbsRowSumsBy(const ConstRow<Tacc>& x, const Tacc* y,
                         const XentConstants<Tacc>& c, Tacc s,
                         const Quotient& quotient,
                         const ClipRangeOfRow<Tacc>& range, Tacc* log_sum,
                         Tacc* in_range_sum) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<Tacc>::type;
  constexpr int64_t kSize = ei::packet_traits<Tacc>::size;
  const bool by_product =
      c.off_weight > Tacc(0) && LogOfProduct<Tacc>::Accepts(c.clip_lo);
  const bool skip =
      by_product || (std::isfinite(s) && s != Tacc(0) && c.clip_lo > Tacc(0));
  const Packet zero = ei::pset1<Packet>(Tacc(0));
  LogOfProduct<Tacc> product;
  Tacc tail_log_sum = Tacc(0);  // sum of log(clip(q)) after the last packet
  CompensatedSum<Tacc> log_total, in_range_total;
  const int64_t n = x.size();
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t end = std::min(n, b + kSumBlock);
    const int64_t full = b + (end - b) / kSize * kSize;
    Packet log_acc = zero, in_range_acc = zero;
    for (int64_t i = b; i < full; i += kSize) {
      const Packet labels = ei::ploadu<Packet>(y + i);
      const Packet t = DenseTargetPacket(c, labels);
      // The weights of the logs taken one by one.
      const Packet w = by_product ? labels : t;
      const bool weighted = AnyNonzero(w);
      if (skip && !by_product && !weighted) continue;
      const Packet v = ei::ploadu<Packet>(x.data() + i);
      in_range_acc = ei::padd(in_range_acc, ei::pand(range.InRangeMask(v), t));
      const Packet clipped = ClipPacket(c, quotient.Of(v));
      if (by_product) product.Multiply(clipped);
      if (skip && !weighted) continue;
      log_acc = ei::padd(log_acc, ei::pmul(w, VectorLogOp().packetOp(clipped)));
    }
    Tacc log_part = ei::predux(log_acc),
         in_range_part = ei::predux(in_range_acc);
    for (int64_t i = full; i < end; ++i) {
      const Tacc t = c.DenseTarget(y[i]);
      const Tacc log_q = LogOf(c.Clip(quotient.Of(static_cast<Tacc>(x[i]))));
      log_part += (by_product ? y[i] : t) * log_q;
      if (by_product) tail_log_sum += log_q;
      if (range.InRange(x[i])) in_range_part += t;
    }
    log_total.Add(log_part);
    in_range_total.Add(in_range_part);
  }
  *log_sum =
      by_product
          ? c.on_weight * log_total.Total() +
                c.off_weight * static_cast<Tacc>(product.Log() + tail_log_sum)
          : log_total.Total();
  *in_range_sum = in_range_total.Total();
}

// x / s as x * (1 / s); or, with kDivide, by division: for a finite s beyond
// 1 / min (2^126 in float), whose reciprocal is subnormal, which TensorFlow's
// threads flush to 0 (the gradients divide throughout).
template <typename Tacc, bool kDivide>
struct RowQuotient {
  Tacc s, inv_s;
  template <typename X>
  X Of(const X& x) const {
    namespace ei = Eigen::internal;
    if constexpr (std::is_same_v<X, Tacc>) {
      return kDivide ? x / s : x * inv_s;
    } else {
      return kDivide ? ei::pdiv(x, ei::pset1<X>(s))
                     : ei::pmul(x, ei::pset1<X>(inv_s));
    }
  }
};

template <typename Tacc>
void DenseProbsRowSums(const ConstRow<Tacc>& x, const Tacc* y,
                       const XentConstants<Tacc>& c, Tacc s,
                       const ClipRangeOfRow<Tacc>& range, Tacc* log_sum,
                       Tacc* in_range_sum) {
  const Tacc inv_s = Tacc(1) / s;
  if (std::isfinite(s) && std::abs(inv_s) < std::numeric_limits<Tacc>::min()) {
    DenseProbsRowSumsBy(x, y, c, s, RowQuotient<Tacc, true>{s, inv_s}, range,
                        log_sum, in_range_sum);
  } else {
    DenseProbsRowSumsBy(x, y, c, s, RowQuotient<Tacc, false>{s, inv_s}, range,
                        log_sum, in_range_sum);
  }
}

}  // namespace
}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_CPU_PROBS_H_
