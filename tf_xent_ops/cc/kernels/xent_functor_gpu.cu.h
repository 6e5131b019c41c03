/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

CUDA specializations of the cross-entropy functors, generic over the element
type: the TensorFlow build instantiates them in xent_functor_gpu.cu.cc and the
standalone harness (tests/gpu/) in its own file, both with CUDA's __half and
__nv_bfloat16. No TensorFlow or Eigen header is included here.

A row is computed by a group of threads: a warp for rows of up to
kMaxWarpRowClasses classes (eight rows per block), else a whole block; rows
are strided over the grid. A group reads its row in 16-byte pieces (a head
and a tail of single elements where the row does not start or end on a
16-byte boundary), several pieces in flight per thread. Logits forwards read
the row once: each thread keeps its sums relative to the largest logit it
has seen (moving them when that grows), and the group combines them relative
to the row max. Reductions run in an order fixed by thread numbers, with no
atomics: results are bitwise reproducible. All offsets are int64.
Sparse labels outside [0, C) that are not ignore_class are never read
through: that row's loss and log_sum_exp are NaN and its gradient is 0 (the
CPU op raises instead; TensorFlow's GPU kernel gives NaN too).
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_GPU_CU_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_GPU_CU_H_

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tf_xent_ops/cc/kernels/xent_functor.h"

namespace tf_xent_ops {
namespace gpu {

// Tuning knobs, defined at build time only to measure other values
// (bench/gpu_session.sh builds such variants of the harness).
#ifndef TFXENT_GPU_MAX_WARP_ROW_CLASSES
#define TFXENT_GPU_MAX_WARP_ROW_CLASSES 2048
#endif
#ifndef TFXENT_GPU_PIECES_IN_FLIGHT
#define TFXENT_GPU_PIECES_IN_FLIGHT 4
#endif
// Blocks of 256 threads each multiprocessor must be able to hold, for the
// kernels that ask kMinBlocksPerSm or kSparseBackwardMinBlocks; 0: no
// minimum (ptxas picks).
#ifndef TFXENT_GPU_MIN_BLOCKS_PER_SM
#define TFXENT_GPU_MIN_BLOCKS_PER_SM 4
#endif
#ifndef TFXENT_GPU_SPARSE_BACKWARD_MIN_BLOCKS
#define TFXENT_GPU_SPARSE_BACKWARD_MIN_BLOCKS 0
#endif

constexpr int kBlockThreads = 256;
constexpr int kWarpThreads = 32;
constexpr int64_t kMaxBlocks = 1 << 20;
// Rows of at most this many classes are computed by a warp each: a block
// would leave most of its threads idle.
constexpr int64_t kMaxWarpRowClasses = TFXENT_GPU_MAX_WARP_ROW_CLASSES;
// 16-byte pieces a thread loads before it uses the first, so that enough
// bytes are in flight to cover the memory's latency.
constexpr int kPiecesInFlight = TFXENT_GPU_PIECES_IN_FLIGHT;
// The minimum asked by the 2-byte types' sparse forward and dense backward:
// at 4, ptxas fits them in 64 registers without spills (73-80 unset), so 4
// blocks per SM instead of 3 and more bytes in flight: up to 17% faster
// forwards on an H200 (bench/GPU_NOTES.md, v3.3). The other kernels keep
// more per thread (or are double) and would spill under that cap.
template <typename T>
constexpr int kMinBlocksPerSm =
    sizeof(T) == 2 ? TFXENT_GPU_MIN_BLOCKS_PER_SM : 0;
// The 2-byte types' sparse backward, unbounded, takes 64 registers, and ptxas
// then issues the third and fourth of a thread's pieces only after the first
// has arrived (two waits per round); at 3 (80 registers) all four go out
// before the first is used (bench/sass_loads.py), yet on an H200 that was no
// faster (1%, within noise), so 0 stays the default.
template <typename T>
constexpr int kSparseBackwardMinBlocks =
    sizeof(T) == 2 ? TFXENT_GPU_SPARSE_BACKWARD_MIN_BLOCKS : 0;

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

template <typename Tacc, typename T, int kVec>
__device__ __forceinline__ void Unpack(const uint4& piece, Tacc (&v)[kVec]) {
  const T* e = reinterpret_cast<const T*>(&piece);
#pragma unroll
  for (int j = 0; j < kVec; ++j) v[j] = static_cast<Tacc>(e[j]);
}

template <typename T, typename Tacc, int kVec>
__device__ __forceinline__ uint4 Pack(const Tacc (&v)[kVec]) {
  uint4 piece;
  T* e = reinterpret_cast<T*>(&piece);
#pragma unroll
  for (int j = 0; j < kVec; ++j) e[j] = static_cast<T>(v[j]);
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

// What a LogitSums keeps besides sum exp(z - m).
enum LogitSumsKeep {
  kExpSum = 0,
  kShiftedSum = 1,  // sum (z - m) and the count (sparse label smoothing)
  kTargetSums = 2,  // sum t and sum t (z - m) (dense targets)
};

// One thread's sums over its logits z_k, relative to the largest it has
// seen, m (the shift is m, or 0 while m is -inf: every z so far was -inf or
// NaN, and 0 keeps exp(z - shift) at 0 or NaN): sum exp(z - m) and what
// kKeep asks for; sum t (z - m) is over t != 0, so that a -inf logit without
// target mass adds nothing. When m grows the sums are moved to the new max;
// the group then moves every thread's sums to the row max and adds them.
template <typename Tacc, int kKeep>
struct LogitSums {
  static constexpr bool kShifted = (kKeep & kShiftedSum) != 0;
  static constexpr bool kTargets = (kKeep & kTargetSums) != 0;
  Tacc m = -Infinity<Tacc>();
  CompensatedSum<Tacc> exp_sum, shifted_sum, target_sum, target_shifted;
  Tacc count = Tacc(0);

  __device__ static Tacc ShiftOf(Tacc max) {
    return max == -Infinity<Tacc>() ? Tacc(0) : max;
  }

  // Moves the sums from m to m_new > m.
  __device__ void Rebase(Tacc m_new) {
    if (m == -Infinity<Tacc>()) {
      // The exp sum is 0 or NaN, the others -inf, NaN or 0 (nothing seen,
      // or no target mass): all stay as they are but the exp sum's scale.
      exp_sum.sum *= Tacc(0);
      exp_sum.carry = Tacc(0);
    } else {
      const Tacc d = m - m_new;  // < 0, or -inf if m_new is +inf
      const Tacc scale = FastExp(d);
      exp_sum.sum *= scale;
      exp_sum.carry *= scale;
      if (kShifted && count != Tacc(0)) shifted_sum.Add(count * d);
      if (kTargets && target_sum.Total() != Tacc(0)) {
        target_shifted.Add(target_sum.Total() * d);
      }
    }
    m = m_new;
  }

  // Adds logits z (with targets t where kTargets; else t is not read).
  template <int kN>
  __device__ void Add(const Tacc (&z)[kN], const Tacc (&t)[kN]) {
    const Tacc piece_max = MaxOf(z);
    if (piece_max > m) Rebase(piece_max);
    const Tacc shift = ShiftOf(m);
    Tacc e = Tacc(0), d_sum = Tacc(0), t_sum = Tacc(0), td_sum = Tacc(0);
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      const Tacc d = z[j] - shift;
      e += FastExp(d);
      if (kShifted) d_sum += d;
      if (kTargets) {
        t_sum += t[j];
        td_sum += t[j] != Tacc(0) ? t[j] * d : Tacc(0);
      }
    }
    exp_sum.Add(e);
    if (kShifted) {
      shifted_sum.Add(d_sum);
      count += Tacc(kN);
    }
    if (kTargets) {
      target_sum.Add(t_sum);
      target_shifted.Add(td_sum);
    }
  }
  template <int kN>
  __device__ void Add(const Tacc (&z)[kN]) {
    static_assert(!kTargets, "dense logits need their targets");
    Add(z, z);
  }

  // The row's totals, relative to shift = ShiftOf(row max), in every
  // thread of the group (0 for what kKeep does not ask for).
  struct Totals {
    Tacc shift, log_exp_sum, shifted_sum, target_sum, target_shifted;
  };
  template <int kThreads>
  __device__ Totals Combine() {
    Tacc row_max[1] = {m};
    Group<kThreads>::Reduce(row_max, MaxOp());
    if (row_max[0] > m) Rebase(row_max[0]);
    Tacc v[4] = {exp_sum.Total(), shifted_sum.Total(), target_sum.Total(),
                 target_shifted.Total()};
    Group<kThreads>::Reduce(v, SumOp());
    return {ShiftOf(row_max[0]), LogOf(v[0]), v[1], v[2], v[3]};
  }
};

// Where element `target` of a row falls in the piece of n elements starting
// at k: its index there, or -1. Once per piece, so that each element's test
// is a 32-bit compare with a constant.
__device__ __forceinline__ int IndexInPiece(int64_t target, int64_t k, int n) {
  const int64_t into = target - k;
  return into >= 0 && into < n ? static_cast<int>(into) : -1;
}

// Whether a sparse row is ignored (0 everywhere) or has a bad label (NaN loss,
// 0 gradient); the same for every thread of the group.
enum class RowKind { kValid, kIgnored, kBadLabel };
template <typename Tidx>
__device__ RowKind ClassifyRow(const XentParams& p, Tidx label) {
  if (IsIgnored(p, label)) return RowKind::kIgnored;
  const int64_t y = static_cast<int64_t>(label);
  return (y >= 0 && y < p.num_classes) ? RowKind::kValid : RowKind::kBadLabel;
}

template <int kThreads, typename T, typename Tidx, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm<T>)
    SparseForwardKernel(XentParams p, const T* predictions, const Tidx* labels,
                        Tacc* loss, Tacc* log_sum_exp) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const RowKind kind = ClassifyRow(p, labels[r]);
    if (kind != RowKind::kValid) {
      if (G::Lane() == 0) {
        const Tacc value =
            kind == RowKind::kIgnored ? Tacc(0) : static_cast<Tacc>(NAN);
        loss[r] = value;
        log_sum_exp[r] = value;
      }
      continue;
    }
    const T* x = predictions + r * num_classes;
    const int64_t label = static_cast<int64_t>(labels[r]);
    if (p.from_logits) {
      const auto forward = [&](auto sums) {
        ForEachPiece<kThreads, Tacc>(
            x, num_classes, [&](int64_t, const auto& z) { sums.Add(z); });
        const auto row = sums.template Combine<kThreads>();
        if (G::Lane() == 0) {
          log_sum_exp[r] = row.shift + row.log_exp_sum;
          const Tacc label_shifted = static_cast<Tacc>(x[label]) - row.shift;
          loss[r] = SparseLogitsLoss(c, row.log_exp_sum, label_shifted,
                                     row.shifted_sum);
        }
      };
      // Only smoothing needs sum (z - m); without it, -inf logits (a -inf
      // sum) cost nothing.
      if (c.off_weight != Tacc(0)) {
        forward(LogitSums<Tacc, kShiftedSum>());
      } else {
        forward(LogitSums<Tacc, kExpSum>());
      }
    } else {
      CompensatedSum<Tacc> s, sum_log;
      const bool smoothing = p.label_smoothing != 0.0f;
      ForEachPiece<kThreads, Tacc>(x, num_classes, [&](int64_t, const auto& v) {
        Tacc piece_sum = Tacc(0), piece_log = Tacc(0);
#pragma unroll
        for (int j = 0; j < SizeOf<decltype(v)>; ++j) {
          const Tacc clipped = c.Clip(v[j]);
          piece_sum += clipped;
          if (smoothing) piece_log += LogOf(clipped);
        }
        s.Add(piece_sum);
        sum_log.Add(piece_log);
      });
      Tacc totals[2] = {s.Total(), sum_log.Total()};
      G::Reduce(totals, SumOp());
      if (G::Lane() == 0) {
        log_sum_exp[r] = totals[0];  // The row sum, Q.
        const Tacc label_clipped = c.Clip(static_cast<Tacc>(x[label]));
        loss[r] = SparseProbsLoss(c, totals[0], label_clipped, totals[1]);
      }
    }
  }
}

template <int kThreads, typename T, typename Tidx, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads, kSparseBackwardMinBlocks<T>)
    SparseBackwardKernel(XentParams p, const T* predictions, const Tidx* labels,
                         const Tacc* log_sum_exp, const Tacc* grad_loss,
                         T* grad_predictions) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const T* x = predictions + r * num_classes;
    T* dx = grad_predictions + r * num_classes;  // May alias x, element-wise.
    if (ClassifyRow(p, labels[r]) != RowKind::kValid) {
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [](int64_t, const auto& in, auto& out) {
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              out[j] = Tacc(0);
            }
          });
      continue;
    }
    const int64_t label = static_cast<int64_t>(labels[r]);
    // log-sum-exp, or the clipped row sum.
    const Tacc g = grad_loss[r], stat = log_sum_exp[r];
    if (p.from_logits) {
      // g t_k: g ls / C, plus g (1 - ls) at the label (sum_t is 1).
      const Tacc g_off = g * c.off_weight, g_on = g_off + g * c.on_weight;
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
            const int hit = IndexInPiece(label, k, SizeOf<decltype(in)>);
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              out[j] = SoftmaxGrad(g, FastExp(in[j] - stat),
                                   j == hit ? g_on : g_off);
            }
          });
    } else {
      const Tacc g_over_sum = g / stat;
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              const Tacc t = c.SparseTarget(k + j, label);
              out[j] = SparseProbsGrad(c, g_over_sum, in[j], stat, t);
            }
          });
    }
  }
}

template <int kThreads, typename T, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads)
    DenseForwardKernel(XentParams p, const T* predictions, const Tacc* labels,
                       Tacc* loss, Tacc* stats) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const T* x = predictions + r * num_classes;
    const Tacc* y = labels + r * num_classes;
    if (p.from_logits) {
      LogitSums<Tacc, kTargetSums> sums;
      // This thread's nonzero labels: how many, the last one's class and
      // value (a one-hot row has one in the whole row).
      int64_t nonzero[2] = {0, -1};
      Tacc nonzero_value[1] = {Tacc(0)};
      ForEachPieceBeside<kThreads, Tacc>(
          x, y, num_classes, [&](int64_t k, const auto& z, const auto& labels) {
            Tacc t[SizeOf<decltype(z)>];
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(z)>; ++j) {
              const Tacc label = labels.v[j];
              t[j] = c.DenseTarget(label);
              if (label != Tacc(0)) {
                ++nonzero[0];
                nonzero[1] = k + j;
                nonzero_value[0] = label;
              }
            }
            sums.Add(z, t);
          });
      const auto row = sums.template Combine<kThreads>();
      // The row's single nonzero label, if it has one: its class is the
      // largest of the threads' last ones, its value the sum of theirs.
      int64_t count[1] = {nonzero[0]}, last[1] = {nonzero[1]};
      G::Reduce(count, SumOp());
      G::Reduce(last, MaxOp());
      G::Reduce(nonzero_value, SumOp());
      if (G::Lane() == 0) {
        loss[r] = DenseLogitsLoss(row.log_exp_sum, row.target_sum,
                                  row.target_shifted);
        const bool single = count[0] == 1;
        WriteDenseStats(stats, r, row.shift + row.log_exp_sum, row.target_sum,
                        single ? last[0] : -1,
                        single ? nonzero_value[0] : Tacc(0));
      }
    } else {
      // The clip range depends on the row sum: a second read, from L2 where
      // rows are short enough.
      CompensatedSum<Tacc> row_sum;
      ForEachPiece<kThreads, Tacc>(x, num_classes, [&](int64_t, const auto& v) {
        Tacc piece = Tacc(0);
#pragma unroll
        for (int j = 0; j < SizeOf<decltype(v)>; ++j) piece += v[j];
        row_sum.Add(piece);
      });
      Tacc s[1] = {row_sum.Total()};
      G::Reduce(s, SumOp());
      CompensatedSum<Tacc> total, in_range_t;
      ForEachPieceBeside<kThreads, Tacc>(
          x, y, num_classes, [&](int64_t, const auto& v, const auto& labels) {
            Tacc piece_total = Tacc(0), piece_in_range = Tacc(0);
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(v)>; ++j) {
              const Tacc q = v[j] / s[0];
              const Tacc t = c.DenseTarget(labels.v[j]);
              piece_total += t * LogOf(c.Clip(q));
              if (c.InClipRange(q)) piece_in_range += t;
            }
            total.Add(piece_total);
            in_range_t.Add(piece_in_range);
          });
      Tacc totals[2] = {total.Total(), in_range_t.Total()};
      G::Reduce(totals, SumOp());
      if (G::Lane() == 0) {
        loss[r] = -totals[0];
        WriteDenseStats(stats, r, s[0], totals[1]);
      }
    }
  }
}

template <int kThreads, typename T, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm<T>)
    DenseBackwardKernel(XentParams p, const T* predictions, const Tacc* labels,
                        const Tacc* stats, const Tacc* grad_loss,
                        T* grad_predictions) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const T* x = predictions + r * num_classes;
    const Tacc* y = labels + r * num_classes;
    T* dx = grad_predictions + r * num_classes;  // May alias x, element-wise.
    const Tacc g = grad_loss[r], stat0 = stats[kDenseStats * r],
               stat1 = stats[kDenseStats * r + 1];
    if (p.from_logits) {
      const Tacc g_sum_t = g * stat1;
      const int64_t single = SingleLabel(stats + kDenseStats * r, num_classes);
      if (single >= 0) {
        // The row's only nonzero label is y_single: no labels read.
        const Tacc y_single = stats[kDenseStats * r + 3];
        MapPieces<kThreads, Tacc>(
            x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
              const int hit = IndexInPiece(single, k, SizeOf<decltype(in)>);
#pragma unroll
              for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
                const Tacc label = j == hit ? y_single : Tacc(0);
                out[j] = SoftmaxGrad(g_sum_t, FastExp(in[j] - stat0),
                                     c.ScaledDenseTarget(g, label));
              }
            });
        continue;
      }
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              out[j] = SoftmaxGrad(g_sum_t, FastExp(in[j] - stat0),
                                   c.ScaledDenseTarget(g, y[k + j]));
            }
          });
    } else {
      const ClipRangeByDivision<Tacc, Tacc> range{c, stat0};
      MapPieces<kThreads, Tacc>(
          x, dx, num_classes, [&](int64_t k, const auto& in, auto& out) {
#pragma unroll
            for (int j = 0; j < SizeOf<decltype(in)>; ++j) {
              out[j] = DenseProbsGrad(g, in[j], range, stat1 / stat0,
                                      c.DenseTarget(y[k + j]));
            }
          });
    }
  }
}

template <int kThreads, typename T, typename Tacc>
__global__ void __launch_bounds__(kBlockThreads)
    DenseLabelsBackwardKernel(XentParams p, const T* predictions,
                              const Tacc* stats, const Tacc* grad_loss,
                              Tacc* grad_labels) {
  using G = Group<kThreads>;
  const XentConstants<Tacc> c(p);
  const int64_t num_classes = p.num_classes;
  for (int64_t r = G::FirstRow(); r < p.num_rows; r += G::RowStride()) {
    const T* x = predictions + r * num_classes;
    Tacc* dy = grad_labels + r * num_classes;
    const Tacc scale = c.on_weight * grad_loss[r],
               stat = stats[kDenseStats * r];
    ForEachPiece<kThreads, Tacc>(x, num_classes, [&](int64_t k, const auto& z) {
#pragma unroll
      for (int j = 0; j < SizeOf<decltype(z)>; ++j) {
        dy[k + j] =
            scale * (p.from_logits ? stat - z[j] : -LogOf(c.Clip(z[j] / stat)));
      }
    });
  }
}

template <typename T>
struct NonDeduced {
  using type = T;
};

// Launches a row kernel on d's stream over every row: warp_kernel (a warp a
// row) for rows of up to kMaxWarpRowClasses classes, else block_kernel (a
// block a row); the grid is capped at kMaxBlocks (the kernels stride over the
// rest). A launch error is left for cudaGetLastError. cudaLaunchKernel rather
// than <<<...>>>, so that a host compiler can build the kernels against the
// CPU emulation of CUDA in tests/gpu/emulation.
template <typename... Params>
void LaunchRows(void (*warp_kernel)(XentParams, Params...),
                void (*block_kernel)(XentParams, Params...), const GpuDevice& d,
                XentParams p, typename NonDeduced<Params>::type... args) {
  if (p.num_rows == 0) return;
  const bool by_warp = p.num_classes <= kMaxWarpRowClasses;
  const int64_t rows_per_block =
      by_warp ? Group<kWarpThreads>::kRowsPerBlock : 1;
  const int64_t blocks = (p.num_rows + rows_per_block - 1) / rows_per_block;
  void* kernel_args[] = {&p, &args...};
  cudaLaunchKernel(
      by_warp ? warp_kernel : block_kernel,
      dim3(
          static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks)),
      dim3(kBlockThreads), kernel_args, 0, static_cast<cudaStream_t>(d.stream));
}

}  // namespace gpu

template <typename T, typename Tidx>
struct SparseXentForward<GpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, Tacc* loss, Tacc* log_sum_exp) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(SparseForwardKernel<kWarpThreads, T, Tidx, Tacc>,
               SparseForwardKernel<kBlockThreads, T, Tidx, Tacc>, d, p,
               predictions, labels, loss, log_sum_exp);
  }
};

template <typename T, typename Tidx>
struct SparseXentBackward<GpuDevice, T, Tidx> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tidx* labels, const Tacc* log_sum_exp,
                  const Tacc* grad_loss, T* grad_predictions) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(SparseBackwardKernel<kWarpThreads, T, Tidx, Tacc>,
               SparseBackwardKernel<kBlockThreads, T, Tidx, Tacc>, d, p,
               predictions, labels, log_sum_exp, grad_loss, grad_predictions);
  }
};

template <typename T>
struct DenseXentForward<GpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, Tacc* loss, Tacc* stats) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(DenseForwardKernel<kWarpThreads, T, Tacc>,
               DenseForwardKernel<kBlockThreads, T, Tacc>, d, p, predictions,
               labels, loss, stats);
  }
};

template <typename T>
struct DenseXentBackward<GpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* labels, const Tacc* stats, const Tacc* grad_loss,
                  T* grad_predictions) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(DenseBackwardKernel<kWarpThreads, T, Tacc>,
               DenseBackwardKernel<kBlockThreads, T, Tacc>, d, p, predictions,
               labels, stats, grad_loss, grad_predictions);
  }
};

template <typename T>
struct DenseXentLabelsBackward<GpuDevice, T> {
  using Tacc = typename AccumulatorType<T>::type;
  void operator()(const GpuDevice& d, const XentParams& p, const T* predictions,
                  const Tacc* stats, const Tacc* grad_loss,
                  Tacc* grad_labels) const {
    using namespace gpu;  // NOLINT(build/namespaces)
    LaunchRows(DenseLabelsBackwardKernel<kWarpThreads, T, Tacc>,
               DenseLabelsBackwardKernel<kBlockThreads, T, Tacc>, d, p,
               predictions, stats, grad_loss, grad_labels);
  }
};

}  // namespace tf_xent_ops

#define TFXENT_INSTANTIATE_GPU(T)                                             \
  template struct ::tf_xent_ops::SparseXentForward<::tf_xent_ops::GpuDevice,  \
                                                   T, int32_t>;               \
  template struct ::tf_xent_ops::SparseXentForward<::tf_xent_ops::GpuDevice,  \
                                                   T, int64_t>;               \
  template struct ::tf_xent_ops::SparseXentBackward<::tf_xent_ops::GpuDevice, \
                                                    T, int32_t>;              \
  template struct ::tf_xent_ops::SparseXentBackward<::tf_xent_ops::GpuDevice, \
                                                    T, int64_t>;              \
  template struct ::tf_xent_ops::DenseXentForward<::tf_xent_ops::GpuDevice,   \
                                                  T>;                         \
  template struct ::tf_xent_ops::DenseXentBackward<::tf_xent_ops::GpuDevice,  \
                                                   T>;                        \
  template struct ::tf_xent_ops::DenseXentLabelsBackward<                     \
      ::tf_xent_ops::GpuDevice, T>;

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_FUNCTOR_GPU_CU_H_
