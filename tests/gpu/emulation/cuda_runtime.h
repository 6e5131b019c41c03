/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

CUDA emulated on the CPU, just enough to run the op library's GPU kernels
(tf_xent_ops/cc/kernels/xent_functor_gpu.cu.h and the headers it includes)
on a machine without a GPU.
A host compiler given this directory first on its include path compiles
tests/gpu/harness.cu unchanged into a library with the same C ABI as the
real harness, so the kernels' logic (indexing, reductions, alias handling,
special rows) is tested in CI, under AddressSanitizer, before a GPU ever
runs it.

Each thread of a block is a fiber (ucontext) with its own stack; blocks run
one after another. A fiber runs until it reaches a barrier (__syncthreads, or
a warp shuffle, which waits for the 32 lanes of its warp), so shared memory
(`__shared__` is `static`: one block at a time) sees exactly the orders a
barrier allows. The fibers between two barriers run in a random order drawn
from a seed, so a missing barrier shows up as results that change with the
seed. A barrier that not every thread of its block (or warp) reaches, or
lanes whose shuffles do not pair up, stops the launch with an error instead
of hanging.

Not emulated: timing, memory coalescing, warp-synchronous code without
*_sync intrinsics, and anything the kernels do not use.
*/
#ifndef TF_XENT_OPS_TESTS_GPU_EMULATION_CUDA_RUNTIME_H_
#define TF_XENT_OPS_TESTS_GPU_EMULATION_CUDA_RUNTIME_H_

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

// The built-in variables of the thread the emulator is running.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

namespace tfxent_emulation {

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save,
                                               const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save,
                                                const void** bottom_old,
                                                size_t* size_old);
#endif

enum class State { kReady, kAtWarpBarrier, kAtBlockBarrier, kDone };

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
  uint64_t shuffles = 0;  // Shuffles this lane has joined.
};

// One block at a time: its fibers, the scheduler's context, the warp
// shuffles' exchange slots and the first error seen.
struct Emulator {
  static constexpr size_t kStackBytes = 256 << 10;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;  // For AddressSanitizer.
  size_t scheduler_stack_size = 0;
  unsigned int current = 0;
  const std::function<void()>* body = nullptr;
  std::vector<uint64_t> slots[2];  // Shuffle values, by parity of the shuffle.
  std::mt19937_64 rng{0};
  std::string error;  // The first failure's message, for the tests.
  cudaError_t last = cudaSuccess;  // What cudaGetLastError returns next.
};

inline Emulator& Get() {
  static Emulator emulator;
  return emulator;
}

inline void Fail(const std::string& message,
                 cudaError_t code = cudaErrorLaunchFailure) {
  Emulator& e = Get();
  if (e.error.empty()) e.error = message;
  e.last = code;
}

// Called on a fiber's stack right after a switch onto it.
inline void ArrivedOnFiber() {
#if defined(__SANITIZE_ADDRESS__)
  Emulator& e = Get();
  __sanitizer_finish_switch_fiber(nullptr, &e.scheduler_stack,
                                  &e.scheduler_stack_size);
#endif
}

// Switches from the current fiber back to the scheduler, which resumes it
// once `state` is released.
inline void Yield(State state) {
  Emulator& e = Get();
  Fiber& f = e.fibers[e.current];
  f.state = state;
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, e.scheduler_stack,
                                 e.scheduler_stack_size);
  swapcontext(&f.context, &e.scheduler);
  __sanitizer_finish_switch_fiber(fake_stack, &e.scheduler_stack,
                                  &e.scheduler_stack_size);
#else
  swapcontext(&f.context, &e.scheduler);
#endif
}

inline void FiberEntry() {
  ArrivedOnFiber();
  Emulator& e = Get();
  (*e.body)();
  e.fibers[e.current].state = State::kDone;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(nullptr, e.scheduler_stack,
                                 e.scheduler_stack_size);
#endif
  setcontext(&e.scheduler);
}

inline void Resume(unsigned int t) {
  Emulator& e = Get();
  e.current = t;
  threadIdx = dim3(t);
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, e.stacks[t].get(),
                                 Emulator::kStackBytes);
  swapcontext(&e.scheduler, &e.fibers[t].context);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  swapcontext(&e.scheduler, &e.fibers[t].context);
#endif
}

inline std::string Describe(const std::vector<Fiber>& fibers) {
  static const char* names[] = {"running", "at a warp shuffle",
                                "at __syncthreads", "exited"};
  std::string out;
  for (size_t t = 0; t < fibers.size(); ++t) {
    if (t == 0 || fibers[t].state != fibers[t - 1].state) {
      out += " thread " + std::to_string(t) + ": " +
             names[static_cast<int>(fibers[t].state)] + ";";
    }
  }
  return out;
}

// Runs body() as the `threads` threads of block `block`. Returns false (and
// records why) if the block's threads deadlock at their barriers.
inline bool RunBlock(unsigned int block, unsigned int threads,
                     const std::function<void()>& body) {
  Emulator& e = Get();
  blockIdx = dim3(block);
  e.body = &body;
  e.fibers.assign(threads, Fiber());
  while (e.stacks.size() < threads) {
    e.stacks.emplace_back(new char[Emulator::kStackBytes]);
  }
  for (int parity = 0; parity < 2; ++parity) e.slots[parity].assign(threads, 0);
  for (unsigned int t = 0; t < threads; ++t) {
    ucontext_t& c = e.fibers[t].context;
    getcontext(&c);
    c.uc_stack.ss_sp = e.stacks[t].get();
    c.uc_stack.ss_size = Emulator::kStackBytes;
    c.uc_link = nullptr;
    makecontext(&c, FiberEntry, 0);
  }
  std::vector<unsigned int> order(threads);
  for (unsigned int t = 0; t < threads; ++t) order[t] = t;
  const unsigned int warps = (threads + warpSize - 1) / warpSize;
  while (true) {
    std::shuffle(order.begin(), order.end(), e.rng);
    for (unsigned int t : order) {
      if (e.fibers[t].state == State::kReady) Resume(t);
    }
    // Every fiber now waits at a barrier or has exited: release what can go.
    unsigned int done = 0, at_block = 0;
    for (const Fiber& f : e.fibers) {
      done += f.state == State::kDone;
      at_block += f.state == State::kAtBlockBarrier;
    }
    if (done == threads) return true;
    bool released = false;
    for (unsigned int w = 0; w < warps; ++w) {
      const unsigned int begin = w * warpSize;
      const unsigned int end = std::min(threads, begin + warpSize);
      bool all = true;
      for (unsigned int t = begin; t < end; ++t) {
        all &= e.fibers[t].state == State::kAtWarpBarrier &&
               e.fibers[t].shuffles == e.fibers[begin].shuffles;
      }
      if (!all) continue;
      for (unsigned int t = begin; t < end; ++t) {
        e.fibers[t].state = State::kReady;
      }
      released = true;
    }
    if (!released && at_block == threads) {
      for (Fiber& f : e.fibers) f.state = State::kReady;
      released = true;
    }
    if (!released) {
      Fail("block " + std::to_string(block) +
           ": threads wait at barriers that can never complete:" +
           Describe(e.fibers));
      return false;
    }
  }
}

// kernel(*args[0], *args[1], ...), each parameter copied as CUDA copies it.
template <typename... Params, size_t... I>
void Invoke(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_reference_t<Params>*>(args[I])...);
}

inline void SetSeed(uint64_t seed) { Get().rng.seed(seed); }

// Takes the first error since the last call (empty if none).
inline std::string TakeError() {
  std::string error;
  std::swap(error, Get().error);
  return error;
}

template <typename V>
uint64_t ToBits(V v) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of a wide type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  return bits;
}
template <typename V>
V FromBits(uint64_t bits) {
  V v;
  std::memcpy(&v, &bits, sizeof(V));
  return v;
}

// A shuffle among all 32 lanes: each lane publishes v, waits for its warp,
// then reads lane src_lane(lane)'s value. Slots alternate between two sets,
// so a lane can publish its next value before a slower lane has read this one.
template <typename V, typename SourceLane>
V Shuffle(unsigned int mask, V v, SourceLane src_lane) {
  Emulator& e = Get();
  if (mask != 0xffffffffu) Fail("shuffle with a partial mask");
  const unsigned int t = threadIdx.x;
  Fiber& f = e.fibers[t];
  const int parity = static_cast<int>(f.shuffles & 1);
  e.slots[parity][t] = ToBits(v);
  ++f.shuffles;
  Yield(State::kAtWarpBarrier);
  const unsigned int lane = t % warpSize;
  const unsigned int src = t - lane + src_lane(lane);
  return FromBits<V>(e.slots[parity][src]);
}

}  // namespace tfxent_emulation

inline void __syncthreads() {
  tfxent_emulation::Yield(tfxent_emulation::State::kAtBlockBarrier);
}

template <typename V>
V __shfl_down_sync(unsigned int mask, V v, unsigned int delta,
                   int width = warpSize) {
  return tfxent_emulation::Shuffle(mask, v, [=](unsigned int lane) {
    const unsigned int in_segment = lane % width;
    return in_segment + delta < static_cast<unsigned int>(width) ? lane + delta
                                                                 : lane;
  });
}

template <typename V>
V __shfl_xor_sync(unsigned int mask, V v, int lane_mask, int width = warpSize) {
  return tfxent_emulation::Shuffle(mask, v, [=](unsigned int lane) {
    const unsigned int src = lane ^ static_cast<unsigned int>(lane_mask);
    return src / width == lane / width ? src : lane;
  });
}

template <typename V>
V __shfl_sync(unsigned int mask, V v, int src_lane, int width = warpSize) {
  return tfxent_emulation::Shuffle(mask, v, [=](unsigned int lane) {
    return lane - lane % width + static_cast<unsigned int>(src_lane) % width;
  });
}

// Streaming loads and stores (cache hints only).
template <typename V>
V __ldcs(const V* p) {
  return *p;
}
template <typename V>
void __stcs(V* p, V v) {
  *p = v;
}

// Device-only math the kernels call, with the host's libm (expf, exp2f and
// the rest are libm's own).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

// The last error, reset to cudaSuccess by the call, as CUDA's.
inline cudaError_t cudaGetLastError() {
  return std::exchange(tfxent_emulation::Get().last, cudaSuccess);
}

// Runs kernel(args...) over the grid, block after block.
template <typename... Params>
cudaError_t cudaLaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block,
                             void** args, size_t /*shared_bytes*/ = 0,
                             cudaStream_t /*stream*/ = nullptr) {
  if (grid.x == 0 || grid.y != 1 || grid.z != 1 || block.x == 0 ||
      block.x > 1024 || block.y != 1 || block.z != 1) {
    tfxent_emulation::Fail("unsupported launch configuration",
                           cudaErrorInvalidConfiguration);
    return cudaErrorInvalidConfiguration;
  }
  gridDim = grid;
  blockDim = block;
  const std::function<void()> body = [&] {
    tfxent_emulation::Invoke(kernel, args,
                             std::index_sequence_for<Params...>());
  };
  for (unsigned int b = 0; b < grid.x; ++b) {
    if (!tfxent_emulation::RunBlock(b, block.x, body)) {
      return cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

#endif  // TF_XENT_OPS_TESTS_GPU_EMULATION_CUDA_RUNTIME_H_
