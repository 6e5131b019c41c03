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

// The parameters of a call, laid out as tests/gpu/harness.py's KernelParams.
struct HarnessParams {
  int64_t num_rows;
  int64_t num_classes;
  int64_t ignore_class;
  int32_t use_ignore_class;
  int32_t from_logits;
  double label_smoothing;
  double epsilon;
  double z_loss;
  double logit_soft_cap;
};

XentParams ToXentParams(const HarnessParams& h) {
  XentParams p;
  p.num_rows = h.num_rows;
  p.num_classes = h.num_classes;
  p.from_logits = h.from_logits != 0;
  p.label_smoothing = h.label_smoothing;
  p.epsilon = h.epsilon;
  p.z_loss = h.z_loss;
  p.logit_soft_cap = h.logit_soft_cap;
  p.use_ignore_class = h.use_ignore_class != 0;
  p.ignore_class = h.ignore_class;
  return p;
}

// A buffer from Python, untyped: converts to whichever pointer type the
// functor's parameter has.
struct Buffer {
  const void* address;
  template <typename P>
  operator P*() const {  // NOLINT(google-explicit-constructor)
    return static_cast<P*>(const_cast<void*>(address));
  }
};

// Runs Functor<GpuDevice, Types...> on `buffers`, in the functor's order.
template <template <typename...> class Functor, typename... Types,
          typename... Buffers>
void Run(const HarnessParams* params, void* stream, Buffers... buffers) {
  Functor<GpuDevice, Types...>()(GpuDevice{stream}, ToXentParams(*params),
                                 Buffer{buffers}...);
}

// Calls fn(T()) for the element type `dtype`, then returns the launch's
// error code.
template <typename Fn>
int Dispatch(int dtype, const Fn& fn) {
  cudaGetLastError();  // An earlier call's error is not this one's.
  if (dtype == kHalf) {
    fn(__half());
  } else if (dtype == kBFloat16) {
    fn(__nv_bfloat16());
  } else if (dtype == kFloat) {
    fn(float());
  } else if (dtype == kDouble) {
    fn(double());
  } else {
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
  return static_cast<int>(tf_xent_ops::DenseRowStats<float>::kColumns);
}

int tfxent_sparse_forward(int dtype, int index_bits,
                          const HarnessParams* params, const void* predictions,
                          const void* labels, void* loss, void* normalizer,
                          void* stream) {
  return DispatchSparse(dtype, index_bits, [&](auto zero, auto index) {
    Run<tf_xent_ops::SparseXentForward, decltype(zero), decltype(index)>(
        params, stream, predictions, labels, loss, normalizer);
  });
}

int tfxent_sparse_backward(int dtype, int index_bits,
                           const HarnessParams* params, const void* predictions,
                           const void* labels, const void* normalizer,
                           const void* grad_loss, void* grad_predictions,
                           void* stream) {
  return DispatchSparse(dtype, index_bits, [&](auto zero, auto index) {
    Run<tf_xent_ops::SparseXentBackward, decltype(zero), decltype(index)>(
        params, stream, predictions, labels, normalizer, grad_loss,
        grad_predictions);
  });
}

int tfxent_dense_forward(int dtype, const HarnessParams* params,
                         const void* predictions, const void* labels,
                         void* loss, void* row_stats, void* stream) {
  return Dispatch(dtype, [&](auto zero) {
    Run<tf_xent_ops::DenseXentForward, decltype(zero)>(
        params, stream, predictions, labels, loss, row_stats);
  });
}

int tfxent_dense_backward(int dtype, const HarnessParams* params,
                          const void* predictions, const void* labels,
                          const void* row_stats, const void* grad_loss,
                          void* grad_predictions, void* stream) {
  return Dispatch(dtype, [&](auto zero) {
    Run<tf_xent_ops::DenseXentBackward, decltype(zero)>(
        params, stream, predictions, labels, row_stats, grad_loss,
        grad_predictions);
  });
}

int tfxent_dense_labels_backward(int dtype, const HarnessParams* params,
                                 const void* predictions, const void* row_stats,
                                 const void* grad_loss, void* grad_labels,
                                 void* stream) {
  return Dispatch(dtype, [&](auto zero) {
    Run<tf_xent_ops::DenseXentLabelsBackward, decltype(zero)>(
        params, stream, predictions, row_stats, grad_loss, grad_labels);
  });
}

}  // extern "C"
