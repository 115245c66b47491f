// One small SPD system per call, for the one-matrix-per-thread batched ops (cholesky.cpp, sge_small.cpp).
//
// factor_one: right-looking (outer-product) Cholesky on the upper factor U = L^T, row-major: for each k
//   U_kk = sqrt(A_kk),  U_k,j = A_kj / U_kk (j > k),  A_ij -= U_ki U_kj (k < i <= j)
// so every update is an axpy over a contiguous row (vectorised, clones per ISA; no reductions), blocked in
// panels of 4 rows; only the lower triangle of A is read, and the factor is transposed into L at the end.
// Returns LAPACK's info.
// solve_one: X <- (L L^T)^-1 X by forward then back substitution (X row-major (n, E)); solve_one_cols: the
//   same for X stored by columns (E, n), the faster layout for a few right-hand sides.
#pragma once

#include <cmath>
#include <cstdint>

namespace steinops {
namespace cpu {
namespace small_spd {
namespace {  // internal linkage: each including file gets its own clones (no ifunc symbol clashes)

// Function multi-versioning: one clone per x86-64 micro-architecture level, picked at load time. The
// levels (GCC >= 12) bring FMA with AVX2 / AVX-512; plain "avx2" / "avx512f" clones would not enable FMA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define STEINOPS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STEINOPS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STEINOPS_CLONES
#endif

template <class T>
STEINOPS_CLONES int64_t factor_one(const T* __restrict__ A, T* __restrict__ L, T* __restrict__ U, int64_t n) {
  // right-looking on the upper factor U = L^T (row-major): every update is an axpy over a contiguous row
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) U[i * n + j] = A[j * n + i];  // the lower triangle of A, transposed
  // blocked by panels of kNB rows: the panel's rows are factorised among themselves (the unblocked
  // recurrence), then the trailing rows get one rank-kNB update, so each trailing row is streamed once per
  // panel instead of once per k (the update is memory bound: ~2x at n = 128-256).
  constexpr int64_t kNB = 4;
  for (int64_t k0 = 0; k0 < n; k0 += kNB) {
    const int64_t k1 = k0 + kNB < n ? k0 + kNB : n;
    for (int64_t k = k0; k < k1; ++k) {
      T* Uk = U + k * n;
      const T s = Uk[k];
      if (!(s > T(0)) || !std::isfinite(s)) return k + 1;
      const T d = std::sqrt(s), inv = T(1) / d;
      Uk[k] = d;
#pragma omp simd
      for (int64_t j = k + 1; j < n; ++j) Uk[j] *= inv;
      for (int64_t i = k + 1; i < k1; ++i) {  // the rest of the panel: A_i,i: -= U_k,i U_k,i:
        T* Ui = U + i * n;
        const T c = Uk[i];
#pragma omp simd
        for (int64_t j = i; j < n; ++j) Ui[j] -= c * Uk[j];
      }
    }
    const T* P0 = U + k0 * n;
    if (k1 - k0 == kNB) {
      const T *P1 = P0 + n, *P2 = P1 + n, *P3 = P2 + n;
      for (int64_t i = k1; i < n; ++i) {  // A_i,i: -= sum_t U_t,i U_t,i: over the panel rows t
        T* Ui = U + i * n;
        const T c0 = P0[i], c1 = P1[i], c2 = P2[i], c3 = P3[i];
#pragma omp simd
        for (int64_t j = i; j < n; ++j) Ui[j] -= (c0 * P0[j] + c1 * P1[j]) + (c2 * P2[j] + c3 * P3[j]);
      }
    } else {
      for (int64_t i = k1; i < n; ++i) {
        T* Ui = U + i * n;
        for (int64_t t = k0; t < k1; ++t) {
          const T* Pt = U + t * n;
          const T c = Pt[i];
#pragma omp simd
          for (int64_t j = i; j < n; ++j) Ui[j] -= c * Pt[j];
        }
      }
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) L[i * n + j] = U[j * n + i];
  return 0;
}

// X <- L^-T L^-1 X for one matrix (X (n, E) row-major): forward then back substitution, row axpys.
template <class T>
STEINOPS_CLONES void solve_one(const T* __restrict__ L, T* __restrict__ X, int64_t n, int64_t E) {
  for (int64_t i = 0; i < n; ++i) {  // L y = x
    T* Xi = X + i * E;
    for (int64_t k = 0; k < i; ++k) {
      const T c = L[i * n + k];
      const T* Xk = X + k * E;
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) Xi[e] -= c * Xk[e];
    }
    const T inv = T(1) / L[i * n + i];
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) Xi[e] *= inv;
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // L^T z = y
    T* Xi = X + i * E;
    const T inv = T(1) / L[i * n + i];
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) Xi[e] *= inv;
    for (int64_t k = 0; k < i; ++k) {  // column i of L^T above the diagonal = row i of L
      const T c = L[i * n + k];
      T* Xk = X + k * E;
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) Xk[e] -= c * Xi[e];
    }
  }
}

// The same solve for right-hand sides stored by column (XT (E, n) row-major, each one contiguous): forward
// substitution as dot products with row i of L, back substitution as axpys with row i of L (column i of L^T).
// Every inner loop runs over a contiguous row of L, so it vectorises for any E; solve_one's loops run over
// the E entries of a row, which for E = 1-4 (the SGE of 2-D data) is a scalar loop per (i, k) pair (~6x slower
// at n = 128).
template <class T>
STEINOPS_CLONES void solve_one_cols(const T* __restrict__ L, T* __restrict__ XT, int64_t n, int64_t E) {
  for (int64_t e = 0; e < E; ++e) {
    T* x = XT + e * n;
    for (int64_t i = 0; i < n; ++i) {  // L y = x
      const T* Li = L + i * n;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < i; ++k) acc += Li[k] * x[k];
      x[i] = (x[i] - acc) / Li[i];
    }
    for (int64_t i = n - 1; i >= 0; --i) {  // L^T z = y
      const T* Li = L + i * n;
      const T xi = x[i] / Li[i];
      x[i] = xi;
#pragma omp simd
      for (int64_t k = 0; k < i; ++k) x[k] -= xi * Li[k];
    }
  }
}

}  // namespace
}  // namespace small_spd
}  // namespace cpu
}  // namespace steinops
