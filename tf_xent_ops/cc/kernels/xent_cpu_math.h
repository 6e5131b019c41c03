/* Copyright 2026 The tf_xent_ops Authors. Licensed under the Apache
License 2.0.

exp, log and 1 / x for the CPU kernels' Eigen array expressions, and the log
of a product of many factors (LogOfProduct).

On AVX-512 builds, float packets use the functions below: Cody-Waite range
reduction, a degree-6 polynomial and vscalefps for exp (without the clamp
above where the caller keeps the argument below 88); vgetexpps/vgetmantps
and a degree-9 polynomial for log; vrcp14ps and a Newton step for 1 / x.
exp and log are within 0.9 ulp of the exact result (tests/test_math_accuracy.py
bounds them by 2 and 4, as builds without AVX-512 use Eigen's, whose log
reaches 3.1) in about half the instructions of Eigen's generic pexp and plog,
and they handle 0, +-inf and NaN like std::exp / std::log (denormals as the
thread's flush-to-zero mode has them). Everything else (scalars, double,
builds without AVX-512) uses Eigen's own exp, log and division.
*/
#ifndef TF_XENT_OPS_CC_KERNELS_XENT_CPU_MATH_H_
#define TF_XENT_OPS_CC_KERNELS_XENT_CPU_MATH_H_

#include <cmath>
#include <type_traits>

#include "Eigen/Core"
#include "tf_xent_ops/cc/kernels/xent_row_math.h"

namespace tf_xent_ops {

#if defined(EIGEN_VECTORIZE_AVX512)
// exp of x already clamped to [-104, 89] (or NaN): 2^n exp(r),
// n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so r is exact to
// float precision); vscalefps applies 2^n, overflow and underflow included.
EIGEN_STRONG_INLINE __m512 ExpOfClamped(const __m512 xc) {
  const __m512 n = _mm512_roundscale_ps(
      _mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  // exp(r) on |r| <= ln(2) / 2: a degree-6 polynomial with the leading
  // 1 + r fixed, fitted for relative error (3e-9, 0.05 ulp), in Horner form:
  // six FMAs.
  __m512 p = _mm512_set1_ps(1.3814440463e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3687184379e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1668392718e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666521132e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.9999994040e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// max(-104, x): -inf -> -104 keeps n finite (exp gives 0). max(lo, x)
// returns x when x is NaN, so NaN propagates.
EIGEN_STRONG_INLINE __m512 ClampExpBelow(const __m512 x) {
  return _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
}
#endif

// exp. kAnyArgument = false takes arguments up to 88 (and -inf or NaN), such
// as logits minus a shift near their max (the logits forwards): without the
// upper clamp, one instruction of the dozen an exp takes. Above 88, where
// exp overflows, its result is unspecified (inf or NaN; on builds without
// AVX-512, Eigen's exp clamped to the largest float): callers check.
template <bool kAnyArgument>
struct ExpOp {
  EIGEN_STRONG_INLINE float operator()(const float& x) const {
    return std::exp(x);
  }
  template <typename Packet>
  EIGEN_STRONG_INLINE Packet packetOp(const Packet& x) const {
    return Eigen::internal::pexp(x);
  }
#if defined(EIGEN_VECTORIZE_AVX512)
  EIGEN_STRONG_INLINE Eigen::internal::Packet16f packetOp(
      const Eigen::internal::Packet16f& x) const {
    const __m512 clamped = ClampExpBelow(x);
    // For any argument, clamped above too: +inf gives inf through vscalefps.
    return ExpOfClamped(
        kAnyArgument ? _mm512_min_ps(_mm512_set1_ps(89.0f), clamped) : clamped);
  }
#endif
};
using VectorExpOp = ExpOp<true>;
using ExpUpTo88Op = ExpOp<false>;

struct VectorLogOp {
  EIGEN_STRONG_INLINE float operator()(const float& x) const {
    return std::log(x);
  }
  template <typename Packet>
  EIGEN_STRONG_INLINE Packet packetOp(const Packet& x) const {
    return Eigen::internal::plog(x);
  }
#if defined(EIGEN_VECTORIZE_AVX512)
  EIGEN_STRONG_INLINE Eigen::internal::Packet16f packetOp(
      const Eigen::internal::Packet16f& x) const {
    // x = 2^e m, m in [sqrt(1/2), sqrt(2)): log x = e ln 2 + log(1 + f),
    // f = m - 1. getmant gives m in [1, 2) (NaN for negative x); getexp
    // gives e exactly, denormals included.
    __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan);
    __m512 e = _mm512_getexp_ps(x);
    const __mmask16 big =
        _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237309505f), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
    const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
    // log(1 + f) = f - f^2 / 2 + f^3 P(f) (Cephes' logf).
    __m512 p = _mm512_set1_ps(7.0376836292e-2f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.1514610310e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.1676998740e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.2420140846e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.4249322787e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.6668057665e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.0000714765e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-2.4999993993e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(3.3333331174e-1f));
    const __m512 f2 = _mm512_mul_ps(f, f);
    p = _mm512_mul_ps(_mm512_mul_ps(p, f), f2);
    p = _mm512_fnmadd_ps(f2, _mm512_set1_ps(0.5f), p);
    // e ln 2 in two parts, the small one added first.
    p = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), p);
    const __m512 y = _mm512_add_ps(
        _mm512_add_ps(f, p), _mm512_mul_ps(e, _mm512_set1_ps(0.693359375f)));
    // +-0 -> -inf and +inf -> +inf (the sum above is inf - inf there).
    const __m512 inf = _mm512_set1_ps(INFINITY);
    const __mmask16 zero =
        _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ);
    const __mmask16 pos_inf = _mm512_cmp_ps_mask(x, inf, _CMP_EQ_OQ);
    return _mm512_mask_mov_ps(
        _mm512_mask_mov_ps(y, zero, _mm512_sub_ps(_mm512_setzero_ps(), inf)),
        pos_inf, inf);
  }
#endif
};

struct VectorReciprocalOp {
  EIGEN_STRONG_INLINE float operator()(const float& x) const {
    return 1.0f / x;
  }
  template <typename Packet>
  EIGEN_STRONG_INLINE Packet packetOp(const Packet& x) const {
    return Eigen::internal::pdiv(Eigen::internal::pset1<Packet>(1.0f), x);
  }
#if defined(EIGEN_VECTORIZE_AVX512)
  EIGEN_STRONG_INLINE Eigen::internal::Packet16f packetOp(
      const Eigen::internal::Packet16f& x) const {
    // vrcp14ps (relative error < 2^-14) and one Newton step: within an ulp
    // of 1 / x, at a fraction of vdivps's cost. Where vrcp14ps gives +-inf
    // or +-0 (x = 0, +-inf, denormals, which it takes as 0) that is 1 / x,
    // and the Newton step would make NaN of it; NaN stays NaN.
    const __m512 r = _mm512_rcp14_ps(x);
    const __m512 e = _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.0f));
    const __mmask16 exact =
        _mm512_fpclass_ps_mask(r, 0x02 | 0x04 | 0x08 | 0x10);
    return _mm512_mask_mov_ps(_mm512_fmadd_ps(r, e, r), exact, r);
  }
#endif
};

// tanh, for the soft cap: Eigen's rational approximation (a couple of ulps;
// NaN stays NaN, +-inf gives +-1), for a single float too, so that a capped
// logit has the same bits whether a packet or the scalar path computed it.
struct VectorTanhOp {
  EIGEN_STRONG_INLINE float operator()(const float& x) const {
    using Packet = Eigen::internal::packet_traits<float>::type;
    return Eigen::internal::pfirst(packetOp(Eigen::internal::pset1<Packet>(x)));
  }
  template <typename Packet>
  EIGEN_STRONG_INLINE Packet packetOp(const Packet& x) const {
    return Eigen::internal::ptanh(x);
  }
};

// x = m 2^e, exactly, with m in [1, 2) (AVX-512) or [0.5, 1) (elsewhere)
// for normal x; NaN gives NaN.
template <typename Packet>
EIGEN_STRONG_INLINE Packet SplitExponent(const Packet& x, Packet* exponent) {
  return Eigen::internal::pfrexp(x, *exponent);
}
#if defined(EIGEN_VECTORIZE_AVX512)
EIGEN_STRONG_INLINE Eigen::internal::Packet16f SplitExponent(
    const Eigen::internal::Packet16f& x, Eigen::internal::Packet16f* exponent) {
  *exponent = _mm512_getexp_ps(x);
  return _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
}
#endif

// The sum of log(v) over packets of v in [kMinFactor, 1] (or NaN), as the log
// of their product: a multiply per packet where a log costs about twenty
// instructions. Every kSplitEvery packets the product's exponent is split
// off (exactly) into a running sum, so the product stays a normal number:
// kSplitEvery factors of at least 2^-28 leave it above 2^-113. The result is
// more accurate than a sum of rounded logs: each multiply adds half an ulp of
// relative error to the product, i.e. 6e-8 (float) to its log, whatever the
// size of the logs. NaN propagates.
template <typename Scalar>
class LogOfProduct {
 public:
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  static constexpr int kSize = Eigen::internal::packet_traits<Scalar>::size;
  static constexpr Scalar kMinFactor = Scalar(1.0 / (1 << 28));

  // Whether factors of at least `lowest` keep the product normal.
  static bool Accepts(Scalar lowest) { return lowest >= kMinFactor; }

  void Multiply(const Packet& v) {
    product_ = Eigen::internal::pmul(product_, v);
    if (++pending_ == kSplitEvery) Split();
  }

  // log of the product of everything multiplied in.
  double Log() {
    namespace ei = Eigen::internal;
    Split();
    FlushExponents();
    Scalar lanes[kSize];
    ei::pstoreu(lanes, product_);
    // The lanes' mantissas are below 2 each: their product cannot overflow.
    double mantissa = 1.0;
    for (const Scalar m : lanes) mantissa *= static_cast<double>(m);
    return std::log(mantissa) + exponent_total_ * 0.69314718055994530942;
  }

 private:
  static constexpr int kSplitEvery = 4;
  // Exponent lanes are moved to a double total this often: each split adds
  // at most 113 to a lane, which stays exact in float below 2^24.
  static constexpr int kFlushEvery = 1 << 16;

  void Split() {
    namespace ei = Eigen::internal;
    Packet exponent;
    product_ = SplitExponent(product_, &exponent);
    exponents_ = ei::padd(exponents_, exponent);
    pending_ = 0;
    if (++splits_ == kFlushEvery) FlushExponents();
  }

  // Moves the exponent lanes to the double total.
  void FlushExponents() {
    namespace ei = Eigen::internal;
    Scalar lanes[kSize];
    ei::pstoreu(lanes, exponents_);
    for (const Scalar e : lanes) exponent_total_ += static_cast<double>(e);
    exponents_ = ei::pset1<Packet>(Scalar(0));
    splits_ = 0;
  }

  Packet product_ = Eigen::internal::pset1<Packet>(Scalar(1));
  Packet exponents_ = Eigen::internal::pset1<Packet>(Scalar(0));
  double exponent_total_ = 0.0;
  int pending_ = 0;
  int splits_ = 0;
};

// exp, log and 1 / x of Eigen array expressions: the functors above for
// float, Eigen's own for double.
template <typename X>
struct MathImpl<X,
                std::enable_if_t<std::is_base_of_v<Eigen::ArrayBase<X>, X>>> {
  static constexpr bool kFloat = std::is_same_v<typename X::Scalar, float>;
  static auto Exp(const X& x) {
    if constexpr (kFloat) {
      return x.unaryExpr(VectorExpOp());
    } else {
      return x.exp();
    }
  }
  static auto Log(const X& x) {
    if constexpr (kFloat) {
      return x.unaryExpr(VectorLogOp());
    } else {
      return x.log();
    }
  }
  static auto Reciprocal(const X& x) {
    if constexpr (kFloat) {
      return x.unaryExpr(VectorReciprocalOp());
    } else {
      return x.inverse();
    }
  }
};

// tanh of Eigen array expressions (VectorTanhOp for float, Eigen's own for
// double) and of a single float.
template <typename X>
struct TanhImpl<X,
                std::enable_if_t<std::is_base_of_v<Eigen::ArrayBase<X>, X>>> {
  static auto Tanh(const X& x) {
    if constexpr (std::is_same_v<typename X::Scalar, float>) {
      return x.unaryExpr(VectorTanhOp());
    } else {
      return x.tanh();
    }
  }
};
template <>
struct TanhImpl<float> {
  static float Tanh(float x) { return VectorTanhOp()(x); }
};

// exp of an Eigen array expression whose elements are at most 88 (or -inf,
// or NaN), such as logits minus their max: ExpUpTo88Op for float.
template <typename X>
auto ExpUpTo88(const Eigen::ArrayBase<X>& x) {
  if constexpr (std::is_same_v<typename X::Scalar, float>) {
    return x.unaryExpr(ExpUpTo88Op());
  } else {
    return x.exp();
  }
}

}  // namespace tf_xent_ops

namespace Eigen {
namespace internal {
#if defined(EIGEN_VECTORIZE_AVX512)
// Eigen (as TensorFlow 2.21 bundles it) assigns the elements before the
// first and after the last whole packet of an array one at a time, through
// the functors' scalar path (a libm exp or log call each), except for packet
// types that declare has_packet_segment, which it does for AVX and not yet
// for AVX-512. Declared here for float: those elements are then one masked
// packet, read and written with AVX-512 masked loads and stores (lanes
// outside the segment are neither read nor written). Only the CPU functor
// files include this header, and they make every float assignment of the
// kernels.
template <>
struct has_packet_segment<Packet16f> : std::true_type {};
inline __mmask16 SegmentMask16(Index begin, Index count) {
  return static_cast<__mmask16>(((1u << count) - 1u) << begin);
}
template <>
inline Packet16f ploaduSegment<Packet16f>(const float* from, Index begin,
                                          Index count) {
  return _mm512_maskz_loadu_ps(SegmentMask16(begin, count), from);
}
template <>
inline Packet16f ploadSegment<Packet16f>(const float* from, Index begin,
                                         Index count) {
  return _mm512_maskz_loadu_ps(SegmentMask16(begin, count), from);
}
template <>
inline void pstoreuSegment<float, Packet16f>(float* to, const Packet16f& from,
                                             Index begin, Index count) {
  _mm512_mask_storeu_ps(to, SegmentMask16(begin, count), from);
}
template <>
inline void pstoreSegment<float, Packet16f>(float* to, const Packet16f& from,
                                            Index begin, Index count) {
  _mm512_mask_storeu_ps(to, SegmentMask16(begin, count), from);
}
// The same for double, so that no element of a double row takes the scalar
// path (std::exp where the packets use Eigen's polynomial).
template <>
struct has_packet_segment<Packet8d> : std::true_type {};
inline __mmask8 SegmentMask8(Index begin, Index count) {
  return static_cast<__mmask8>(((1u << count) - 1u) << begin);
}
template <>
inline Packet8d ploaduSegment<Packet8d>(const double* from, Index begin,
                                        Index count) {
  return _mm512_maskz_loadu_pd(SegmentMask8(begin, count), from);
}
template <>
inline Packet8d ploadSegment<Packet8d>(const double* from, Index begin,
                                       Index count) {
  return _mm512_maskz_loadu_pd(SegmentMask8(begin, count), from);
}
template <>
inline void pstoreuSegment<double, Packet8d>(double* to, const Packet8d& from,
                                             Index begin, Index count) {
  _mm512_mask_storeu_pd(to, SegmentMask8(begin, count), from);
}
template <>
inline void pstoreSegment<double, Packet8d>(double* to, const Packet8d& from,
                                            Index begin, Index count) {
  _mm512_mask_storeu_pd(to, SegmentMask8(begin, count), from);
}
#endif
template <bool kAnyArgument>
struct functor_traits<tf_xent_ops::ExpOp<kAnyArgument>> {
  enum { Cost = 20, PacketAccess = packet_traits<float>::HasExp };
};
template <>
struct functor_traits<tf_xent_ops::VectorLogOp> {
  enum { Cost = 24, PacketAccess = packet_traits<float>::HasLog };
};
template <>
struct functor_traits<tf_xent_ops::VectorReciprocalOp> {
  enum { Cost = 4, PacketAccess = packet_traits<float>::HasDiv };
};
template <>
struct functor_traits<tf_xent_ops::VectorTanhOp> {
  enum { Cost = 24, PacketAccess = packet_traits<float>::HasTanh };
};
}  // namespace internal
}  // namespace Eigen

#endif  // TF_XENT_OPS_CC_KERNELS_XENT_CPU_MATH_H_
