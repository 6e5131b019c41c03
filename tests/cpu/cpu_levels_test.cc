/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

ChooseCpuLevel (xent_cpu_levels.h) for CPUs and builds this machine may not
be: prints one line per case, "<requested>|<built>|<supported>|<choice or
error>", which tests/test_cpu_isa.py checks.
*/
#include <cstdio>
#include <string>

#include "tf_xent_ops/cc/kernels/xent_cpu_levels.h"

namespace {

// `levels`: a string of level names separated by spaces.
bool Has(const std::string& levels, int i) {
  return (" " + levels + " ")
             .find(std::string(" ") + tf_xent_ops::kCpuLevels[i].name + " ") !=
         std::string::npos;
}

}  // namespace

int main(int argc, char** argv) {
  // Arguments in threes: requested level, built levels, supported levels.
  for (int a = 1; a + 2 < argc; a += 3) {
    const std::string built = argv[a + 1], supported = argv[a + 2];
    const tf_xent_ops::CpuLevelChoice choice = tf_xent_ops::ChooseCpuLevel(
        argv[a], [&](int i) { return Has(built, i); },
        [&](int i) { return Has(supported, i); });
    std::printf("%s|%s|%s|%s\n", argv[a], built.c_str(), supported.c_str(),
                choice.level >= 0 ? tf_xent_ops::kCpuLevels[choice.level].name
                                  : choice.error.c_str());
  }
  return 0;
}
