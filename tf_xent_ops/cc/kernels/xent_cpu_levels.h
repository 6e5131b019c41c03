/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The CPU instruction-set levels the CPU functors are built for, and how the
one to run is chosen from TFXENT_CPU_ISA, what the build has and what the
CPU supports. Pure logic (xent_cpu_dispatch.cc supplies the facts), so that
it can be tested with any CPU.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_CPU_LEVELS_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_CPU_LEVELS_H_

#include <string>

namespace tf_xent_ops {

struct CpuLevel {
  const char* name;
  const char* needs;  // What the CPU must have, for error messages.
};

// Best first. "native" is a build for the build machine's own instruction
// set (the only level such a build has); the others are what the portable
// build ships, each in a library of its own.
inline constexpr CpuLevel kCpuLevels[] = {
    {"native", "the instruction set of the machine that built it"},
    {"avx512bf16",
     "AVX-512 F, CD, BW, DQ, VL and BF16 (x86-64-v4 and AVX512-BF16)"},
    {"avx512", "AVX-512 F, CD, BW, DQ and VL (x86-64-v4)"},
    {"avx2", "AVX2, FMA, F16C, BMI1 and BMI2 (x86-64-v3)"},
    {"baseline", "x86-64"},
};
inline constexpr int kNumCpuLevels =
    static_cast<int>(sizeof(kCpuLevels) / sizeof(kCpuLevels[0]));

struct CpuLevelChoice {
  int level = -1;  // Index into kCpuLevels, or -1 with `error` set.
  std::string error;
};

namespace internal {

// "a, b and c" of the levels `include(i)` selects, or "none".
template <typename Include>
std::string LevelList(Include include) {
  std::string names;
  for (int i = 0; i < kNumCpuLevels; ++i) {
    if (!include(i)) continue;
    if (!names.empty()) names += ", ";
    names += kCpuLevels[i].name;
  }
  return names.empty() ? "none" : names;
}

}  // namespace internal

// The level for TFXENT_CPU_ISA=`requested` ("" or "auto": the best level
// that is built and that the CPU supports). `built(i)` says whether this
// build has level i's library, `supported(i)` whether this CPU runs it.
template <typename Built, typename Supported>
CpuLevelChoice ChooseCpuLevel(const std::string& requested, Built built,
                              Supported supported) {
  CpuLevelChoice choice;
  const auto usable = [&](int i) { return built(i) && supported(i); };
  if (requested.empty() || requested == "auto") {
    for (int i = 0; i < kNumCpuLevels; ++i) {
      if (usable(i)) {
        choice.level = i;
        return choice;
      }
    }
    choice.error =
        "this build of tf_xent_ops has no CPU kernels this CPU runs "
        "(built: " +
        internal::LevelList(built) + ")";
    return choice;
  }
  for (int i = 0; i < kNumCpuLevels; ++i) {
    if (requested != kCpuLevels[i].name) continue;
    const std::string setting = "TFXENT_CPU_ISA=" + requested;
    if (!built(i)) {
      choice.error = setting + ", but this build of tf_xent_ops has no " +
                     requested +
                     " kernels (it has: " + internal::LevelList(built) + ")";
    } else if (!supported(i)) {
      choice.error = setting + ", but this CPU lacks " + kCpuLevels[i].needs +
                     " (levels it runs: " + internal::LevelList(usable) + ")";
    } else {
      choice.level = i;
    }
    return choice;
  }
  choice.error = "TFXENT_CPU_ISA=\"" + requested +
                 "\" is not a CPU level: use auto, avx512bf16, avx512, avx2 or "
                 "baseline (native in a native build)";
  return choice;
}

}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_CPU_LEVELS_H_
