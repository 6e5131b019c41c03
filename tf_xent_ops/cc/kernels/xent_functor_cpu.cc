/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

CPU specializations of the cross-entropy functors: one thread per shard of
rows, each row computed start to finish by that thread (bitwise the same result
whatever the thread count). Forward passes keep only O(N) statistics; backward
passes read the predictions once and write the gradient once.
*/
#include <algorithm>
#include <cstdint>
#include <limits>

#include "Eigen/Core"  // Eigen::half and Eigen::bfloat16, as TensorFlow uses.
#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace tf_xent_ops {
namespace {

// Rough cycles per element of one row pass, for the thread pool's sharding.
constexpr int64_t kCyclesPerElement = 40;

template <typename Tacc, typename T>
inline Tacc Load(const T* x, int64_t i) {
  return static_cast<Tacc>(x[i]);
}

template <typename Tacc, typename T>
inline Tacc RowMax(const T* z, int64_t num_classes) {
  Tacc m = -std::numeric_limits<Tacc>::infinity();
  for (int64_t k = 0; k < num_classes; ++k) {
    const Tacc x = Load<Tacc>(z, k);
    m = x > m ? x : m;
  }
  return m;
}

// Runs row_fn(r) for every row on the device's thread pool.
template <typename RowFn>
void ForEachRow(const CpuDevice& d, const XentParams& p, const RowFn& row_fn) {
  if (p.num_rows == 0) return;
  d.parallel_for(p.num_rows,
                 std::max<int64_t>(1, p.num_classes) * kCyclesPerElement,
                 [&row_fn](int64_t begin, int64_t end) {
                   for (int64_t r = begin; r < end; ++r) row_fn(r);
                 });
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
    ForEachRow(d, p, [&](int64_t r) {
      if (IsIgnored(p, labels[r])) {
        loss[r] = Tacc(0);
        log_sum_exp[r] = Tacc(0);
        return;
      }
      const T* x = predictions + r * num_classes;
      const int64_t label = static_cast<int64_t>(labels[r]);
      if (p.from_logits) {
        // loss = log(s) - sum_k t_k (z_k - m), with s = sum_k exp(z_k - m).
        const Tacc m = RowMax<Tacc>(x, num_classes);
        CompensatedSum<Tacc> s, sum_shifted;
        for (int64_t k = 0; k < num_classes; ++k) {
          const Tacc shifted = Load<Tacc>(x, k) - m;
          s.Add(ExpOf(shifted));
          if (smoothing) sum_shifted.Add(shifted);
        }
        const Tacc log_s = LogOf(s.Total());
        log_sum_exp[r] = m + log_s;
        loss[r] = log_s - c.on_weight * (Load<Tacc>(x, label) - m) -
                  c.off_weight * sum_shifted.Total();
      } else {
        // z_k = log(clip(p_k)): lse = log(sum_k clip(p_k)).
        CompensatedSum<Tacc> s, sum_log;
        for (int64_t k = 0; k < num_classes; ++k) {
          const Tacc clipped = c.Clip(Load<Tacc>(x, k));
          s.Add(clipped);
          if (smoothing) sum_log.Add(LogOf(clipped));
        }
        const Tacc lse = LogOf(s.Total());
        log_sum_exp[r] = lse;
        loss[r] = lse - c.on_weight * LogOf(c.Clip(Load<Tacc>(x, label))) -
                  c.off_weight * sum_log.Total();
      }
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
    ForEachRow(d, p, [&](int64_t r) {
      const T* x = predictions + r * num_classes;
      T* dx = grad_predictions + r * num_classes;
      if (IsIgnored(p, labels[r])) {
        std::fill(dx, dx + num_classes, T(0));
        return;
      }
      const int64_t label = static_cast<int64_t>(labels[r]);
      const Tacc g = grad_loss[r];
      const Tacc lse = log_sum_exp[r];
      if (p.from_logits) {
        for (int64_t k = 0; k < num_classes; ++k) {
          dx[k] = static_cast<T>(LogitsGrad(g, Load<Tacc>(x, k), lse, Tacc(1),
                                            c.SparseTarget(k, label)));
        }
      } else {
        const Tacc inv_sum = ExpOf(-lse);
        for (int64_t k = 0; k < num_classes; ++k) {
          dx[k] = static_cast<T>(SparseProbsGrad(
              c, g, Load<Tacc>(x, k), inv_sum, c.SparseTarget(k, label)));
        }
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
    ForEachRow(d, p, [&](int64_t r) {
      const T* x = predictions + r * num_classes;
      const Tacc* y = labels + r * num_classes;
      if (p.from_logits) {
        // loss = sum_t * log(s) - sum_k t_k (z_k - m). Zero targets are
        // skipped so that a -inf logit with no target mass costs nothing.
        const Tacc m = RowMax<Tacc>(x, num_classes);
        CompensatedSum<Tacc> s, sum_t, sum_t_shifted;
        for (int64_t k = 0; k < num_classes; ++k) {
          const Tacc shifted = Load<Tacc>(x, k) - m;
          const Tacc t = c.DenseTarget(y[k]);
          s.Add(ExpOf(shifted));
          sum_t.Add(t);
          if (t != Tacc(0)) sum_t_shifted.Add(t * shifted);
        }
        const Tacc log_s = LogOf(s.Total());
        loss[r] = sum_t.Total() * log_s - sum_t_shifted.Total();
        stats[2 * r] = m + log_s;
        stats[2 * r + 1] = sum_t.Total();
      } else {
        CompensatedSum<Tacc> row_sum;
        for (int64_t k = 0; k < num_classes; ++k) row_sum.Add(Load<Tacc>(x, k));
        const Tacc s = row_sum.Total();
        CompensatedSum<Tacc> total, in_range_t;
        for (int64_t k = 0; k < num_classes; ++k) {
          const Tacc q = Load<Tacc>(x, k) / s;
          const Tacc t = c.DenseTarget(y[k]);
          total.Add(t * LogOf(c.Clip(q)));
          if (c.InClipRange(q)) in_range_t.Add(t);
        }
        loss[r] = -total.Total();
        stats[2 * r] = s;
        stats[2 * r + 1] = in_range_t.Total();
      }
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
    ForEachRow(d, p, [&](int64_t r) {
      const T* x = predictions + r * num_classes;
      const Tacc* y = labels + r * num_classes;
      T* dx = grad_predictions + r * num_classes;
      const Tacc g = grad_loss[r];
      if (p.from_logits) {
        const Tacc lse = stats[2 * r], sum_t = stats[2 * r + 1];
        for (int64_t k = 0; k < num_classes; ++k) {
          dx[k] = static_cast<T>(
              LogitsGrad(g, Load<Tacc>(x, k), lse, sum_t, c.DenseTarget(y[k])));
        }
      } else {
        const Tacc s = stats[2 * r], a_over_s = stats[2 * r + 1] / s;
        for (int64_t k = 0; k < num_classes; ++k) {
          dx[k] = static_cast<T>(DenseProbsGrad(c, g, Load<Tacc>(x, k), s,
                                                a_over_s, c.DenseTarget(y[k])));
        }
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
    ForEachRow(d, p, [&](int64_t r) {
      const T* x = predictions + r * num_classes;
      Tacc* dy = grad_labels + r * num_classes;
      const Tacc scale = c.on_weight * grad_loss[r];
      const Tacc stat = stats[2 * r];  // log_sum_exp, or the row sum.
      for (int64_t k = 0; k < num_classes; ++k) {
        const Tacc neg_log_q = p.from_logits
                                   ? stat - Load<Tacc>(x, k)
                                   : -LogOf(c.Clip(Load<Tacc>(x, k) / stat));
        dy[k] = scale * neg_log_q;
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
