/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

CUDA specializations of the cross-entropy functors, generic over the element
type: the TensorFlow build instantiates them in xent_functor_gpu.cu.cc and the
standalone harness (tests/gpu/) in its own file, both with CUDA's __half and
__nv_bfloat16. No TensorFlow or Eigen header is included here. The kernels
are in xent_gpu_sparse.cu.h and xent_gpu_dense.cu.h.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_GPU_CU_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_GPU_CU_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "tf_xent_ops/cc/kernels/xent_functor.h"
#include "tf_xent_ops/cc/kernels/xent_gpu_dense.cu.h"
#include "tf_xent_ops/cc/kernels/xent_gpu_rows.cu.h"
#include "tf_xent_ops/cc/kernels/xent_gpu_sparse.cu.h"

namespace tf_xent_ops {
namespace gpu {

template <typename T>
struct NonDeduced {
  using type = T;
};

// Launches a row kernel on d's stream over every row: a warp a row for rows
// of up to kMaxWarpRowClasses classes, else a block a row, each in its
// instantiation for soft-capped logits where the call has a cap
// (TFXENT_ROW_KERNELS lists the four); the grid is capped at kMaxBlocks (the
// kernels stride over the rest). A launch error is left for cudaGetLastError.
// cudaLaunchKernel rather than <<<...>>>, so that a host compiler can build
// the kernels against the CPU emulation of CUDA in tests/gpu/emulation.
template <typename... Params>
void LaunchRows(void (*warp_kernel)(XentParams, Params...),
                void (*block_kernel)(XentParams, Params...),
                void (*capped_warp_kernel)(XentParams, Params...),
                void (*capped_block_kernel)(XentParams, Params...),
                const GpuDevice& d, XentParams p,
                typename NonDeduced<Params>::type... args) {
  if (p.num_rows == 0) return;
  const bool by_warp = p.num_classes <= kMaxWarpRowClasses;
  const bool capped = XentConstants<double>(p).capped;
  const int64_t rows_per_block =
      by_warp ? Group<kWarpThreads>::kRowsPerBlock : 1;
  const int64_t blocks = (p.num_rows + rows_per_block - 1) / rows_per_block;
  void* kernel_args[] = {&p, &args...};
  cudaLaunchKernel(
      capped ? (by_warp ? capped_warp_kernel : capped_block_kernel)
             : (by_warp ? warp_kernel : block_kernel),
      dim3(
          static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks)),
      dim3(kBlockThreads), kernel_args, 0, static_cast<cudaStream_t>(d.stream));
}

// The instantiations of row kernel template KERNEL<kThreads, kCapped, TYPES>
// that LaunchRows chooses from.
#define TFXENT_ROW_KERNELS(KERNEL, ...)          \
  KERNEL<kWarpThreads, false, __VA_ARGS__>,      \
      KERNEL<kBlockThreads, false, __VA_ARGS__>, \
      KERNEL<kWarpThreads, true, __VA_ARGS__>,   \
      KERNEL<kBlockThreads, true, __VA_ARGS__>

}  // namespace gpu

template <typename T, typename Tidx>
struct SparseXentForward<GpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, Tacc* loss, Tacc* normalizer) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(TFXENT_ROW_KERNELS(SparseForwardKernel, T, Tidx, Tacc), d, p,
               predictions, labels, loss, normalizer);
  }
};

template <typename T, typename Tidx>
struct SparseXentBackward<GpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, const Tacc* normalizer,
                  const Tacc* grad_loss, T* grad_predictions) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(TFXENT_ROW_KERNELS(SparseBackwardKernel, T, Tidx, Tacc), d, p,
               predictions, labels, normalizer, grad_loss, grad_predictions);
  }
};

template <typename T>
struct DenseXentForward<GpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, Tacc* loss,
                  DenseRowStats<Tacc>* row_stats) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(TFXENT_ROW_KERNELS(DenseForwardKernel, T, Tacc), d, p,
               predictions, labels, loss, row_stats);
  }
};

template <typename T>
struct DenseXentBackward<GpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, const DenseRowStats<Tacc>* row_stats,
                  const Tacc* grad_loss, T* grad_predictions) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(TFXENT_ROW_KERNELS(DenseBackwardKernel, T, Tacc), d, p,
               predictions, labels, row_stats, grad_loss, grad_predictions);
  }
};

template <typename T>
struct DenseXentLabelsBackward<GpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const DenseRowStats<Tacc>* row_stats, const Tacc* grad_loss,
                  Tacc* grad_labels) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(TFXENT_ROW_KERNELS(DenseLabelsBackwardKernel, T, Tacc), d, p,
               predictions, row_stats, grad_loss, grad_labels);
  }
};

#undef TFXENT_ROW_KERNELS

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
