// Per-ISA tile microkernels. NO include guard: cpu/isa_instantiate.h includes this once per
// instruction set, inside `#pragma GCC target(...)` and with
//   STEINOPS_ISA_NS  the namespace (avx512 / avx2 / generic)
//   STEINOPS_VBYTES  native vector width in bytes (64 / 32 / 16)
//   STEINOPS_NREGS   vector registers (32 / 16 / 16), sizes the register blocks
// Every function here is serial; the OpenMP parallelism lives in the generic drivers.
//
// Tiles are row-major kTN x kTM buffers of T. Register blocks: RB rows x CB vectors of columns
// with the accumulators kept in registers over the whole reduction (GCC vector extensions, so
// the code is identical for every ISA and the compiler emits SSE2 / AVX2+FMA / AVX-512).

// k(r2), exp, broadcasts, ... compiled for this instruction set (see the note in kernel_math.h)
#include "cpu/kernel_math.h"

namespace steinops {
namespace cpu {
namespace STEINOPS_ISA_NS {

template <class T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(STEINOPS_VBYTES)));
  typedef int32_t I __attribute__((vector_size(STEINOPS_VBYTES)));
  static constexpr int W = STEINOPS_VBYTES / 4;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(STEINOPS_VBYTES)));
  typedef int64_t I __attribute__((vector_size(STEINOPS_VBYTES)));
  static constexpr int W = STEINOPS_VBYTES / 8;
};

constexpr int kRB = 4;                              // rows per register block
constexpr int kCB = STEINOPS_NREGS >= 32 ? 4 : 2;   // column vectors per register block

template <class V, class T>
STEINOPS_ALWAYS_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V, class T>
STEINOPS_ALWAYS_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <class T, class V>
STEINOPS_ALWAYS_INLINE T hsum(const V& v) {
  constexpr int W = sizeof(V) / sizeof(T);
  T s = 0;
#pragma GCC unroll 16
  for (int l = 0; l < W; ++l) s += v[l];
  return s;
}

// ---- sqrt of a vector (no generic builtin for GCC vectors) ------------------------------------
#if defined(STEINOPS_X86) && STEINOPS_VBYTES == 64
STEINOPS_ALWAYS_INLINE Vec<float>::V vsqrt(Vec<float>::V v) { return (Vec<float>::V)_mm512_sqrt_ps((__m512)v); }
STEINOPS_ALWAYS_INLINE Vec<double>::V vsqrt(Vec<double>::V v) { return (Vec<double>::V)_mm512_sqrt_pd((__m512d)v); }
#elif defined(STEINOPS_X86) && STEINOPS_VBYTES == 32
STEINOPS_ALWAYS_INLINE Vec<float>::V vsqrt(Vec<float>::V v) { return (Vec<float>::V)_mm256_sqrt_ps((__m256)v); }
STEINOPS_ALWAYS_INLINE Vec<double>::V vsqrt(Vec<double>::V v) { return (Vec<double>::V)_mm256_sqrt_pd((__m256d)v); }
#elif defined(STEINOPS_X86) && STEINOPS_VBYTES == 16
STEINOPS_ALWAYS_INLINE Vec<float>::V vsqrt(Vec<float>::V v) { return (Vec<float>::V)_mm_sqrt_ps((__m128)v); }
STEINOPS_ALWAYS_INLINE Vec<double>::V vsqrt(Vec<double>::V v) { return (Vec<double>::V)_mm_sqrt_pd((__m128d)v); }
#else
template <class V>
STEINOPS_ALWAYS_INLINE V vsqrt(V v) {
  constexpr int W = sizeof(V) / sizeof(v[0]);
  for (int l = 0; l < W; ++l) v[l] = __builtin_sqrt(v[l]);
  return v;
}
#endif

// ---- pairwise tile: R[i][j] (+)= sum_k f(A[i][k], BT[k][j]) ----------------------------------
// DIFF: f = (a - b)^2 (squared distances by direct differences, exact up to rounding of the sum)
// else: f = a * b (dot products).
// A: nrb*kRB rows with leading dimension lda (features k0..k1 used); BT: [K][kTM] tile;
// columns: ncb blocks of kCB vectors. accum=false starts from zero.
template <class T, bool DIFF>
void pair_tile(const T* A, int64_t lda, const T* BT, T* R, int64_t k0, int64_t k1, int nrb, int ncb,
               bool accum) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  for (int cb = 0; cb < ncb; ++cb) {
    const T* bt = BT + cb * kCB * W;
    for (int rb = 0; rb < nrb; ++rb) {
      T* r = R + (int64_t)rb * kRB * kTM + cb * kCB * W;
      const T* a = A + (int64_t)rb * kRB * lda;
      V acc[kRB][kCB];
#pragma GCC unroll 4
      for (int i = 0; i < kRB; ++i)
#pragma GCC unroll 4
        for (int c = 0; c < kCB; ++c) acc[i][c] = V{};
      for (int64_t k = k0; k < k1; ++k) {
        V b[kCB];
#pragma GCC unroll 4
        for (int c = 0; c < kCB; ++c) b[c] = vload<V>(bt + k * kTM + c * W);
#pragma GCC unroll 4
        for (int i = 0; i < kRB; ++i) {
          const V ai = splat<V>(a[i * lda + k]);
#pragma GCC unroll 4
          for (int c = 0; c < kCB; ++c) {
            if (DIFF) {
              const V t = ai - b[c];
              acc[i][c] += t * t;
            } else {
              acc[i][c] += ai * b[c];
            }
          }
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < kRB; ++i)
#pragma GCC unroll 4
        for (int c = 0; c < kCB; ++c) {
          // chunk sums are added at the end (blocked summation: float32 error grows with kKC + K/kKC, not K)
          if (accum) acc[i][c] += vload<V>(r + i * kTM + c * W);
          vstore(r + i * kTM + c * W, acc[i][c]);
        }
    }
  }
}

// Full distance / dot tile over K features, chunked by kKC so the BT chunk stays in cache.
template <class T, bool DIFF>
void pair_tile_full(const T* A, int64_t lda, const T* BT, T* R, int64_t K, int nrb, int ncb) {
  if (K == 0) {
    for (int i = 0; i < nrb * kRB; ++i) std::memset(R + (int64_t)i * kTM, 0, sizeof(T) * kTM);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t k1 = k0 + kKC < K ? k0 + kKC : K;
    pair_tile<T, DIFF>(A, lda, BT, R, k0, k1, nrb, ncb, k0 > 0);
  }
}

// ---- elementwise kernel values ------------------------------------------------------------
struct VSqrt {
  template <class V>
  STEINOPS_ALWAYS_INLINE V operator()(V v) const {
    return vsqrt(v);
  }
};

// R[i][j] <- k(R[i][j]) for rows < nrows, vectors < nv; coef from kernel_coef().
template <class T, int KID>
void kernel_values(T* R, int nrows, int nv, T coef) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr int W = Vec<T>::W;
  for (int i = 0; i < nrows; ++i) {
    T* r = R + (int64_t)i * kTM;
    for (int j = 0; j < nv; ++j) vstore(r + j * W, kernel_value<KID, T, V, I>(vload<V>(r + j * W), coef, VSqrt{}));
  }
}

// R[i][j] <- k'(R[i][j]) * G[i][j]  (kmv_xgrad's P = k'(r2) (g_n . v_m))
template <class T, int KID>
void kernel_derivs_times(T* R, const T* G, int nrows, int nv, T coef) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr int W = Vec<T>::W;
  for (int i = 0; i < nrows; ++i) {
    T* r = R + (int64_t)i * kTM;
    const T* gg = G + (int64_t)i * kTM;
    for (int j = 0; j < nv; ++j) {
      const V kp = kernel_deriv<KID, T, V, I>(vload<V>(r + j * W), coef, VSqrt{});
      vstore(r + j * W, kp * vload<V>(gg + j * W));
    }
  }
}

// R[i][j] <- k(R[i][j]) and D[i][j] <- k'(R[i][j]) for j < tm, D = 0 for tm <= j < nv*W.
template <class T, int KID>
void kernel_values_derivs(T* R, T* D, int nrows, int nv, int tm, T coef) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr int W = Vec<T>::W;
  for (int i = 0; i < nrows; ++i) {
    T* r = R + (int64_t)i * kTM;
    T* dd = D + (int64_t)i * kTM;
    for (int j = 0; j < nv; ++j) {
      V k, kp;
      kernel_value_deriv<KID, T, V, I>(vload<V>(r + j * W), coef, VSqrt{}, k, kp);
      vstore(r + j * W, k);
      vstore(dd + j * W, kp);
    }
    for (int j = tm; j < nv * W; ++j) dd[j] = T(0);
  }
}

// rs[i] += sum_j P[i][j]
template <class T>
void row_sums(const T* P, int nrows, int nv, T* rs) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  for (int i = 0; i < nrows; ++i) {
    const T* p = P + (int64_t)i * kTM;
    V s0{}, s1{};
    int j = 0;
    for (; j + 1 < nv; j += 2) {
      s0 += vload<V>(p + j * W);
      s1 += vload<V>(p + (j + 1) * W);
    }
    if (j < nv) s0 += vload<V>(p + j * W);
    rs[i] += hsum<T>(s0 + s1);
  }
}

// ---- product with a narrow right-hand side (F <= kSmallF): acc[i][f] += sum_j P[i][j] WT[f][j]
// WT: [F][kTM] transposed tile (zero past the valid columns). acc: [rows][F].
template <class T, int RI, int EB>
STEINOPS_ALWAYS_INLINE void acc_small_block(const T* P, const T* WT, int nv, T* acc, int F, int i0, int f0) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  V s[RI][EB];
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
    for (int e = 0; e < EB; ++e) s[r][e] = V{};
  for (int j = 0; j < nv; ++j) {
    V p[RI], w[EB];
#pragma GCC unroll 4
    for (int r = 0; r < RI; ++r) p[r] = vload<V>(P + (int64_t)(i0 + r) * kTM + j * W);
#pragma GCC unroll 4
    for (int e = 0; e < EB; ++e) w[e] = vload<V>(WT + (int64_t)(f0 + e) * kTM + j * W);
#pragma GCC unroll 4
    for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
      for (int e = 0; e < EB; ++e) s[r][e] += p[r] * w[e];
  }
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
    for (int e = 0; e < EB; ++e) acc[(int64_t)(i0 + r) * F + f0 + e] += hsum<T>(s[r][e]);
}

template <class T>
void acc_small(const T* P, const T* WT, int nrows, int nv, T* acc, int F) {
  constexpr int RI = STEINOPS_NREGS >= 32 ? 4 : 2;  // nrows is a multiple of kRB = 4
  for (int i0 = 0; i0 < nrows; i0 += RI) {
    int f = 0;
    for (; f + 4 <= F; f += 4) acc_small_block<T, RI, 4>(P, WT, nv, acc, F, i0, f);
    for (; f + 2 <= F; f += 2) acc_small_block<T, RI, 2>(P, WT, nv, acc, F, i0, f);
    for (; f < F; ++f) acc_small_block<T, RI, 1>(P, WT, nv, acc, F, i0, f);
  }
}

// ---- product with a wide right-hand side: acc[i][f] += sum_{j<tm} P[i][j] Wm[j][f]
// Wm: rows of width ldw (= Fp, a multiple of every W) starting at the tile's first column.
// Register block RI rows x CE vectors; j is chunked so the Wm slice in use stays in L1.
template <class T, int RI, int CE>
STEINOPS_ALWAYS_INLINE void acc_large_block(const T* P, const T* Wm, int64_t ldw, int j0, int j1, T* acc,
                                            int64_t lda, int i0, int64_t f0) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  V a[RI][CE];
#pragma GCC unroll 8
  for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CE; ++c) a[r][c] = vload<V>(acc + (int64_t)(i0 + r) * lda + f0 + c * W);
  const T* p = P + (int64_t)i0 * kTM;
  for (int j = j0; j < j1; ++j) {
    V w[CE];
#pragma GCC unroll 4
    for (int c = 0; c < CE; ++c) w[c] = vload<V>(Wm + (int64_t)j * ldw + f0 + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < RI; ++r) {
      const V pr = splat<V>(p[r * kTM + j]);
#pragma GCC unroll 4
      for (int c = 0; c < CE; ++c) a[r][c] += pr * w[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RI; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CE; ++c) vstore(acc + (int64_t)(i0 + r) * lda + f0 + c * W, a[r][c]);
}

template <class T, int CE>
STEINOPS_ALWAYS_INLINE void acc_large_rows(const T* P, const T* Wm, int64_t Fp, int j0, int j1, T* acc, int nrows,
                                           int64_t f) {
  constexpr int RI = STEINOPS_NREGS >= 32 ? 8 : 4;
  int i0 = 0;
  for (; i0 + RI <= nrows; i0 += RI) acc_large_block<T, RI, CE>(P, Wm, Fp, j0, j1, acc, Fp, i0, f);
  for (; i0 < nrows; i0 += kRB) acc_large_block<T, kRB, CE>(P, Wm, Fp, j0, j1, acc, Fp, i0, f);
}

template <class T>
void acc_large(const T* P, const T* Wm, int64_t Fp, int tm, T* acc, int nrows) {
  constexpr int W = Vec<T>::W;
  constexpr int CE = STEINOPS_NREGS >= 32 ? 3 : 2;
  constexpr int JC = 8192 / (CE * W * (int)sizeof(T)) * 4;  // Wm slice of JC x CE vectors ~ 32 KB
  for (int j0 = 0; j0 < tm; j0 += JC) {
    const int j1 = j0 + JC < tm ? j0 + JC : tm;
    int64_t f = 0;
    for (; f + CE * W <= Fp; f += CE * W) acc_large_rows<T, CE>(P, Wm, Fp, j0, j1, acc, nrows, f);
    for (; f < Fp; f += W) acc_large_rows<T, 1>(P, Wm, Fp, j0, j1, acc, nrows, f);
  }
}

// ---- row tile setup ---------------------------------------------------------------------
// Copies rows [0, tn) of src (leading dimension ld) to dst and zeroes rows [tn, tnp).
template <class T>
void load_rows(const T* src, int64_t ld, int tn, int tnp, T* dst) {
  if (ld > 0) {
    std::memcpy(dst, src, sizeof(T) * ld * tn);
    std::memset(dst + ld * tn, 0, sizeof(T) * ld * (tnp - tn));
  }
}

// Geometry of one task.
struct TaskGeom {
  int64_t b, n0;
  int tn, tnp, nrb;
};
STEINOPS_ALWAYS_INLINE TaskGeom task_geom(int64_t task, int64_t nrt, int64_t N) {
  TaskGeom g;
  g.b = task / nrt;
  g.n0 = (task % nrt) * kTN;
  g.tn = (int)((N - g.n0) < kTN ? (N - g.n0) : kTN);
  g.tnp = (g.tn + kRB - 1) / kRB * kRB;
  g.nrb = g.tnp / kRB;
  return g;
}

// Columns of one column tile: tm valid, ncb register blocks, nv vectors (ncb * kCB).
struct ColGeom {
  int64_t m0;
  int tm, ncb, nv;
};
template <class T>
STEINOPS_ALWAYS_INLINE ColGeom col_geom(int64_t ct, int64_t M) {
  constexpr int W = Vec<T>::W;
  ColGeom c;
  c.m0 = ct * kTM;
  c.tm = (int)((M - c.m0) < kTM ? (M - c.m0) : kTM);
  c.ncb = (c.tm + kCB * W - 1) / (kCB * W);
  c.nv = c.ncb * kCB;
  return c;
}

}  // namespace STEINOPS_ISA_NS
}  // namespace cpu
}  // namespace steinops
