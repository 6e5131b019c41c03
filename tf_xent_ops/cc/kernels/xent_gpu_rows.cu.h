/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

How the CUDA kernels visit rows. A row is computed by a group of threads: a
warp for rows of up to kMaxWarpRowClasses classes (eight rows per block),
else a whole block; rows are strided over the grid. A group reads its row in
16-byte pieces (a head and a tail of single elements where the row does not
start or end on a 16-byte boundary), kPiecesInFlight pieces in flight per
thread. Group reductions run in an order fixed by thread numbers, with no
atomics: results are bitwise reproducible. All offsets are int64.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_GPU_ROWS_CU_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_GPU_ROWS_CU_H_

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tf_xent_ops/cc/kernels/xent_row_math.h"

namespace tf_xent_ops {
namespace gpu {

constexpr int kBlockThreads = 256;
constexpr int kWarpThreads = 32;
constexpr int64_t kMaxBlocks = 1 << 20;
// Rows of at most this many classes are computed by a warp each: a block
// would leave most of its threads idle.
constexpr int64_t kMaxWarpRowClasses = 2048;
// 16-byte pieces a thread loads before it uses the first, so that enough
// bytes are in flight to cover the memory's latency.
constexpr int kPiecesInFlight = 4;
// Blocks per multiprocessor asked of ptxas by the 2-byte types' sparse
// forward and dense backward: at 4 they fit in 64 registers without spills,
// so more blocks (and more bytes) are in flight. The other kernels keep more
// per thread (or are double) and would spill under that cap.
template <typename T>
constexpr int kMinBlocksPerSm = sizeof(T) == 2 ? 4 : 0;

template <typename Tacc>
__device__ __forceinline__ Tacc Infinity() {
  return static_cast<Tacc>(INFINITY);
}

// exp(x) in the reductions and gradients. float: the hardware's base-2
// exponential of x log2(e) (2 ulp; results below 2^-126 flush to zero; for
// x within [-87, 0] the product's rounding adds |x| 2^-24 relative), a few
// instructions where expf takes about ten. double: exp.
__device__ __forceinline__ float FastExp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#else
  // The CPU emulation of CUDA (tests/gpu/emulation), as the GPU rounds:
  // the same product, ex2.approx's error at its bound (2^-22 relative, up or
  // down by the product's last bit; none at 0, where PTX gives 1 exactly),
  // and the flush to zero.
  const float t = x * 1.4426950408889634f;
  if (t == 0.0f) return 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  const float y =
      std::exp2(t) * (bits & 1u ? 1.0f + 0x1p-22f : 1.0f - 0x1p-22f);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
#endif
}
__device__ __forceinline__ double FastExp(double x) { return exp(x); }

// max(a, b), NaN-ignoring (one instruction): a NaN reaches the result
// through the sums instead.
__device__ __forceinline__ float Max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double Max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ int64_t Max(int64_t a, int64_t b) {
  return a > b ? a : b;
}

struct MaxOp {
  template <typename Tacc>
  __device__ Tacc operator()(Tacc a, Tacc b) const {
    return Max(a, b);
  }
};
struct SumOp {
  template <typename Tacc>
  __device__ Tacc operator()(Tacc a, Tacc b) const {
    return a + b;
  }
};

// The threads that compute one row: a warp or a whole block.
template <int kThreads>
struct Group {
  static_assert(kThreads == kWarpThreads || kThreads == kBlockThreads,
                "a row is computed by a warp or by a block");
  static constexpr int kSize = kThreads;
  static constexpr int kRowsPerBlock = kBlockThreads / kThreads;

  __device__ static int Lane() { return threadIdx.x % kThreads; }
  __device__ static int64_t FirstRow() {
    return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock +
           threadIdx.x / kThreads;
  }
  __device__ static int64_t RowStride() {
    return static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  }

  // Folds op over the group's values of each v[i]; every thread gets the
  // results, bitwise the same (the butterfly pairs operands commutatively,
  // and the block's warps are combined in warp order).
  template <int kN, typename Tacc, typename Op>
  __device__ static void Reduce(Tacc (&v)[kN], Op op) {
#pragma unroll
    for (int offset = kWarpThreads / 2; offset > 0; offset >>= 1) {
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], offset));
      }
    }
    if constexpr (kThreads > kWarpThreads) {
      constexpr int kWarps = kThreads / kWarpThreads;
      __shared__ Tacc partials[kN][kWarps];
      __syncthreads();  // The previous reduction's readers are done.
      if (threadIdx.x % kWarpThreads == 0) {
#pragma unroll
        for (int i = 0; i < kN; ++i)
          partials[i][threadIdx.x / kWarpThreads] = v[i];
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        Tacc total = partials[i][0];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) total = op(total, partials[i][w]);
        v[i] = total;
      }
    }
  }
};

// The length of a piece's array of values (kVec, or 1 for a single element).
template <typename Array>
constexpr int SizeOf = std::extent<std::remove_reference_t<Array>>::value;

template <typename Tacc, int kN>
__device__ __forceinline__ Tacc MaxOf(const Tacc (&v)[kN]) {
  Tacc m = -Infinity<Tacc>();
#pragma unroll
  for (int j = 0; j < kN; ++j) m = Max(m, v[j]);
  return m;
}

// A row of n elements of T starting at `row`, as a head of single elements
// up to the first 16-byte boundary, whole 16-byte pieces of kVec elements,
// and a tail of single elements.
template <typename T>
struct RowPieces {
  static constexpr int kVec = 16 / sizeof(T);
  int64_t head;    // elements before the first piece
  int64_t pieces;  // whole pieces
  int64_t tail;    // index of the first element after them

  __device__ RowPieces(const void* row, int64_t n) {
    const int64_t into = (reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T);
    head = into == 0 ? 0 : (kVec - into < n ? kVec - into : n);
    pieces = (n - head) / kVec;
    tail = head + pieces * kVec;
  }
};

// A piece's elements go through memcpy, not a T* into the uint4: that would
// break the aliasing rules, which an optimizing compiler may act on.
template <typename Tacc, typename T, int kVec>
__device__ __forceinline__ void Unpack(const uint4& piece, Tacc (&v)[kVec]) {
  static_assert(sizeof(T) * kVec == sizeof(uint4), "a piece is 16 bytes");
  T e[kVec];
  memcpy(e, &piece, sizeof(e));
#pragma unroll
  for (int j = 0; j < kVec; ++j) v[j] = static_cast<Tacc>(e[j]);
}

template <typename T, typename Tacc, int kVec>
__device__ __forceinline__ uint4 Pack(const Tacc (&v)[kVec]) {
  static_assert(sizeof(T) * kVec == sizeof(uint4), "a piece is 16 bytes");
  T e[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) e[j] = static_cast<T>(v[j]);
  uint4 piece;
  memcpy(&piece, e, sizeof(e));
  return piece;
}

// The values y_k .. y_{k+N-1} of a row beside the one visited (a row of
// dense labels), loaded with the visited row's piece so that both are in
// flight together; nothing where there is no such row (Tb void).
template <typename Tb, int kN>
struct Beside {
  Tb v[kN];
  __device__ static Beside Load(const Tb* y, int64_t k) {
    Beside b;
#pragma unroll
    for (int j = 0; j < kN; ++j) b.v[j] = y[k + j];
    return b;
  }
};
template <int kN>
struct Beside<void, kN> {
  __device__ static Beside Load(const void*, int64_t) { return {}; }
};
// The `beside` row of a row visited alone.
constexpr const void* kNoRowBeside = nullptr;

// Visits this thread's share of a row of n elements: element(k) for each
// single element (the head and the tail), piece(k, raw, b) for each 16-byte
// piece, raw holding x_k .. x_{k+kVec-1} and b the Beside values of the row
// `beside` at k. kPiecesInFlight pieces (and their Beside values) are loaded
// before the first is visited; the pieces stream past the caches (each
// element is read once).
template <int kThreads, typename T, typename Tb, typename Element,
          typename Piece>
__device__ __forceinline__ void VisitRow(const T* row, const Tb* beside,
                                         int64_t n, Element element,
                                         Piece piece) {
  constexpr int kVec = RowPieces<T>::kVec;
  using B = Beside<Tb, kVec>;
  const RowPieces<T> layout(row, n);
  const int lane = Group<kThreads>::Lane();
  for (int64_t k = lane; k < layout.head; k += kThreads) element(k);
  const uint4* pieces = reinterpret_cast<const uint4*>(row + layout.head);
  const auto first = [&](int64_t i) { return layout.head + i * kVec; };
  int64_t i = lane;
  for (; i + (kPiecesInFlight - 1) * kThreads < layout.pieces;
       i += kPiecesInFlight * kThreads) {
    uint4 raw[kPiecesInFlight];
    B b[kPiecesInFlight];
#pragma unroll
    for (int u = 0; u < kPiecesInFlight; ++u)
      raw[u] = __ldcs(pieces + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kPiecesInFlight; ++u)
      b[u] = B::Load(beside, first(i + u * kThreads));
#pragma unroll
    for (int u = 0; u < kPiecesInFlight; ++u) {
      piece(first(i + u * kThreads), raw[u], b[u]);
    }
  }
  for (; i < layout.pieces; i += kThreads) {
    piece(first(i), __ldcs(pieces + i), B::Load(beside, first(i)));
  }
  for (int64_t k = layout.tail + lane; k < n; k += kThreads) element(k);
}

// Calls fn(k, v, t) over this thread's share of a row of n elements: v an
// array of the values x_k .. x_{k+N-1} in Tacc (N is kVec for a piece, 1 for
// a single element), t their Beside values of the row `beside`.
template <int kThreads, typename Tacc, typename T, typename Tb, typename Fn>
__device__ __forceinline__ void ForEachPieceBeside(const T* row,
                                                   const Tb* beside, int64_t n,
                                                   Fn fn) {
  VisitRow<kThreads>(
      row, beside, n,
      [&](int64_t k) {
        const Tacc v[1] = {static_cast<Tacc>(row[k])};
        fn(k, v, Beside<Tb, 1>::Load(beside, k));
      },
      [&](int64_t k, const uint4& raw, const auto& t) {
        Tacc v[RowPieces<T>::kVec];
        Unpack<Tacc, T>(raw, v);
        fn(k, v, t);
      });
}

// fn(k, v) as ForEachPieceBeside's, for a row alone.
template <int kThreads, typename Tacc, typename T, typename Fn>
__device__ __forceinline__ void ForEachPiece(const T* row, int64_t n, Fn fn) {
  ForEachPieceBeside<kThreads, Tacc>(
      row, kNoRowBeside, n,
      [&](int64_t k, const auto& v, const auto&) { fn(k, v); });
}

// dx_k = fn(k, x) for this thread's share of a row, in pieces as
// ForEachPiece (fn(k, in, out) fills out[j] for x_{k+j}). dx may alias x:
// each piece is read before it is written, by the same thread.
template <int kThreads, typename Tacc, typename T, typename Fn>
__device__ __forceinline__ void MapPieces(const T* x, T* dx, int64_t n, Fn fn) {
  const auto element = [&](int64_t k) {
    const Tacc in[1] = {static_cast<Tacc>(x[k])};
    Tacc out[1];
    fn(k, in, out);
    dx[k] = static_cast<T>(out[0]);
  };
  if (reinterpret_cast<uintptr_t>(x) % 16 !=
      reinterpret_cast<uintptr_t>(dx) % 16) {
    // No pieces in common: element by element.
    for (int64_t k = Group<kThreads>::Lane(); k < n; k += kThreads) element(k);
    return;
  }
  VisitRow<kThreads>(x, kNoRowBeside, n, element,
                     [&](int64_t k, const uint4& raw, const auto&) {
                       Tacc in[RowPieces<T>::kVec], out[RowPieces<T>::kVec];
                       Unpack<Tacc, T>(raw, in);
                       fn(k, in, out);
                       __stcs(reinterpret_cast<uint4*>(dx + k), Pack<T>(out));
                     });
}

// A logit as the softmax sees it: soft-capped in the kernels for capped
// logits (kCapped), as it is. Resolved at compile time, so kernels without
// a cap are the same code as before caps existed.
template <bool kCapped, typename Tacc>
__device__ __forceinline__ Tacc LogitOf(const XentConstants<Tacc>& c, Tacc z) {
  if constexpr (kCapped) {
    return c.SoftCap(z);
  } else {
    return z;
  }
}

// The gradient with respect to a logit z of g_sum_t * softmax(z') - g_t,
// z' = LogitOf(z), for a row whose log-sum-exp (of z') is lse.
template <bool kCapped, typename Tacc>
__device__ __forceinline__ Tacc LogitGradOf(const XentConstants<Tacc>& c,
                                            Tacc g_sum_t, Tacc z, Tacc lse,
                                            Tacc g_t) {
  if constexpr (kCapped) {
    const Tacc t = c.CapTanh(z);
    return SoftmaxGrad(g_sum_t, FastExp(c.cap * t - lse), g_t) *
           (Tacc(1) - t * t);
  } else {
    return SoftmaxGrad(g_sum_t, FastExp(z - lse), g_t);
  }
}

// Where element `target` of a row falls in the piece of n elements starting
// at k: its index there, or -1. Once per piece, so that each element's test
// is a 32-bit compare with a constant.
__device__ __forceinline__ int IndexInPiece(int64_t target, int64_t k, int n) {
  const int64_t into = target - k;
  return into >= 0 && into < n ? static_cast<int>(into) : -1;
}

}  // namespace gpu
}  // namespace tf_xent_ops

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_GPU_ROWS_CU_H_
