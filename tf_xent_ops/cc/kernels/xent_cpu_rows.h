/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

Row access for the CPU functors: rows as Eigen arrays in the accumulation
type, read in place or widened a row at a time (never [N, C]), written back
from an expression, and sharded over the device's thread pool with each row
computed start to finish by one thread, so a row's result does not depend on
the thread count.

The xent_cpu_*.h headers are the private implementation of the CPU functor
files (xent_functor_cpu_*.cc) and give what they define internal linkage (an
unnamed namespace), as when it all was one file: GCC allocates registers in
the hot loops of file-local functions better than in inline ones.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_CPU_ROWS_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_CPU_ROWS_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "Eigen/Core"  // Eigen::half, Eigen::bfloat16 and the array expressions.
#include "tf_xent_ops/cc/kernels/xent_row_math.h"

namespace tf_xent_ops {

// Where() on Eigen boolean arrays is Eigen's select().
template <typename Cond>
struct WhereImpl<
    Cond, std::enable_if_t<std::is_base_of_v<Eigen::ArrayBase<Cond>, Cond>>> {
  template <typename A, typename B>
  static auto Apply(const Cond& cond, const A& a, const B& b) {
    return cond.select(a, b);
  }
};

namespace {

// Rough cycles per element of one row pass, for the thread pool's sharding.
constexpr int64_t kCyclesPerElement = 10;
// Partial sums of this many elements (SIMD lanes, Eigen's tree of packets)
// are combined with a compensated sum: accurate whatever C is.
constexpr Eigen::Index kSumBlock = 1024;

template <typename Tacc>
using ConstRow = Eigen::Map<const Eigen::Array<Tacc, Eigen::Dynamic, 1>>;
// Per-thread scratch, aligned as TensorFlow aligns tensors. Eigen splits a
// reduction or an assignment at the first aligned address (the elements
// before it take its scalar path), so the bits a row gets must not depend on
// where malloc happened to put the scratch: aligned, they never do.
template <typename Tacc>
using Scratch = std::vector<Tacc, Eigen::aligned_allocator<Tacc>>;
template <typename T>
using MutableRow = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;

// The sum of e's elements [begin, end), from its first element whatever its
// address: Eigen's sum() of an expression with direct access (a row read in
// place) starts its packets at the first aligned address and adds the
// elements before it apart, so a row's sum, and its loss, would depend on
// where the row lies in the batch; that of any other expression starts at
// its first element.
template <typename Expr>
typename Expr::Scalar SegmentSum(const Expr& e, Eigen::Index begin,
                                 Eigen::Index end) {
  if constexpr (!(Expr::Flags & Eigen::DirectAccessBit)) {
    return e.segment(begin, end - begin).sum();
  } else {
    namespace ei = Eigen::internal;
    using Scalar = typename Expr::Scalar;
    using Packet = typename ei::packet_traits<Scalar>::type;
    constexpr Eigen::Index kSize = ei::packet_traits<Scalar>::size;
    const Scalar* data = e.data();
    const Eigen::Index full = begin + (end - begin) / kSize * kSize;
    const Eigen::Index pairs = begin + (end - begin) / (2 * kSize) * 2 * kSize;
    // Two chains of packets, so that their adds overlap.
    Packet even = ei::pset1<Packet>(Scalar(0)), odd = even;
    for (Eigen::Index i = begin; i < pairs; i += 2 * kSize) {
      even = ei::padd(even, ei::ploadu<Packet>(data + i));
      odd = ei::padd(odd, ei::ploadu<Packet>(data + i + kSize));
    }
    if (pairs < full) even = ei::padd(even, ei::ploadu<Packet>(data + pairs));
    Scalar sum = ei::predux(ei::padd(even, odd));
    for (Eigen::Index i = full; i < end; ++i) sum += data[i];
    return sum;
  }
}

template <typename Expr>
typename Expr::Scalar BlockedSum(const Expr& e) {
  using Scalar = typename Expr::Scalar;
  const Eigen::Index n = e.size();
  CompensatedSum<Scalar> total;
  for (Eigen::Index b = 0; b < n; b += kSumBlock) {
    total.Add(SegmentSum(e, b, std::min(n, b + kSumBlock)));
  }
  return total.Total();
}

// Rows of T as arrays of Tacc: float and double rows are read in place;
// 16-bit rows are widened into a buffer of one row per thread (never [N, C]).
// Soft-capped logits are transformed into that buffer (for every T): the
// logits forwards read z' = cap * tanh(z / cap), the backwards
// t = tanh(z / cap), one tanh per element either way, a block of kSumBlock
// classes at a time (rows of few classes: see Chunk). (A pass of its own over
// a block in L1 is faster than the tanh inside the passes that reduce or
// write it.)
template <typename T, typename Tacc>
class RowReader {
 public:
  // Reads of at most `size` elements, into the buffer for every T if
  // `transforms`.
  RowReader(int64_t size, bool transforms)
      : size_(size),
        buffer_(std::is_same_v<T, Tacc> && !transforms ? 0 : size) {}
  // Rows of the op's predictions.
  explicit RowReader(const XentParams& p)
      : RowReader(p.num_classes, XentConstants<Tacc>(p).capped) {}

  ConstRow<Tacc> Read(const T* row) { return Read(row, size_); }

  // `count` (at most the constructor's size) contiguous elements.
  ConstRow<Tacc> Read(const T* data, int64_t count) {
    if constexpr (std::is_same_v<T, Tacc>) {
      return ConstRow<Tacc>(data, count);
    } else {
      return Store(Widened(data, count));
    }
  }
  // z' = cap * tanh(z / cap) of `count` logits.
  ConstRow<Tacc> ReadSoftCapped(const T* data, int64_t count,
                                const XentConstants<Tacc>& c) {
    return Store(c.SoftCap(Widened(data, count)));
  }
  // t = tanh(z / cap) of `count` logits.
  ConstRow<Tacc> ReadCapTanh(const T* data, const XentConstants<Tacc>& c,
                             int64_t count) {
    return Store(c.CapTanh(Widened(data, count)));
  }

 private:
  static auto Widened(const T* data, int64_t count) {
    return Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(data, count)
        .template cast<Tacc>();
  }
  template <typename Expr>
  ConstRow<Tacc> Store(const Expr& values) {
    MutableRow<Tacc>(buffer_.data(), values.size()) = values;
    return ConstRow<Tacc>(buffer_.data(), values.size());
  }

  int64_t size_;
  Scratch<Tacc> buffer_;
};

// Writes `value` to `row` in packets from its first element. The last
// elements that fill no packet take the scalar path; or, where `value`'s
// operands can be read to the next whole packet (kReadablePastEnd), a whole
// packet of which only they are stored.
template <bool kReadablePastEnd = false, typename Expr>
void WriteFromFirstElement(typename Expr::Scalar* row, Eigen::Index size,
                           const Expr& value) {
  namespace ei = Eigen::internal;
  using Scalar = typename Expr::Scalar;
  using Packet = typename ei::packet_traits<Scalar>::type;
  constexpr Eigen::Index kSize = ei::unpacket_traits<Packet>::size;
  const ei::evaluator<Expr> eval(value);
  const Eigen::Index full = size / kSize * kSize;
  for (Eigen::Index i = 0; i < full; i += kSize) {
    ei::pstoreu(row + i, eval.template packet<Eigen::Unaligned, Packet>(i));
  }
  if constexpr (kReadablePastEnd) {
    if (full < size) {
      EIGEN_ALIGN_MAX Scalar tail[kSize];
      ei::pstoreu(tail, eval.template packet<Eigen::Unaligned, Packet>(full));
      std::copy(tail, tail + (size - full), row + full);
    }
  } else {
    for (Eigen::Index i = full; i < size; ++i) row[i] = eval.coeff(i);
  }
}

// Writes an expression to a row of its scalar type. Eigen's assignment takes
// the elements before the first aligned address and after the last whole
// packet apart: as one masked packet where the packet type has masked forms
// (float and double at avx2 and avx512, see xent_cpu_math.h), the same bits
// as the packet path; else on the scalar path, whose functions' last bits
// differ, so that a row's gradient would depend on where the row lies in the
// batch. There the row is written in packets from its first element.
template <typename Expr>
void WriteInPlace(typename Expr::Scalar* row, Eigen::Index size,
                  const Expr& value) {
  namespace ei = Eigen::internal;
  using Scalar = typename Expr::Scalar;
  using Packet = typename ei::packet_traits<Scalar>::type;
  if constexpr ((ei::evaluator<Expr>::Flags & Eigen::PacketAccessBit) &&
                !ei::has_packet_segment<Packet>::value) {
    WriteFromFirstElement(row, size, value);
  } else {
    MutableRow<Scalar>(row, size) = value;
  }
}

// Writes an expression in Tacc to a row of T.
template <typename T, typename Expr>
void WriteRow(T* row, int64_t num_classes, const Expr& value) {
  using Tacc = typename Expr::Scalar;
  if constexpr (std::is_same_v<T, Tacc>) {
    WriteInPlace(row, num_classes, value);
  } else {
    WriteInPlace(row, num_classes, value.template cast<T>());
  }
}

// Runs row_fn(reader, r) for every row on the device's thread pool, with one
// Reader (a RowReader or a LogitsRowReducer) per shard.
template <typename T, typename Tacc, typename Reader = RowReader<T, Tacc>,
          typename RowFn>
void ForEachRow(const CpuDevice& d, const XentParams& p, const RowFn& row_fn) {
  if (p.num_rows == 0) return;
  const int64_t cost = std::max<int64_t>(1, p.num_classes) * kCyclesPerElement;
  d.parallel_for(p.num_rows, cost, [&](int64_t begin, int64_t end) {
    Reader reader(p);
    for (int64_t r = begin; r < end; ++r) row_fn(reader, r);
  });
}

}  // namespace
}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_CPU_ROWS_H_
