/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The CUDA kernels of the dense (one-hot or soft label) ops.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_GPU_DENSE_CU_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_GPU_DENSE_CU_H_

#include "tf_xent_ops/cc/kernels/xent_gpu_logit_sums.cu.h"
#include "tf_xent_ops/cc/kernels/xent_gpu_rows.cu.h"

namespace tf_xent_ops {
namespace gpu {

// kCapped: the logits are soft-capped (launched only for logits with a cap).
template <int kThreads, bool kCapped, typename T, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads)
    DenseForwardKernel(XentParams p, const T* predictions, const Tacc* labels,
                       Tacc* loss, DenseRowStats<Tacc>* row_stats) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const T* x = predictions + r * num_classes;
    const Tacc* y = labels + r * num_classes;
    if (p.from_logits) {
      LogitSums<Tacc, kTargetSums> sums;
      // This thread's nonzero labels: how many, the last one's class and
      // value (a one-hot row has one in the whole row).
      int64_t nonzero[2] = {0, -1};
      Tacc nonzero_value[1] = {Tacc(0)};
      ForEachPieceBeside<kThreads, Tacc>(
          x, y, num_classes, [&](int64_t k, const auto& z, const auto& labels) {
            Tacc t[SizeOf<decltype(z)>], logits[SizeOf<decltype(z)>];
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(z)>; ++j) {
              const Tacc label = labels.v[j];
              t[j] = c.DenseTarget(label);
              logits[j] = LogitOf<kCapped>(c, z[j]);
              if (label != Tacc(0)) {
                ++nonzero[0];
                nonzero[1] = k + j;
                nonzero_value[0] = label;
              }
            }
            sums.Add(logits, t);
          });
      const auto row = sums.template Combine<kThreads>();
      // The row's single nonzero label, if it has one: its class is the
      // largest of the threads' last ones, its value the sum of theirs.
      int64_t count[1] = {nonzero[0]}, last[1] = {nonzero[1]};
      G::Reduce(count, SumOp());
      G::Reduce(last, MaxOp());
      G::Reduce(nonzero_value, SumOp());
      if (G::Lane() == 0) {
        const Tacc lse = row.shift + row.log_exp_sum;
        loss[r] = DenseLogitsLoss(row.log_exp_sum, row.target_sum,
                                  row.target_shifted) +
                  c.ZLoss(lse);
        const bool single = count[0] == 1;
        row_stats[r] =
            DenseRowStats<Tacc>::Of(lse, row.target_sum, single ? last[0] : -1,
                                    single ? nonzero_value[0] : Tacc(0));
      }
    } else {
      // The clip range depends on the row sum: a second read, from L2 where
      // rows are short enough.
      CompensatedSum<Tacc> row_sum;
      ForEachPiece<kThreads, Tacc>(x, num_classes, [&](int64_t, const auto& v) {
        Tacc piece = Tacc(0);
#pragma unroll
        for (int j = 0; j < SizeOf<decltype(v)>; ++j) piece += v[j];
        row_sum.Add(piece);
      });
      Tacc s[1] = {row_sum.Total()};
      G::Reduce(s, SumOp());
      CompensatedSum<Tacc> total, in_range_t;
      ForEachPieceBeside<kThreads, Tacc>(
          x, y, num_classes, [&](int64_t, const auto& v, const auto& labels) {
            Tacc piece_total = Tacc(0), piece_in_range = Tacc(0);
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(v)>; ++j) {
              const Tacc q = v[j] / s[0];
              const Tacc t = c.DenseTarget(labels.v[j]);
              piece_total += t * LogOf(c.Clip(q));
              if (c.InClipRange(q)) piece_in_range += t;
            }
            total.Add(piece_total);
            in_range_t.Add(piece_in_range);
          });
      Tacc totals[2] = {total.Total(), in_range_t.Total()};
      G::Reduce(totals, SumOp());
      if (G::Lane() == 0) {
        loss[r] = -totals[0];
        row_stats[r] = DenseRowStats<Tacc>::Of(s[0], totals[1]);
      }
    }
  }
}

template <int kThreads, bool kCapped, typename T, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm<T>)
    DenseBackwardKernel(XentParams p, const T* predictions, const Tacc* labels,
                        const DenseRowStats<Tacc>* row_stats,
                        const Tacc* grad_loss, T* grad_predictions) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const T* x = predictions + r * num_classes;
    const Tacc* y = labels + r * num_classes;
    T* dx = grad_predictions + r * num_classes;  // May alias x, element-wise.
    const DenseRowStats<Tacc>& stats = row_stats[r];
    const Tacc g = grad_loss[r];
    if (p.from_logits) {
      const Tacc lse = stats.normalizer;
      const Tacc g_sum_t = g * c.SoftmaxWeight(stats.target_mass, lse);
      const int64_t single = stats.SingleLabel(num_classes);
      if (single >= 0) {
        // The row's only nonzero label is y_single: no labels read.
        const Tacc y_single = stats.single_label_value;
        MapPieces<kThreads, Tacc>(
            x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
              const int hit = IndexInPiece(single, k, SizeOf<decltype(in)>);
#pragma unroll
              for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
                const Tacc label = j == hit ? y_single : Tacc(0);
                out[j] = LogitGradOf<kCapped>(c, g_sum_t, in[j], lse,
                                              c.ScaledDenseTarget(g, label));
              }
            });
        continue;
      }
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              out[j] = LogitGradOf<kCapped>(c, g_sum_t, in[j], lse,
                                            c.ScaledDenseTarget(g, y[k + j]));
            }
          });
    } else {
      const ClipRangeByDivision<Tacc, Tacc> range{c, stats.normalizer};
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              out[j] = DenseProbsGrad(g, in[j], range,
                                      stats.target_mass / stats.normalizer,
                                      c.DenseTarget(y[k + j]));
            }
          });
    }
  }
}

template <int kThreads, bool kCapped, typename T, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads)
    DenseLabelsBackwardKernel(XentParams p, const T* predictions,
                              const DenseRowStats<Tacc>* row_stats,
                              const Tacc* grad_loss, Tacc* grad_labels) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const T* x = predictions + r * num_classes;
    Tacc* dy = grad_labels + r * num_classes;
    const Tacc scale = c.on_weight * grad_loss[r],
               stat = row_stats[r].normalizer;
    ForEachPiece<kThreads, Tacc>(x, num_classes, [&](int64_t k, const auto& z) {
#pragma unroll
      for (int j = 0; j < SizeOf<decltype(z)>; ++j) {
        dy[k + j] = scale * (p.from_logits ? stat - LogitOf<kCapped>(c, z[j])
                                           : -LogOf(c.Clip(z[j] / stat)));
      }
    });
  }
}

}  // namespace gpu
}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_GPU_DENSE_CU_H_
