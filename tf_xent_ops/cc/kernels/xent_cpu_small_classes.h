/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

Rows of fewer than kSmallClasses classes on the CPU: too short for SIMD
packets one row at a time, so they are processed in chunks of kChunkRows.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_CPU_SMALL_CLASSES_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_CPU_SMALL_CLASSES_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>
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
// does not depend on its chunk or its place in it: a chunk's rows are padded
// (with zeros) to a multiple of kRowPacket in aligned scratch, so that no
// element falls in the part Eigen takes apart (before the first aligned
// address, after the last whole packet), whose scalar functions' last bits
// differ from the packets'.
constexpr int64_t kSmallClasses = 32;
constexpr int64_t kChunkRows = 256;
// A multiple of every level's packet size (16 floats at avx512).
constexpr int64_t kRowPacket = 16;
static_assert(kChunkRows % kRowPacket == 0);

// A chunk of `rows` rows as the kernels compute it.
inline int64_t PaddedRows(int64_t rows) {
  return (rows + kRowPacket - 1) / kRowPacket * kRowPacket;
}

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
        reader_(kChunkRows * num_classes_),
        x_(kChunkRows * num_classes_),
        t_(kChunkRows * num_classes_),
        work_(kChunkRows * num_classes_) {
    for (auto& e : expanded_) e.resize(kChunkRows * num_classes_);
  }

  // Flat arrays, for the element-wise passes (the backward ones): each is
  // [PaddedRows(rows) * C], and WriteChunk writes the first rows * C.

  // `rows` rows of predictions, in place where T is Tacc and no padding is
  // needed.
  ConstRow<Tacc> FlatPredictions(const T* data, int64_t rows) {
    if constexpr (std::is_same_v<T, Tacc>) {
      if (rows == PaddedRows(rows))
        return ConstRow<Tacc>(data, rows * num_classes_);
    }
    return Flat(data, rows, reader_.data());
  }
  // The same for soft-capped logits, as t = tanh(z / cap).
  ConstRow<Tacc> FlatCapTanh(const T* data, int64_t rows) {
    ConstRow<Tacc> z = Flat(data, rows, reader_.data());
    MutableRow<Tacc>(reader_.data(), z.size()) = c_.CapTanh(z);
    return z;
  }
  // `rows` rows of dense labels, in place where no padding is needed.
  ConstRow<Tacc> FlatLabels(const Tacc* data, int64_t rows) {
    if (rows == PaddedRows(rows))
      return ConstRow<Tacc>(data, rows * num_classes_);
    return Flat(data, rows, t_.data());
  }
  // Per-row values (`per_row[i * stride]`), each repeated C times, in
  // expansion buffer `slot`.
  ConstRow<Tacc> Expand(int slot, const Tacc* per_row, int64_t stride,
                        int64_t rows) {
    Tacc* out = expanded_[slot].data();
    for (int64_t i = 0; i < rows; ++i) {
      std::fill(out + i * num_classes_, out + (i + 1) * num_classes_,
                per_row[i * stride]);
    }
    const int64_t size = PaddedRows(rows) * num_classes_;
    std::fill(out + rows * num_classes_, out + size, Tacc(0));
    return ConstRow<Tacc>(out, size);
  }

  // Columns: [PaddedRows(rows), C], the rows after `rows` zeros.

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
  // A buffer for intermediate values of the shape of `x`.
  Columns<Tacc> Work(const Columns<Tacc>& x) {
    return Columns<Tacc>(work_.data(), x.rows(), num_classes_);
  }

 private:
  template <typename S>
  ConstRow<Tacc> Flat(const S* data, int64_t rows, Tacc* buffer) {
    const int64_t n = rows * num_classes_;
    const int64_t size = PaddedRows(rows) * num_classes_;
    MutableRow<Tacc>(buffer, n) =
        Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(data, n)
            .template cast<Tacc>();
    std::fill(buffer + n, buffer + size, Tacc(0));
    return ConstRow<Tacc>(buffer, size);
  }
  template <typename S>
  Columns<Tacc> Transposed(const S* data, int64_t rows, Tacc* buffer) {
    Columns<Tacc> out(buffer, PaddedRows(rows), num_classes_);
    out.topRows(rows) =
        ConstRowMajorRows<S>(data, rows, num_classes_).template cast<Tacc>();
    out.bottomRows(out.rows() - rows).setZero();
    return out;
  }

  const XentConstants<Tacc> c_;
  int64_t num_classes_;
  Scratch<Tacc> reader_, x_, t_, work_;
  Scratch<Tacc> expanded_[3];
};

// Writes the first `size` elements of `value`, an expression in Tacc over a
// chunk's flat arrays, to `out` in T: in packets from the first element, the
// last elements that fill no packet in a whole packet too (the padding makes
// the arrays readable that far), so that every element takes the packet path
// wherever its row lies.
template <typename T, typename Expr>
void WriteChunk(T* out, Eigen::Index size, const Expr& value) {
  namespace ei = Eigen::internal;
  const auto as_t = value.template cast<T>();
  using AsT = std::decay_t<decltype(as_t)>;
  constexpr Eigen::Index kSize =
      ei::unpacket_traits<typename ei::packet_traits<T>::type>::size;
  static_assert(kRowPacket % kSize == 0);
  if constexpr (ei::evaluator<AsT>::Flags & Eigen::PacketAccessBit) {
    WriteFromFirstElement</*kReadablePastEnd=*/true>(out, size, as_t);
  } else {  // No packets of T at this level: every element is scalar.
    const ei::evaluator<AsT> eval(as_t);
    for (Eigen::Index i = 0; i < size; ++i) out[i] = eval.coeff(i);
  }
}

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
  Columns<Tacc> shifted = chunk.Work(x);
  *row_max = x.rowwise().maxCoeff();
  shifted = x - PerRow(*row_max, x.cols());
  *log_s = LogOf(ExpUpTo88(shifted).rowwise().sum());
}

}  // namespace
}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_CPU_SMALL_CLASSES_H_
