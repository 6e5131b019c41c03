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
                  const Tidx* labels, Tacc* loss, Tacc* normalizer) const {
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
                normalizer[r] = Tacc(0);
                continue;
              }
              const int64_t label = static_cast<int64_t>(labels[r]);
              const Tacc at_label = z[label * rows + i];
              const Tacc sum = smoothing ? sum_z[i] : Tacc(0);
              normalizer[r] = stat[i];
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
              normalizer[r] = Tacc(0);
              return;
            }
            const T* x = predictions + r * num_classes;
            const auto stats = smoothing ? reducer.Reduce(x, UnitWeights())
                                         : reducer.Reduce(x, NoWeights());
            const int64_t label = static_cast<int64_t>(labels[r]);
            normalizer[r] = stats.max + stats.log_s;
            loss[r] = SparseLogitsLoss(c, stats.log_s,
                                       static_cast<Tacc>(x[label]) - stats.max,
                                       stats.sum_w_shifted);
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
            const auto x =
                chunk.FlatPredictions(predictions + first * num_classes, rows);
            // log-sum-exp, or the clipped row sum.
            const ConstRow<Tacc> stat(normalizer + first, rows);
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
      const Tacc stat = normalizer[r];  // log-sum-exp, or the row sum Q
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

template int64_t FindInvalidLabel<int32_t>(const XentParams&, const int32_t*);
template int64_t FindInvalidLabel<int64_t>(const XentParams&, const int64_t*);

}  // namespace tf_xent_ops
