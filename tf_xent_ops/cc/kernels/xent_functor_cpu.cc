/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

CPU specializations of the cross-entropy functors: one thread per shard of
rows (or of fixed 256-row chunks when rows have fewer than 32 classes), each
row computed start to finish by one thread: bitwise the same result whatever
the thread count. The header's element-wise formulas are applied to whole rows
(or chunks) as Eigen array expressions, so exp, log and the arithmetic run on
SIMD packets. Forward passes keep only O(N) statistics; backward passes read
the predictions once and write the gradient once.
*/
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "Eigen/Core"  // Eigen::half, Eigen::bfloat16 and the array expressions.
#include "tf_xent_ops/cc/kernels/xent_functor.h"
#include "tf_xent_ops/cc/kernels/xent_math_cpu.h"

namespace tf_xent_ops {

// Where() on Eigen boolean arrays is Eigen's select().
template <typename Cond>
struct WhereImpl<
    Cond, std::enable_if_t<std::is_base_of_v<Eigen::ArrayBase<Cond>, Cond>>> {
  template <typename A, typename B>
  static auto Apply(const Cond& cond, const A& a, const B& b) {
    return cond.select(a, b);
  }
};

namespace {

// Rough cycles per element of one row pass, for the thread pool's sharding.
constexpr int64_t kCyclesPerElement = 10;
// Partial sums of this many elements (SIMD lanes, Eigen's tree of packets)
// are combined with a compensated sum: accurate whatever C is.
constexpr Eigen::Index kSumBlock = 1024;

template <typename Tacc>
using ConstRow = Eigen::Map<const Eigen::Array<Tacc, Eigen::Dynamic, 1>>;
template <typename T>
using MutableRow = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;

template <typename Expr>
typename Expr::Scalar BlockedSum(const Expr& e) {
  using Scalar = typename Expr::Scalar;
  const Eigen::Index n = e.size();
  CompensatedSum<Scalar> total;
  for (Eigen::Index b = 0; b < n; b += kSumBlock) {
    total.Add(e.segment(b, std::min(kSumBlock, n - b)).sum());
  }
  return total.Total();
}

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
template <typename Tacc>
void DenseProbsRowSums(const ConstRow<Tacc>& x, const Tacc* y,
                       const XentConstants<Tacc>& c, Tacc s,
                       const ClipRangeOfRow<Tacc>& range, Tacc* log_sum,
                       Tacc* in_range_sum) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<Tacc>::type;
  constexpr int64_t kSize = ei::packet_traits<Tacc>::size;
  const bool by_product =
      c.off_weight > Tacc(0) && LogOfProduct<Tacc>::Accepts(c.clip_lo);
  const bool skip =
      by_product || (std::isfinite(s) && s != Tacc(0) && c.clip_lo > Tacc(0));
  const Tacc inv_s = Tacc(1) / s;
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
      const Packet clipped =
          ClipPacket(c, ei::pmul(v, ei::pset1<Packet>(inv_s)));
      if (by_product) product.Multiply(clipped);
      if (skip && !weighted) continue;
      log_acc = ei::padd(log_acc, ei::pmul(w, VectorLogOp().packetOp(clipped)));
    }
    Tacc log_part = ei::predux(log_acc),
         in_range_part = ei::predux(in_range_acc);
    for (int64_t i = full; i < end; ++i) {
      const Tacc t = c.DenseTarget(y[i]);
      const Tacc log_q = LogOf(c.Clip(x[i] * inv_s));
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

// Rows of T as arrays of Tacc: float and double rows are read in place;
// 16-bit rows are widened into a buffer of one row per thread (never [N, C]).
template <typename T, typename Tacc>
class RowReader {
 public:
  explicit RowReader(int64_t num_classes)
      : num_classes_(num_classes),
        buffer_(std::is_same_v<T, Tacc> ? 0 : num_classes) {}

  ConstRow<Tacc> Read(const T* row) { return Read(row, num_classes_); }

  // `count` (at most the constructor's size) contiguous elements.
  ConstRow<Tacc> Read(const T* data, int64_t count) {
    if constexpr (std::is_same_v<T, Tacc>) {
      return ConstRow<Tacc>(data, count);
    } else {
      MutableRow<Tacc>(buffer_.data(), count) =
          Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(data, count)
              .template cast<Tacc>();
      return ConstRow<Tacc>(buffer_.data(), count);
    }
  }

 private:
  int64_t num_classes_;
  std::vector<Tacc> buffer_;
};

// Weights of the weighted sums LogitsRowReducer forms: none, 1 for every
// class (the smoothing term of sparse labels), or the smoothed dense targets.
struct NoWeights {};
struct UnitWeights {};
template <typename Tacc>
struct TargetWeights {
  const XentConstants<Tacc>& c;
  const Tacc* labels;  // The row's unsmoothed labels.
};

// A row of logits z with weights w, reduced:
template <typename Tacc>
struct LogitsRowStats {
  Tacc max = Tacc(0);            // m = max_k z_k
  Tacc log_s = Tacc(0);          // log sum_k exp(z_k - m)
  Tacc sum_w = Tacc(0);          // sum_k w_k
  Tacc sum_w_shifted = Tacc(0);  // sum_k w_k (z_k - m), w_k = 0 skipped
  // With TargetWeights: the class of the row's only nonzero label, or -1.
  int64_t single_label = -1;
};

// Counts the nonzero lanes of a packet of labels for classes [first, ...),
// and keeps the class of the last. Called on the few packets that have any.
template <typename Packet>
void CountNonzeroLabels(const Packet& y, int64_t first, int64_t* count,
                        int64_t* last) {
  using Scalar = typename Eigen::internal::unpacket_traits<Packet>::type;
  constexpr int kSize = Eigen::internal::unpacket_traits<Packet>::size;
  Scalar lanes[kSize];
  Eigen::internal::pstoreu(lanes, y);
  for (int j = 0; j < kSize; ++j) {
    if (lanes[j] != Scalar(0)) {  // NaN counts, as AnyNonzero has it.
      ++*count;
      *last = first + j;
    }
  }
}

// What ReduceLogitsBlock finds in a block of logits.
template <typename Tacc>
struct LogitsBlockSums {
  Tacc max, exp_sum, weight, shifted;
  int64_t nonzero_labels = 0;       // With TargetWeights: labels y_k != 0,
  int64_t last_nonzero_label = -1;  // and the class of the last.
};

// Sums over a block of logits z (classes [begin, begin + z.size()) of the
// row), in one loop, as an Eigen reduction takes one expression per loop:
// max = max_k z_k, exp_sum = sum_k exp(z_k - shift) and, unless the weights
// are NoWeights, weight = sum_k w_k and shifted = sum_k w_k (z_k - shift),
// terms with w_k = 0 skipped (so a -inf logit without target mass costs
// nothing). z_k - shift may be positive: the exp is exact up to 88 and
// unspecified above, where it overflows (the caller checks max - shift).
template <typename Tacc, typename Weights>
LogitsBlockSums<Tacc> ReduceLogitsBlock(const ConstRow<Tacc>& z, int64_t begin,
                                        Tacc shift, const Weights& weights) {
  LogitsBlockSums<Tacc> sums;
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<Tacc>::type;
  constexpr int64_t kSize = ei::packet_traits<Tacc>::size;
  constexpr bool kTargets = std::is_same_v<Weights, TargetWeights<Tacc>>;
  constexpr bool kUnit = std::is_same_v<Weights, UnitWeights>;
  const int64_t n = z.size(), full = n - n % kSize;
  const Packet zero = ei::pset1<Packet>(Tacc(0));
  const Packet lowest =
      ei::pset1<Packet>(-std::numeric_limits<Tacc>::infinity());
  Packet m = lowest;
  // Packets whose labels are all 0 (with one-hot labels, all but one of the
  // row) have w_k = off_weight: their sum_k d_k is kept apart and weighted
  // once at the end, sparing the per-element target, product and zero test.
  Packet e = zero, w_sum = zero, d_sum = zero, off_d_sum = zero;
  int64_t off_packets = 0;
  // Adds a packet of targets w and their w * d, terms with w = 0 skipped.
  const auto add_targets = [&](const Packet& d, const Packet& w) {
    w_sum = ei::padd(w_sum, w);
    d_sum = ei::padd(d_sum, ei::pandnot(ei::pmul(w, d), ei::pcmp_eq(w, zero)));
  };
  for (int64_t i = 0; i < full; i += kSize) {
    const Packet x = ei::ploadu<Packet>(z.data() + i);
    m = ei::pmax(m, x);
    const Packet d = ei::psub(x, ei::pset1<Packet>(shift));
    e = ei::padd(e, ExpUpTo88Op().packetOp(d));
    if constexpr (kUnit) {
      d_sum = ei::padd(d_sum, d);
    } else if constexpr (kTargets) {
      const Packet y = ei::ploadu<Packet>(weights.labels + begin + i);
      if (!AnyNonzero(y)) {
        off_d_sum = ei::padd(off_d_sum, d);
        ++off_packets;
        continue;
      }
      CountNonzeroLabels(y, begin + i, &sums.nonzero_labels,
                         &sums.last_nonzero_label);
      add_targets(d, DenseTargetPacket(weights.c, y));
    }
  }
  if (full < n) {
    // The last n - full classes as one packet: lanes past the row read
    // nothing, get d = 0 and y = 0, and are masked out of the sums.
    const int64_t count = n - full;
    const Packet valid =
        ei::pcmp_lt(ei::plset<Packet>(Tacc(0)),
                    ei::pset1<Packet>(static_cast<Tacc>(count)));
    const Packet x = ei::ploaduSegment<Packet>(z.data() + full, 0, count);
    m = ei::pmax(m, ei::pselect(valid, x, lowest));
    const Packet d =
        ei::pselect(valid, ei::psub(x, ei::pset1<Packet>(shift)), zero);
    e = ei::padd(e, ei::pand(valid, ExpUpTo88Op().packetOp(d)));
    if constexpr (kUnit) {
      d_sum = ei::padd(d_sum, d);
    } else if constexpr (kTargets) {
      const Packet y = ei::pselect(
          valid,
          ei::ploaduSegment<Packet>(weights.labels + begin + full, 0, count),
          zero);
      CountNonzeroLabels(y, begin + full, &sums.nonzero_labels,
                         &sums.last_nonzero_label);
      add_targets(d, ei::pand(valid, DenseTargetPacket(weights.c, y)));
    }
  }
  Tacc w_total = ei::predux(w_sum), d_total = ei::predux(d_sum);
  if constexpr (kTargets) {
    // Without smoothing those packets' weights are 0: skipped, as -inf
    // logits there must add nothing.
    if (off_packets > 0 && weights.c.off_weight != Tacc(0)) {
      w_total += weights.c.off_weight * static_cast<Tacc>(off_packets * kSize);
      d_total += weights.c.off_weight * ei::predux(off_d_sum);
    }
  }
  sums.max = ei::predux_max(m);
  sums.exp_sum = ei::predux(e);
  sums.weight = kUnit ? Tacc(n) : w_total;
  sums.shifted = d_total;
  return sums;
}

// Reduces rows of logits from one read of each, per block of kSumBlock
// classes (in L1 while it is reduced): the block's max m_b and its sums
// relative to a shift s_b; then, in block order, exp sums scaled by
// exp(s_b - m) and weighted sums moved by (s_b - m) * sum_w, in compensated
// sums. The shift is the largest logit seen before the block (for the first
// block, the largest of its first packet), so that one loop finds m_b and
// the sums (a max pass before the exp pass took an eighth of the forward's
// time). The shift is kept when the block's max exceeds it by at most
// kMaxShiftGap and its exp sum is finite (no logit is NaN or +inf): its
// terms then neither overflow nor, scaled by exp(s_b - m), lose precision.
// Else, as where no logit was seen yet, the block is reduced again relative
// to its own max (0 where that is -inf, so that its sums stay finite: its
// exp sum is 0 and is scaled by exp(-inf) = 0). NaN and +inf propagate to
// NaN.
template <typename T, typename Tacc>
class LogitsRowReducer {
 public:
  explicit LogitsRowReducer(int64_t num_classes)
      : num_classes_(num_classes),
        reader_(std::min<int64_t>(num_classes, kSumBlock)),
        blocks_((num_classes + kSumBlock - 1) / kSumBlock) {}

  template <typename Weights>
  LogitsRowStats<Tacc> Reduce(const T* row, const Weights& weights) {
    Tacc m = -std::numeric_limits<Tacc>::infinity();
    for (int64_t i = 0; i < static_cast<int64_t>(blocks_.size()); ++i) {
      const int64_t begin = i * kSumBlock;
      const auto z =
          reader_.Read(row + begin, std::min(kSumBlock, num_classes_ - begin));
      Block& b = blocks_[i];
      const Tacc guess = i == 0 ? LeadingMax(z) : m;
      if (!std::isfinite(guess) ||
          !ReduceShifted(z, begin, guess, weights, &b)) {
        ReduceExact(z, begin, weights, &b);
      }
      m = std::max(m, b.sums.max);
    }
    CompensatedSum<Tacc> exp_sum, sum_w, sum_w_shifted;
    int64_t nonzero_labels = 0, last_nonzero_label = -1;
    for (const Block& b : blocks_) {
      exp_sum.Add(b.sums.exp_sum * ExpOf(b.exp_base - m));
      sum_w.Add(b.sums.weight);
      sum_w_shifted.Add(b.sums.shifted + b.sums.weight * (b.shift - m));
      nonzero_labels += b.sums.nonzero_labels;
      if (b.sums.nonzero_labels > 0) {
        last_nonzero_label = b.sums.last_nonzero_label;
      }
    }
    LogitsRowStats<Tacc> stats;
    stats.max = m;
    stats.log_s = LogOf(exp_sum.Total());
    stats.sum_w = sum_w.Total();
    stats.sum_w_shifted = sum_w_shifted.Total();
    if (nonzero_labels == 1) stats.single_label = last_nonzero_label;
    return stats;
  }

 private:
  // sums.exp_sum is relative to exp_base, the weighted sums to shift.
  struct Block {
    LogitsBlockSums<Tacc> sums;
    Tacc shift, exp_base;
  };
  // A bound on m_b - s_b: kSumBlock * exp(64) is far from overflow, and
  // exp(-64) far from the denormals (which TensorFlow's threads flush to 0).
  static constexpr Tacc kMaxShiftGap = 64;

  // The largest of the first packet's worth of logits.
  static Tacc LeadingMax(const ConstRow<Tacc>& z) {
    constexpr int64_t kSize = Eigen::internal::packet_traits<Tacc>::size;
    return z.head(std::min<int64_t>(kSize, z.size())).maxCoeff();
  }

  template <typename Weights>
  static bool ReduceShifted(const ConstRow<Tacc>& z, int64_t begin, Tacc shift,
                            const Weights& weights, Block* b) {
    b->sums = ReduceLogitsBlock(z, begin, shift, weights);
    b->shift = b->exp_base = shift;
    return std::isfinite(b->sums.exp_sum) &&
           b->sums.max - shift <= kMaxShiftGap;
  }

  template <typename Weights>
  static void ReduceExact(const ConstRow<Tacc>& z, int64_t begin,
                          const Weights& weights, Block* b) {
    const Tacc max = z.maxCoeff();
    const Tacc shift =
        max == -std::numeric_limits<Tacc>::infinity() ? Tacc(0) : max;
    b->sums = ReduceLogitsBlock(z, begin, shift, weights);
    b->sums.max = b->exp_base = max;
    b->shift = shift;
  }

  int64_t num_classes_;
  RowReader<T, Tacc> reader_;
  std::vector<Block> blocks_;
};

// Writes an expression in Tacc to a row of T.
template <typename T, typename Expr>
void WriteRow(T* row, int64_t num_classes, const Expr& value) {
  using Tacc = typename Expr::Scalar;
  if constexpr (std::is_same_v<T, Tacc>) {
    MutableRow<T>(row, num_classes) = value;
  } else {
    MutableRow<T>(row, num_classes) = value.template cast<T>();
  }
}

// Writes the logits gradient g_sum_t * softmax(z) - g_t of a row whose scaled
// targets g_t are g_off but at class k, g_off + g_on_k: the row with g_off
// throughout, then dx_k moved by -g_on_k. dx may alias the predictions (the
// op reuses their buffer), and reading x_k before the row is written waits
// on memory once per row (0.2 ms of the sparse logits step's 1.7 at
// 4096 x 1000 in TensorFlow). Where T is 16-bit, x is the row widened into
// the reader's buffer, so x_k is still there to form dx_k from, rather than
// from dx_k rounded to T.
template <typename T, typename Tacc, typename X>
void WriteOneTargetLogitsGrad(T* dx, const X& x, int64_t num_classes,
                              Tacc g_sum_t, Tacc lse, Tacc g_off, int64_t k,
                              Tacc g_on_k) {
  WriteRow(dx, num_classes, ScaledLogitsGrad(g_sum_t, x, lse, g_off));
  if constexpr (std::is_same_v<T, Tacc>) {
    dx[k] -= g_on_k;
  } else {
    dx[k] =
        static_cast<T>(ScaledLogitsGrad(g_sum_t, x[k], lse, g_off + g_on_k));
  }
}

// Runs row_fn(reader, r) for every row on the device's thread pool, with one
// Reader (a RowReader or a LogitsRowReducer) per shard.
template <typename T, typename Tacc, typename Reader = RowReader<T, Tacc>,
          typename RowFn>
void ForEachRow(const CpuDevice& d, const XentParams& p, const RowFn& row_fn) {
  if (p.num_rows == 0) return;
  const int64_t cost = std::max<int64_t>(1, p.num_classes) * kCyclesPerElement;
  d.parallel_for(p.num_rows, cost, [&](int64_t begin, int64_t end) {
    Reader reader(p.num_classes);
    for (int64_t r = begin; r < end; ++r) row_fn(reader, r);
  });
}

// Rows of fewer classes than this are shorter than two SIMD packets: they are
// processed kChunkRows at a time. Forwards hold a chunk transposed (column k
// holds class k of every row, contiguous), so that every per-row reduction
// (max, sums) is an element-wise operation across rows; backwards, element-
// wise already, take the chunk as one flat array with the per-row values
// repeated. Either way exp, log and the arithmetic run on full SIMD packets.
// Chunk boundaries do not depend on the thread count, and a row's result
// does not depend on its chunk.
constexpr int64_t kSmallClasses = 32;
constexpr int64_t kChunkRows = 256;

template <typename Tacc>
using Columns = Eigen::Map<Eigen::Array<Tacc, Eigen::Dynamic, Eigen::Dynamic>>;
template <typename T>
using ConstRowMajorRows = Eigen::Map<
    const Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

// Per-thread scratch for chunks, transposed or flat.
template <typename T, typename Tacc>
class Chunk {
 public:
  explicit Chunk(int64_t num_classes)
      : num_classes_(num_classes),
        reader_(kChunkRows * num_classes),
        x_(kChunkRows * num_classes),
        t_(kChunkRows * num_classes),
        work_(kChunkRows * num_classes) {
    for (auto& e : expanded_) e.resize(kChunkRows * num_classes);
  }

  // `rows` rows of predictions as one flat array, in place where T is Tacc.
  // Element-wise passes (the backward ones) need no transposition.
  ConstRow<Tacc> FlatPredictions(const T* data, int64_t rows) {
    return reader_.Read(data, rows * num_classes_);
  }
  // A flat [rows * C] array of per-row values (`per_row[i * stride]`), each
  // repeated C times, in expansion buffer `slot`.
  ConstRow<Tacc> Expand(int slot, const Tacc* per_row, int64_t stride,
                        int64_t rows) {
    Tacc* out = expanded_[slot].data();
    for (int64_t i = 0; i < rows; ++i) {
      std::fill(out + i * num_classes_, out + (i + 1) * num_classes_,
                per_row[i * stride]);
    }
    return ConstRow<Tacc>(out, rows * num_classes_);
  }

  // `rows` rows of predictions, transposed and widened to Tacc.
  Columns<Tacc> Predictions(const T* data, int64_t rows) {
    return Transposed(data, rows, x_.data());
  }
  // `rows` rows of dense labels, transposed.
  Columns<Tacc> Labels(const Tacc* data, int64_t rows) {
    return Transposed(data, rows, t_.data());
  }
  // A [rows, C] buffer for intermediate values.
  Columns<Tacc> Work(int64_t rows) {
    return Columns<Tacc>(work_.data(), rows, num_classes_);
  }

 private:
  template <typename S>
  Columns<Tacc> Transposed(const S* data, int64_t rows, Tacc* buffer) {
    Columns<Tacc> out(buffer, rows, num_classes_);
    out = ConstRowMajorRows<S>(data, rows, num_classes_).template cast<Tacc>();
    return out;
  }

  int64_t num_classes_;
  RowReader<T, Tacc> reader_;
  std::vector<Tacc> x_, t_, work_;
  std::vector<Tacc> expanded_[3];
};

// A per-row vector of a chunk ([rows]) as a [rows, C] expression.
template <typename Vector>
auto PerRow(const Vector& v, int64_t num_classes) {
  return v.rowwise().replicate(num_classes);
}

// Runs chunk_fn(chunk, first_row, num_rows) over chunks of rows.
template <typename T, typename Tacc, typename ChunkFn>
void ForEachChunk(const CpuDevice& d, const XentParams& p,
                  const ChunkFn& chunk_fn) {
  if (p.num_rows == 0) return;
  const int64_t num_chunks = (p.num_rows + kChunkRows - 1) / kChunkRows;
  const int64_t cost = kChunkRows * p.num_classes * kCyclesPerElement;
  d.parallel_for(num_chunks, cost, [&](int64_t begin, int64_t end) {
    Chunk<T, Tacc> chunk(p.num_classes);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = i * kChunkRows;
      chunk_fn(chunk, first, std::min(kChunkRows, p.num_rows - first));
    }
  });
}

template <typename Tacc>
using ChunkVector = Eigen::Array<Tacc, Eigen::Dynamic, 1>;

// For a chunk of logits x: the work buffer gets z - max (per row); returns
// the per-row max and log(sum_k exp(z_k - max)).
template <typename T, typename Tacc>
void ShiftedLogits(Chunk<T, Tacc>& chunk, const Columns<Tacc>& x,
                   ChunkVector<Tacc>* row_max, ChunkVector<Tacc>* log_s) {
  Columns<Tacc> shifted = chunk.Work(x.rows());
  *row_max = x.rowwise().maxCoeff();
  shifted = x - PerRow(*row_max, x.cols());
  *log_s = LogOf(ExpUpTo88(shifted).rowwise().sum());
}

}  // namespace

template <typename Tidx>
int64_t FindInvalidLabel(const XentParams& p, const Tidx* labels) {
  for (int64_t i = 0; i < p.num_rows; ++i) {
    const int64_t y = static_cast<int64_t>(labels[i]);
    if (IsIgnored(p, labels[i])) continue;
    if (y < 0 || y >= p.num_classes) return i;
  }
  return -1;
}

template <typename T, typename Tidx>
struct SparseXentForward<CpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const CpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, Tacc* loss, Tacc* log_sum_exp) const {
    const XentConstants<Tacc> c(p);
    const int64_t num_classes = p.num_classes;
    const bool smoothing = p.label_smoothing != 0.0f;
    if (num_classes < kSmallClasses) {
      ForEachChunk<T, Tacc>(
          d, p, [&](Chunk<T, Tacc>& chunk, int64_t first, int64_t rows) {
            const auto x =
                chunk.Predictions(predictions + first * num_classes, rows);
            // The saved statistic: log-sum-exp, or the clipped row sum.
            ChunkVector<Tacc> stat(rows), sum_z(rows);
            ChunkVector<Tacc> log_s;
            const Tacc* z = x.data();  // z - max, or the probabilities.
            if (p.from_logits) {
              ChunkVector<Tacc> row_max;
              ShiftedLogits(chunk, x, &row_max, &log_s);
              z = chunk.Work(rows).data();  // z - max
              stat = row_max + log_s;
              if (smoothing) sum_z = chunk.Work(rows).rowwise().sum();
            } else {
              stat = c.Clip(x).rowwise().sum();
              if (smoothing) sum_z = LogOf(c.Clip(x)).rowwise().sum();
            }
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t r = first + i;
              if (IsIgnored(p, labels[r])) {
                loss[r] = Tacc(0);
                log_sum_exp[r] = Tacc(0);
                continue;
              }
              const int64_t label = static_cast<int64_t>(labels[r]);
              const Tacc at_label = z[label * rows + i];
              const Tacc sum = smoothing ? sum_z[i] : Tacc(0);
              log_sum_exp[r] = stat[i];
              loss[r] =
                  p.from_logits
                      ? SparseLogitsLoss(c, log_s[i], at_label, sum)
                      : SparseProbsLoss(c, stat[i], c.Clip(at_label), sum);
            }
          });
      return;
    }
    if (p.from_logits) {
      // loss = log(s) - sum_k t_k (z_k - m), with s = sum_k exp(z_k - m).
      ForEachRow<T, Tacc, LogitsRowReducer<T, Tacc>>(
          d, p, [&](LogitsRowReducer<T, Tacc>& reducer, int64_t r) {
            if (IsIgnored(p, labels[r])) {
              loss[r] = Tacc(0);
              log_sum_exp[r] = Tacc(0);
              return;
            }
            const T* x = predictions + r * num_classes;
            const auto stats = smoothing ? reducer.Reduce(x, UnitWeights())
                                         : reducer.Reduce(x, NoWeights());
            const int64_t label = static_cast<int64_t>(labels[r]);
            log_sum_exp[r] = stats.max + stats.log_s;
            loss[r] = SparseLogitsLoss(c, stats.log_s,
                                       static_cast<Tacc>(x[label]) - stats.max,
                                       stats.sum_w_shifted);
          });
      return;
    }
    ForEachRow<T, Tacc>(d, p, [&](RowReader<T, Tacc>& reader, int64_t r) {
      if (IsIgnored(p, labels[r])) {
        loss[r] = Tacc(0);
        log_sum_exp[r] = Tacc(0);
        return;
      }
      const auto x = reader.Read(predictions + r * num_classes);
      const int64_t label = static_cast<int64_t>(labels[r]);
      const Tacc row_sum = BlockedSum(c.Clip(x));
      const Tacc sum_log = smoothing ? ClippedLogSum(x, c) : Tacc(0);
      log_sum_exp[r] = row_sum;
      loss[r] = SparseProbsLoss(c, row_sum, c.Clip(x[label]), sum_log);
    });
  }
};

template <typename T, typename Tidx>
struct SparseXentBackward<CpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const CpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, const Tacc* log_sum_exp,
                  const Tacc* grad_loss, T* grad_predictions) const {
    const XentConstants<Tacc> c(p);
    const int64_t num_classes = p.num_classes;
    if (num_classes < kSmallClasses) {
      ForEachChunk<T, Tacc>(
          d, p, [&](Chunk<T, Tacc>& chunk, int64_t first, int64_t rows) {
            const int64_t n = rows * num_classes;
            const auto x =
                chunk.FlatPredictions(predictions + first * num_classes, rows);
            // log-sum-exp, or the clipped row sum.
            const ConstRow<Tacc> stat(log_sum_exp + first, rows);
            ChunkVector<Tacc> g_over_sum;
            if (!p.from_logits) {
              g_over_sum = ConstRow<Tacc>(grad_loss + first, rows) / stat;
            }
            // The labelled elements, formed before dx (which may alias x) is
            // written.
            Tacc at_label[kChunkRows];
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t r = first + i;
              if (IsIgnored(p, labels[r])) continue;
              const int64_t label = static_cast<int64_t>(labels[r]);
              const Tacc x_label = x[i * num_classes + label];
              const Tacc label_t = c.SparseTarget(label, label);
              at_label[i] = p.from_logits
                                ? LogitsGrad(grad_loss[r], x_label, stat[i],
                                             Tacc(1), label_t)
                                : SparseProbsGrad(c, g_over_sum[i], x_label,
                                                  stat[i], label_t);
            }
            T* dx = grad_predictions + first * num_classes;
            if (p.from_logits) {
              WriteRow(dx, n,
                       LogitsGrad(chunk.Expand(0, grad_loss + first, 1, rows),
                                  x, chunk.Expand(1, stat.data(), 1, rows),
                                  Tacc(1), c.off_weight));
            } else {
              WriteRow(
                  dx, n,
                  SparseProbsGrad(
                      c, chunk.Expand(0, g_over_sum.data(), 1, rows), x,
                      chunk.Expand(1, stat.data(), 1, rows), c.off_weight));
            }
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t r = first + i;
              T* row = dx + i * num_classes;
              if (IsIgnored(p, labels[r])) {
                std::fill(row, row + num_classes, T(0));
              } else {
                row[static_cast<int64_t>(labels[r])] =
                    static_cast<T>(at_label[i]);
              }
            }
          });
      return;
    }
    ForEachRow<T, Tacc>(d, p, [&](RowReader<T, Tacc>& reader, int64_t r) {
      T* dx = grad_predictions + r * num_classes;  // May alias the row.
      if (IsIgnored(p, labels[r])) {
        std::fill(dx, dx + num_classes, T(0));
        return;
      }
      const auto x = reader.Read(predictions + r * num_classes);
      const int64_t label = static_cast<int64_t>(labels[r]);
      const Tacc g = grad_loss[r];
      const Tacc stat = log_sum_exp[r];  // log-sum-exp, or the row sum
      if (p.from_logits) {
        WriteOneTargetLogitsGrad(dx, x, num_classes, g, stat, g * c.off_weight,
                                 label, g * c.on_weight);
      } else {
        // dx may alias the predictions (the op reuses their buffer), so the
        // labelled element's gradient is formed before the row is written.
        const Tacc label_t = c.SparseTarget(label, label);
        const Tacc g_over_sum = g / stat;
        const Tacc at_label =
            SparseProbsGrad(c, g_over_sum, x[label], stat, label_t);
        WriteRow(dx, num_classes,
                 SparseProbsGrad(c, g_over_sum, x, stat, c.off_weight));
        dx[label] = static_cast<T>(at_label);
      }
    });
  }
};

template <typename T>
struct DenseXentForward<CpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const CpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, Tacc* loss, Tacc* stats) const {
    const XentConstants<Tacc> c(p);
    const int64_t num_classes = p.num_classes;
    if (num_classes < kSmallClasses) {
      ForEachChunk<T, Tacc>(
          d, p, [&](Chunk<T, Tacc>& chunk, int64_t first, int64_t rows) {
            const auto x =
                chunk.Predictions(predictions + first * num_classes, rows);
            const auto t =
                c.DenseTarget(chunk.Labels(labels + first * num_classes, rows));
            ChunkVector<Tacc> loss_c, stat0, stat1;
            if (p.from_logits) {
              ChunkVector<Tacc> row_max, log_s;
              ShiftedLogits(chunk, x, &row_max, &log_s);
              const auto z = chunk.Work(rows);  // z - max
              stat1 = t.rowwise().sum();        // sum_t
              loss_c = DenseLogitsLoss(
                  log_s, stat1,
                  Where(t != Tacc(0), t * z, Tacc(0)).rowwise().sum());
              stat0 = row_max + log_s;
            } else {
              stat0 = x.rowwise().sum();
              Columns<Tacc> q = chunk.Work(rows);
              q = x / PerRow(stat0, num_classes);
              loss_c = -(t * LogOf(c.Clip(q))).rowwise().sum();
              stat1 = c.WhereInClipRange(q, t, Tacc(0)).rowwise().sum();
            }
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t r = first + i;
              loss[r] = loss_c[i];
              WriteDenseStats(stats, r, stat0[i], stat1[i]);
            }
          });
      return;
    }
    if (p.from_logits) {
      // loss = sum_t * log(s) - sum_k t_k (z_k - m).
      ForEachRow<T, Tacc, LogitsRowReducer<T, Tacc>>(
          d, p, [&](LogitsRowReducer<T, Tacc>& reducer, int64_t r) {
            const auto row = reducer.Reduce(
                predictions + r * num_classes,
                TargetWeights<Tacc>{c, labels + r * num_classes});
            loss[r] = DenseLogitsLoss(row.log_s, row.sum_w, row.sum_w_shifted);
            // The single label's class, where Tacc holds it exactly.
            const int64_t j = row.single_label;
            const bool exact =
                j >= 0 && static_cast<int64_t>(static_cast<Tacc>(j)) == j;
            WriteDenseStats(stats, r, row.max + row.log_s, row.sum_w,
                            exact ? j : -1,
                            exact ? labels[r * num_classes + j] : Tacc(0));
          });
      return;
    }
    ForEachRow<T, Tacc>(d, p, [&](RowReader<T, Tacc>& reader, int64_t r) {
      const auto x = reader.Read(predictions + r * num_classes);
      const Tacc s = BlockedSum(x);
      Tacc log_sum, in_range_sum;
      DenseProbsRowSums(x, labels + r * num_classes, c, s,
                        ClipRangeOfRow<Tacc>(c, s), &log_sum, &in_range_sum);
      loss[r] = -log_sum;
      WriteDenseStats(stats, r, s, in_range_sum);
    });
  }
};

template <typename T>
struct DenseXentBackward<CpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const CpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, const Tacc* stats, const Tacc* grad_loss,
                  T* grad_predictions) const {
    const XentConstants<Tacc> c(p);
    const int64_t num_classes = p.num_classes;
    if (num_classes < kSmallClasses) {
      ForEachChunk<T, Tacc>(
          d, p, [&](Chunk<T, Tacc>& chunk, int64_t first, int64_t rows) {
            const int64_t n = rows * num_classes;
            const auto x =
                chunk.FlatPredictions(predictions + first * num_classes, rows);
            const auto t =
                c.DenseTarget(ConstRow<Tacc>(labels + first * num_classes, n));
            const auto g = chunk.Expand(0, grad_loss + first, 1, rows);
            const auto stat0 =
                chunk.Expand(1, stats + kDenseStats * first, kDenseStats, rows);
            T* dx = grad_predictions + first * num_classes;
            if (p.from_logits) {
              const auto sum_t = chunk.Expand(
                  2, stats + kDenseStats * first + 1, kDenseStats, rows);
              WriteRow(dx, n, LogitsGrad(g, x, stat0, sum_t, t));
            } else {
              ChunkVector<Tacc> a_over_s(rows);
              for (int64_t i = 0; i < rows; ++i) {
                const Tacc* row_stats = stats + kDenseStats * (first + i);
                a_over_s[i] = row_stats[1] / row_stats[0];
              }
              const ClipRangeByDivision<Tacc, ConstRow<Tacc>> range{c, stat0};
              WriteRow(
                  dx, n,
                  DenseProbsGrad(g, x, range,
                                 chunk.Expand(2, a_over_s.data(), 1, rows), t));
            }
          });
      return;
    }
    ForEachRow<T, Tacc>(d, p, [&](RowReader<T, Tacc>& reader, int64_t r) {
      const auto x = reader.Read(predictions + r * num_classes);
      const ConstRow<Tacc> y(labels + r * num_classes, num_classes);
      const Tacc* row_stats = stats + kDenseStats * r;
      T* dx = grad_predictions + r * num_classes;
      const Tacc g = grad_loss[r];
      if (p.from_logits) {
        const Tacc g_sum_t = g * row_stats[1], lse = row_stats[0];
        const int64_t j = SingleLabel(row_stats, num_classes);
        if (j >= 0) {  // The targets are known: no labels read.
          WriteOneTargetLogitsGrad(dx, x, num_classes, g_sum_t, lse,
                                   g * c.off_weight, j,
                                   (g * c.on_weight) * row_stats[3]);
        } else {
          WriteRow(
              dx, num_classes,
              ScaledLogitsGrad(g_sum_t, x, lse, c.ScaledDenseTarget(g, y)));
        }
        return;
      }
      const auto t = c.DenseTarget(y);
      const Tacc s = row_stats[0], a_over_s = row_stats[1] / s;
      const ClipRangeOfRow<Tacc> range(c, s);
      if (range.bounded()) {
        WriteRow(dx, num_classes, DenseProbsGrad(g, x, range, a_over_s, t));
      } else {
        WriteRow(dx, num_classes,
                 DenseProbsGrad(g, x, range.by_division(), a_over_s, t));
      }
    });
  }
};

template <typename T>
struct DenseXentLabelsBackward<CpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const CpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* stats, const Tacc* grad_loss,
                  Tacc* grad_labels) const {
    const XentConstants<Tacc> c(p);
    const int64_t num_classes = p.num_classes;
    ForEachRow<T, Tacc>(d, p, [&](RowReader<T, Tacc>& reader, int64_t r) {
      const auto x = reader.Read(predictions + r * num_classes);
      const Tacc scale = c.on_weight * grad_loss[r];
      // log_sum_exp, or the row sum.
      const Tacc stat = stats[kDenseStats * r];
      // (1 - ls) * g * -log q, q the softmax or the clipped normalized row.
      if (p.from_logits) {
        WriteRow(grad_labels + r * num_classes, num_classes,
                 scale * (stat - x));
      } else {
        WriteRow(grad_labels + r * num_classes, num_classes,
                 -scale * LogOf(c.Clip(x / stat)));
      }
    });
  }
};

#define TFXENT_INSTANTIATE_CPU(T)                            \
  template struct SparseXentForward<CpuDevice, T, int32_t>;  \
  template struct SparseXentForward<CpuDevice, T, int64_t>;  \
  template struct SparseXentBackward<CpuDevice, T, int32_t>; \
  template struct SparseXentBackward<CpuDevice, T, int64_t>; \
  template struct DenseXentForward<CpuDevice, T>;            \
  template struct DenseXentBackward<CpuDevice, T>;           \
  template struct DenseXentLabelsBackward<CpuDevice, T>;

TFXENT_INSTANTIATE_CPU(Eigen::half)
TFXENT_INSTANTIATE_CPU(Eigen::bfloat16)
TFXENT_INSTANTIATE_CPU(float)
TFXENT_INSTANTIATE_CPU(double)
#undef TFXENT_INSTANTIATE_CPU

template int64_t FindInvalidLabel<int32_t>(const XentParams&, const int32_t*);
template int64_t FindInvalidLabel<int64_t>(const XentParams&, const int64_t*);

}  // namespace tf_xent_ops
