/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

The CPU functors timed alone, without TensorFlow's executor or Keras around
them: what the kernels themselves cost, for comparing versions of a kernel.
Inputs are built once and reused (so at small sizes they sit in the caches);
backwards write into their own input, as the op does when it can reuse the
predictions' buffer. Prints the minimum over repetitions, the least noisy
figure on a shared machine. `make bench-functors` builds and runs it.

    functor_bench N C [repetitions [float32|bfloat16|float16]]
*/
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "Eigen/Core"  // Eigen::half and Eigen::bfloat16.
#include "tests/cpu/threads_device.h"
#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace {

using tf_xent_ops::CpuDevice;
using tf_xent_ops::ThreadsDevice;
using tf_xent_ops::XentParams;

template <typename Fn>
double MinMs(int repetitions, const Fn& fn) {
  fn();
  double best = 1e30;
  for (int i = 0; i < repetitions; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double, std::milli>(
                              std::chrono::steady_clock::now() - start)
                              .count());
  }
  return best;
}

// Times every functor on predictions of T (labels and losses in float).
template <typename T>
void Run(const CpuDevice& d, int threads, int64_t n, int64_t c, int reps,
         const char* dtype) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<T> logits(n * c), probs(n * c), work(n * c);
  std::vector<float> onehot(n * c, 0.0f), loss(n), normalizer(n),
      grad_loss(n, 1.0f / n);
  std::vector<tf_xent_ops::DenseRowStats<float>> row_stats(n);
  std::vector<int64_t> labels(n);
  std::vector<float> z(c);
  for (int64_t r = 0; r < n; ++r) {
    labels[r] = rng() % c;
    onehot[r * c + labels[r]] = 1.0f;
    for (int64_t k = 0; k < c; ++k) {
      logits[r * c + k] = static_cast<T>(normal(rng));
      z[k] = static_cast<float>(logits[r * c + k]);
    }
    const float m = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (int64_t k = 0; k < c; ++k) sum += std::exp(z[k] - m);
    for (int64_t k = 0; k < c; ++k) {
      probs[r * c + k] = static_cast<T>(std::exp(z[k] - m) / sum);
    }
  }
  std::printf("%lld x %lld %s, %d threads, min of %d (ms)\n",
              static_cast<long long>(n), static_cast<long long>(c), dtype,
              threads, reps);
  const double copy_ms = MinMs(
      reps, [&] { std::copy(logits.begin(), logits.end(), work.begin()); });
  std::printf("copy (read + write): %.3f ms, %.1f GB/s\n", copy_ms,
              2.0 * n * c * sizeof(T) / copy_ms / 1e6);

  // Logits and probabilities, with and without smoothing; logits with a
  // z-loss, alone and with a soft cap (Gemma 2's 30).
  struct Config {
    bool from_logits;
    float ls;
    double z_loss, cap;
  };
  for (const Config& config :
       {Config{true, 0.0f, 0, 0}, Config{true, 0.1f, 0, 0},
        Config{true, 0.0f, 1e-4, 0.0}, Config{true, 0.0f, 1e-4, 30.0},
        Config{false, 0.0f, 0, 0}, Config{false, 0.1f, 0, 0}}) {
    const bool from_logits = config.from_logits;
    const std::vector<T>& x = from_logits ? logits : probs;
    XentParams p;
    p.num_rows = n;
    p.num_classes = c;
    p.from_logits = from_logits;
    p.label_smoothing = config.ls;
    p.z_loss = config.z_loss;
    p.logit_soft_cap = config.cap;
    const double sparse_fwd = MinMs(reps, [&] {
      tf_xent_ops::SparseXentForward<CpuDevice, T, int64_t>()(
          d, p, x.data(), labels.data(), loss.data(), normalizer.data());
    });
    std::copy(x.begin(), x.end(), work.begin());
    const double sparse_bwd = MinMs(reps, [&] {
      tf_xent_ops::SparseXentBackward<CpuDevice, T, int64_t>()(
          d, p, work.data(), labels.data(), normalizer.data(), grad_loss.data(),
          work.data());
    });
    const double dense_fwd = MinMs(reps, [&] {
      tf_xent_ops::DenseXentForward<CpuDevice, T>()(
          d, p, x.data(), onehot.data(), loss.data(), row_stats.data());
    });
    std::copy(x.begin(), x.end(), work.begin());
    const double dense_bwd = MinMs(reps, [&] {
      tf_xent_ops::DenseXentBackward<CpuDevice, T>()(
          d, p, work.data(), onehot.data(), row_stats.data(), grad_loss.data(),
          work.data());
    });
    std::printf(
        "%-6s ls=%.1f  sparse fwd %7.3f  bwd %7.3f  |  dense fwd %7.3f  bwd "
        "%7.3f%s\n",
        from_logits ? "logits" : "probs", config.ls, sparse_fwd, sparse_bwd,
        dense_fwd, dense_bwd,
        config.cap > 0 ? "  z_loss=1e-4 cap=30"
                       : (config.z_loss > 0 ? "  z_loss=1e-4" : ""));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: %s N C [repetitions [float32|bfloat16|float16]]\n",
                 argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[1]), c = std::atoll(argv[2]);
  const int reps = argc > 3 ? std::atoi(argv[3]) : 50;
  const std::string dtype = argc > 4 ? argv[4] : "float32";
  const int threads = std::max(1u, std::thread::hardware_concurrency());
  const CpuDevice d = ThreadsDevice(threads);
  if (dtype == "float32") {
    Run<float>(d, threads, n, c, reps, "float32");
  } else if (dtype == "bfloat16") {
    Run<Eigen::bfloat16>(d, threads, n, c, reps, "bfloat16");
  } else if (dtype == "float16") {
    Run<Eigen::half>(d, threads, n, c, reps, "float16");
  } else {
    std::fprintf(stderr, "unknown dtype %s: float32, bfloat16 or float16\n",
                 dtype.c_str());
    return 2;
  }
  return 0;
}
