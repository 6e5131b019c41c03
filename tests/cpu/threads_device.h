/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

A CpuDevice for programs that call the CPU functors without TensorFlow: its
shards run on one std::thread each (or inline for one thread), as
TensorFlow's intra-op pool would run them.
*/
#ifndef TF_XENT_OPS_TESTS_CPU_THREADS_DEVICE_H_
#define TF_XENT_OPS_TESTS_CPU_THREADS_DEVICE_H_

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace tf_xent_ops {

inline CpuDevice ThreadsDevice(int threads) {
  CpuDevice d;
  d.parallel_for = [threads](int64_t total, int64_t,
                             const CpuDevice::ShardFn& fn) {
    if (threads == 1) return fn(0, total);
    std::vector<std::thread> pool;
    const int64_t per = (total + threads - 1) / threads;
    for (int64_t begin = 0; begin < total; begin += per) {
      pool.emplace_back([=, &fn] { fn(begin, std::min(total, begin + per)); });
    }
    for (auto& t : pool) t.join();
  };
  return d;
}

}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_TESTS_CPU_THREADS_DEVICE_H_
