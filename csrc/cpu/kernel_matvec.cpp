// CPU kmv_forward / kmv_xgrad (contract: csrc/README.md), plus run-time ISA selection.
//
// Tiled like flash-attention: one OpenMP task per (batch, row tile of kTN points) sweeps the
// column tiles of kTM points; per tile: squared distances by direct differences (register-
// blocked), kernel values with a polynomial exp, product with v accumulated in a kTN x E buffer.
// Nothing of size N x M is allocated. The tile code is compiled for AVX-512, AVX2+FMA and the
// baseline (cpu/isa_instantiate.h) and picked at run time.
#include "cpu/isa_prelude.h"
#include "cpu/driver.h"

#include <atomic>
#include <cstdlib>
#include <string>

#define STEINOPS_ISA_BODY "cpu/kmv_impl.h"
#include "cpu/isa_instantiate.h"
#undef STEINOPS_ISA_BODY

namespace steinops {
namespace cpu {

// ---- ISA selection -------------------------------------------------------------------------

bool isa_supported(int isa) {
  if (isa == kIsaDefault) return true;
#if STEINOPS_MULTI_ISA
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kIsaAVX2) return avx2;
  if (isa == kIsaAVX512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#endif
  return false;
}

const char* isa_name(int isa) {
  switch (isa) {
    case kIsaAVX512:
      return "avx512";
    case kIsaAVX2:
      return "avx2";
    default:
      return "default";
  }
}

int isa_from_name(const std::string& name) {
  if (name == "avx512") return kIsaAVX512;
  if (name == "avx2") return kIsaAVX2;
  if (name == "default" || name == "generic" || name == "baseline") return kIsaDefault;
  return -1;
}

namespace {
std::atomic<int> g_forced_isa{-1};

int best_isa() {
  static const int best = [] {
    // STEINOPS_CPU_ISA=default|avx2|avx512 caps the choice (for testing / benchmarking).
    int cap = kIsaAVX512;
    if (const char* env = std::getenv("STEINOPS_CPU_ISA")) {
      const int e = isa_from_name(env);
      if (e >= 0) cap = e;
    }
    for (int isa = cap; isa > kIsaDefault; --isa)
      if (isa_supported(isa)) return isa;
    return (int)kIsaDefault;
  }();
  return best;
}
}  // namespace

int active_isa() {
  const int f = g_forced_isa.load(std::memory_order_relaxed);
  return f >= 0 ? f : best_isa();
}

void set_active_isa(int isa) {
  TORCH_CHECK(isa == -1 || (isa >= kIsaDefault && isa <= kIsaAVX512 && isa_supported(isa)),
              "steinops: instruction set ", isa_name(isa), " is not supported by this CPU or build");
  g_forced_isa.store(isa, std::memory_order_relaxed);
}

// ---- dispatch tables -------------------------------------------------------------------------

namespace {

template <class T>
TaskFn<T> kmv_forward_fn(int isa) {
  switch (isa) {
#if STEINOPS_MULTI_ISA
    case kIsaAVX512:
      return &avx512::kmv_forward_task<T>;
    case kIsaAVX2:
      return &avx2::kmv_forward_task<T>;
#endif
    default:
      return &generic::kmv_forward_task<T>;
  }
}

template <class T>
TaskFn<T> kmv_xgrad_fn(int isa) {
  switch (isa) {
#if STEINOPS_MULTI_ISA
    case kIsaAVX512:
      return &avx512::kmv_xgrad_task<T>;
    case kIsaAVX2:
      return &avx2::kmv_xgrad_task<T>;
#endif
    default:
      return &generic::kmv_xgrad_task<T>;
  }
}

template <class T>
Problem<T> base_problem(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h, int64_t kernel) {
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
  return p;
}

template <class T>
void kmv_forward_impl(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v, const at::Tensor& h,
                      int64_t kernel, at::Tensor& out) {
  Problem<T> p = base_problem<T>(x, y, h, kernel);
  p.v = v.data_ptr<T>();
  p.E = v.size(2);
  p.out = out.data_ptr<T>();
  const auto opts = x.options();
  const int npack = num_threads_for(p.B * p.nct);
  at::Tensor yT = at::empty({p.B * p.nct * p.d * kTM}, opts);
  pack_transposed<T>(p.y, p.B, p.M, p.d, p.nct, yT.data_ptr<T>(), npack);
  p.yT = yT.data_ptr<T>();
  at::Tensor vpack;
  int64_t acc_width;
  if (p.E <= kSmallF) {
    vpack = at::empty({p.B * p.nct * p.E * kTM}, opts);
    pack_transposed<T>(p.v, p.B, p.M, p.E, p.nct, vpack.data_ptr<T>(), npack);
    p.vT = vpack.data_ptr<T>();
    acc_width = p.E;
  } else {
    p.Fp = round_up(p.E, kPad);
    vpack = at::empty({p.B * p.M * p.Fp}, opts);
    pack_rows<T>(p.v, p.B, p.M, p.E, p.Fp, vpack.data_ptr<T>(), num_threads_for(p.B * p.M / 64 + 1));
    p.vP = vpack.data_ptr<T>();
    acc_width = p.Fp;
  }
  run_tasks<T>(p, p.B * p.nrt, kmv_forward_fn<T>(active_isa()), workspace_sizes(p.d, p.E, acc_width, false, false),
               opts);
}

template <class T>
void kmv_xgrad_impl(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v, const at::Tensor& g,
                    const at::Tensor& h, int64_t kernel, at::Tensor& out) {
  Problem<T> p = base_problem<T>(x, y, h, kernel);
  p.v = v.data_ptr<T>();
  p.g = g.data_ptr<T>();
  p.E = v.size(2);
  p.out = out.data_ptr<T>();
  const auto opts = x.options();
  const int npack = num_threads_for(p.B * p.nct);
  at::Tensor yT = at::empty({p.B * p.nct * p.d * kTM}, opts);
  pack_transposed<T>(p.y, p.B, p.M, p.d, p.nct, yT.data_ptr<T>(), npack);
  p.yT = yT.data_ptr<T>();
  at::Tensor vT = at::empty({p.B * p.nct * p.E * kTM}, opts);
  pack_transposed<T>(p.v, p.B, p.M, p.E, p.nct, vT.data_ptr<T>(), npack);
  p.vT = vT.data_ptr<T>();
  at::Tensor yP;
  int64_t acc_width = p.d;
  if (p.d > kSmallF) {
    p.Fp = round_up(p.d, kPad);
    yP = at::empty({p.B * p.M * p.Fp}, opts);
    pack_rows<T>(p.y, p.B, p.M, p.d, p.Fp, yP.data_ptr<T>(), num_threads_for(p.B * p.M / 64 + 1));
    p.yP = yP.data_ptr<T>();
    acc_width = p.Fp;
  }
  run_tasks<T>(p, p.B * p.nrt, kmv_xgrad_fn<T>(active_isa()), workspace_sizes(p.d, p.E, acc_width, true, true),
               opts);
}

}  // namespace

at::Tensor kmv_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v, const at::Tensor& h,
                       int64_t kernel) {
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), E = v.size(2);
  if (B == 0 || N == 0 || E == 0 || M == 0) return at::zeros({B, N, E}, x.options());
  at::Tensor out = at::empty({B, N, E}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "steinops_kmv_forward_cpu",
                             [&] { kmv_forward_impl<scalar_t>(x, y, v, h, kernel, out); });
  return out;
}

at::Tensor kmv_xgrad(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v, const at::Tensor& g,
                     const at::Tensor& h, int64_t kernel) {
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), d = x.size(2);
  if (B == 0 || N == 0 || d == 0 || M == 0) return at::zeros({B, N, d}, x.options());
  at::Tensor out = at::empty({B, N, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "steinops_kmv_xgrad_cpu",
                             [&] { kmv_xgrad_impl<scalar_t>(x, y, v, g, h, kernel, out); });
  return out;
}

}  // namespace cpu
}  // namespace steinops
