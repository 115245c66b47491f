// Device code of the CUDA kmv_forward (see kernel_matvec.cu for the design notes and the host
// side). Depends only on the CUDA toolkit headers (no torch), so the kernels can be reused by other
// ops of the backend.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace steinops {
namespace cuda {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Kernel profiles. With t = kInit + kSign * coef(h) * r2, k = from_t(t):
//   RBF float : coef = log2(e) / (2 h^2), t = -coef r2,  k = 2^t      (one MUFU.EX2)
//   RBF double: coef = 1 / (2 h^2),       t = -coef r2,  k = exp(t)
//   IMQ       : coef = 1 / h^2,           t = 1 + coef r2, k = t^(-1/2) (one MUFU.RSQ for float)
//   IMQ cubed : as IMQ, k = s^3 with s = t^(-1/2)   (id 2, the Stein profile of IMQ)
//   IMQ^5     : as IMQ, k = s^5                      (id 3, the trace term of the IMQ KSD)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float fast_exp2(float t) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));  // one MUFU.EX2, whatever the math flags
  return r;
#else
  return exp2f(t);
#endif
}

__device__ __forceinline__ float fast_rsqrt(float t) {
#ifdef __CUDA_ARCH__
  float r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));  // one MUFU.RSQ
  return r;
#else
  return 1.f / sqrtf(t);
#endif
}

template <typename A, int KERNEL>
struct Profile;

template <>
struct Profile<float, 0> {
  static constexpr float kInit = 0.f;
  static constexpr float kSign = -1.f;
  __device__ static float coef(float h) { return 1.4426950408889634f / (2.f * h * h); }
  __device__ static float from_t(float t) { return fast_exp2(t); }
};

template <>
struct Profile<float, 1> {
  static constexpr float kInit = 1.f;
  static constexpr float kSign = 1.f;
  __device__ static float coef(float h) { return 1.f / (h * h); }
  __device__ static float from_t(float t) { return fast_rsqrt(t); }
};

template <>
struct Profile<double, 0> {
  static constexpr double kInit = 0.0;
  static constexpr double kSign = -1.0;
  __device__ static double coef(double h) { return 1.0 / (2.0 * h * h); }
  __device__ static double from_t(double t) { return exp(t); }
};

template <>
struct Profile<double, 1> {
  static constexpr double kInit = 1.0;
  static constexpr double kSign = 1.0;
  __device__ static double coef(double h) { return 1.0 / (h * h); }
  __device__ static double from_t(double t) { return rsqrt(t); }
};

// IMQ cubed and IMQ^5: the IMQ t and rsqrt, then a power by multiplications (no extra MUFU op).
template <typename A>
struct Profile<A, 2> : Profile<A, 1> {
  __device__ static A from_t(A t) {
    const A s = Profile<A, 1>::from_t(t);
    return s * s * s;
  }
};

template <typename A>
struct Profile<A, 3> : Profile<A, 1> {
  __device__ static A from_t(A t) {
    const A s = Profile<A, 1>::from_t(t);
    const A s2 = s * s;
    return s2 * s2 * s;
  }
};

constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

// 16-byte shared-memory loads of a packed record (REC is a multiple of the vector width).
template <int REC>
__device__ __forceinline__ void load_record(const float* __restrict__ p, float (&r)[REC]) {
  static_assert(REC % 4 == 0, "record must be a whole number of float4");
#pragma unroll
  for (int i = 0; i < REC; i += 4) {
    const float4 q = *reinterpret_cast<const float4*>(p + i);
    r[i] = q.x;
    r[i + 1] = q.y;
    r[i + 2] = q.z;
    r[i + 3] = q.w;
  }
}

template <int REC>
__device__ __forceinline__ void load_record(const double* __restrict__ p, double (&r)[REC]) {
  static_assert(REC % 2 == 0, "record must be a whole number of double2");
#pragma unroll
  for (int i = 0; i < REC; i += 2) {
    const double2 q = *reinterpret_cast<const double2*>(p + i);
    r[i] = q.x;
    r[i + 1] = q.y;
  }
}

// ---------------------------------------------------------------------------------------------
// Direct-difference kernel, d <= 8.
// ---------------------------------------------------------------------------------------------
template <typename A, int D, int EC>
struct DirectCfg {
  static constexpr int kThreads = 128;
  // Rows per thread: more rows = more reuse of each shared-memory record; fewer when the
  // EC accumulators per row already take many registers (halved for double: 2 registers each).
  static constexpr int kRows = (EC <= 4 ? 4 : 2) / (sizeof(A) == 8 ? 2 : 1);
  static constexpr int kRowsPerBlock = kThreads * kRows;
  static constexpr int kTile = sizeof(A) == 4 ? 128 : 64;  // samples per shared-memory tile
  static constexpr int kVec = 16 / static_cast<int>(sizeof(A));
  static constexpr int kRec = round_up(D + EC, kVec);  // packed record: y (D), v (EC), pad
};

// grid: x = row blocks, y = n_chunks * splits (chunk fastest), z = batch (offset b_offset).
// ws[(split, b, n, e)] receives the partial sum of this launch's e-range over the split's samples.
template <typename A, int KERNEL, int D, int EC>
__global__ void __launch_bounds__(DirectCfg<A, D, EC>::kThreads)
kmv_direct_kernel(const A* __restrict__ x, const A* __restrict__ y, const A* __restrict__ v,
                  const A* __restrict__ h, A* __restrict__ ws, int64_t B, int64_t N, int64_t M,
                  int64_t d, int64_t E, int64_t e_begin, int n_chunks, int64_t m_per_split,
                  int64_t b_offset) {
  using C = DirectCfg<A, D, EC>;
  using P = Profile<A, KERNEL>;
  constexpr int R = C::kRows;
  constexpr int T = C::kThreads;
  constexpr int TILE = C::kTile;
  constexpr int REC = C::kRec;
  __shared__ __align__(16) A tile[TILE * REC];

  const int tid = threadIdx.x;
  const int64_t b = b_offset + blockIdx.z;
  const int chunk = blockIdx.y % n_chunks;
  const int64_t split = blockIdx.y / n_chunks;
  const int64_t e0 = e_begin + static_cast<int64_t>(chunk) * EC;
  const int64_t m_begin = split * m_per_split;
  const int64_t m_end = m_begin + m_per_split < M ? m_begin + m_per_split : M;
  // Coordinates are pre-scaled by sqrt(coef): then t = kInit + kSign * sum_k (sx_k - sy_k)^2.
  const A s = sqrt(P::coef(h[b]));

  const A* xb = x + b * N * d;
  const A* yb = y + b * M * d;
  const A* vb = v + b * M * E;
  const int64_t n_first = static_cast<int64_t>(blockIdx.x) * C::kRowsPerBlock + tid;

  A xr[R][D];
  A acc[R][EC];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n_first + r * T;
#pragma unroll
    for (int k = 0; k < D; ++k) xr[r][k] = (n < N && k < d) ? s * xb[n * d + k] : A(0);
#pragma unroll
    for (int e = 0; e < EC; ++e) acc[r][e] = A(0);
  }

  for (int64_t m0 = m_begin; m0 < m_end; m0 += TILE) {
    __syncthreads();  // previous tile fully consumed
    // Stage TILE packed records. Samples past m_end get y = 0, v = 0 (they add k * 0 = 0).
    for (int i = tid; i < TILE * REC; i += T) {
      const int mm = i / REC;
      const int c = i - mm * REC;
      const int64_t m = m0 + mm;
      A val = A(0);
      if (m < m_end) {
        if (c < D) {
          if (c < d) val = s * yb[m * d + c];
        } else if (c < D + EC) {
          const int64_t e = e0 + (c - D);
          if (e < E) val = vb[m * E + e];
        }
      }
      tile[i] = val;
    }
    __syncthreads();

#pragma unroll 2
    for (int mm = 0; mm < TILE; ++mm) {
      A rec[REC];
      load_record<REC>(tile + mm * REC, rec);  // broadcast: same address for the whole warp
#pragma unroll
      for (int r = 0; r < R; ++r) {
        A t = P::kInit;
#pragma unroll
        for (int k = 0; k < D; ++k) {
          const A df = xr[r][k] - rec[k];
          t = fma(P::kSign * df, df, t);
        }
        const A kv = P::from_t(t);
#pragma unroll
        for (int e = 0; e < EC; ++e) acc[r][e] = fma(kv, rec[D + e], acc[r][e]);
      }
    }
  }

  A* out = ws + (split * B + b) * N * E;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n_first + r * T;
    if (n < N) {
#pragma unroll
      for (int e = 0; e < EC; ++e)
        if (e0 + e < E) out[n * E + e0 + e] = acc[r][e];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dot-form kernel, d > 8.
// ---------------------------------------------------------------------------------------------
template <typename A>
struct DotCfg {
  static constexpr int kThreads = 256;  // 16 x 16 thread grid in phase 1
  static constexpr int kBN = sizeof(A) == 4 ? 64 : 32;  // query rows per block
  static constexpr int kBM = kBN;                        // samples per tile
  static constexpr int kKC = 16;                         // feature slice staged per step
  static constexpr int kTN = kBN / 16;                   // dot products per thread: kTN x kTM
  static constexpr int kTM = kBM / 16;
  static constexpr int kGroups = kThreads / kBN;  // phase 2: kGroups threads share a row
};

template <typename A, int KERNEL, int EC>
__global__ void __launch_bounds__(DotCfg<A>::kThreads)
kmv_dot_kernel(const A* __restrict__ x, const A* __restrict__ y, const A* __restrict__ v,
               const A* __restrict__ h, const A* __restrict__ xn2, const A* __restrict__ yn2,
               A* __restrict__ ws, int64_t B, int64_t N, int64_t M, int64_t d, int64_t E,
               int64_t e_begin, int n_chunks, int64_t m_per_split, int64_t b_offset) {
  using C = DotCfg<A>;
  using P = Profile<A, KERNEL>;
  constexpr int T = C::kThreads, BN = C::kBN, BM = C::kBM, KC = C::kKC, TN = C::kTN, TM = C::kTM;
  constexpr int G = C::kGroups;
  constexpr int EPT = (EC + G - 1) / G;  // outputs per thread in phase 2
  __shared__ A Xs[KC][BN + 1];           // +1: conflict-free transposed stores
  __shared__ A Ys[KC][BM + 1];
  __shared__ A Ps[BN][BM + 1];           // kernel values of the current tile
  __shared__ A Vs[BM][EC];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t b = b_offset + blockIdx.z;
  const int chunk = blockIdx.y % n_chunks;
  const int64_t split = blockIdx.y / n_chunks;
  const int64_t e0 = e_begin + static_cast<int64_t>(chunk) * EC;
  const int64_t m_begin = split * m_per_split;
  const int64_t m_end = m_begin + m_per_split < M ? m_begin + m_per_split : M;
  const A scoef = P::kSign * P::coef(h[b]);

  const A* xb = x + b * N * d;
  const A* yb = y + b * M * d;
  const A* vb = v + b * M * E;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;

  A xq[TN];
#pragma unroll
  for (int i = 0; i < TN; ++i) {
    const int64_t n = n0 + ty + 16 * i;
    xq[i] = n < N ? xn2[b * N + n] : A(0);
  }
  // Phase-2 ownership: row nl, outputs g * EPT .. g * EPT + EPT - 1 of the chunk.
  const int nl = tid % BN, g = tid / BN;
  const bool active = g * EPT < EC;  // warp-uniform (BN >= 32)
  A acc[EPT];
#pragma unroll
  for (int q = 0; q < EPT; ++q) acc[q] = A(0);

  for (int64_t m0 = m_begin; m0 < m_end; m0 += BM) {
    A dot[TN][TM];
#pragma unroll
    for (int i = 0; i < TN; ++i)
#pragma unroll
      for (int j = 0; j < TM; ++j) dot[i][j] = A(0);

    for (int64_t k0 = 0; k0 < d; k0 += KC) {
      __syncthreads();  // Xs / Ys free (and, on the first slice, Ps / Vs of the last tile)
      for (int i = tid; i < BN * KC; i += T) {
        const int r = i / KC, kk = i % KC;
        const int64_t n = n0 + r, k = k0 + kk;
        Xs[kk][r] = (n < N && k < d) ? xb[n * d + k] : A(0);
      }
      for (int i = tid; i < BM * KC; i += T) {
        const int r = i / KC, kk = i % KC;
        const int64_t m = m0 + r, k = k0 + kk;
        Ys[kk][r] = (m < m_end && k < d) ? yb[m * d + k] : A(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) {
        A a[TN], bb[TM];
#pragma unroll
        for (int i = 0; i < TN; ++i) a[i] = Xs[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TM; ++j) bb[j] = Ys[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TN; ++i)
#pragma unroll
          for (int j = 0; j < TM; ++j) dot[i][j] = fma(a[i], bb[j], dot[i][j]);
      }
    }

    // Kernel values -> shared memory.
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t m = m0 + tx + 16 * j;
      const bool valid = m < m_end;
      const A yq = valid ? yn2[b * M + m] : A(0);
#pragma unroll
      for (int i = 0; i < TN; ++i) {
        A r2 = xq[i] + yq - A(2) * dot[i][j];
        r2 = r2 > A(0) ? r2 : A(0);
        Ps[ty + 16 * i][tx + 16 * j] = valid ? P::from_t(fma(scoef, r2, P::kInit)) : A(0);
      }
    }
    for (int i = tid; i < BM * EC; i += T) {
      const int mm = i / EC, e = i % EC;
      const int64_t m = m0 + mm;
      Vs[mm][e] = (m < m_end && e0 + e < E) ? vb[m * E + e0 + e] : A(0);
    }
    __syncthreads();

    // out[nl, e] += sum_m P[nl, m] v[m, e]
    if (active) {
#pragma unroll 8
      for (int mm = 0; mm < BM; ++mm) {
        const A p = Ps[nl][mm];
#pragma unroll
        for (int q = 0; q < EPT; ++q) acc[q] = fma(p, Vs[mm][g * EPT + q], acc[q]);
      }
    }
  }

  const int64_t n = n0 + nl;
  if (active && n < N) {
    A* out = ws + ((split * B + b) * N + n) * E;
#pragma unroll
    for (int q = 0; q < EPT; ++q) {
      const int64_t e = e0 + g * EPT + q;
      if (e < E) out[e] = acc[q];
    }
  }
}

// Squared row norms (one warp per row), for the dot form.
template <typename A>
__global__ void __launch_bounds__(256)
row_sqnorm_kernel(const A* __restrict__ x, A* __restrict__ out, int64_t rows, int64_t d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const A* xr = x + row * d;
  A s = A(0);
  for (int64_t k = lane; k < d; k += 32) s = fma(xr[k], xr[k], s);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) out[row] = s;
}

}  // namespace detail
}  // namespace cuda
}  // namespace steinops
