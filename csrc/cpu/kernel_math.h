// k(r2) and dk/dr2 for every kernel profile, shared by the CPU code.
//
//   id 0  RBF         k(r2) = exp(-r2 / (2 h^2))     k'(r2) = -k / (2 h^2)
//   id 1  IMQ         k(r2) = (1 + r2 / h^2)^(-1/2)  k'(r2) = -k^3 / (2 h^2)
//   id 2  IMQ cubed   k(r2) = (1 + r2 / h^2)^(-3/2)  k'(r2) = -3 (1 + r2 / h^2)^(-5/2) / (2 h^2)
//                     (the Stein profile of IMQ, used by the matrix-free Stein term)
//   id 3  IMQ^5       k(r2) = (1 + r2 / h^2)^(-5/2)  k'(r2) = -5 (1 + r2 / h^2)^(-7/2) / (2 h^2)
//                     (used by the fused IMQ KSD: its trace term is sum_ij k_ij^5 = 1^T K_5 1)
//
// The IMQ family is branch-free: u = 1 / sqrt(1 + r2 / h^2) (the caller's square root), then
// k = u, u^3 or u^5 and k' = -(p/2) u^(p+2) / h^2 by multiplications only.
//
// The math is written once as templates over a scalar T and a value type V that is either T or
// a GCC vector of T (vector_size extension), so the same body compiles to scalar code or to
// SSE2 / AVX2 / AVX-512 code.
//
// exp is a branch-free polynomial: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a minimax
// polynomial for e^r (float: Cephes expf, degree 5 in r around 1 + r + r^2/2; double: Taylor to
// r^13), and 2^n built directly in the exponent bits (no float->int conversion instruction
// needed, so it vectorises on plain SSE2). Measured error: < 1 ulp in float32 and float64.
// Arguments below the normal range give exactly 0 (never a denormal), NaN stays NaN.
//
// Layout of this header. The first part (constants, kernel ids) is ordinary and include-guarded.
// The second part, the templates, is emitted into a namespace chosen by the includer:
//   * inside each instruction-set namespace steinops::cpu::<isa> when STEINOPS_ISA_NS is defined
//     (cpu/tile_impl.h includes this header again from inside its `#pragma GCC target` region).
//     This matters: helpers that build vectors must be compiled with the target of their caller,
//     a broadcast written in baseline code and inlined into AVX-512 code is lowered lane by lane;
//   * once in steinops::cpu::scalar otherwise (scalar reference helpers).

#ifndef STEINOPS_CPU_KERNEL_MATH_H_CONSTANTS
#define STEINOPS_CPU_KERNEL_MATH_H_CONSTANTS

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#define STEINOPS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace steinops {
namespace cpu {

enum KernelId : int { kRBF = 0, kIMQ = 1, kIMQ3 = 2, kIMQ5 = 3 };

inline bool valid_kernel_id(int64_t kid) { return kid == kRBF || kid == kIMQ || kid == kIMQ3 || kid == kIMQ5; }

template <class T>
struct ExpConst;

template <>
struct ExpConst<float> {
  using Int = int32_t;
  static constexpr float lo = -87.3f;  // below: 0 (e^-87.3 ~ 1.2e-38, the smallest normal)
  static constexpr float hi = 88.7f;   // above: +inf (general exp_poly only)
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;  // 9 significant bits: n * ln2_hi is exact
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23: x*log2e + magic rounds to an integer
  static constexpr int32_t magic_bits = 0x4B400000;
  static constexpr int32_t bias = 127;
  static constexpr int32_t shift = 23;
};

template <>
struct ExpConst<double> {
  using Int = int64_t;
  static constexpr double lo = -708.3;  // e^-708.3 ~ 2.5e-308, just above the smallest normal
  static constexpr double hi = 709.7;
  static constexpr double log2e = 1.44269504088896338700e+00;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;  // low 32 bits zero (fdlibm)
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int64_t magic_bits = 0x4338000000000000LL;
  static constexpr int64_t bias = 1023;
  static constexpr int64_t shift = 52;
};

}  // namespace cpu
}  // namespace steinops

#endif  // STEINOPS_CPU_KERNEL_MATH_H_CONSTANTS

// ---- the templates ----------------------------------------------------------------------------

#if defined(STEINOPS_ISA_NS)
#define STEINOPS_MATH_NS STEINOPS_ISA_NS
#elif !defined(STEINOPS_CPU_KERNEL_MATH_H_SCALAR)
#define STEINOPS_CPU_KERNEL_MATH_H_SCALAR
#define STEINOPS_MATH_NS scalar
#endif

#ifdef STEINOPS_MATH_NS
namespace steinops {
namespace cpu {
namespace STEINOPS_MATH_NS {

// Reinterpret the bits of a scalar or vector (same size) as another type.
template <class To, class From>
STEINOPS_ALWAYS_INLINE To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast size mismatch");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

// A scalar broadcast to V (V may itself be the scalar type). Written `s - 0`, which folds to a
// single broadcast (`0 + s` would not fold: it differs from s for s = -0).
template <class V, class S>
STEINOPS_ALWAYS_INLINE V splat(S s) {
  return s - V{};
}

// e^r for |r| <= ln2/2.
template <class T, class V>
STEINOPS_ALWAYS_INLINE V expm_poly(V r) {
  if constexpr (sizeof(T) == 4) {  // Cephes expf
    V p = splat<V>(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * (r * r) + r + 1.0f;
  } else {  // Taylor to r^13: truncation < 1e-17 relative
    V p = splat<V>(1.0 / 6227020800.0);
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    return p * (r * r) + r + 1.0;
  }
}

// e^xc * (its exponent part) for xc already clamped to [lo, hi].
template <class T, class V, class I>
STEINOPS_ALWAYS_INLINE V exp_core(V xc) {
  using C = ExpConst<T>;
  const V magic = splat<V>(C::magic);
  const V t = xc * C::log2e + magic;  // = magic + round(x * log2e), exactly
  const V n = t - magic;
  V r = xc - n * C::ln2_hi;
  r = r - n * C::ln2_lo;
  const V p = expm_poly<T, V>(r);
  // 2^n: the integer n sits in the low mantissa bits of t.
  const I ebits = (bit_cast<I>(t) - splat<I>(C::magic_bits) + splat<I>(C::bias)) << C::shift;
  return p * bit_cast<V>(ebits);
}

// e^x for any x. V = T (scalar, I = ExpConst<T>::Int) or a GCC vector with its integer vector I.
template <class T, class V, class I>
STEINOPS_ALWAYS_INLINE V exp_poly(V x) {
  using C = ExpConst<T>;
  const V lo = splat<V>(C::lo);
  const V hi = splat<V>(C::hi);
  V xc = x > lo ? x : lo;  // NaN -> lo, fixed up at the end
  xc = xc < hi ? xc : hi;
  V res = exp_core<T, V, I>(xc);
  res = x < lo ? splat<V>(T(0)) : res;
  res = x > hi ? splat<V>(std::numeric_limits<T>::infinity()) : res;
  res = x != x ? x : res;
  return res;
}

// e^x for x <= 0 (or NaN): the kernels' argument coef * r2 with coef = -1/(2h^2) <= 0, r2 >= 0.
// Cheaper than exp_poly (no overflow handling). Positive x must not be passed.
template <class T, class V, class I>
STEINOPS_ALWAYS_INLINE V exp_poly_nonpos(V x) {
  using C = ExpConst<T>;
  const V lo = splat<V>(C::lo);
  const V xc = x > lo ? x : lo;  // NaN -> lo, fixed up at the end
  V res = exp_core<T, V, I>(xc);
  res = x < lo ? splat<V>(T(0)) : res;
  res = x != x ? x : res;
  return res;
}

// Per-bandwidth coefficient of a kernel: RBF -1/(2h^2) (k = exp(coef r2)); IMQ, IMQ cubed and
// IMQ^5 1/h^2 (u = (1 + coef r2)^(-1/2), k = u, u^3 resp. u^5).
template <class T>
STEINOPS_ALWAYS_INLINE T kernel_coef(int kid, T h) {
  return kid == kRBF ? T(-0.5) / (h * h) : T(1) / (h * h);
}

// k(r2). Sqrt: the caller's square root for V (a functor; vectors have no generic sqrt).
template <int KID, class T, class V, class I, class Sqrt>
STEINOPS_ALWAYS_INLINE V kernel_value(V r2, T coef, Sqrt sq) {
  if constexpr (KID == kRBF) {
    return exp_poly_nonpos<T, V, I>(r2 * coef);
  } else {
    const V u = splat<V>(T(1)) / sq(r2 * coef + T(1));
    if constexpr (KID == kIMQ) {
      return u;
    } else if constexpr (KID == kIMQ3) {
      return (u * u) * u;
    } else {
      const V u2 = u * u;
      return (u2 * u2) * u;
    }
  }
}

// k(r2) and k'(r2) together.
template <int KID, class T, class V, class I, class Sqrt>
STEINOPS_ALWAYS_INLINE void kernel_value_deriv(V r2, T coef, Sqrt sq, V& k, V& kp) {
  if constexpr (KID == kRBF) {
    k = exp_poly_nonpos<T, V, I>(r2 * coef);
    kp = k * coef;  // -k / (2h^2)
  } else {
    const V u = splat<V>(T(1)) / sq(r2 * coef + T(1));
    const V u2 = u * u;
    if constexpr (KID == kIMQ) {
      k = u;
      kp = (u2 * u) * (T(-0.5) * coef);  // -u^3 / (2h^2)
    } else if constexpr (KID == kIMQ3) {
      k = u2 * u;
      kp = (k * u2) * (T(-1.5) * coef);  // -3 u^5 / (2h^2)
    } else {
      k = (u2 * u2) * u;
      kp = (k * u2) * (T(-2.5) * coef);  // -5 u^7 / (2h^2)
    }
  }
}

template <int KID, class T, class V, class I, class Sqrt>
STEINOPS_ALWAYS_INLINE V kernel_deriv(V r2, T coef, Sqrt sq) {
  V k, kp;
  kernel_value_deriv<KID, T, V, I>(r2, coef, sq, k, kp);
  return kp;
}

struct ScalarSqrt {
  template <class T>
  T operator()(T a) const {
    return std::sqrt(a);
  }
};

// Scalar k(r2) and k'(r2) (reference / documentation; the tiles use the vector forms).
template <class T>
inline T kernel_value_scalar(int kid, T r2, T h) {
  using I = typename ExpConst<T>::Int;
  const T c = kernel_coef<T>(kid, h);
  if (kid == kRBF) return kernel_value<kRBF, T, T, I>(r2, c, ScalarSqrt{});
  if (kid == kIMQ) return kernel_value<kIMQ, T, T, I>(r2, c, ScalarSqrt{});
  if (kid == kIMQ3) return kernel_value<kIMQ3, T, T, I>(r2, c, ScalarSqrt{});
  return kernel_value<kIMQ5, T, T, I>(r2, c, ScalarSqrt{});
}

template <class T>
inline T kernel_deriv_scalar(int kid, T r2, T h) {
  using I = typename ExpConst<T>::Int;
  const T c = kernel_coef<T>(kid, h);
  if (kid == kRBF) return kernel_deriv<kRBF, T, T, I>(r2, c, ScalarSqrt{});
  if (kid == kIMQ) return kernel_deriv<kIMQ, T, T, I>(r2, c, ScalarSqrt{});
  if (kid == kIMQ3) return kernel_deriv<kIMQ3, T, T, I>(r2, c, ScalarSqrt{});
  return kernel_deriv<kIMQ5, T, T, I>(r2, c, ScalarSqrt{});
}

}  // namespace STEINOPS_MATH_NS
}  // namespace cpu
}  // namespace steinops
#undef STEINOPS_MATH_NS
#endif  // STEINOPS_MATH_NS
