/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The CUDA kernels of the sparse (integer label) ops. Labels outside [0, C)
that are not ignore_class are never read through: that row's loss and
normalizer are NaN and its gradient is 0 (the CPU op raises instead;
TensorFlow's GPU kernel gives NaN too).
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_GPU_SPARSE_CU_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_GPU_SPARSE_CU_H_

#include "tf_xent_ops/cc/kernels/xent_gpu_logit_sums.cu.h"
#include "tf_xent_ops/cc/kernels/xent_gpu_rows.cu.h"

namespace tf_xent_ops {
namespace gpu {

// Whether a sparse row is ignored (0 everywhere) or has a bad label (NaN loss,
// 0 gradient); the same for every thread of the group.
enum class RowKind { kValid, kIgnored, kBadLabel };
template <typename Tidx>
__device__ RowKind ClassifyRow(const XentParams& p, Tidx label) {
  if (IsIgnored(p, label)) return RowKind::kIgnored;
  const int64_t y = static_cast<int64_t>(label);
  return (y >= 0 && y < p.num_classes) ? RowKind::kValid : RowKind::kBadLabel;
}

// kCapped: the logits are soft-capped (launched only for logits with a cap).
template <int kThreads, bool kCapped, typename T, typename Tidx, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm<T>)
    SparseForwardKernel(XentParams p, const T* predictions, const Tidx* labels,
                        Tacc* loss, Tacc* normalizer) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const RowKind kind = ClassifyRow(p, labels[r]);
    if (kind != RowKind::kValid) {
      if (G::Lane() == 0) {
        const Tacc value =
            kind == RowKind::kIgnored ? Tacc(0) : static_cast<Tacc>(NAN);
        loss[r] = value;
        normalizer[r] = value;
      }
      continue;
    }
    const T* x = predictions + r * num_classes;
    const int64_t label = static_cast<int64_t>(labels[r]);
    if (p.from_logits) {
      const auto forward = [&](auto sums) {
        ForEachPiece<kThreads, Tacc>(
            x, num_classes, [&](int64_t, const auto& z) {
              if constexpr (kCapped) {
                Tacc capped[SizeOf<decltype(z)>];
#pragma unroll
                for (int j = 0; j < SizeOf<decltype(z)>; ++j) {
                  capped[j] = c.SoftCap(z[j]);
                }
                sums.Add(capped);
              } else {
                sums.Add(z);
              }
            });
        const auto row = sums.template Combine<kThreads>();
        if (G::Lane() == 0) {
          const Tacc lse = row.shift + row.log_exp_sum;
          normalizer[r] = lse;
          const Tacc label_shifted =
              LogitOf<kCapped>(c, static_cast<Tacc>(x[label])) - row.shift;
          loss[r] = SparseLogitsLoss(c, row.log_exp_sum, label_shifted,
                                     row.shifted_sum) +
                    c.ZLoss(lse);
        }
      };
      // Only smoothing needs sum (z - m); without it, -inf logits (a -inf
      // sum) cost nothing.
      if (c.off_weight != Tacc(0)) {
        forward(LogitSums<Tacc, kShiftedSum>());
      } else {
        forward(LogitSums<Tacc, kExpSum>());
      }
    } else {
      CompensatedSum<Tacc> s, sum_log;
      const bool smoothing = p.label_smoothing != 0.0;
      ForEachPiece<kThreads, Tacc>(x, num_classes, [&](int64_t, const auto& v) {
        Tacc piece_sum = Tacc(0), piece_log = Tacc(0);
#pragma unroll
        for (int j = 0; j < SizeOf<decltype(v)>; ++j) {
          const Tacc clipped = c.Clip(v[j]);
          piece_sum += clipped;
          if (smoothing) piece_log += LogOf(clipped);
        }
        s.Add(piece_sum);
        sum_log.Add(piece_log);
      });
      Tacc totals[2] = {s.Total(), sum_log.Total()};
      G::Reduce(totals, SumOp());
      if (G::Lane() == 0) {
        normalizer[r] = totals[0];  // The row sum, Q.
        const Tacc label_clipped = c.Clip(static_cast<Tacc>(x[label]));
        loss[r] = SparseProbsLoss(c, totals[0], label_clipped, totals[1]);
      }
    }
  }
}

template <int kThreads, bool kCapped, typename T, typename Tidx, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads)
    SparseBackwardKernel(XentParams p, const T* predictions, const Tidx* labels,
                         const Tacc* normalizer, const Tacc* grad_loss,
                         T* grad_predictions) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const T* x = predictions + r * num_classes;
    T* dx = grad_predictions + r * num_classes;  // May alias x, element-wise.
    if (ClassifyRow(p, labels[r]) != RowKind::kValid) {
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [](int64_t, const auto& in, auto& out) {
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              out[j] = Tacc(0);
            }
          });
      continue;
    }
    const int64_t label = static_cast<int64_t>(labels[r]);
    // log-sum-exp, or the clipped row sum.
    const Tacc g = grad_loss[r], stat = normalizer[r];
    if (p.from_logits) {
      // g t_k: g ls / C, plus g (1 - ls) at the label (sum_t is 1); the
      // softmax's weight is g (1 + 2 z_loss lse).
      const Tacc g_off = g * c.off_weight, g_on = g_off + g * c.on_weight;
      const Tacc g_w = g * c.SoftmaxWeight(Tacc(1), stat);
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
            const int hit = IndexInPiece(label, k, SizeOf<decltype(in)>);
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              out[j] = LogitGradOf<kCapped>(c, g_w, in[j], stat,
                                            j == hit ? g_on : g_off);
            }
          });
    } else {
      const Tacc g_over_sum = g / stat;
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              const Tacc t = c.SparseTarget(k + j, label);
              out[j] = SparseProbsGrad(c, g_over_sum, in[j], stat, t);
            }
          });
    }
  }
}

}  // namespace gpu
}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_GPU_SPARSE_CU_H_
