// CPU gram_forward (contract: csrc/README.md): K (B,N,M) and, in the same pass over the tiles,
// the Stein term S_n = 2 sum_m k'(r2_nm) (y_m - x_n) (B,N,d).
#include "cpu/isa_prelude.h"
#include "cpu/driver.h"

#define STEINOPS_ISA_BODY "cpu/gram_impl.h"
#include "cpu/isa_instantiate.h"
#undef STEINOPS_ISA_BODY

namespace steinops {
namespace cpu {

namespace {

template <class T>
TaskFn<T> gram_fn(int isa) {
  switch (isa) {
#if STEINOPS_MULTI_ISA
    case kIsaAVX512:
      return &avx512::gram_task<T>;
    case kIsaAVX2:
      return &avx2::gram_task<T>;
#endif
    default:
      return &generic::gram_task<T>;
  }
}

template <class T>
void gram_impl(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h, int64_t kernel, bool stein,
               at::Tensor& K, at::Tensor& S) {
  Problem<T> p;
  p.x = x.data_ptr<T>();
  p.y = y.data_ptr<T>();
  p.h = h.data_ptr<T>();
  p.B = x.size(0);
  p.N = x.size(1);
  p.M = y.size(1);
  p.d = x.size(2);
  p.nrt = ceil_div(p.N, kTN);
  p.nct = ceil_div(p.M, kTM);
  p.kernel = (int)kernel;
  p.stein = stein;
  p.out = K.data_ptr<T>();
  p.out2 = stein ? S.data_ptr<T>() : nullptr;
  const auto opts = x.options();
  at::Tensor yT = at::empty({p.B * p.nct * p.d * kTM}, opts);
  pack_transposed<T>(p.y, p.B, p.M, p.d, p.nct, yT.data_ptr<T>(), num_threads_for(p.B * p.nct));
  p.yT = yT.data_ptr<T>();
  at::Tensor yP;
  int64_t acc_width = stein ? p.d : 1;
  if (stein && p.d > kSmallF) {
    p.Fp = round_up(p.d, kPad);
    yP = at::empty({p.B * p.M * p.Fp}, opts);
    pack_rows<T>(p.y, p.B, p.M, p.d, p.Fp, yP.data_ptr<T>(), num_threads_for(p.B * p.M / 64 + 1));
    p.yP = yP.data_ptr<T>();
    acc_width = p.Fp;
  }
  run_tasks<T>(p, p.B * p.nrt, gram_fn<T>(active_isa()), workspace_sizes(p.d, 0, acc_width, false, stein), opts);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gram_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                                                int64_t kernel, bool stein) {
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), d = x.size(2);
  at::Tensor K = at::empty({B, N, M}, x.options());
  at::Tensor S = stein ? at::empty({B, N, d}, x.options()) : at::empty({0}, x.options());
  if (B == 0 || N == 0) return {K, S};
  if (M == 0) {
    if (stein) S.zero_();
    return {K, S};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "steinops_gram_forward_cpu",
                             [&] { gram_impl<scalar_t>(x, y, h, kernel, stein, K, S); });
  return {K, S};
}

}  // namespace cpu
}  // namespace steinops
