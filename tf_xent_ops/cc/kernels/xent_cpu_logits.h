/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The CPU's row reductions of logits: one read of a row gives its max, its
log-sum-exp and the weighted sums the loss needs (LogitsRowReducer), and the
logits backwards' row writer for rows with one labelled class.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_CPU_LOGITS_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_CPU_LOGITS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "tf_xent_ops/cc/kernels/xent_cpu_math.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_probs.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_rows.h"

namespace tf_xent_ops {
namespace {

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
// the sums (a max pass before the exp pass would read the row twice). The shift
// is kept when the block's max exceeds it by at most kMaxShiftGap and its exp
// sum is finite (no logit is NaN or +inf): its terms then neither overflow nor,
// scaled by exp(s_b - m), lose precision. Else, as where no logit was seen yet,
// the block is reduced again relative to its own max (0 where that is -inf, so
// that its sums stay finite: its exp sum is 0 and is scaled by exp(-inf) = 0).
// NaN and +inf propagate to NaN.
template <typename T, typename Tacc>
class LogitsRowReducer {
 public:
  // Rows of the op's logits (soft-capped where it has a cap).
  explicit LogitsRowReducer(const XentParams& p)
      : c_(p),
        num_classes_(p.num_classes),
        reader_(std::min<int64_t>(num_classes_, kSumBlock), c_.capped),
        blocks_((num_classes_ + kSumBlock - 1) / kSumBlock) {}

  template <typename Weights>
  LogitsRowStats<Tacc> Reduce(const T* row, const Weights& weights) {
    Tacc m = -std::numeric_limits<Tacc>::infinity();
    for (int64_t i = 0; i < static_cast<int64_t>(blocks_.size()); ++i) {
      const int64_t begin = i * kSumBlock;
      const int64_t count = std::min(kSumBlock, num_classes_ - begin);
      const auto z = c_.capped ? reader_.ReadSoftCapped(row + begin, count, c_)
                               : reader_.Read(row + begin, count);
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

  const XentConstants<Tacc> c_;
  int64_t num_classes_;
  RowReader<T, Tacc> reader_;
  std::vector<Block> blocks_;
};

// The logits gradient g_sum_t * softmax(z') - g_t of a row (or of one of its
// elements), from its logits z: without a cap (z' = z)...
template <typename Tacc>
struct LogitsGradOf {
  Tacc g_sum_t, lse;
  template <typename X, typename GT>
  auto operator()(const X& z, const GT& g_t) const {
    return ScaledLogitsGrad(g_sum_t, z, lse, g_t);
  }
};

// ... and from t = tanh(z / cap) of soft-capped ones (z' = cap * t).
template <typename Tacc>
struct CappedLogitsGradOf {
  const XentConstants<Tacc>& c;
  Tacc g_sum_t, lse;
  template <typename X, typename GT>
  auto operator()(const X& t, const GT& g_t) const {
    return CappedLogitsGrad(c, g_sum_t, t, lse, g_t);
  }
};

// Calls fn(x, grad, begin) with a row of logits as its gradient needs it,
// x holding classes [begin, begin + x.size()): the whole row of logits
// (widened where T is 16-bit) and LogitsGradOf, or, where the op has a soft
// cap, t = tanh(z / cap) and CappedLogitsGradOf for a block of kSumBlock
// classes at a time (so the block's t is in L1 while its gradient is
// written, and the reads of the row overlap the exp).
template <typename T, typename Tacc, typename Fn>
void WithLogitsGrad(RowReader<T, Tacc>& reader, const T* row,
                    int64_t num_classes, const XentConstants<Tacc>& c,
                    Tacc g_sum_t, Tacc lse, const Fn& fn) {
  if (c.capped) {
    const CappedLogitsGradOf<Tacc> grad{c, g_sum_t, lse};
    for (int64_t begin = 0; begin < num_classes; begin += kSumBlock) {
      const int64_t count = std::min<int64_t>(kSumBlock, num_classes - begin);
      fn(reader.ReadCapTanh(row + begin, c, count), grad, begin);
    }
  } else {
    fn(reader.Read(row), LogitsGradOf<Tacc>{g_sum_t, lse}, int64_t{0});
  }
}

// Writes the logits gradient grad(x, g_t) of classes [begin, begin +
// x.size()) of a row whose scaled targets g_t are g_off but at class k,
// g_off + g_on_k: those classes with g_off throughout, then dx_k if k is
// among them. dx may alias the predictions (the op reuses their buffer), and
// reading x_k before the row is written would wait on memory once per row.
// Where T is 16-bit or the logits are capped, x is the row (or block)
// transformed into the reader's buffer, so x_k is still there to form dx_k
// from; float and double logits without a cap move dx_k by -g_on_k.
// Flattened: else GCC may build the gradient's Eigen expression in a call of
// its own, which copies it through the stack once per block.
template <typename T, typename Tacc, typename X, typename GradOf>
__attribute__((flatten)) void WriteOneTargetLogitsGrad(T* dx, const X& x,
                                                       int64_t begin,
                                                       const GradOf& grad,
                                                       Tacc g_off, int64_t k,
                                                       Tacc g_on_k) {
  const int64_t n = x.size(), at = k - begin;
  T* out = dx + begin;
  if (at < 0 || at >= n) {
    WriteRow(out, n, grad(x, g_off));
  } else if constexpr (std::is_same_v<T, Tacc> &&
                       std::is_same_v<GradOf, LogitsGradOf<Tacc>>) {
    WriteRow(out, n, grad(x, g_off));
    out[at] -= g_on_k;
  } else {
    const Tacc at_k = grad(static_cast<Tacc>(x[at]), g_off + g_on_k);
    WriteRow(out, n, grad(x, g_off));
    out[at] = static_cast<T>(at_k);
  }
}

}  // namespace
}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_CPU_LOGITS_H_
