// Shared declarations of the CPU backend: tile geometry, the problem/workspace structs handed to
// the per-ISA tile code, ISA selection, and the entry points called by ops.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace steinops {
namespace cpu {

// ---- tile geometry (the same for every ISA) -------------------------------------------------
// A task is one (batch, row tile of kTN query points); it sweeps all column tiles of kTM sample
// points, so nothing of size N x M is ever allocated (gram_forward writes its N x M output).
constexpr int kTN = 32;   // rows per tile (multiple of the 4-row register blocks)
constexpr int kTM = 256;  // columns per tile (multiple of every register block width, 64 floats)
constexpr int kKC = 64;   // feature chunk of the distance / dot tiles: cache blocking and blocked summation
constexpr int kSmallF = 16;  // right-hand sides up to this width use the transposed (reduction) product
constexpr int kPad = 16;     // row widths of packed buffers are padded to a multiple of this

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Everything a task needs. Packed layouts (built once per call, O(M (d + E)) memory):
//   yT [B][nct][d][kTM]  y transposed per column tile, zero padded past M
//   vT [B][nct][E][kTM]  v likewise (small E, and always for kmv_xgrad)
//   vP [B][M][Fp]        v with rows padded to Fp (large E in kmv_forward)
//   yP [B][M][Fp]        y likewise (large d in kmv_xgrad / gram_forward with stein)
template <class T>
struct Problem {
  const T* x = nullptr;
  const T* y = nullptr;
  const T* v = nullptr;
  const T* g = nullptr;
  const T* h = nullptr;
  T* out = nullptr;   // kmv_forward (B,N,E) | kmv_xgrad (B,N,d) | gram K (B,N,M)
  T* out2 = nullptr;  // gram S (B,N,d) when stein
  const T* yT = nullptr;
  const T* vT = nullptr;
  const T* vP = nullptr;
  const T* yP = nullptr;
  int64_t B = 0, N = 0, M = 0, d = 0, E = 0;
  int64_t nrt = 0, nct = 0;  // number of row / column tiles
  int64_t Fp = 0;            // padded row width of vP / yP
  int kernel = 0;
  bool stein = false;
};

// Per-thread scratch, carved out of one preallocated tensor (no allocation inside parallel code).
template <class T>
struct Workspace {
  T* xbuf;  // kTN x max(d,1)     query rows of the tile, zero padded
  T* gbuf;  // kTN x max(E,1)     cotangent rows (kmv_xgrad)
  T* R;     // kTN x kTM          r2, then k / P
  T* G;     // kTN x kTM          g.v^T (kmv_xgrad) or k' (gram)
  T* acc;   // kTN x Fa           accumulated products
  T* rs;    // kTN                row sums of P / k'
};

// ---- ISA selection ---------------------------------------------------------------------------
enum Isa : int { kIsaDefault = 0, kIsaAVX2 = 1, kIsaAVX512 = 2 };

int active_isa();                       // the ISA the tiles run with (best supported, or forced)
bool isa_supported(int isa);            // whether this CPU (and this build) can run it
const char* isa_name(int isa);
int isa_from_name(const std::string& name);  // -1 if unknown
void set_active_isa(int isa);           // force one (must be supported); -1 = back to automatic

// ---- entry points (inputs already validated by ops.cpp) -------------------------------------
at::Tensor kmv_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v, const at::Tensor& h,
                       int64_t kernel);
at::Tensor kmv_xgrad(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v, const at::Tensor& g,
                     const at::Tensor& h, int64_t kernel);
std::tuple<at::Tensor, at::Tensor> gram_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                                                int64_t kernel, bool stein);
// Lower Cholesky factors of a batch of small SPD matrices A (B,n,n), the solutions X of A X = B (B,n,E) when
// B is given (else an empty tensor), and LAPACK-style info (B,) (cholesky.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_solve_small(const at::Tensor& A,
                                                                    const c10::optional<at::Tensor>& B);

// The dense SGE fit of B small sample sets x (B,n,d) (centred) with bandwidths h (B,) and ridges eta (B,):
// L (B,n,n) the lower Cholesky factors of K + eta I, G = -(K + eta I)^-1 S (B,n,d), info (B,) (sge_small.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sge_small(const at::Tensor& x, const at::Tensor& h,
                                                         const at::Tensor& eta, int64_t kernel);

// The lower median and the mean of the n (n - 1) / 2 pairwise distances of each set x (B,n,d), float64 (B,)
// each (pairwise_median.cpp).
std::tuple<at::Tensor, at::Tensor> pairwise_median(const at::Tensor& x);

// The Gaussian-window Stein ratio of B sample sets x (B,M,d) at queries y (B,N,d) with bandwidths h (B,),
// leaving out sample exclude[n] for query n (exclude (N,) long, or empty): g (B,N,d) and n_eff (B,N)
// (window_score.cpp).
std::tuple<at::Tensor, at::Tensor> window_score(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                                                const at::Tensor& exclude);

}  // namespace cpu
}  // namespace steinops
