/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

Whether the CPU functors give the same bits on every call, wherever their
per-thread scratch happens to be allocated: each functor runs several times
on the same inputs, into fresh output buffers (64-byte aligned, as TensorFlow
allocates tensors), serially and over two threads, while this program's
operator new (which replaces the library's too) puts each allocation 16 to 64
bytes past a 64-byte boundary, pseudo-randomly. Scratch whose owner does
not align it then lies at other alignments from call to call, and Eigen,
which splits a reduction at the first aligned address, sums it in another
order. Prints one line per functor and
configuration that ever gave other bits, then "mismatches: N".

Built and run by tests/test_determinism.py with the library of each CPU
level (_xent_cpu_<level>.so, the first argument), whose functors it calls
through the level's table, as the op library does.
*/
#include <dlfcn.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "Eigen/Core"
#include "tests/cpu/threads_device.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_kernels.h"
#include "tf_xent_ops/cc/kernels/xent_functor.h"

// The replaceable global allocation functions: every allocation lands 16,
// 32, 48 or 64 bytes past a 64-byte boundary, in a pseudo-random order (a
// fixed cycle could repeat with each call's allocations), the address malloc
// gave stored just before it.
namespace {
std::atomic<uint64_t> allocations{0};
}  // namespace

void* operator new(std::size_t size) {
  const uint64_t hash = (allocations++ + 1) * 0x9E3779B97F4A7C15ull;
  const std::size_t offset = 16 * (1 + (hash >> 62));
  char* raw = static_cast<char*>(std::malloc(size + 64 + offset));
  if (raw == nullptr) throw std::bad_alloc();
  const std::uintptr_t aligned =
      (reinterpret_cast<std::uintptr_t>(raw) + 63) & ~std::uintptr_t{63};
  char* p = reinterpret_cast<char*>(aligned) + offset;
  std::memcpy(p - sizeof(raw), &raw, sizeof(raw));
  return p;
}
void* operator new[](std::size_t size) { return operator new(size); }
void operator delete(void* p) noexcept {
  if (p == nullptr) return;
  char* raw;
  std::memcpy(&raw, static_cast<char*>(p) - sizeof(raw), sizeof(raw));
  std::free(raw);
}
void operator delete[](void* p) noexcept { operator delete(p); }
void operator delete(void* p, std::size_t) noexcept { operator delete(p); }
void operator delete[](void* p, std::size_t) noexcept { operator delete(p); }

namespace {

using tf_xent_ops::AccumulatorType;
using tf_xent_ops::CpuDevice;
using tf_xent_ops::DenseRowStats;
using tf_xent_ops::XentParams;

// The table of the level's library under test.
const tf_xent_ops::CpuKernels* kernels = nullptr;

template <typename Functor, typename... Args>
void Run(Args... args) {
  tf_xent_ops::CpuFunction<Functor> (*kernels)(args...);
}

// Buffers as TensorFlow's CPU allocator gives them: 64-byte aligned.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  explicit Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, Aligned64<T>>;

template <typename V>
std::string Bytes(const V& v) {
  return std::string(reinterpret_cast<const char*>(v.data()),
                     v.size() * sizeof(v[0]));
}

// Runs `call` (which returns its outputs' bytes) a few times; true if every
// call gave the first one's bytes.
template <typename Call>
bool SameEveryCall(const Call& call) {
  constexpr int kCalls = 8;
  const std::string first = call();
  bool same = true;
  for (int i = 1; i < kCalls; ++i) same &= call() == first;
  return same;
}

int mismatches = 0;

void Report(bool same, const char* what, const char* type, int threads,
            const XentParams& p) {
  if (same) return;
  ++mismatches;
  std::printf("%s %s threads=%d %lldx%lld from_logits=%d ls=%g: bits differ\n",
              what, type, threads, static_cast<long long>(p.num_rows),
              static_cast<long long>(p.num_classes), p.from_logits,
              static_cast<double>(p.label_smoothing));
}

template <typename T>
void CheckType(const char* type, int64_t n, int64_t c, std::mt19937* rng) {
  using Tacc = typename AccumulatorType<T>::type;
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  Buffer<T> logits(n * c), probs(n * c);
  Buffer<Tacc> soft(n * c), grad_loss(n);
  Buffer<int64_t> labels(n);
  for (int64_t r = 0; r < n; ++r) {
    float row = 0.0f, label_mass = 0.0f;
    for (int64_t k = 0; k < c; ++k) {
      const float v = u(*rng) < 0.2f ? 0.0f : u(*rng);
      probs[r * c + k] = static_cast<T>(v);
      row += v;
      logits[r * c + k] = static_cast<T>(8.0f * u(*rng) - 4.0f);
      soft[r * c + k] = static_cast<Tacc>(u(*rng));
      label_mass += static_cast<float>(soft[r * c + k]);
    }
    for (int64_t k = 0; k < c; ++k) {
      probs[r * c + k] =
          static_cast<T>(static_cast<float>(probs[r * c + k]) / row);
      soft[r * c + k] = static_cast<Tacc>(soft[r * c + k] / label_mass);
    }
    labels[r] = (*rng)() % c;
    grad_loss[r] = static_cast<Tacc>(0.5f + u(*rng));
  }
  for (const int threads : {1, 2}) {
    const CpuDevice d = tf_xent_ops::ThreadsDevice(threads);
    for (const bool from_logits : {true, false}) {
      for (const float ls : {0.0f, 0.1f}) {
        XentParams p;
        p.num_rows = n;
        p.num_classes = c;
        p.from_logits = from_logits;
        p.label_smoothing = ls;
        const Buffer<T>& x = from_logits ? logits : probs;
        Buffer<Tacc> normalizer(n);
        Buffer<DenseRowStats<Tacc>> row_stats(n);
        {
          Buffer<Tacc> loss(n);
          Run<tf_xent_ops::SparseXentForward<CpuDevice, T, int64_t>>(
              d, p, x.data(), labels.data(), loss.data(), normalizer.data());
          Run<tf_xent_ops::DenseXentForward<CpuDevice, T>>(
              d, p, x.data(), soft.data(), loss.data(), row_stats.data());
        }
        Report(SameEveryCall([&] {
                 Buffer<Tacc> loss(n), stat(n);
                 Run<tf_xent_ops::SparseXentForward<CpuDevice, T, int64_t>>(
                     d, p, x.data(), labels.data(), loss.data(), stat.data());
                 return Bytes(loss) + Bytes(stat);
               }),
               "sparse forward", type, threads, p);
        Report(SameEveryCall([&] {
                 Buffer<T> grad(n * c);
                 Run<tf_xent_ops::SparseXentBackward<CpuDevice, T, int64_t>>(
                     d, p, x.data(), labels.data(), normalizer.data(),
                     grad_loss.data(), grad.data());
                 return Bytes(grad);
               }),
               "sparse backward", type, threads, p);
        Report(SameEveryCall([&] {
                 Buffer<Tacc> loss(n);
                 Buffer<DenseRowStats<Tacc>> stats(n);
                 Run<tf_xent_ops::DenseXentForward<CpuDevice, T>>(
                     d, p, x.data(), soft.data(), loss.data(), stats.data());
                 return Bytes(loss) + Bytes(stats);
               }),
               "dense forward", type, threads, p);
        Report(SameEveryCall([&] {
                 Buffer<T> grad(n * c);
                 Run<tf_xent_ops::DenseXentBackward<CpuDevice, T>>(
                     d, p, x.data(), soft.data(), row_stats.data(),
                     grad_loss.data(), grad.data());
                 return Bytes(grad);
               }),
               "dense backward", type, threads, p);
        Report(SameEveryCall([&] {
                 Buffer<Tacc> grad(n * c);
                 Run<tf_xent_ops::DenseXentLabelsBackward<CpuDevice, T>>(
                     d, p, x.data(), row_stats.data(), grad_loss.data(),
                     grad.data());
                 return Bytes(grad);
               }),
               "dense labels backward", type, threads, p);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s _xent_cpu_<level>.so [seed]\n", argv[0]);
    return 2;
  }
  void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  const auto entry = library
                         ? reinterpret_cast<tf_xent_ops::CpuKernelsEntryPoint>(
                               dlsym(library, TFXENT_CPU_KERNELS_SYMBOL))
                         : nullptr;
  if (entry == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  kernels = entry();
  std::mt19937 rng(argc > 2 ? std::atoi(argv[2]) : 1);
  // Rows in transposed chunks (C < 32), single rows, several sum blocks.
  for (const auto& [n, c] : std::vector<std::pair<int64_t, int64_t>>{
           {300, 7}, {28, 629}, {9, 33}, {5, 2051}}) {
    CheckType<Eigen::half>("float16", n, c, &rng);
    CheckType<Eigen::bfloat16>("bfloat16", n, c, &rng);
    CheckType<float>("float32", n, c, &rng);
    CheckType<double>("float64", n, c, &rng);
  }
  std::printf("mismatches: %d\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}
