/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

Rows of fewer than kSmallClasses classes on the CPU: too short for SIMD
packets one row at a time, so they are processed in chunks of kChunkRows.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_CPU_SMALL_CLASSES_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_CPU_SMALL_CLASSES_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tf_xent_ops/cc/kernels/xent_cpu_math.h"
#include "tf_xent_ops/cc/kernels/xent_cpu_rows.h"

namespace tf_xent_ops {
namespace {

// Rows of fewer classes than this are shorter than two SIMD packets: they are
// processed kChunkRows at a time. Forwards hold a chunk transposed (column k
// holds class k of every row, contiguous), so that every per-row reduction
// (max, sums) is an element-wise operation across rows; backwards, element-
// wise already, take the chunk as one flat array with the per-row values
// repeated. Either way exp, log and the arithmetic run on full SIMD packets.
// Chunk boundaries do not depend on the thread count, and a row's result
// does not depend on its chunk.
constexpr int64_t kSmallClasses = 32;
constexpr int64_t kChunkRows = 256;

template <typename Tacc>
using Columns = Eigen::Map<Eigen::Array<Tacc, Eigen::Dynamic, Eigen::Dynamic>>;
template <typename T>
using ConstRowMajorRows = Eigen::Map<
    const Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

// Per-thread scratch for chunks, transposed or flat.
template <typename T, typename Tacc>
class Chunk {
 public:
  explicit Chunk(const XentParams& p)
      : c_(p),
        num_classes_(p.num_classes),
        reader_(kChunkRows * num_classes_, c_.capped),
        x_(kChunkRows * num_classes_),
        t_(kChunkRows * num_classes_),
        work_(kChunkRows * num_classes_) {
    for (auto& e : expanded_) e.resize(kChunkRows * num_classes_);
  }

  // `rows` rows of predictions as one flat array, in place where T is Tacc.
  // Element-wise passes (the backward ones) need no transposition.
  ConstRow<Tacc> FlatPredictions(const T* data, int64_t rows) {
    return reader_.Read(data, rows * num_classes_);
  }
  // The same for soft-capped logits, as t = tanh(z / cap).
  ConstRow<Tacc> FlatCapTanh(const T* data, int64_t rows) {
    return reader_.ReadCapTanh(data, c_, rows * num_classes_);
  }
  // A flat [rows * C] array of per-row values (`per_row[i * stride]`), each
  // repeated C times, in expansion buffer `slot`.
  ConstRow<Tacc> Expand(int slot, const Tacc* per_row, int64_t stride,
                        int64_t rows) {
    Tacc* out = expanded_[slot].data();
    for (int64_t i = 0; i < rows; ++i) {
      std::fill(out + i * num_classes_, out + (i + 1) * num_classes_,
                per_row[i * stride]);
    }
    return ConstRow<Tacc>(out, rows * num_classes_);
  }

  // `rows` rows of predictions, transposed and widened to Tacc; logits
  // soft-capped where the op has a cap.
  Columns<Tacc> Predictions(const T* data, int64_t rows) {
    Columns<Tacc> x = Transposed(data, rows, x_.data());
    if (c_.capped) x = c_.SoftCap(x);
    return x;
  }
  // `rows` rows of dense labels, transposed.
  Columns<Tacc> Labels(const Tacc* data, int64_t rows) {
    return Transposed(data, rows, t_.data());
  }
  // A [rows, C] buffer for intermediate values.
  Columns<Tacc> Work(int64_t rows) {
    return Columns<Tacc>(work_.data(), rows, num_classes_);
  }

 private:
  template <typename S>
  Columns<Tacc> Transposed(const S* data, int64_t rows, Tacc* buffer) {
    Columns<Tacc> out(buffer, rows, num_classes_);
    out = ConstRowMajorRows<S>(data, rows, num_classes_).template cast<Tacc>();
    return out;
  }

  const XentConstants<Tacc> c_;
  int64_t num_classes_;
  RowReader<T, Tacc> reader_;
  Scratch<Tacc> x_, t_, work_;
  Scratch<Tacc> expanded_[3];
};

// A per-row vector of a chunk ([rows]) as a [rows, C] expression.
template <typename Vector>
auto PerRow(const Vector& v, int64_t num_classes) {
  return v.rowwise().replicate(num_classes);
}

// Runs chunk_fn(chunk, first_row, num_rows) over chunks of rows.
template <typename T, typename Tacc, typename ChunkFn>
void ForEachChunk(const CpuDevice& d, const XentParams& p,
                  const ChunkFn& chunk_fn) {
  if (p.num_rows == 0) return;
  const int64_t num_chunks = (p.num_rows + kChunkRows - 1) / kChunkRows;
  const int64_t cost = kChunkRows * p.num_classes * kCyclesPerElement;
  d.parallel_for(num_chunks, cost, [&](int64_t begin, int64_t end) {
    Chunk<T, Tacc> chunk(p);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = i * kChunkRows;
      chunk_fn(chunk, first, std::min(kChunkRows, p.num_rows - first));
    }
  });
}

template <typename Tacc>
using ChunkVector = Eigen::Array<Tacc, Eigen::Dynamic, 1>;

// For a chunk of logits x: the work buffer gets z - max (per row); returns
// the per-row max and log(sum_k exp(z_k - max)).
template <typename T, typename Tacc>
void ShiftedLogits(Chunk<T, Tacc>& chunk, const Columns<Tacc>& x,
                   ChunkVector<Tacc>* row_max, ChunkVector<Tacc>* log_s) {
  Columns<Tacc> shifted = chunk.Work(x.rows());
  *row_max = x.rowwise().maxCoeff();
  shifted = x - PerRow(*row_max, x.cols());
  *log_s = LogOf(ExpUpTo88(shifted).rowwise().sum());
}

}  // namespace
}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_CPU_SMALL_CLASSES_H_
