/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

CPU specializations of the sparse (integer label) cross-entropy functors.
*/
#include <algorithm>
#include <cstdint>

#include "tf_xent_ops/cc/kernels/xent_cpu_logits.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_math.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_probs.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_rows.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_small_classes.h"
#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace tf_xent_ops {

template <typename T, typename Tidx>
struct SparseXentForward<CpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const CpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, Tacc* loss, Tacc* normalizer) const {
    const XentConstants<Tacc> c(p);
    const int64_t num_classes = p.num_classes;
    const bool smoothing = p.label_smoothing != 0.0;
    if (num_classes < kSmallClasses) {
      ForEachChunk<T, Tacc>(
          d, p, [&](Chunk<T, Tacc>& chunk, int64_t first, int64_t rows) {
            // Logits are soft-capped here where the op has a cap.
            const auto x =
                chunk.Predictions(predictions + first * num_classes, rows);
            // The saved statistic: log-sum-exp, or the clipped row sum.
            ChunkVector<Tacc> stat(rows), sum_z(rows);
            ChunkVector<Tacc> log_s;
            const Tacc* z = x.data();  // z - max, or the probabilities.
            if (p.from_logits) {
              ChunkVector<Tacc> row_max;
              ShiftedLogits(chunk, x, &row_max, &log_s);
              z = chunk.Work(x).data();  // z - max
              stat = row_max + log_s;
              if (smoothing) sum_z = chunk.Work(x).rowwise().sum();
            } else {
              stat = c.Clip(x).rowwise().sum();
              if (smoothing) sum_z = LogOf(c.Clip(x)).rowwise().sum();
            }
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t r = first + i;
              if (IsIgnored(p, labels[r])) {
                loss[r] = Tacc(0);
                normalizer[r] = Tacc(0);
                continue;
              }
              const int64_t label = static_cast<int64_t>(labels[r]);
              const Tacc at_label = z[label * x.rows() + i];
              const Tacc sum = smoothing ? sum_z[i] : Tacc(0);
              normalizer[r] = stat[i];
              loss[r] =
                  p.from_logits
                      ? SparseLogitsLoss(c, log_s[i], at_label, sum) +
                            c.ZLoss(stat[i])
                      : SparseProbsLoss(c, stat[i], c.Clip(at_label), sum);
            }
          });
      return;
    }
    if (p.from_logits) {
      // loss = log(s) - sum_k t_k (z'_k - m) + z_loss lse^2, with
      // s = sum_k exp(z'_k - m) and z' the logits the reducer gives (capped
      // where the op has a cap).
      ForEachRow<T, Tacc, LogitsRowReducer<T, Tacc>>(
          d, p, [&](LogitsRowReducer<T, Tacc>& reducer, int64_t r) {
            if (IsIgnored(p, labels[r])) {
              loss[r] = Tacc(0);
              normalizer[r] = Tacc(0);
              return;
            }
            const T* x = predictions + r * num_classes;
            const auto stats = smoothing ? reducer.Reduce(x, UnitWeights())
                                         : reducer.Reduce(x, NoWeights());
            const int64_t label = static_cast<int64_t>(labels[r]);
            const Tacc lse = stats.max + stats.log_s;
            normalizer[r] = lse;
            loss[r] = SparseLogitsLoss(
                          c, stats.log_s,
                          c.Logit(static_cast<Tacc>(x[label])) - stats.max,
                          stats.sum_w_shifted) +
                      c.ZLoss(lse);
          });
      return;
    }
    ForEachRow<T, Tacc>(d, p, [&](RowReader<T, Tacc>& reader, int64_t r) {
      if (IsIgnored(p, labels[r])) {
        loss[r] = Tacc(0);
        normalizer[r] = Tacc(0);
        return;
      }
      const auto x = reader.Read(predictions + r * num_classes);
      const int64_t label = static_cast<int64_t>(labels[r]);
      const Tacc row_sum = BlockedSum(c.Clip(x));
      const Tacc sum_log = smoothing ? ClippedLogSum(x, c) : Tacc(0);
      normalizer[r] = row_sum;
      loss[r] = SparseProbsLoss(c, row_sum, c.Clip(x[label]), sum_log);
    });
  }
};

template <typename T, typename Tidx>
struct SparseXentBackward<CpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const CpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, const Tacc* normalizer,
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
            // log-sum-exp, or the clipped row sum.
            const ConstRow<Tacc> stat(normalizer + first, rows);
            const ConstRow<Tacc> g(grad_loss + first, rows);
            // Per row, g / Q for probabilities; for logits the weight of the
            // softmax, g (1 + 2 z_loss lse).
            ChunkVector<Tacc> g_w(rows);
            for (int64_t i = 0; i < rows; ++i) {
              g_w[i] = p.from_logits ? g[i] * c.SoftmaxWeight(Tacc(1), stat[i])
                                     : g[i] / stat[i];
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
              if (!p.from_logits) {
                at_label[i] =
                    SparseProbsGrad(c, g_w[i], x_label, stat[i], label_t);
              } else if (c.capped) {
                at_label[i] = CappedLogitsGradOf<Tacc>{c, g_w[i], stat[i]}(
                    x_label, g[i] * label_t);
              } else {
                at_label[i] = LogitsGradOf<Tacc>{g_w[i], stat[i]}(
                    x_label, g[i] * label_t);
              }
            }
            T* dx = grad_predictions + first * num_classes;
            const auto g_w_each = chunk.Expand(0, g_w.data(), 1, rows);
            const auto stat_each = chunk.Expand(1, stat.data(), 1, rows);
            if (p.from_logits) {
              const auto g_off =
                  chunk.Expand(2, g.data(), 1, rows) * c.off_weight;
              if (c.capped) {
                WriteChunk(dx, n,
                           CappedLogitsGrad(c, g_w_each, x, stat_each, g_off));
              } else {
                WriteChunk(dx, n,
                           ScaledLogitsGrad(g_w_each, x, stat_each, g_off));
              }
            } else {
              WriteChunk(
                  dx, n,
                  SparseProbsGrad(c, g_w_each, x, stat_each, c.off_weight));
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
      const T* row = predictions + r * num_classes;
      const int64_t label = static_cast<int64_t>(labels[r]);
      const Tacc g = grad_loss[r];
      const Tacc stat = normalizer[r];  // log-sum-exp, or the row sum Q
      if (p.from_logits) {
        WithLogitsGrad(
            reader, row, num_classes, c, g * c.SoftmaxWeight(Tacc(1), stat),
            stat, [&](const auto& x, const auto& grad, int64_t begin) {
              WriteOneTargetLogitsGrad(dx, x, begin, grad, g * c.off_weight,
                                       label, g * c.on_weight);
            });
      } else {
        // dx may alias the predictions (the op reuses their buffer), so the
        // labelled element's gradient is formed before the row is written.
        const auto x = reader.Read(row);
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

#define TFXENT_INSTANTIATE_CPU(T)                            \
  template struct SparseXentForward<CpuDevice, T, int32_t>;  \
  template struct SparseXentForward<CpuDevice, T, int64_t>;  \
  template struct SparseXentBackward<CpuDevice, T, int32_t>; \
  template struct SparseXentBackward<CpuDevice, T, int64_t>;

TFXENT_INSTANTIATE_CPU(Eigen::half)
TFXENT_INSTANTIATE_CPU(Eigen::bfloat16)
TFXENT_INSTANTIATE_CPU(float)
TFXENT_INSTANTIATE_CPU(double)
#undef TFXENT_INSTANTIATE_CPU

}  // namespace tf_xent_ops
