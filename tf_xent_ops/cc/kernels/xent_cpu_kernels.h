/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The CPU functors of one instruction-set level as a table of plain functions.

Each level (x86-64 baseline, AVX2 + FMA, AVX-512, or a native build) is a
shared library of its own, _xent_cpu_<level>.so, built from the CPU functor
files with that level's compiler flags and exporting one function,
TfXentCpuKernels(), which returns its table. The op library loads the level
it dispatches to (xent_cpu_dispatch.h) and calls the CPU functors through
that table. Libraries rather than translation units: every level
instantiates the same inline functions and templates of Eigen and the
standard library, and a linker merging them would keep one copy, compiled
for any one of the levels.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_CPU_KERNELS_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_CPU_KERNELS_H_

#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#include "Eigen/Core"  // Eigen::half, Eigen::bfloat16
#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace tf_xent_ops {

// One functor as a plain function of the functor's arguments.
template <typename Functor, typename Method = decltype(&Functor::operator())>
struct CpuEntry;
template <typename Functor, typename... Args>
struct CpuEntry<Functor, void (Functor::*)(Args...) const> {
  void (*fn)(Args...) = nullptr;
  // What a level's library puts in `fn`.
  static void Call(Args... args) { Functor()(args...); }
};

template <typename T>
using CpuEntriesOf =
    std::tuple<CpuEntry<SparseXentForward<CpuDevice, T, int32_t>>,
               CpuEntry<SparseXentForward<CpuDevice, T, int64_t>>,
               CpuEntry<SparseXentBackward<CpuDevice, T, int32_t>>,
               CpuEntry<SparseXentBackward<CpuDevice, T, int64_t>>,
               CpuEntry<DenseXentForward<CpuDevice, T>>,
               CpuEntry<DenseXentBackward<CpuDevice, T>>,
               CpuEntry<DenseXentLabelsBackward<CpuDevice, T>>>;

using CpuEntries = decltype(std::tuple_cat(
    std::declval<CpuEntriesOf<Eigen::half>>(),
    std::declval<CpuEntriesOf<Eigen::bfloat16>>(),
    std::declval<CpuEntriesOf<float>>(), std::declval<CpuEntriesOf<double>>()));

// Raised whenever the table, the functors' arguments or XentParams change: a
// level's library from another build is refused rather than misread.
constexpr int32_t kCpuKernelsVersion = 1;

struct CpuKernels {
  int32_t version = kCpuKernelsVersion;
  // What the two sides must agree on besides the version.
  int32_t size = sizeof(CpuKernels);
  int32_t params_size = sizeof(XentParams);
  int32_t device_size = sizeof(CpuDevice);
  const char* level = nullptr;  // A name in kCpuLevels.
  CpuEntries entries;

  // Whether a table another library made is one this build can call.
  bool Matches(const char* expected_level) const;
};

inline bool CpuKernels::Matches(const char* expected_level) const {
  const CpuKernels here;
  return version == here.version && size == here.size &&
         params_size == here.params_size && device_size == here.device_size &&
         level != nullptr && std::strcmp(level, expected_level) == 0;
}

// The function that runs `Functor` at the level of `kernels`.
template <typename Functor>
auto CpuFunction(const CpuKernels& kernels) {
  return std::get<CpuEntry<Functor>>(kernels.entries).fn;
}

// The exported entry point of a level's library.
#define TFXENT_CPU_KERNELS_SYMBOL "TfXentCpuKernels"
using CpuKernelsEntryPoint = const CpuKernels* (*)();

}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_CPU_KERNELS_H_
