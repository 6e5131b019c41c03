/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The entry point of one CPU level's library (_xent_cpu_<level>.so): its
table of functors. Built once per level, with TFXENT_CPU_LEVEL naming it,
together with the CPU functor files and the same compiler flags.
*/
#include <tuple>

#include "tf_xent_ops/cc/kernels/xent_cpu_kernels.h"

#ifndef TFXENT_CPU_LEVEL
#error "TFXENT_CPU_LEVEL must name the level this library is built for"
#endif

namespace tf_xent_ops {
namespace {

template <typename... Entries>
void FillEntries(std::tuple<Entries...>* entries) {
  ((std::get<Entries>(*entries).fn = &Entries::Call), ...);
}

CpuKernels MakeKernels() {
  CpuKernels kernels;
  kernels.level = TFXENT_CPU_LEVEL;
  FillEntries(&kernels.entries);
  return kernels;
}

}  // namespace
}  // namespace tf_xent_ops

extern "C" __attribute__((visibility("default"))) const tf_xent_ops::CpuKernels*
TfXentCpuKernels() {
  static const tf_xent_ops::CpuKernels kernels = tf_xent_ops::MakeKernels();
  return &kernels;
}
