// Batched Cholesky of many small SPD matrices (the SGE / KEF systems K + eta I of a training step),
// one matrix per OpenMP thread. LAPACK's potrf is tuned for large n and torch runs a batch serially,
// so at n ~ 64-256 with a batch of noise levels this is several times faster.
//
// The factorisation and the substitutions of one matrix are in cholesky_impl.h (shared with sge_small.cpp).
// With a right-hand side B (B,n,E) the same thread then solves (L L^T) X = B by two substitutions.
// info (B,) follows LAPACK: 0 on success, k > 0 when the leading minor of order k is not positive
// definite (that factor is then partial; the caller retries with jitter).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "cholesky_impl.h"

namespace steinops {
namespace cpu {

// Fewer right-hand sides than this are solved by column (solve_one_cols): solve_one's loops over E would be
// shorter than one 8-float vector.
constexpr int64_t kColumnsBelow = 8;

std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_solve_small(const at::Tensor& A_in,
                                                                    const c10::optional<at::Tensor>& B_in) {
  TORCH_CHECK(A_in.dim() == 3 && A_in.size(1) == A_in.size(2), "steinops_C::cholesky: A must be (B, n, n)");
  TORCH_CHECK(A_in.scalar_type() == at::kFloat || A_in.scalar_type() == at::kDouble,
              "steinops_C::cholesky: A must be float32 or float64");
  const at::Tensor A = A_in.contiguous();
  const int64_t B = A.size(0), n = A.size(1);
  at::Tensor X;
  if (B_in.has_value()) {
    TORCH_CHECK(B_in->dim() == 3 && B_in->size(0) == B && B_in->size(1) == n && B_in->scalar_type() == A.scalar_type(),
                "steinops_C::cholesky: B must be (B, n, E) with the batch, size and dtype of A");
    X = B_in->contiguous().clone();
  }
  const int64_t E = X.defined() ? X.size(2) : 0;
  at::Tensor L = at::zeros_like(A);  // the strict upper triangle stays zero
  at::Tensor info = at::zeros({B}, A.options().dtype(at::kLong));
  int64_t* ip = info.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "steinops_cholesky", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    scalar_t* l = L.data_ptr<scalar_t>();
    at::Tensor work = at::empty({at::get_num_threads(), n * n}, A.options());
    scalar_t* w = work.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      scalar_t* U = w + at::get_thread_num() * n * n;
      for (int64_t b = b0; b < b1; ++b) {
        ip[b] = small_spd::factor_one<scalar_t>(a + b * n * n, l + b * n * n, U, n);
        if (E == 0 || ip[b] != 0) continue;
        scalar_t* Xb = X.data_ptr<scalar_t>() + b * n * E;
        if (E < kColumnsBelow && E <= n) {  // a few right-hand sides: by column, in the factor's (now free) scratch
          for (int64_t i = 0; i < n; ++i)
            for (int64_t e = 0; e < E; ++e) U[e * n + i] = Xb[i * E + e];
          small_spd::solve_one_cols<scalar_t>(l + b * n * n, U, n, E);
          for (int64_t i = 0; i < n; ++i)
            for (int64_t e = 0; e < E; ++e) Xb[i * E + e] = U[e * n + i];
        } else {
          small_spd::solve_one<scalar_t>(l + b * n * n, Xb, n, E);
        }
      }
    });
  });
  return {L, X.defined() ? X : at::empty({0}, A.options()), info};
}

}  // namespace cpu
}  // namespace steinops
