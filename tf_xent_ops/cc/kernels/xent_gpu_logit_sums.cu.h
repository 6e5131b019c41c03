/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

One-read ("online") sums over a row of logits for the CUDA forwards: each
thread keeps its sums relative to the largest logit it has seen, moving them
when that grows, and the group combines them relative to the row max.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_GPU_LOGIT_SUMS_CU_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_GPU_LOGIT_SUMS_CU_H_

#include "tf_xent_ops/cc/kernels/xent_gpu_rows.cu.h"

namespace tf_xent_ops {
namespace gpu {

// What a LogitSums keeps besides sum exp(z - m).
enum LogitSumsKeep {
  kExpSum = 0,
  kShiftedSum = 1,  // sum (z - m) and the count (sparse label smoothing)
  kTargetSums = 2,  // sum t and sum t (z - m) (dense targets)
};

// One thread's sums over its logits z_k, relative to the largest it has
// seen, m (the shift is m, or 0 while m is -inf: every z so far was -inf or
// NaN, and 0 keeps exp(z - shift) at 0 or NaN): sum exp(z - m) and what
// kKeep asks for; sum t (z - m) is over t != 0, so that a -inf logit without
// target mass adds nothing. When m grows the sums are moved to the new max;
// the group then moves every thread's sums to the row max and adds them.
template <typename Tacc, int kKeep>
struct LogitSums {
  static constexpr bool kShifted = (kKeep & kShiftedSum) != 0;
  static constexpr bool kTargets = (kKeep & kTargetSums) != 0;
  Tacc m = -Infinity<Tacc>();
  CompensatedSum<Tacc> exp_sum, shifted_sum, target_sum, target_shifted;
  Tacc count = Tacc(0);

  __device__ static Tacc ShiftOf(Tacc max) {
    return max == -Infinity<Tacc>() ? Tacc(0) : max;
  }

  // Moves the sums from m to m_new > m.
  __device__ void Rebase(Tacc m_new) {
    if (m == -Infinity<Tacc>()) {
      // The exp sum is 0 or NaN, the others -inf, NaN or 0 (nothing seen,
      // or no target mass): all stay as they are but the exp sum's scale.
      exp_sum.sum *= Tacc(0);
      exp_sum.carry = Tacc(0);
    } else {
      const Tacc d = m - m_new;  // < 0, or -inf if m_new is +inf
      const Tacc scale = FastExp(d);
      exp_sum.sum *= scale;
      exp_sum.carry *= scale;
      if (kShifted && count != Tacc(0)) shifted_sum.Add(count * d);
      if (kTargets && target_sum.Total() != Tacc(0)) {
        target_shifted.Add(target_sum.Total() * d);
      }
    }
    m = m_new;
  }

  // Adds logits z (with targets t where kTargets; else t is not read).
  template <int kN>
  __device__ void Add(const Tacc (&z)[kN], const Tacc (&t)[kN]) {
    const Tacc piece_max = MaxOf(z);
    if (piece_max > m) Rebase(piece_max);
    const Tacc shift = ShiftOf(m);
    Tacc e = Tacc(0), d_sum = Tacc(0), t_sum = Tacc(0), td_sum = Tacc(0);
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      const Tacc d = z[j] - shift;
      e += FastExp(d);
      if (kShifted) d_sum += d;
      if (kTargets) {
        t_sum += t[j];
        td_sum += t[j] != Tacc(0) ? t[j] * d : Tacc(0);
      }
    }
    exp_sum.Add(e);
    if (kShifted) {
      shifted_sum.Add(d_sum);
      count += Tacc(kN);
    }
    if (kTargets) {
      target_sum.Add(t_sum);
      target_shifted.Add(td_sum);
    }
  }
  template <int kN>
  __device__ void Add(const Tacc (&z)[kN]) {
    static_assert(!kTargets, "dense logits need their targets");
    Add(z, z);
  }

  // The row's totals, relative to shift = ShiftOf(row max), in every
  // thread of the group (0 for what kKeep does not ask for). A row of -inf
  // only has log_exp_sum NaN, not log(0): NaN lse, as the CPU gives.
  struct Totals {
    Tacc shift, log_exp_sum, shifted_sum, target_sum, target_shifted;
  };
  template <int kThreads>
  __device__ Totals Combine() {
    Tacc row_max[1] = {m};
    Group<kThreads>::Reduce(row_max, MaxOp());
    if (row_max[0] > m) Rebase(row_max[0]);
    Tacc v[4] = {exp_sum.Total(), shifted_sum.Total(), target_sum.Total(),
                 target_shifted.Total()};
    Group<kThreads>::Reduce(v, SumOp());
    const Tacc log_exp_sum =
        row_max[0] == -Infinity<Tacc>() ? static_cast<Tacc>(NAN) : LogOf(v[0]);
    return {ShiftOf(row_max[0]), log_exp_sum, v[1], v[2], v[3]};
  }
};

}  // namespace gpu
}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_GPU_LOGIT_SUMS_CU_H_
