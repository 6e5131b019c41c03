/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The functor contract of the fused cross-entropy ops: the per-call parameters,
the row statistics a forward saves for its backward, the devices, and one
functor declaration per op. The OpKernels (xent_op.cc) call these, the CPU
ones through the table of an instruction-set level (xent_cpu_kernels.h); the
CPU (xent_functor_cpu_*.cc) and CUDA (xent_functor_gpu.cu.h) files specialize
them. No TensorFlow header: the standalone GPU harness (tests/gpu) and the
CPU functor benchmark build against it too. Both nvcc and the host compiler
accept this header.

Every buffer is row-major [num_rows, num_classes]; semantics per row are in
xent_row_math.h.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_H_

#include <cstdint>
#include <functional>

#if defined(__CUDACC__)
#define TFXENT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TFXENT_HOST_DEVICE inline
#endif

namespace tf_xent_ops {

// Parameters of one op call. Plain data, copied to the device by value. The
// coefficients come from the op's scalar inputs in the loss type, so they are
// exact for double predictions and the float value otherwise.
struct XentParams {
  int64_t num_rows = 0;
  int64_t num_classes = 0;
  bool from_logits = true;
  double label_smoothing = 0.0;
  double epsilon = 1e-7;  // keras.config.epsilon() at call time.
  // Logits only: the weight of the z-loss term z_loss * lse^2 of each row,
  // and the soft cap of the logits, z' = cap * tanh(z / cap) (0: none).
  double z_loss = 0.0;
  double logit_soft_cap = 0.0;
  bool use_ignore_class = false;
  int64_t ignore_class = 0;
};

// Accumulation type: float for half, bfloat16 and float; double for double.
// Losses, row statistics and dense labels are kept in it.
template <typename T>
struct AccumulatorType {
  using type = float;
};
template <>
struct AccumulatorType<double> {
  using type = double;
};

// One row of the dense forward's statistics: what its backwards read instead
// of the [N, C] softmax (the op's `row_stats` output, [N, kColumns]).
template <typename Tacc>
struct DenseRowStats {
  static constexpr int64_t kColumns = 4;
  // Logits: the row's log-sum-exp. Probabilities: the row sum S = sum_k y_k.
  Tacc normalizer;
  // Logits: sum_k t_k. Probabilities: the sum of t_k over the classes whose
  // y_k / S lies inside the clip range.
  Tacc target_mass;
  // Logits: the class j of the row's only nonzero label, if it has exactly
  // one (as a one-hot row has) and Tacc holds j exactly, and y_j; else -1
  // and 0. The logits backwards then read no labels for that row.
  // Probabilities: always -1 and 0.
  Tacc single_label;
  Tacc single_label_value;

  // A class Tacc would round (float beyond 2^24) is stored as -1: the
  // backward would put the row's label on the neighbouring class.
  TFXENT_HOST_DEVICE static DenseRowStats Of(
      Tacc normalizer, Tacc target_mass, int64_t single_label = -1,
      Tacc single_label_value = Tacc(0)) {
    const Tacc j = static_cast<Tacc>(single_label);
    const bool exact =
        single_label >= 0 && static_cast<int64_t>(j) == single_label;
    return {normalizer, target_mass, exact ? j : Tacc(-1),
            exact ? single_label_value : Tacc(0)};
  }

  // The single label's class, or -1; also for anything that is not a class
  // of the row: statistics are an input of the backward op, and the backward
  // must never index out of the row.
  TFXENT_HOST_DEVICE int64_t SingleLabel(int64_t num_classes) const {
    const Tacc j = single_label;
    if (!(j >= Tacc(0) && j < static_cast<Tacc>(num_classes))) return -1;
    const int64_t k = static_cast<int64_t>(j);
    return k < num_classes ? k : -1;
  }
};

// ---------------------------------------------------------------------------
// Devices. The CPU device runs shards of rows on a thread pool the caller
// provides (TensorFlow's intra-op pool in the OpKernels, a serial loop
// elsewhere); each row is computed by one thread, so results do not depend on
// the number of threads.
struct CpuDevice {
  using ShardFn = std::function<void(int64_t begin, int64_t end)>;
  std::function<void(int64_t total, int64_t cost_per_unit, const ShardFn& fn)>
      parallel_for;
};

// The GPU device is a CUDA stream (a cudaStream_t, kept as void* so that
// host-only files need no CUDA header). GPU kernels use fixed-order
// reductions and no atomics: bitwise reproducible.
struct GpuDevice {
  void* stream = nullptr;
};

// The error of this thread's last failed GPU launch, which it clears, or
// nullptr if there was none (defined with the CUDA functors; the GPU
// OpKernels turn it into an error status).
const char* TakeGpuLaunchError();

// ---------------------------------------------------------------------------
// Functors. `Tidx` is int32_t or int64_t; T is the prediction type; the loss,
// the row statistics and dense labels are in AccumulatorType<T>. Backward
// functors allow grad_predictions to alias predictions (the OpKernels reuse
// the predictions' buffer when nothing else holds it).

// Sparse forward: loss[N] and normalizer[N], the row statistic the backward
// reads: for logits the log-sum-exp; for probabilities the row sum of clipped
// probabilities Q = sum_k clip(p_k) itself (through its log and back it would
// lose bits that the labelled class's gradient magnifies). Labels must already
// be valid on devices that cannot report errors; the CPU op checks first.
template <typename Device, typename T, typename Tidx>
struct SparseXentForward {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const Device& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, Tacc* loss, Tacc* normalizer) const;
};

// Sparse backward: grad_predictions[N, C] from the saved normalizer.
template <typename Device, typename T, typename Tidx>
struct SparseXentBackward {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const Device& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, const Tacc* normalizer,
                  const Tacc* grad_loss, T* grad_predictions) const;
};

// Dense forward: loss[N] and row_stats[N].
template <typename Device, typename T>
struct DenseXentForward {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const Device& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, Tacc* loss,
                  DenseRowStats<Tacc>* row_stats) const;
};

// Dense backward with respect to the predictions.
template <typename Device, typename T>
struct DenseXentBackward {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const Device& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, const DenseRowStats<Tacc>* row_stats,
                  const Tacc* grad_loss, T* grad_predictions) const;
};

// Dense backward with respect to the (unsmoothed) labels:
//   (1 - ls) * g * -log_softmax(z)_k, or (1 - ls) * g * -log(clip(y_k / S)).
template <typename Device, typename T>
struct DenseXentLabelsBackward {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const Device& d, const XentParams& p, const T* predictions,
                  const DenseRowStats<Tacc>* row_stats, const Tacc* grad_loss,
                  Tacc* grad_labels) const;
};

}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_H_
