// k(r2) and dk/dr2 for every kernel profile, shared by the CPU code.
//
//   id 0  RBF  k(r2) = exp(-r2 / (2 h^2))     k'(r2) = -k / (2 h^2)
//   id 1  IMQ  k(r2) = (1 + r2 / h^2)^(-1/2)  k'(r2) = -k^3 / (2 h^2)
//
// Everything here is written once for a scalar T and for a GCC vector of T (vector_size
// extension): the same template body compiles to scalar code or to SSE2 / AVX2 / AVX-512 code
// depending on the function it is inlined into (see cpu/isa_instantiate.h). The functions are
// always_inline so that they take the instruction set of their caller.
//
// exp is a branch-free polynomial: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a minimax
// (float, Cephes expf, ~1-2 ulp) or degree-13 Taylor (double, ~1-2 ulp) polynomial for e^r, and
// 2^n built directly in the exponent bits. Arguments below the normal range give exactly 0 (never
// a denormal), above it +inf, NaN stays NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#define STEINOPS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace steinops {
namespace cpu {

enum KernelId : int { kRBF = 0, kIMQ = 1 };

inline bool valid_kernel_id(int64_t kid) { return kid == kRBF || kid == kIMQ; }

// Reinterpret the bits of a scalar or vector (same size) as another type.
template <class To, class From>
STEINOPS_ALWAYS_INLINE To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast size mismatch");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

// A scalar broadcast to V (V may itself be the scalar type).
template <class V, class S>
STEINOPS_ALWAYS_INLINE V splat(S s) {
  return V{} + s;
}

template <class T>
struct ExpConst;

template <>
struct ExpConst<float> {
  using Int = int32_t;
  static constexpr float lo = -87.3f;  // below: 0 (e^-87.3 ~ 1.2e-38, the smallest normal)
  static constexpr float hi = 88.7f;   // above: +inf
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;  // 9 significant bits: n * ln2_hi is exact
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23: t = x*log2e + magic rounds to an integer
  static constexpr int32_t bias = 127;
  static constexpr int32_t shift = 23;

  template <class V>
  static STEINOPS_ALWAYS_INLINE V expm_poly(V r) {  // e^r, |r| <= ln2/2 (Cephes expf)
    V p = splat<V>(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * (r * r) + r + 1.0f;
  }
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
  static constexpr int64_t bias = 1023;
  static constexpr int64_t shift = 52;

  template <class V>
  static STEINOPS_ALWAYS_INLINE V expm_poly(V r) {  // e^r, |r| <= ln2/2: Taylor to r^13 (rel. err < 1e-17)
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
};

// e^x for a scalar T (V = T, I = ExpConst<T>::Int) or a GCC vector V of T with the integer
// vector I of the same lane count. Branch-free, so loops over it vectorise.
template <class T, class V, class I>
STEINOPS_ALWAYS_INLINE V exp_poly(V x) {
  using C = ExpConst<T>;
  using Int = typename C::Int;
  const V lo = splat<V>(C::lo);
  const V hi = splat<V>(C::hi);
  V xc = x < lo ? lo : x;  // NaN compares false and stays NaN here; fixed up at the end
  xc = xc > hi ? hi : xc;
  const V magic = splat<V>(C::magic);
  const V t = xc * C::log2e + magic;  // = magic + round(x * log2e), exactly
  const V n = t - magic;
  V r = xc - n * C::ln2_hi;
  r = r - n * C::ln2_lo;
  const V p = C::template expm_poly<V>(r);
  // 2^n: the integer n sits in the low mantissa bits of t.
  const I ni = bit_cast<I>(t) - splat<I>(bit_cast<Int>(C::magic));
  const I ebits = (ni + splat<I>(C::bias)) << C::shift;
  V res = p * bit_cast<V>(ebits);
  res = x < lo ? splat<V>(T(0)) : res;
  res = x > hi ? splat<V>(std::numeric_limits<T>::infinity()) : res;
  res = x != x ? x : res;
  return res;
}

// e^x for x <= 0 (or NaN): the kernels' argument coef * r2 with coef = -1/(2h^2) <= 0, r2 >= 0.
// Cheaper than exp_poly (no overflow branch; `x > lo ? x : lo` is a single max instruction):
// below the normal range -> 0, NaN -> NaN. Positive x must not be passed.
template <class T, class V, class I>
STEINOPS_ALWAYS_INLINE V exp_poly_nonpos(V x) {
  using C = ExpConst<T>;
  using Int = typename C::Int;
  const V lo = splat<V>(C::lo);
  const V xc = x > lo ? x : lo;  // NaN -> lo, fixed up at the end
  const V magic = splat<V>(C::magic);
  const V t = xc * C::log2e + magic;
  const V n = t - magic;
  V r = xc - n * C::ln2_hi;
  r = r - n * C::ln2_lo;
  const V p = C::template expm_poly<V>(r);
  const I ni = bit_cast<I>(t) - splat<I>(bit_cast<Int>(C::magic));
  const I ebits = (ni + splat<I>(C::bias)) << C::shift;
  V res = p * bit_cast<V>(ebits);
  res = x < lo ? splat<V>(T(0)) : res;
  res = x != x ? x : res;
  return res;
}

// Scalar helpers (reference / documentation; the tiles use the vector forms).
template <class T>
STEINOPS_ALWAYS_INLINE T exp_poly(T x) {
  return exp_poly<T, T, typename ExpConst<T>::Int>(x);
}

// Per-bandwidth coefficient of a kernel: RBF -1/(2h^2) (k = exp(coef r2)), IMQ 1/h^2
// (k = (1 + coef r2)^(-1/2)).
template <class T>
STEINOPS_ALWAYS_INLINE T kernel_coef(int kid, T h) {
  return kid == kRBF ? T(-0.5) / (h * h) : T(1) / (h * h);
}

// k'(r2) from k(r2) and the coefficient above: RBF coef * k, IMQ -coef/2 * k^3.
template <int KID, class V, class T>
STEINOPS_ALWAYS_INLINE V kernel_deriv_from_value(V k, T coef) {
  if (KID == kRBF) return k * coef;
  return (k * k) * (k * (T(-0.5) * coef));
}

template <class T>
inline T kernel_value_scalar(int kid, T r2, T h) {
  const T c = kernel_coef<T>(kid, h);
  return kid == kRBF ? exp_poly<T>(c * r2) : T(1) / std::sqrt(T(1) + c * r2);
}

template <class T>
inline T kernel_deriv_scalar(int kid, T r2, T h) {
  const T c = kernel_coef<T>(kid, h);
  const T k = kernel_value_scalar<T>(kid, r2, h);
  return kid == kRBF ? kernel_deriv_from_value<kRBF>(k, c) : kernel_deriv_from_value<kIMQ>(k, c);
}

}  // namespace cpu
}  // namespace steinops
