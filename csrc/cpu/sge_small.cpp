// The whole dense Stein gradient estimator fit of many small sample sets in one pass per set:
//   G = -(K + eta I)^-1 S,   K_ij = k(x_i, x_j),   S_i = sum_j grad_{x_j} k(x_i, x_j) = sum_j k~_ij (x_i - x_j) / h^2
// with k~ the Stein profile (RBF: k itself; IMQ: k^3). One set per OpenMP thread: the kernel matrix is
// built straight into the thread's scratch (lower triangle; S accumulated from the same pairs), factorised
// and solved in place, so a training step's G groups of m ~ 64-256 points cost one op call instead of a
// Gram op, an add, a Cholesky op and a sign flip (the step-time target of the Stein objective).
// x must be centred by the caller (cancellation in r^2). info (B,) follows LAPACK: 0 on success, k > 0
// when the leading minor of order k is not positive definite (the caller then retries with jitter).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cholesky_impl.h"
#include "cpu_ops.h"
#include "kernel_math.h"

namespace steinops {
namespace cpu {

namespace {

// A's lower triangle (row-major n x n, A_ii = 1 + eta) and S, stored by column (ST: d x n), for one set. Row by row over j < i,
// structure of arrays (xT, ST: d x n) so that every loop over j vectorises (the exp is kernel_math.h's
// branch-free polynomial); scratch: xT (d x n) and w (n).
template <class T>
STEINOPS_CLONES void kernel_system(const T* __restrict__ x, int64_t n, int64_t d, T h, T eta, bool imq,
                                   T* __restrict__ A, T* __restrict__ xT, T* __restrict__ ST, T* __restrict__ w) {
  using I = typename ExpConst<T>::Int;
  const T inv_h2 = T(1) / (h * h), coef = T(-0.5) * inv_h2;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < d; ++c) xT[c * n + i] = x[i * d + c], ST[c * n + i] = T(0);
  for (int64_t i = 0; i < n; ++i) {
    T* Ai = A + i * n;  // r2, then k, for j < i
#pragma omp simd
    for (int64_t j = 0; j < i; ++j) Ai[j] = T(0);
    for (int64_t c = 0; c < d; ++c) {
      const T xic = xT[c * n + i];
      const T* xc = xT + c * n;
#pragma omp simd
      for (int64_t j = 0; j < i; ++j) Ai[j] += (xic - xc[j]) * (xic - xc[j]);
    }
    if (imq) {
#pragma omp simd
      for (int64_t j = 0; j < i; ++j) {
        const T k = T(1) / std::sqrt(T(1) + Ai[j] * inv_h2);
        Ai[j] = k;
        w[j] = k * k * k * inv_h2;  // Stein profile k^3, over h^2
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < i; ++j) {
        const T k = scalar::exp_poly_nonpos<T, T, I>(Ai[j] * coef);
        Ai[j] = k;
        w[j] = k * inv_h2;
      }
    }
    Ai[i] = T(1) + eta;  // k(x, x) = 1 for RBF and IMQ
    for (int64_t c = 0; c < d; ++c) {  // S_i += w_ij (x_i - x_j), S_j -= the same
      const T xic = xT[c * n + i];
      const T* xc = xT + c * n;
      T* Sc = ST + c * n;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < i; ++j) {
        const T v = w[j] * (xic - xc[j]);
        acc += v;
        Sc[j] -= v;
      }
      Sc[i] += acc;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sge_small(const at::Tensor& x, const at::Tensor& h,
                                                         const at::Tensor& eta, int64_t kernel) {
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2);
  at::Tensor L = at::zeros({B, n, n}, x.options());  // the strict upper triangle stays zero
  at::Tensor G = at::empty({B, n, d}, x.options());
  at::Tensor info = at::zeros({B}, x.options().dtype(at::kLong));
  int64_t* ip = info.data_ptr<int64_t>();
  const bool imq = kernel == kIMQ;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "steinops_sge_small", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* ep = eta.data_ptr<scalar_t>();
    scalar_t* lp = L.data_ptr<scalar_t>();
    scalar_t* gp = G.data_ptr<scalar_t>();
    const int64_t per_thread = 2 * n * n + 2 * n * d + n;
    at::Tensor work = at::empty({at::get_num_threads(), per_thread}, x.options());
    scalar_t* w = work.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      scalar_t* A = w + at::get_thread_num() * per_thread;
      scalar_t* U = A + n * n;
      scalar_t* xT = U + n * n;
      scalar_t* ST = xT + n * d;
      scalar_t* wrow = ST + n * d;
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* Gb = gp + b * n * d;
        scalar_t* Lb = lp + b * n * n;
        kernel_system<scalar_t>(xp + b * n * d, n, d, hp[b], ep[b], imq, A, xT, ST, wrow);
        ip[b] = small_spd::factor_one<scalar_t>(A, Lb, U, n);
        if (ip[b] != 0) {  // the caller retries these sets with jitter; never hand out stale numbers
          for (int64_t t = 0; t < n * d; ++t) Gb[t] = std::numeric_limits<scalar_t>::quiet_NaN();
          continue;
        }
        small_spd::solve_one_cols<scalar_t>(Lb, ST, n, d);  // by column: d is small here (one vector or less)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t c = 0; c < d; ++c) Gb[i * d + c] = -ST[c * n + i];
      }
    });
  });
  return {L, G, info};
}

}  // namespace cpu
}  // namespace steinops
