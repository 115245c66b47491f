// The Gaussian-window Stein ratio (steinops/estimators/window.py) of B sample sets in one pass per query:
//
//   g(y_n) = (sum_j w_nj x_j / sum_j w_nj - y_n) / h^2,   w_nj = exp(-|y_n - x_j|^2 / (2 h^2) - max),
//   n_eff(y_n) = (sum_j w_nj)^2 / sum_j w_nj^2,           j over the M samples except exclude[n] (if given).
//
// Each query's M log-weights go to a per-thread scratch row, are shifted by their maximum (so an isolated
// query never underflows to 0 / 0) and exponentiated with kernel_math.h's branch-free polynomial; the sums
// run in the input dtype over samples centred in float64 (structure of arrays, d x M, so the loops over j
// vectorise). O(B N M d) time, O(M) scratch per thread, no N x M array. Parallel over the B N queries.
// Forward only: the Python wrapper keeps the autograd path in plain torch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cholesky_impl.h"  // STEINOPS_CLONES
#include "cpu_ops.h"
#include "kernel_math.h"

namespace steinops {
namespace cpu {

namespace {

// One query y (d, centred like the samples) against the centred samples xT (d x M) of its set; r (M)
// scratch. Writes g (d) and n_eff. T = the input dtype: float32 sets run 8-lane float arithmetic (its exp
// polynomial is < 1 ulp, and sum_j w_j (x_j - y) avoids the cancellation of sum_j w_j x_j - y sum_j w_j).
template <class T>
STEINOPS_CLONES void window_one(const T* __restrict__ xT, const T* __restrict__ y, int64_t M, int64_t d, T inv_h2,
                                int64_t skip, T* __restrict__ r, T* __restrict__ g, T* neff) {
  using I = typename ExpConst<T>::Int;
  const T coef = T(-0.5) * inv_h2;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) r[j] = T(0);
  for (int64_t c = 0; c < d; ++c) {
    const T yc = y[c];
    const T* xc = xT + c * M;
#pragma omp simd
    for (int64_t j = 0; j < M; ++j) r[j] += (yc - xc[j]) * (yc - xc[j]);
  }
  if (skip >= 0) r[skip] = std::numeric_limits<T>::infinity();  // weight exactly 0 below
  // the nearest kept sample (the largest log-weight), in 16 lanes: a std::min reduction does not vectorise
  // without -ffast-math (its NaN order), it ran as a serial vminss chain at ~70% of the op's time
  constexpr int64_t W = 16;
  T lane[W];
  for (int64_t l = 0; l < W; ++l) lane[l] = std::numeric_limits<T>::infinity();
  int64_t j0 = 0;
  for (; j0 + W <= M; j0 += W) {
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) lane[l] = r[j0 + l] < lane[l] ? r[j0 + l] : lane[l];
  }
  for (; j0 < M; ++j0) lane[0] = r[j0] < lane[0] ? r[j0] : lane[0];
  T rmin = lane[0];
  for (int64_t l = 1; l < W; ++l) rmin = lane[l] < rmin ? lane[l] : rmin;
  const T top = rmin * coef;
  T s0 = T(0), s2 = T(0);
#pragma omp simd reduction(+ : s0, s2)
  for (int64_t j = 0; j < M; ++j) {  // r >= rmin and coef < 0: coef r - top <= 0 exactly (-inf, weight 0, if skipped)
    const T w = scalar::exp_poly_nonpos<T, T, I>(r[j] * coef - top);
    r[j] = w;
    s0 += w, s2 += w * w;
  }
  for (int64_t c = 0; c < d; ++c) {
    const T yc = y[c];
    const T* xc = xT + c * M;
    T s1 = T(0);
#pragma omp simd reduction(+ : s1)
    for (int64_t j = 0; j < M; ++j) s1 += r[j] * (xc[j] - yc);
    g[c] = s1 / s0 * inv_h2;
  }
  *neff = s0 * s0 / s2;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_score(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                                                const at::Tensor& exclude) {
  const int64_t B = x.size(0), M = x.size(1), d = x.size(2), N = y.size(1);
  const bool has_ex = exclude.numel() > 0;
  at::Tensor g = at::empty({B, N, d}, x.options());
  at::Tensor neff = at::empty({B, N}, x.options());
  // samples centred (in float64) and transposed to (B, d, M) in the input dtype, their centres (B, d);
  // per-thread scratch: M weights and the centred query (d)
  at::Tensor xT = at::empty({B, d, M}, x.options());
  at::Tensor centre = at::empty({B, d}, x.options().dtype(at::kDouble));
  const int64_t per_thread = M + d;
  at::Tensor work = at::empty({at::get_num_threads(), per_thread}, x.options());
  double* cp = centre.data_ptr<double>();
  const int64_t* ex = has_ex ? exclude.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "steinops_window_score", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* xTp = xT.data_ptr<scalar_t>();
    scalar_t* wp = work.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* np = neff.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t c = 0; c < d; ++c) {
          double s = 0.0;
          for (int64_t j = 0; j < M; ++j) s += double(xp[(b * M + j) * d + c]);
          s /= double(M);
          cp[b * d + c] = s;
          for (int64_t j = 0; j < M; ++j)
            xTp[(b * d + c) * M + j] = static_cast<scalar_t>(double(xp[(b * M + j) * d + c]) - s);
        }
    });
    at::parallel_for(0, B * N, 16, [&](int64_t q0, int64_t q1) {
      scalar_t* r = wp + at::get_thread_num() * per_thread;
      scalar_t* yq = r + M;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q / N, n = q % N;
        const scalar_t hb = hp[b], inv_h2 = scalar_t(1) / (hb * hb);
        for (int64_t c = 0; c < d; ++c) yq[c] = static_cast<scalar_t>(double(yp[q * d + c]) - cp[b * d + c]);
        window_one<scalar_t>(xTp + b * d * M, yq, M, d, inv_h2, has_ex ? ex[n] : -1, r, gp + q * d, np + q);
      }
    });
  });
  return {g, neff};
}

}  // namespace cpu
}  // namespace steinops
