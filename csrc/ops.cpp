// Schemas of every compiled op of steinops (namespace torch.ops.steinops_C), the CPU
// implementations (validation here, the kernels in csrc/cpu/), and the pybind module
// steinops._C with a few build / runtime queries. CUDA implementations are registered by
// csrc/cuda/*.cu with TORCH_LIBRARY_IMPL(steinops_C, CUDA, m).
//
// Contract (shapes, formulas): csrc/README.md.
#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/cpu_ops.h"

namespace steinops {
namespace {

// ---- validation (the C++ must never crash on bad input) -----------------------------------

void check_tensor3(const char* op, const char* name, const at::Tensor& t, const char* shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D ", shape, ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU backend, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(!t.is_complex(), op, ": ", name, " must be real");
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
}

void check_kernel(const char* op, int64_t kernel) {
  TORCH_CHECK(kernel == 0 || kernel == 1 || kernel == 2 || kernel == 3, op,
              ": kernel id must be 0 (rbf), 1 (imq), 2 (imq cubed) or 3 (imq^5), got ", kernel);
}

// Checks x (B,N,d), y (B,M,d), h (B,) and the kernel id; returns h made contiguous.
at::Tensor check_xyh(const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& h, int64_t kernel) {
  check_tensor3(op, "x", x, "(B, N, d)");
  check_tensor3(op, "y", y, "(B, M, d)");
  check_same_dtype(op, "y", y, x);
  TORCH_CHECK(y.size(0) == x.size(0), op, ": batch sizes differ: x ", x.sizes(), ", y ", y.sizes());
  TORCH_CHECK(y.size(2) == x.size(2), op, ": feature dimensions differ: x ", x.sizes(), ", y ", y.sizes());
  TORCH_CHECK(h.defined(), op, ": h is an undefined tensor");
  TORCH_CHECK(h.dim() == 1 && h.size(0) == x.size(0), op, ": h must have shape (B,) = (", x.size(0), ",), got ",
              h.sizes());
  TORCH_CHECK(h.device().is_cpu(), op, ": h must be a CPU tensor, got ", h.device());
  check_same_dtype(op, "h", h, x);
  check_kernel(op, kernel);
  return h.contiguous();
}

// ---- CPU implementations --------------------------------------------------------------------

at::Tensor kmv_forward_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v, const at::Tensor& h,
                           int64_t kernel) {
  const char* op = "steinops_C::kmv_forward";
  at::Tensor hc = check_xyh(op, x, y, h, kernel);
  check_tensor3(op, "v", v, "(B, M, E)");
  check_same_dtype(op, "v", v, x);
  TORCH_CHECK(v.size(0) == x.size(0) && v.size(1) == y.size(1), op, ": v must have shape (B, M, E) = (", x.size(0),
              ", ", y.size(1), ", E), got ", v.sizes());
  return cpu::kmv_forward(x, y, v, hc, kernel);
}

at::Tensor kmv_xgrad_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v, const at::Tensor& g,
                         const at::Tensor& h, int64_t kernel) {
  const char* op = "steinops_C::kmv_xgrad";
  at::Tensor hc = check_xyh(op, x, y, h, kernel);
  check_tensor3(op, "v", v, "(B, M, E)");
  check_same_dtype(op, "v", v, x);
  TORCH_CHECK(v.size(0) == x.size(0) && v.size(1) == y.size(1), op, ": v must have shape (B, M, E) = (", x.size(0),
              ", ", y.size(1), ", E), got ", v.sizes());
  check_tensor3(op, "g", g, "(B, N, E)");
  check_same_dtype(op, "g", g, x);
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(1) == x.size(1) && g.size(2) == v.size(2), op,
              ": g must have shape (B, N, E) = (", x.size(0), ", ", x.size(1), ", ", v.size(2), "), got ", g.sizes());
  return cpu::kmv_xgrad(x, y, v, g, hc, kernel);
}

std::tuple<at::Tensor, at::Tensor> gram_forward_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                                                    int64_t kernel, bool stein) {
  at::Tensor hc = check_xyh("steinops_C::gram_forward", x, y, h, kernel);
  return cpu::gram_forward(x, y, hc, kernel, stein);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sge_small_cpu(const at::Tensor& x, const at::Tensor& h,
                                                             const at::Tensor& eta, int64_t kernel) {
  const char* op = "steinops_C::sge_small";
  check_tensor3(op, "x", x, "(B, n, d)");
  TORCH_CHECK(x.size(1) >= 1, op, ": x needs at least one point per set, got ", x.sizes());
  TORCH_CHECK(kernel == 0 || kernel == 1, op, ": kernel id must be 0 (rbf) or 1 (imq), got ", kernel);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"h", h}, {"eta", eta}}) {
    TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == x.size(0), op, ": ", name, " must have shape (B,) = (",
                x.size(0), ",), got ", t.defined() ? t.sizes() : at::IntArrayRef{});
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
    check_same_dtype(op, name, t, x);
  }
  return cpu::sge_small(x, h.contiguous(), eta.contiguous(), kernel);
}

std::tuple<at::Tensor, at::Tensor> pairwise_median_cpu(const at::Tensor& x) {
  check_tensor3("steinops_C::pairwise_median", "x", x, "(B, n, d)");
  return cpu::pairwise_median(x);
}

std::tuple<at::Tensor, at::Tensor> window_score_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                                                    const at::Tensor& exclude) {
  const char* op = "steinops_C::window_score";
  check_tensor3(op, "x", x, "(B, M, d)");
  check_tensor3(op, "y", y, "(B, N, d)");
  check_same_dtype(op, "y", y, x);
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(2) == x.size(2), op, ": y must have shape (B, N, d) = (", x.size(0),
              ", N, ", x.size(2), "), got ", y.sizes());
  TORCH_CHECK(x.size(1) >= 1, op, ": x needs at least one sample per set, got ", x.sizes());
  TORCH_CHECK(h.defined() && h.dim() == 1 && h.size(0) == x.size(0) && h.device().is_cpu() && h.is_contiguous(), op,
              ": h must be a contiguous CPU tensor of shape (B,) = (", x.size(0), ",)");
  check_same_dtype(op, "h", h, x);
  TORCH_CHECK(exclude.defined() && exclude.dim() == 1 && exclude.scalar_type() == at::kLong &&
                  exclude.device().is_cpu() && exclude.is_contiguous(),
              op, ": exclude must be a contiguous CPU long tensor (N,) or empty");
  if (exclude.numel() > 0) {
    TORCH_CHECK(exclude.size(0) == y.size(1), op, ": exclude must have one entry per query (", y.size(1), "), got ",
                exclude.size(0));
    TORCH_CHECK(x.size(1) >= 2, op, ": leaving one sample out needs at least 2 samples per set, got ", x.size(1));
    const int64_t* e = exclude.data_ptr<int64_t>();  // a plain loop: min()/max() would be two more op calls
    const auto [lo, hi] = std::minmax_element(e, e + exclude.numel());
    TORCH_CHECK(*lo >= 0 && *hi < x.size(1), op, ": exclude must index the ", x.size(1), " samples, got values in [",
                *lo, ", ", *hi, "]");
  }
  return cpu::window_score(x, y, h, exclude);
}

bool built_with_cuda() {
#ifdef STEINOPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int omp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace
}  // namespace steinops

TORCH_LIBRARY(steinops_C, m) {
  m.def("kmv_forward(Tensor x, Tensor y, Tensor v, Tensor h, int kernel) -> Tensor");
  m.def("kmv_xgrad(Tensor x, Tensor y, Tensor v, Tensor g, Tensor h, int kernel) -> Tensor");
  m.def("gram_forward(Tensor x, Tensor y, Tensor h, int kernel, bool stein) -> (Tensor, Tensor)");
  m.def("cholesky(Tensor A, Tensor? B=None) -> (Tensor, Tensor, Tensor)");
  m.def("pairwise_median(Tensor x) -> (Tensor, Tensor)");
  m.def("sge_small(Tensor x, Tensor h, Tensor eta, int kernel) -> (Tensor, Tensor, Tensor)");
  m.def("window_score(Tensor x, Tensor y, Tensor h, Tensor exclude) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(steinops_C, CPU, m) {
  m.impl("kmv_forward", &steinops::kmv_forward_cpu);
  m.impl("kmv_xgrad", &steinops::kmv_xgrad_cpu);
  m.impl("gram_forward", &steinops::gram_forward_cpu);
  m.impl("cholesky", &steinops::cpu::cholesky_solve_small);
  m.impl("pairwise_median", &steinops::pairwise_median_cpu);
  m.impl("sge_small", &steinops::sge_small_cpu);
  m.impl("window_score", &steinops::window_score_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "steinops compiled kernels; the ops live in torch.ops.steinops_C";
  m.def("has_cuda", &steinops::built_with_cuda, "Whether the CUDA kernels were compiled in (STEINOPS_WITH_CUDA).");
  m.def("num_threads", &steinops::omp_threads, "OpenMP max threads (omp_get_max_threads()).");
  m.def(
      "cpu_isa", [] { return std::string(steinops::cpu::isa_name(steinops::cpu::active_isa())); },
      "Instruction set the CPU tiles run with: 'avx512', 'avx2' or 'default'.");
  m.def(
      "supported_cpu_isas",
      [] {
        std::vector<std::string> out;
        for (int isa = steinops::cpu::kIsaDefault; isa <= steinops::cpu::kIsaAVX512; ++isa)
          if (steinops::cpu::isa_supported(isa)) out.emplace_back(steinops::cpu::isa_name(isa));
        return out;
      },
      "Instruction sets this CPU and build can run the tiles with.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        const std::string prev = steinops::cpu::isa_name(steinops::cpu::active_isa());
        if (name == "auto") {
          steinops::cpu::set_active_isa(-1);
        } else {
          const int isa = steinops::cpu::isa_from_name(name);
          TORCH_CHECK(isa >= 0, "steinops: unknown instruction set '", name,
                      "' (use 'auto', 'default', 'avx2' or 'avx512')");
          steinops::cpu::set_active_isa(isa);
        }
        return prev;
      },
      "Force the instruction set of the CPU tiles ('auto', 'default', 'avx2', 'avx512'); returns the previous one. "
      "For testing and benchmarking.");
}
