/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

Kernels that show what the CUDA emulation (cuda_runtime.h here) finds, for
tests/test_gpu_emulation.py: a block sum with and without the barrier it
needs, a barrier only some threads reach, a shuffle in divergent code, and
the three shuffles' lane arithmetic.
*/
#include <cstdint>

#include "cuda_runtime.h"

namespace {

constexpr int kThreads = 128;

// Each thread stores t + 1 + 1000 * call; thread 0 sums the values after a
// barrier (or, with `synced` false, without one: it then also sees the
// values an earlier call left for the threads that had not yet run).
__global__ void BlockSumKernel(bool synced, int call, int64_t* out) {
  __shared__ int64_t values[kThreads];
  values[threadIdx.x] = threadIdx.x + 1 + 1000 * call;
  if (synced) __syncthreads();
  if (threadIdx.x == 0) {
    int64_t sum = 0;
    for (int t = 0; t < kThreads; ++t) sum += values[t];
    *out = sum;
  }
}

__global__ void DivergentBarrierKernel(int* out) {
  if (threadIdx.x < 40) __syncthreads();
  *out = 1;
}

__global__ void DivergentShuffleKernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// out[3 * t + i]: thread t's results of shfl_down(1), shfl_xor(5) and
// shfl(lane 7) of the value 100 * t.
__global__ void ShuffleLanesKernel(int* out) {
  const int v = 100 * threadIdx.x;
  out[3 * threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 1);
  out[3 * threadIdx.x + 1] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[3 * threadIdx.x + 2] = __shfl_sync(0xffffffffu, v, 7);
}

template <typename... Params>
int Launch(void (*kernel)(Params...), unsigned int blocks, unsigned int threads,
           Params... args) {
  void* kernel_args[] = {&args...};
  cudaLaunchKernel(kernel, dim3(blocks), dim3(threads), kernel_args);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int emulation_block_sum(int synced, int call, int64_t* out) {
  return Launch(BlockSumKernel, 1, kThreads, synced != 0, call, out);
}

int emulation_divergent_barrier(int* out) {
  return Launch(DivergentBarrierKernel, 1, 64, out);
}

int emulation_divergent_shuffle(int* out) {
  return Launch(DivergentShuffleKernel, 1, 64, out);
}

int emulation_shuffle_lanes(int* out) {
  return Launch(ShuffleLanesKernel, 1, 64, out);
}

}  // extern "C"
