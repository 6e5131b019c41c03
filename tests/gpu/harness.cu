/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

Standalone harness: the op library's GPU functors (the same
xent_functor_gpu.cu.h) behind a C ABI, for machines without TensorFlow.
tests/gpu/harness.py builds and loads it with ctypes, two ways:
  - with nvcc, for a real GPU (bench/bench_gpu.py passes PyTorch tensors'
    device pointers);
  - with a host compiler and tests/gpu/emulation/ first on the include path,
    which emulates CUDA on the CPU (tests/test_gpu_emulation.py passes NumPy
    arrays' addresses).
Each entry point launches one functor and returns the CUDA error code of the
launch (-1 for an unknown dtype or index width).
*/
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tf_xent_ops/cc/kernels/xent_functor_gpu.cu.h"

namespace {

using tf_xent_ops::GpuDevice;
using tf_xent_ops::XentParams;

enum DType { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

XentParams Params(int64_t n, int64_t c, int from_logits, float ls, float eps,
                  int use_ignore, int64_t ignore) {
  XentParams p;
  p.num_rows = n;
  p.num_classes = c;
  p.from_logits = from_logits != 0;
  p.label_smoothing = ls;
  p.epsilon = eps;
  p.use_ignore_class = use_ignore != 0;
  p.ignore_class = ignore;
  return p;
}

// Calls fn(T()) for the element type `dtype`, then returns the launch's
// error code.
template <typename Fn>
int Dispatch(int dtype, const Fn& fn) {
  cudaGetLastError();  // An earlier call's error is not this one's.
  switch (dtype) {
    case kHalf:
      fn(__half());
      break;
    case kBFloat16:
      fn(__nv_bfloat16());
      break;
    case kFloat:
      fn(float());
      break;
    case kDouble:
      fn(double());
      break;
    default:
      return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

// Calls fn(T(), Tidx()) for the element type `dtype` and labels of
// `index_bits` (32 or 64) bits.
template <typename Fn>
int DispatchSparse(int dtype, int index_bits, const Fn& fn) {
  switch (index_bits) {
    case 32:
      return Dispatch(dtype, [&](auto zero) { fn(zero, int32_t()); });
    case 64:
      return Dispatch(dtype, [&](auto zero) { fn(zero, int64_t()); });
    default:
      return -1;
  }
}

}  // namespace

extern "C" {

// Statistics per row of the dense forward (the stats buffer is [n, this]).
int tfxent_dense_stats_per_row() {
  return static_cast<int>(tf_xent_ops::kDenseStats);
}

int tfxent_sparse_forward(int dtype, int index_bits, int64_t n, int64_t c,
                          int from_logits, float ls, float eps, int use_ignore,
                          int64_t ignore, const void* predictions,
                          const void* labels, void* loss, void* log_sum_exp,
                          void* stream) {
  const XentParams p = Params(n, c, from_logits, ls, eps, use_ignore, ignore);
  return DispatchSparse(dtype, index_bits, [&](auto zero, auto index) {
    using T = decltype(zero);
    using Tidx = decltype(index);
    using Tacc = typename tf_xent_ops::AccumulatorType<T>::type;
    tf_xent_ops::SparseXentForward<GpuDevice, T, Tidx>()(
        GpuDevice{stream}, p, static_cast<const T*>(predictions),
        static_cast<const Tidx*>(labels), static_cast<Tacc*>(loss),
        static_cast<Tacc*>(log_sum_exp));
  });
}

int tfxent_sparse_backward(int dtype, int index_bits, int64_t n, int64_t c,
                           int from_logits, float ls, float eps, int use_ignore,
                           int64_t ignore, const void* predictions,
                           const void* labels, const void* log_sum_exp,
                           const void* grad_loss, void* grad_predictions,
                           void* stream) {
  const XentParams p = Params(n, c, from_logits, ls, eps, use_ignore, ignore);
  return DispatchSparse(dtype, index_bits, [&](auto zero, auto index) {
    using T = decltype(zero);
    using Tidx = decltype(index);
    using Tacc = typename tf_xent_ops::AccumulatorType<T>::type;
    tf_xent_ops::SparseXentBackward<GpuDevice, T, Tidx>()(
        GpuDevice{stream}, p, static_cast<const T*>(predictions),
        static_cast<const Tidx*>(labels), static_cast<const Tacc*>(log_sum_exp),
        static_cast<const Tacc*>(grad_loss), static_cast<T*>(grad_predictions));
  });
}

int tfxent_dense_forward(int dtype, int64_t n, int64_t c, int from_logits,
                         float ls, float eps, const void* predictions,
                         const void* labels, void* loss, void* stats,
                         void* stream) {
  const XentParams p = Params(n, c, from_logits, ls, eps, 0, 0);
  return Dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    using Tacc = typename tf_xent_ops::AccumulatorType<T>::type;
    tf_xent_ops::DenseXentForward<GpuDevice, T>()(
        GpuDevice{stream}, p, static_cast<const T*>(predictions),
        static_cast<const Tacc*>(labels), static_cast<Tacc*>(loss),
        static_cast<Tacc*>(stats));
  });
}

int tfxent_dense_backward(int dtype, int64_t n, int64_t c, int from_logits,
                          float ls, float eps, const void* predictions,
                          const void* labels, const void* stats,
                          const void* grad_loss, void* grad_predictions,
                          void* stream) {
  const XentParams p = Params(n, c, from_logits, ls, eps, 0, 0);
  return Dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    using Tacc = typename tf_xent_ops::AccumulatorType<T>::type;
    tf_xent_ops::DenseXentBackward<GpuDevice, T>()(
        GpuDevice{stream}, p, static_cast<const T*>(predictions),
        static_cast<const Tacc*>(labels), static_cast<const Tacc*>(stats),
        static_cast<const Tacc*>(grad_loss), static_cast<T*>(grad_predictions));
  });
}

int tfxent_dense_labels_backward(int dtype, int64_t n, int64_t c,
                                 int from_logits, float ls, float eps,
                                 const void* predictions, const void* stats,
                                 const void* grad_loss, void* grad_labels,
                                 void* stream) {
  const XentParams p = Params(n, c, from_logits, ls, eps, 0, 0);
  return Dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    using Tacc = typename tf_xent_ops::AccumulatorType<T>::type;
    tf_xent_ops::DenseXentLabelsBackward<GpuDevice, T>()(
        GpuDevice{stream}, p, static_cast<const T*>(predictions),
        static_cast<const Tacc*>(stats), static_cast<const Tacc*>(grad_loss),
        static_cast<Tacc*>(grad_labels));
  });
}

}  // extern "C"
