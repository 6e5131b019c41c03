/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The emulation's own controls, linked beside tests/gpu/harness.cu into the
emulated harness (tests/gpu/harness.py): the seed of the fibers' order, and
the message of the first failure (a barrier not every thread reaches).
*/
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda_runtime.h"

extern "C" {

void tfxent_emulation_set_seed(uint64_t seed) {
  tfxent_emulation::SetSeed(seed);
}

// Copies the first failure's message since the last call into buffer (empty
// if none) and clears it; returns its length.
int tfxent_emulation_take_error(char* buffer, int size) {
  const std::string error = tfxent_emulation::TakeError();
  if (size > 0) {
    const size_t n = std::min(error.size(), static_cast<size_t>(size - 1));
    std::memcpy(buffer, error.data(), n);
    buffer[n] = '\0';
  }
  return static_cast<int>(error.size());
}

}  // extern "C"
