/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

Which CPU level's functors the op library runs (xent_cpu_kernels.h): chosen
on first use from TFXENT_CPU_ISA (default auto: the best level the build has
and the CPU supports) and loaded from the library's own directory. A C API
lets Python report and, for tests and benchmarks, switch the level.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_CPU_DISPATCH_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_CPU_DISPATCH_H_

#include <string>

#include "tf_xent_ops/cc/kernels/xent_cpu_kernels.h"

namespace tf_xent_ops {

// The kernels of the level in use, or nullptr if TFXENT_CPU_ISA asks for a
// level this build or this CPU does not have (the reason in *error).
const CpuKernels* CpuKernelsInUse(std::string* error);

}  // namespace tf_xent_ops

extern "C" {
// The level in use ("avx512bf16", "avx2", ... or "native"), or NULL if
// none can be (the reason in TfXentCpuIsaError()).
const char* TfXentCpuIsa();
const char* TfXentCpuIsaError();
// The levels this build has and this CPU runs, best first, comma-separated.
const char* TfXentCpuIsasAvailable();
// Switches to `level` for the calls that follow: NULL, or why it cannot.
const char* TfXentUseCpuIsa(const char* level);
}

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_CPU_DISPATCH_H_
