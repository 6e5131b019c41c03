/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

__half for the CUDA emulation (see cuda_runtime.h here): IEEE binary16 as the
host compiler's _Float16, converted to and from float with round to nearest
even, as CUDA's conversions do. Only what the kernels use.
*/
#ifndef TF_XENT_OPS_TESTS_GPU_EMULATION_CUDA_FP16_H_
#define TF_XENT_OPS_TESTS_GPU_EMULATION_CUDA_FP16_H_

struct __half {
  _Float16 value;
  __half() = default;
  __half(float f) : value(static_cast<_Float16>(f)) {}
  __half(double d) : value(static_cast<_Float16>(d)) {}
  operator float() const { return static_cast<float>(value); }
};
static_assert(sizeof(__half) == 2, "__half must be 2 bytes");

#endif  // TF_XENT_OPS_TESTS_GPU_EMULATION_CUDA_FP16_H_
