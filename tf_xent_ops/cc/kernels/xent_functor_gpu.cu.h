/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

CUDA specializations of the cross-entropy functors, generic over the element
type: the TensorFlow build instantiates them in xent_functor_gpu.cu.cc and the
standalone harness (tests/gpu/) in its own file, both with CUDA's __half and
__nv_bfloat16. No TensorFlow or Eigen header is included here.

One block per row (rows strided over the grid), threads strided over the
classes (16 bytes per load where rows are aligned); per-thread compensated
sums and fixed-order block reductions, so results are bitwise reproducible
(no atomics). The sparse logits forward without smoothing reads its row once
(online softmax). All offsets are int64.
Sparse labels outside [0, C) that are not ignore_class are never read
through: that row's loss and log_sum_exp are NaN and its gradient is 0 (the
CPU op raises instead; TensorFlow's GPU kernel gives NaN too).
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_GPU_CU_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_GPU_CU_H_

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace tf_xent_ops {
namespace gpu {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

template <typename Tacc, typename T>
__device__ __forceinline__ Tacc Load(const T* x, int64_t i) {
  return static_cast<Tacc>(x[i]);
}

template <typename Tacc>
__device__ __forceinline__ Tacc NaNOf() {
  return static_cast<Tacc>(NAN);
}

struct MaxOp {
  template <typename Tacc>
  __device__ Tacc operator()(Tacc a, Tacc b) const {
    return b > a ? b : a;
  }
};
struct SumOp {
  template <typename Tacc>
  __device__ Tacc operator()(Tacc a, Tacc b) const {
    return a + b;
  }
};

// Fixed-order reduction over the block; every thread gets the result.
template <typename Tacc, typename Op>
__device__ Tacc BlockReduce(Tacc value, Op op, Tacc identity) {
  __shared__ Tacc warp_results[kThreads / 32];
  __shared__ Tacc result;
  for (int offset = 16; offset > 0; offset >>= 1) {
    value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // The previous call's readers are done with the buffers.
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? warp_results[lane] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) {
      value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
    }
    if (lane == 0) result = value;
  }
  __syncthreads();
  return result;
}

template <typename Tacc, typename T>
__device__ Tacc RowMax(const T* row, int64_t num_classes) {
  const Tacc lowest = -Tacc(INFINITY);
  Tacc m = lowest;
  for (int64_t k = threadIdx.x; k < num_classes; k += kThreads) {
    m = MaxOp()(m, Load<Tacc>(row, k));
  }
  return BlockReduce(m, MaxOp(), lowest);
}

template <typename Tacc>
__device__ Tacc BlockSum(const CompensatedSum<Tacc>& partial) {
  return BlockReduce(partial.Total(), SumOp(), Tacc(0));
}

// Calls fn(k, x_k) for this thread's share of a row of n elements. Rows that
// start on a 16-byte boundary and are a whole number of 16-byte pieces are
// read 16 bytes per load (8 bfloat16s): 2-byte loads alone leave much of the
// memory bandwidth unused.
template <typename T>
__device__ __forceinline__ bool InPieces(const T* row, int64_t n) {
  constexpr int kVec = 16 / sizeof(T);
  return kVec > 1 && n % kVec == 0 &&
         reinterpret_cast<uintptr_t>(row) % 16 == 0;
}

template <typename Tacc, typename T, typename Fn>
__device__ __forceinline__ void ForEachElement(const T* row, int64_t n, Fn fn) {
  constexpr int kVec = 16 / sizeof(T);
  if (InPieces(row, n)) {
    const uint4* pieces = reinterpret_cast<const uint4*>(row);
    for (int64_t i = threadIdx.x; i < n / kVec; i += kThreads) {
      const uint4 piece = pieces[i];
      const T* e = reinterpret_cast<const T*>(&piece);
#pragma unroll
      for (int j = 0; j < kVec; ++j) fn(i * kVec + j, static_cast<Tacc>(e[j]));
    }
  } else {
    for (int64_t k = threadIdx.x; k < n; k += kThreads) {
      fn(k, Load<Tacc>(row, k));
    }
  }
}

// dx_k = fn(k, x_k) over a row, with ForEachElement's 16-byte loads and
// stores where the rows allow. dx may alias x: each piece is read before it
// is written, by the same thread.
template <typename Tacc, typename T, typename Fn>
__device__ __forceinline__ void MapRow(const T* x, T* dx, int64_t n, Fn fn) {
  constexpr int kVec = 16 / sizeof(T);
  if (InPieces(x, n) && InPieces(dx, n)) {
    const uint4* in = reinterpret_cast<const uint4*>(x);
    uint4* out = reinterpret_cast<uint4*>(dx);
    for (int64_t i = threadIdx.x; i < n / kVec; i += kThreads) {
      const uint4 piece = in[i];
      const T* e = reinterpret_cast<const T*>(&piece);
      uint4 result;
      T* r = reinterpret_cast<T*>(&result);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        r[j] = static_cast<T>(fn(i * kVec + j, static_cast<Tacc>(e[j])));
      }
      out[i] = result;
    }
  } else {
    for (int64_t k = threadIdx.x; k < n; k += kThreads) {
      dx[k] = static_cast<T>(fn(k, Load<Tacc>(x, k)));
    }
  }
}

// Online softmax sum of one thread's elements: the running max m and
// sum_k exp(x_k - m), rescaled when m grows, so the row is read once.
template <typename Tacc>
struct OnlineExpSum {
  Tacc m = -Tacc(INFINITY);
  CompensatedSum<Tacc> s;
  __device__ void Add(Tacc x) {
    if (x > m) {
      const Tacc scale = ExpOf(m - x);  // 0 while m is -inf
      s.sum *= scale;
      s.carry *= scale;
      s.Add(Tacc(1));
      m = x;
    } else if (!(x == -Tacc(INFINITY))) {  // exp(-inf) adds nothing; NaN does
      s.Add(ExpOf(x - m));
    }
  }
};

// The row's max and log(sum_k exp(x_k - max)) from every thread's
// OnlineExpSum, combined in a fixed order.
template <typename Tacc>
__device__ void CombineExpSums(const OnlineExpSum<Tacc>& mine, Tacc* row_max,
                               Tacc* log_s) {
  const Tacc m = BlockReduce(mine.m, MaxOp(), -Tacc(INFINITY));
  // A thread that saw only -inf and NaN has m = -inf and a sum of 0 or NaN.
  const Tacc part = mine.m == -Tacc(INFINITY)
                        ? mine.s.Total()
                        : mine.s.Total() * ExpOf(mine.m - m);
  *row_max = m;
  *log_s = LogOf(BlockReduce(part, SumOp(), Tacc(0)));
}

// Whether a sparse row is ignored (0 everywhere) or has a bad label (NaN loss,
// 0 gradient); the same for every thread of the block.
enum class RowKind { kValid, kIgnored, kBadLabel };
template <typename Tidx>
__device__ RowKind ClassifyRow(const XentParams& p, Tidx label) {
  if (IsIgnored(p, label)) return RowKind::kIgnored;
  const int64_t y = static_cast<int64_t>(label);
  return (y >= 0 && y < p.num_classes) ? RowKind::kValid : RowKind::kBadLabel;
}

template <typename T, typename Tidx, typename Tacc>
__global__ void __launch_bounds__(kThreads)
    SparseForwardKernel(XentParams p, const T* predictions, const Tidx* labels,
                        Tacc* loss, Tacc* log_sum_exp) {
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  const bool smoothing = p.label_smoothing != 0.0f;
  for (int64_t r = blockIdx.x; r < p.num_rows; r += gridDim.x) {
    const RowKind kind = ClassifyRow(p, labels[r]);
    if (kind != RowKind::kValid) {
      if (threadIdx.x == 0) {
        const Tacc value = kind == RowKind::kIgnored ? Tacc(0) : NaNOf<Tacc>();
        loss[r] = value;
        log_sum_exp[r] = value;
      }
      continue;
    }
    const T* x = predictions + r * num_classes;
    const int64_t label = static_cast<int64_t>(labels[r]);
    if (p.from_logits && !smoothing) {
      // One read of the row.
      OnlineExpSum<Tacc> mine;
      ForEachElement<Tacc>(x, num_classes,
                           [&](int64_t, Tacc z) { mine.Add(z); });
      Tacc m, log_s;
      CombineExpSums(mine, &m, &log_s);
      if (threadIdx.x == 0) {
        log_sum_exp[r] = m + log_s;
        loss[r] = SparseLogitsLoss(c, log_s, Load<Tacc>(x, label) - m, Tacc(0));
      }
    } else if (p.from_logits) {
      // Smoothing also needs sum_k (x_k - max): a second read, from L2.
      const Tacc m = RowMax<Tacc>(x, num_classes);
      CompensatedSum<Tacc> s, sum_shifted;
      ForEachElement<Tacc>(x, num_classes, [&](int64_t, Tacc z) {
        s.Add(ExpOf(z - m));
        sum_shifted.Add(z - m);
      });
      const Tacc log_s = LogOf(BlockSum(s));
      const Tacc total_shifted = BlockSum(sum_shifted);
      if (threadIdx.x == 0) {
        log_sum_exp[r] = m + log_s;
        loss[r] =
            SparseLogitsLoss(c, log_s, Load<Tacc>(x, label) - m, total_shifted);
      }
    } else {
      CompensatedSum<Tacc> s, sum_log;
      for (int64_t k = threadIdx.x; k < num_classes; k += kThreads) {
        const Tacc clipped = c.Clip(Load<Tacc>(x, k));
        s.Add(clipped);
        if (smoothing) sum_log.Add(LogOf(clipped));
      }
      const Tacc lse = LogOf(BlockSum(s));
      const Tacc total_log = smoothing ? BlockSum(sum_log) : Tacc(0);
      if (threadIdx.x == 0) {
        log_sum_exp[r] = lse;
        loss[r] = SparseProbsLoss(c, lse, LogOf(c.Clip(Load<Tacc>(x, label))),
                                  total_log);
      }
    }
  }
}

template <typename T, typename Tidx, typename Tacc>
__global__ void __launch_bounds__(kThreads)
    SparseBackwardKernel(XentParams p, const T* predictions, const Tidx* labels,
                         const Tacc* log_sum_exp, const Tacc* grad_loss,
                         T* grad_predictions) {
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = blockIdx.x; r < p.num_rows; r += gridDim.x) {
    const T* x = predictions + r * num_classes;
    T* dx = grad_predictions + r * num_classes;  // May alias x, element-wise.
    const RowKind kind = ClassifyRow(p, labels[r]);
    if (kind != RowKind::kValid) {
      for (int64_t k = threadIdx.x; k < num_classes; k += kThreads) {
        dx[k] = static_cast<T>(Tacc(0));
      }
      continue;
    }
    const int64_t label = static_cast<int64_t>(labels[r]);
    const Tacc g = grad_loss[r], lse = log_sum_exp[r];
    const Tacc inv_sum = ExpOf(-lse);
    MapRow<Tacc>(x, dx, num_classes, [&](int64_t k, Tacc z) {
      const Tacc t = c.SparseTarget(k, label);
      return p.from_logits ? LogitsGrad(g, z, lse, Tacc(1), t)
                           : SparseProbsGrad(c, g, z, inv_sum, t);
    });
  }
}

template <typename T, typename Tacc>
__global__ void __launch_bounds__(kThreads)
    DenseForwardKernel(XentParams p, const T* predictions, const Tacc* labels,
                       Tacc* loss, Tacc* stats) {
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = blockIdx.x; r < p.num_rows; r += gridDim.x) {
    const T* x = predictions + r * num_classes;
    const Tacc* y = labels + r * num_classes;
    if (p.from_logits) {
      const Tacc m = RowMax<Tacc>(x, num_classes);
      CompensatedSum<Tacc> s, sum_t, sum_t_shifted;
      for (int64_t k = threadIdx.x; k < num_classes; k += kThreads) {
        const Tacc shifted = Load<Tacc>(x, k) - m;
        const Tacc t = c.DenseTarget(y[k]);
        s.Add(ExpOf(shifted));
        sum_t.Add(t);
        if (t != Tacc(0)) sum_t_shifted.Add(t * shifted);
      }
      const Tacc log_s = LogOf(BlockSum(s));
      const Tacc total_t = BlockSum(sum_t);
      const Tacc total_t_shifted = BlockSum(sum_t_shifted);
      if (threadIdx.x == 0) {
        loss[r] = DenseLogitsLoss(log_s, total_t, total_t_shifted);
        // No single label: the GPU backward reads the labels (coalesced).
        WriteDenseStats(stats, r, m + log_s, total_t);
      }
    } else {
      CompensatedSum<Tacc> row_sum;
      for (int64_t k = threadIdx.x; k < num_classes; k += kThreads) {
        row_sum.Add(Load<Tacc>(x, k));
      }
      const Tacc s = BlockSum(row_sum);
      CompensatedSum<Tacc> total, in_range_t;
      for (int64_t k = threadIdx.x; k < num_classes; k += kThreads) {
        const Tacc q = Load<Tacc>(x, k) / s;
        const Tacc t = c.DenseTarget(y[k]);
        total.Add(t * LogOf(c.Clip(q)));
        if (c.InClipRange(q)) in_range_t.Add(t);
      }
      const Tacc total_sum = BlockSum(total);
      const Tacc in_range_sum = BlockSum(in_range_t);
      if (threadIdx.x == 0) {
        loss[r] = -total_sum;
        WriteDenseStats(stats, r, s, in_range_sum);
      }
    }
  }
}

template <typename T, typename Tacc>
__global__ void __launch_bounds__(kThreads)
    DenseBackwardKernel(XentParams p, const T* predictions, const Tacc* labels,
                        const Tacc* stats, const Tacc* grad_loss,
                        T* grad_predictions) {
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = blockIdx.x; r < p.num_rows; r += gridDim.x) {
    const T* x = predictions + r * num_classes;
    const Tacc* y = labels + r * num_classes;
    T* dx = grad_predictions + r * num_classes;  // May alias x, element-wise.
    const Tacc g = grad_loss[r], stat0 = stats[kDenseStats * r],
               stat1 = stats[kDenseStats * r + 1];
    for (int64_t k = threadIdx.x; k < num_classes; k += kThreads) {
      const Tacc z = Load<Tacc>(x, k);
      const Tacc t = c.DenseTarget(y[k]);
      dx[k] = static_cast<T>(
          p.from_logits
              ? LogitsGrad(g, z, stat0, stat1, t)
              : DenseProbsGrad(g, z, ClipRangeByDivision<Tacc, Tacc>{c, stat0},
                               stat1 / stat0, t));
    }
  }
}

template <typename T, typename Tacc>
__global__ void __launch_bounds__(kThreads)
    DenseLabelsBackwardKernel(XentParams p, const T* predictions,
                              const Tacc* stats, const Tacc* grad_loss,
                              Tacc* grad_labels) {
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = blockIdx.x; r < p.num_rows; r += gridDim.x) {
    const T* x = predictions + r * num_classes;
    Tacc* dy = grad_labels + r * num_classes;
    const Tacc scale = c.on_weight * grad_loss[r],
               stat = stats[kDenseStats * r];
    for (int64_t k = threadIdx.x; k < num_classes; k += kThreads) {
      const Tacc z = Load<Tacc>(x, k);
      dy[k] = scale * (p.from_logits ? stat - z : -LogOf(c.Clip(z / stat)));
    }
  }
}

// Launches a row kernel, kernel(p, args...), on d's stream: one block per
// row up to kMaxBlocks (the kernels stride over the rest). A launch error is
// left for cudaGetLastError. cudaLaunchKernel rather than <<<...>>>, so that
// a host compiler can build the kernels against the CPU emulation of CUDA
// in tests/gpu/emulation.
template <typename T>
struct NonDeduced {
  using type = T;
};
template <typename... Params>
void LaunchRows(void (*kernel)(XentParams, Params...), const GpuDevice& d,
                XentParams p, typename NonDeduced<Params>::type... args) {
  if (p.num_rows == 0) return;
  const auto blocks = static_cast<unsigned int>(
      p.num_rows < kMaxBlocks ? p.num_rows : kMaxBlocks);
  void* kernel_args[] = {&p, &args...};
  cudaLaunchKernel(kernel, dim3(blocks), dim3(kThreads), kernel_args, 0,
                   static_cast<cudaStream_t>(d.stream));
}

}  // namespace gpu

template <typename T, typename Tidx>
struct SparseXentForward<GpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, Tacc* loss, Tacc* log_sum_exp) const {
    gpu::LaunchRows(gpu::SparseForwardKernel<T, Tidx, Tacc>, d, p, predictions,
                    labels, loss, log_sum_exp);
  }
};

template <typename T, typename Tidx>
struct SparseXentBackward<GpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, const Tacc* log_sum_exp,
                  const Tacc* grad_loss, T* grad_predictions) const {
    gpu::LaunchRows(gpu::SparseBackwardKernel<T, Tidx, Tacc>, d, p, predictions,
                    labels, log_sum_exp, grad_loss, grad_predictions);
  }
};

template <typename T>
struct DenseXentForward<GpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, Tacc* loss, Tacc* stats) const {
    gpu::LaunchRows(gpu::DenseForwardKernel<T, Tacc>, d, p, predictions, labels,
                    loss, stats);
  }
};

template <typename T>
struct DenseXentBackward<GpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, const Tacc* stats, const Tacc* grad_loss,
                  T* grad_predictions) const {
    gpu::LaunchRows(gpu::DenseBackwardKernel<T, Tacc>, d, p, predictions,
                    labels, stats, grad_loss, grad_predictions);
  }
};

template <typename T>
struct DenseXentLabelsBackward<GpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* stats, const Tacc* grad_loss,
                  Tacc* grad_labels) const {
    gpu::LaunchRows(gpu::DenseLabelsBackwardKernel<T, Tacc>, d, p, predictions,
                    stats, grad_loss, grad_labels);
  }
};

}  // namespace tf_xent_ops

#define TFXENT_INSTANTIATE_GPU(T)                                             \
  template struct ::tf_xent_ops::SparseXentForward<::tf_xent_ops::GpuDevice,  \
                                                   T, int32_t>;               \
  template struct ::tf_xent_ops::SparseXentForward<::tf_xent_ops::GpuDevice,  \
                                                   T, int64_t>;               \
  template struct ::tf_xent_ops::SparseXentBackward<::tf_xent_ops::GpuDevice, \
                                                    T, int32_t>;              \
  template struct ::tf_xent_ops::SparseXentBackward<::tf_xent_ops::GpuDevice, \
                                                    T, int64_t>;              \
  template struct ::tf_xent_ops::DenseXentForward<::tf_xent_ops::GpuDevice,   \
                                                  T>;                         \
  template struct ::tf_xent_ops::DenseXentBackward<::tf_xent_ops::GpuDevice,  \
                                                   T>;                        \
  template struct ::tf_xent_ops::DenseXentLabelsBackward<                     \
      ::tf_xent_ops::GpuDevice, T>;

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_GPU_CU_H_
