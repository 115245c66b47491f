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
//   loop is D subs + D FMAs + one MUFU op (ex2.approx for RBF, rsqrt.approx for the IMQ family,
//   whose powers s^3 / s^5 for kernel ids 2 / 3 are 2 / 3 more multiplies) + EC FMAs;
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
// Files: the kernels live in kernel_matvec.cuh (torch-free), the host side below.
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

#include "kernel_matvec.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace steinops {
namespace cuda {
namespace {

using namespace detail;

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
  TORCH_CHECK(kernel >= 0 && kernel <= 3,
              "kmv_forward (CUDA): kernel must be 0 (rbf), 1 (imq), 2 (imq cubed) or 3 (imq^5), got ", kernel);
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
    at::Tensor out;
    dispatch_int<0, 1, 2, 3>(static_cast<int>(kernel), "kernel id", [&](auto kc) {
      out = kmv_typed<double, decltype(kc)::value>(x, y, v, h, pb, stream, device);
    });
    return out;
  }
  // float32 compute for float32, float16 and bfloat16.
  const bool cast = dtype != at::kFloat;
  const at::Tensor xf = cast ? x.to(at::kFloat) : x;
  const at::Tensor yf = cast ? y.to(at::kFloat) : y;
  const at::Tensor vf = cast ? v.to(at::kFloat) : v;
  const at::Tensor hf = cast ? h.to(at::kFloat) : h;
  at::Tensor out;
  dispatch_int<0, 1, 2, 3>(static_cast<int>(kernel), "kernel id", [&](auto kc) {
    out = kmv_typed<float, decltype(kc)::value>(xf, yf, vf, hf, pb, stream, device);
  });
  return cast ? out.to(dtype) : out;
}

}  // namespace cuda
}  // namespace steinops

TORCH_LIBRARY_IMPL(steinops_C, CUDA, m) {
  m.impl("kmv_forward", &steinops::cuda::kmv_forward_cuda);
}
