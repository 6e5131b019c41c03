/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

CPU specializations of the dense (one-hot or soft label) cross-entropy
functors.
*/
#include <cstdint>

#include "tf_xent_ops/cc/kernels/xent_cpu_logits.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_math.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_probs.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_rows.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_small_classes.h"
#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace tf_xent_ops {

template <typename T>
struct DenseXentForward<CpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const CpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, Tacc* loss,
                  DenseRowStats<Tacc>* row_stats) const {
    const XentConstants<Tacc> c(p);
    const int64_t num_classes = p.num_classes;
    if (num_classes < kSmallClasses) {
      ForEachChunk<T, Tacc>(
          d, p, [&](Chunk<T, Tacc>& chunk, int64_t first, int64_t rows) {
            // Logits are soft-capped here where the op has a cap.
            const auto x =
                chunk.Predictions(predictions + first * num_classes, rows);
            const auto t =
                c.DenseTarget(chunk.Labels(labels + first * num_classes, rows));
            ChunkVector<Tacc> loss_c, normalizer, target_mass;
            if (p.from_logits) {
              ChunkVector<Tacc> row_max, log_s;
              ShiftedLogits(chunk, x, &row_max, &log_s);
              const auto z = chunk.Work(x);  // z - max
              target_mass = t.rowwise().sum();
              loss_c = DenseLogitsLoss(
                  log_s, target_mass,
                  Where(t != Tacc(0), t * z, Tacc(0)).rowwise().sum());
              normalizer = row_max + log_s;
              for (int64_t i = 0; i < rows; ++i) {
                loss_c[i] += c.ZLoss(normalizer[i]);
              }
            } else {
              normalizer = x.rowwise().sum();
              Columns<Tacc> q = chunk.Work(x);
              q = x / PerRow(normalizer, num_classes);
              loss_c = -(t * LogOf(c.Clip(q))).rowwise().sum();
              target_mass = c.WhereInClipRange(q, t, Tacc(0)).rowwise().sum();
            }
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t r = first + i;
              loss[r] = loss_c[i];
              row_stats[r] =
                  DenseRowStats<Tacc>::Of(normalizer[i], target_mass[i]);
            }
          });
      return;
    }
    if (p.from_logits) {
      // loss = sum_t * log(s) - sum_k t_k (z'_k - m) + z_loss lse^2, z' the
      // logits the reducer gives (capped where the op has a cap).
      ForEachRow<T, Tacc, LogitsRowReducer<T, Tacc>>(
          d, p, [&](LogitsRowReducer<T, Tacc>& reducer, int64_t r) {
            const auto row = reducer.Reduce(
                predictions + r * num_classes,
                TargetWeights<Tacc>{c, labels + r * num_classes});
            const Tacc lse = row.max + row.log_s;
            loss[r] = DenseLogitsLoss(row.log_s, row.sum_w, row.sum_w_shifted) +
                      c.ZLoss(lse);
            const int64_t j = row.single_label;
            row_stats[r] = DenseRowStats<Tacc>::Of(
                lse, row.sum_w, j,
                j >= 0 ? labels[r * num_classes + j] : Tacc(0));
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
      row_stats[r] = DenseRowStats<Tacc>::Of(s, in_range_sum);
    });
  }
};

template <typename T>
struct DenseXentBackward<CpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const CpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, const DenseRowStats<Tacc>* row_stats,
                  const Tacc* grad_loss, T* grad_predictions) const {
    const XentConstants<Tacc> c(p);
    const int64_t num_classes = p.num_classes;
    if (num_classes < kSmallClasses) {
      ForEachChunk<T, Tacc>(
          d, p, [&](Chunk<T, Tacc>& chunk, int64_t first, int64_t rows) {
            const int64_t n = rows * num_classes;
            const T* data = predictions + first * num_classes;
            // The predictions, or tanh(z / cap) of soft-capped logits.
            const auto x = c.capped ? chunk.FlatCapTanh(data, rows)
                                    : chunk.FlatPredictions(data, rows);
            const auto t = c.DenseTarget(
                chunk.FlatLabels(labels + first * num_classes, rows));
            const auto g = chunk.Expand(0, grad_loss + first, 1, rows);
            constexpr int64_t kStride = DenseRowStats<Tacc>::kColumns;
            const auto normalizer =
                chunk.Expand(1, &row_stats[first].normalizer, kStride, rows);
            T* dx = grad_predictions + first * num_classes;
            if (p.from_logits) {
              // Per row, g times the weight of the softmax.
              ChunkVector<Tacc> g_w(rows);
              for (int64_t i = 0; i < rows; ++i) {
                const DenseRowStats<Tacc>& stats = row_stats[first + i];
                g_w[i] = grad_loss[first + i] *
                         c.SoftmaxWeight(stats.target_mass, stats.normalizer);
              }
              const auto g_w_each = chunk.Expand(2, g_w.data(), 1, rows);
              if (c.capped) {
                WriteChunk(dx, n,
                           CappedLogitsGrad(c, g_w_each, x, normalizer, g * t));
              } else {
                WriteChunk(dx, n,
                           ScaledLogitsGrad(g_w_each, x, normalizer, g * t));
              }
            } else {
              ChunkVector<Tacc> a_over_s(rows);
              for (int64_t i = 0; i < rows; ++i) {
                const DenseRowStats<Tacc>& stats = row_stats[first + i];
                a_over_s[i] = stats.target_mass / stats.normalizer;
              }
              const ClipRangeByDivision<Tacc, ConstRow<Tacc>> range{c,
                                                                    normalizer};
              WriteChunk(
                  dx, n,
                  DenseProbsGrad(g, x, range,
                                 chunk.Expand(2, a_over_s.data(), 1, rows), t));
            }
          });
      return;
    }
    ForEachRow<T, Tacc>(d, p, [&](RowReader<T, Tacc>& reader, int64_t r) {
      const T* row = predictions + r * num_classes;
      const ConstRow<Tacc> y(labels + r * num_classes, num_classes);
      const DenseRowStats<Tacc>& stats = row_stats[r];
      T* dx = grad_predictions + r * num_classes;
      const Tacc g = grad_loss[r];
      if (p.from_logits) {
        const Tacc lse = stats.normalizer;
        const Tacc g_sum_t = g * c.SoftmaxWeight(stats.target_mass, lse);
        const int64_t j = stats.SingleLabel(num_classes);
        WithLogitsGrad(
            reader, row, num_classes, c, g_sum_t, lse,
            [&](const auto& x, const auto& grad, int64_t begin) {
              if (j >= 0) {  // The targets are known: no labels read.
                WriteOneTargetLogitsGrad(
                    dx, x, begin, grad, g * c.off_weight, j,
                    (g * c.on_weight) * stats.single_label_value);
              } else {
                const int64_t n = x.size();
                WriteRow(dx + begin, n,
                         grad(x, c.ScaledDenseTarget(g, y.segment(begin, n))));
              }
            });
        return;
      }
      const auto x = reader.Read(row);
      const auto t = c.DenseTarget(y);
      const Tacc s = stats.normalizer, a_over_s = stats.target_mass / s;
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
                  const DenseRowStats<Tacc>* row_stats, const Tacc* grad_loss,
                  Tacc* grad_labels) const {
    const XentConstants<Tacc> c(p);
    const int64_t num_classes = p.num_classes;
    ForEachRow<T, Tacc>(d, p, [&](RowReader<T, Tacc>& reader, int64_t r) {
      const auto x = reader.Read(predictions + r * num_classes);
      const Tacc scale = c.on_weight * grad_loss[r];
      // The log-sum-exp, or the row sum.
      const Tacc stat = row_stats[r].normalizer;
      // (1 - ls) * g * -log q, q the softmax or the clipped normalized row.
      if (c.capped) {
        WriteRow(grad_labels + r * num_classes, num_classes,
                 scale * (stat - c.SoftCap(x)));
      } else if (p.from_logits) {
        WriteRow(grad_labels + r * num_classes, num_classes,
                 scale * (stat - x));
      } else {
        WriteRow(grad_labels + r * num_classes, num_classes,
                 -scale * LogOf(c.Clip(x / stat)));
      }
    });
  }
};

#define TFXENT_INSTANTIATE_CPU(T)                  \
  template struct DenseXentForward<CpuDevice, T>;  \
  template struct DenseXentBackward<CpuDevice, T>; \
  template struct DenseXentLabelsBackward<CpuDevice, T>;

TFXENT_INSTANTIATE_CPU(Eigen::half)
TFXENT_INSTANTIATE_CPU(Eigen::bfloat16)
TFXENT_INSTANTIATE_CPU(float)
TFXENT_INSTANTIATE_CPU(double)
#undef TFXENT_INSTANTIATE_CPU

}  // namespace tf_xent_ops
