// CUDA backend of kmv_forward:  out[b, n, :] = sum_m k(|x[b, n] - y[b, m]|^2) v[b, m, :]
// (contract: csrc/README.md; schema: csrc/ops.cpp). Nothing of size N x M is ever allocated.
//
// Design
// ------
// Two fused, tiled kernels, both of the form "rows of x per thread block, y and v streamed through
// shared memory tile by tile, k(r2) and the product with v accumulated in registers":
//
// * kmv_direct_kernel (d <= 8): r2 by direct differences (exact, no cancellation). d is a
//   compile-time D in {1, 2, 3, 4, 8} (d = 5..7 is zero-padded to 8). Each thread owns R query
//   rows (x held in registers, pre-multiplied by sqrt of the kernel coefficient so the inner loop
//   needs no scaling) and EC outputs per row. A y tile is staged in shared memory as packed
//   records [y_0..y_{D-1}, v_0..v_{EC-1}, pad] read back with 16-byte vector loads; every thread of
//   a warp reads the same record (broadcast, no bank conflicts). Per (row, sample) pair the inner
//   loop is D subs + D FMAs + one MUFU op (ex2.approx for RBF, rsqrt.approx for IMQ) + EC FMAs;
//   for d = 3, E = 1 that is ~8 instructions per pair plus 1/R of a 16-byte shared load, so the
//   kernel is bound by instruction issue / the SFU pipe, as intended (N = M = 1e5, d = 3 is 1e10
//   pairs: ~3 ms of issue on an H100 at full occupancy).
// * kmv_dot_kernel (d > 8): r2 = |x|^2 + |y|^2 - 2 x.y (inputs are centred by the caller), with
//   the x.y block computed like a small SGEMM: BN x BM tile, KC-wide slices of x and y staged
//   (transposed, padded) in shared memory, 4x4 (float) / 2x2 (double) register blocking per
//   thread. The BN x BM kernel values go to shared memory and a second register-blocked pass
//   multiplies them with the staged v tile (flash-attention style). Row norms come from a tiny
//   pre-pass (O((N + M) B) memory).
//
// Outputs: E is split over grid.y into chunks of a compile-time width EC in {1, 4, 8, 16, 32}
// (E >= 32: full chunks of 32 plus one launch for the remainder with the smallest EC that fits;
// padded v columns are zero). To fill the GPU when B * N is small, the sample axis M is also split
// over grid.y (splits sized from the occupancy calculator to ~2 waves); each split writes its own
// partial sum to a workspace (S, B, N, E) that is then reduced with at::sum -- deterministic, no
// atomics, O(S N E) memory.
//
// Precision: float32 inputs accumulate in float32 (fast ex2/rsqrt: ~2 ulp); float64 in float64
// (exp, rsqrt); float16 / bfloat16 inputs are converted to float32 up front (O((N + M) d) copies),
// computed in float32 and the result is converted back to the input dtype.
//
// Headers: only c10/cuda (stream, guard, launch check) and ATen core; ATen/cuda/CUDAContext.h is
// avoided on purpose (it pulls in cuBLAS / cuSPARSE / cuSOLVER headers that are not needed here).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace steinops {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernel profiles. With t = kInit + kSign * coef(h) * r2, k = from_t(t):
//   RBF float : coef = log2(e) / (2 h^2), t = -coef r2,  k = 2^t      (one MUFU.EX2)
//   RBF double: coef = 1 / (2 h^2),       t = -coef r2,  k = exp(t)
//   IMQ       : coef = 1 / h^2,           t = 1 + coef r2, k = t^(-1/2) (one MUFU.RSQ for float)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float fast_exp2(float t) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
}

__device__ __forceinline__ float fast_rsqrt(float t) {
  float r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
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
  // EC accumulators per row already take many registers.
  static constexpr int kRows = EC <= 4 ? 4 : 2;
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

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
template <int... Vs, typename F>
void dispatch_int(int value, const char* what, F&& f) {
  const bool done = ((value == Vs ? (f(std::integral_constant<int, Vs>{}), true) : false) || ...);
  TORCH_CHECK(done, "steinops kmv_forward (CUDA): unsupported ", what, " ", value);
}

int fit_ec(int64_t e) { return e <= 1 ? 1 : e <= 4 ? 4 : e <= 8 ? 8 : e <= 16 ? 16 : 32; }

int sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n > 0 ? n : 1;
}

struct Plan {
  int64_t splits = 1;
  int64_t m_per_split = 0;
};

// Split the sample axis so that about two waves of resident blocks are launched.
Plan plan_splits(int64_t base_blocks, int64_t resident_blocks, int64_t M, int64_t tile,
                 int64_t n_chunks) {
  const int64_t tiles = (M + tile - 1) / tile;
  int64_t s = 1;
  if (base_blocks < resident_blocks) s = (2 * resident_blocks) / std::max<int64_t>(base_blocks, 1);
  s = std::min(s, std::max<int64_t>(tiles / 4, 1));  // keep >= 4 tiles per split
  s = std::min(s, std::max<int64_t>(65535 / n_chunks, 1));  // grid.y limit
  s = std::max<int64_t>(s, 1);
  const int64_t tiles_per_split = (tiles + s - 1) / s;
  Plan p;
  p.splits = (tiles + tiles_per_split - 1) / tiles_per_split;
  p.m_per_split = tiles_per_split * tile;
  return p;
}

struct Problem {
  int64_t B, N, M, d, E;
};

// Launches one kernel over all batch elements (grid.z is chunked to its 65535 limit).
template <typename Launch>
void for_batches(int64_t B, Launch&& launch) {
  for (int64_t b0 = 0; b0 < B; b0 += 65535) {
    launch(b0, static_cast<unsigned>(std::min<int64_t>(B - b0, 65535)));
  }
}

template <typename A, int KERNEL>
at::Tensor kmv_typed(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v,
                     const at::Tensor& h, const Problem& pb, cudaStream_t stream, int device) {
  const int64_t B = pb.B, N = pb.N, M = pb.M, d = pb.d, E = pb.E;
  const A* xp = x.data_ptr<A>();
  const A* yp = y.data_ptr<A>();
  const A* vp = v.data_ptr<A>();
  const A* hp = h.data_ptr<A>();

  // E chunks: one launch of width ec_main over n_main chunks, plus a remainder launch.
  const int ec_main = E >= 32 ? 32 : fit_ec(E);
  const int64_t n_main = E >= 32 ? E / 32 : 1;
  const int64_t e_rem = E >= 32 ? E % 32 : 0;
  const int64_t n_chunks_total = n_main + (e_rem > 0 ? 1 : 0);
  TORCH_CHECK(n_main <= 65535, "steinops kmv_forward (CUDA): E = ", E, " is too large");
  const int sms = sm_count(device);

  at::Tensor ws;
  Plan plan;
  auto alloc_ws = [&](int64_t splits) {
    ws = at::empty({splits, B, N, E}, x.options());
  };

  if (d <= 8) {
    const int dpad = d <= 1 ? 1 : d <= 2 ? 2 : d <= 3 ? 3 : d <= 4 ? 4 : 8;
    dispatch_int<1, 2, 3, 4, 8>(dpad, "padded d", [&](auto dc) {
      constexpr int D = decltype(dc)::value;
      auto launch = [&](auto ecc, int64_t e_begin, int64_t n_chunks, bool first) {
        constexpr int EC = decltype(ecc)::value;
        using Cfg = DirectCfg<A, D, EC>;
        auto kern = kmv_direct_kernel<A, KERNEL, D, EC>;
        const int64_t row_blocks = (N + Cfg::kRowsPerBlock - 1) / Cfg::kRowsPerBlock;
        if (first) {
          int per_sm = 0;
          C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, Cfg::kThreads, 0));
          plan = plan_splits(row_blocks * n_chunks_total * B, std::max(per_sm, 1) * int64_t(sms), M,
                             Cfg::kTile, n_chunks_total);
          alloc_ws(plan.splits);
        }
        for_batches(B, [&](int64_t b0, unsigned nb) {
          const dim3 grid(static_cast<unsigned>(row_blocks),
                          static_cast<unsigned>(n_chunks * plan.splits), nb);
          kern<<<grid, Cfg::kThreads, 0, stream>>>(xp, yp, vp, hp, ws.data_ptr<A>(), B, N, M, d, E,
                                                   e_begin, static_cast<int>(n_chunks),
                                                   plan.m_per_split, b0);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      };
      dispatch_int<1, 4, 8, 16, 32>(ec_main, "E chunk", [&](auto ecc) { launch(ecc, 0, n_main, true); });
      if (e_rem > 0)
        dispatch_int<1, 4, 8, 16, 32>(fit_ec(e_rem), "E chunk",
                                      [&](auto ecc) { launch(ecc, n_main * 32, 1, false); });
    });
  } else {
    using Cfg = DotCfg<A>;
    at::Tensor xn2 = at::empty({B * N}, x.options());
    at::Tensor yn2 = at::empty({B * M}, x.options());
    auto norms = [&](const A* src, A* dst, int64_t rows) {
      const int64_t blocks = (rows + 7) / 8;
      TORCH_CHECK(blocks <= 0x7fffffff, "steinops kmv_forward (CUDA): too many rows");
      row_sqnorm_kernel<A><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(src, dst, rows, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    norms(xp, xn2.data_ptr<A>(), B * N);
    norms(yp, yn2.data_ptr<A>(), B * M);
    const int64_t row_blocks = (N + Cfg::kBN - 1) / Cfg::kBN;
    auto launch = [&](auto ecc, int64_t e_begin, int64_t n_chunks, bool first) {
      constexpr int EC = decltype(ecc)::value;
      auto kern = kmv_dot_kernel<A, KERNEL, EC>;
      if (first) {
        int per_sm = 0;
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, Cfg::kThreads, 0));
        plan = plan_splits(row_blocks * n_chunks_total * B, std::max(per_sm, 1) * int64_t(sms), M,
                           Cfg::kBM, n_chunks_total);
        alloc_ws(plan.splits);
      }
      for_batches(B, [&](int64_t b0, unsigned nb) {
        const dim3 grid(static_cast<unsigned>(row_blocks),
                        static_cast<unsigned>(n_chunks * plan.splits), nb);
        kern<<<grid, Cfg::kThreads, 0, stream>>>(xp, yp, vp, hp, xn2.data_ptr<A>(), yn2.data_ptr<A>(),
                                                 ws.data_ptr<A>(), B, N, M, d, E, e_begin,
                                                 static_cast<int>(n_chunks), plan.m_per_split, b0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    dispatch_int<1, 4, 8, 16, 32>(ec_main, "E chunk", [&](auto ecc) { launch(ecc, 0, n_main, true); });
    if (e_rem > 0)
      dispatch_int<1, 4, 8, 16, 32>(fit_ec(e_rem), "E chunk",
                                    [&](auto ecc) { launch(ecc, n_main * 32, 1, false); });
  }
  return plan.splits == 1 ? ws.select(0, 0) : ws.sum(0);
}

void check_input(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "kmv_forward (CUDA): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == x.device(), "kmv_forward (CUDA): ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "kmv_forward (CUDA): ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.dim() == dim, "kmv_forward (CUDA): ", name, " must have ", dim,
              " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "kmv_forward (CUDA): ", name, " must be contiguous");
}

}  // namespace

at::Tensor kmv_forward_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v,
                            const at::Tensor& h, int64_t kernel) {
  check_input(x, "x", x, 3);
  check_input(y, "y", x, 3);
  check_input(v, "v", x, 3);
  check_input(h, "h", x, 1);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "kmv_forward (CUDA): unsupported dtype ", dtype);
  TORCH_CHECK(kernel == 0 || kernel == 1, "kmv_forward (CUDA): kernel must be 0 (rbf) or 1 (imq), got ",
              kernel);
  const Problem pb{x.size(0), x.size(1), y.size(1), x.size(2), v.size(2)};
  TORCH_CHECK(y.size(0) == pb.B && v.size(0) == pb.B && h.size(0) == pb.B,
              "kmv_forward (CUDA): batch sizes differ: x ", x.sizes(), ", y ", y.sizes(), ", v ",
              v.sizes(), ", h ", h.sizes());
  TORCH_CHECK(y.size(2) == pb.d, "kmv_forward (CUDA): x is ", x.sizes(), " but y is ", y.sizes());
  TORCH_CHECK(v.size(1) == pb.M, "kmv_forward (CUDA): y is ", y.sizes(), " but v is ", v.sizes());

  c10::cuda::CUDAGuard guard(x.device());
  if (pb.B == 0 || pb.N == 0 || pb.E == 0) return at::empty({pb.B, pb.N, pb.E}, x.options());
  if (pb.M == 0) return at::zeros({pb.B, pb.N, pb.E}, x.options());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int device = x.get_device();

  if (dtype == at::kDouble) {
    return kernel == 0 ? kmv_typed<double, 0>(x, y, v, h, pb, stream, device)
                       : kmv_typed<double, 1>(x, y, v, h, pb, stream, device);
  }
  // float32 compute for float32, float16 and bfloat16.
  const bool cast = dtype != at::kFloat;
  const at::Tensor xf = cast ? x.to(at::kFloat) : x;
  const at::Tensor yf = cast ? y.to(at::kFloat) : y;
  const at::Tensor vf = cast ? v.to(at::kFloat) : v;
  const at::Tensor hf = cast ? h.to(at::kFloat) : h;
  at::Tensor out = kernel == 0 ? kmv_typed<float, 0>(xf, yf, vf, hf, pb, stream, device)
                               : kmv_typed<float, 1>(xf, yf, vf, hf, pb, stream, device);
  return cast ? out.to(dtype) : out;
}

}  // namespace cuda
}  // namespace steinops

TORCH_LIBRARY_IMPL(steinops_C, CUDA, m) {
  m.impl("kmv_forward", &steinops::cuda::kmv_forward_cuda);
}
