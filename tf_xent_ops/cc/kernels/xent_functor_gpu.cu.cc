/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The CUDA functors for the TensorFlow op library, with CUDA's 16-bit types
(the OpKernels pass Eigen::half / Eigen::bfloat16 buffers, which have the
same layout). Compiled by nvcc when a CUDA toolkit is found (setup.py).
*/
#include "tf_xent_ops/cc/kernels/xent_functor_gpu.cu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tf_xent_ops {

const char* TakeGpuLaunchError() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace tf_xent_ops

TFXENT_INSTANTIATE_GPU(__half)
TFXENT_INSTANTIATE_GPU(__nv_bfloat16)
TFXENT_INSTANTIATE_GPU(float)
TFXENT_INSTANTIATE_GPU(double)
