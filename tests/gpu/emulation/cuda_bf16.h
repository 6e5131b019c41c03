/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

__nv_bfloat16 for the CUDA emulation (see cuda_runtime.h here): the top 16
bits of a float, rounded to nearest even (NaN stays NaN), as CUDA's
conversions do. Only what the kernels use.
*/
#ifndef TF_XENT_OPS_TESTS_GPU_EMULATION_CUDA_BF16_H_
#define TF_XENT_OPS_TESTS_GPU_EMULATION_CUDA_BF16_H_

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    } else {
      bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  __nv_bfloat16(double d) : __nv_bfloat16(static_cast<float>(d)) {}
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};
static_assert(sizeof(__nv_bfloat16) == 2, "__nv_bfloat16 must be 2 bytes");

#endif  // TF_XENT_OPS_TESTS_GPU_EMULATION_CUDA_BF16_H_
