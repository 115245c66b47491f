// The median pairwise distance of many small sample sets, the default bandwidth rule of every estimator
// ("median": h = 2 median_{i<j} |x_i - x_j|), one set per OpenMP thread: the n (n - 1) / 2 squared distances
// of a set in float64 scratch (vectorised over j), a selection of their lower median (select_nonneg below,
// O(n^2)) and one square root. The same set's mean pairwise distance comes along for the caller's fallback
// when more than half the pairs coincide. On fresh 4 x 128-point sets it costs about half of torch.cdist +
// numpy's partition. Direct differences: meant for small d (the caller uses cdist's matrix-product form for
// large d).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "cholesky_impl.h"  // STEINOPS_CLONES
#include "cpu_ops.h"

namespace steinops {
namespace cpu {

namespace {

// The k-th smallest (0-based) of v[0..P), all finite and >= 0; v is overwritten. A comparison selection
// (std::nth_element) mispredicts a branch per element on fresh data, which made it cost ~5x the distances;
// here one branch-free pass histograms a monotone 12-bit key (float32 exponent and top mantissa bits), the
// bin holding rank k is found by a scan, its members (a few % of v) are compacted in place and only they
// go to nth_element.
inline double select_nonneg(double* __restrict__ v, int64_t P, int64_t k) {
  constexpr int kShift = 19, kBins = 1 << (31 - kShift);
  auto key = [](double x) {  // float32 rounding is monotone and non-negative floats order as their bits
    const float f = static_cast<float>(x);
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u >> kShift;
  };
  int32_t hist[kBins] = {};
  for (int64_t t = 0; t < P; ++t) ++hist[key(v[t])];
  uint32_t bin = 0;
  int64_t below = 0;
  while (below + hist[bin] <= k) below += hist[bin++];
  int64_t c = 0;
  for (int64_t t = 0; t < P; ++t) {  // in place: the write index never passes the read index
    const double x = v[t];
    v[c] = x;
    c += key(x) == bin;
  }
  const int64_t r = k - below;
  std::nth_element(v, v + r, v + c);
  return v[r];
}

// Median and mean pairwise distance of one set x (n x d); scratch r2 (n (n - 1) / 2) and xT (d x n).
template <class T>
STEINOPS_CLONES void median_one(const T* __restrict__ x, int64_t n, int64_t d, double* __restrict__ r2,
                                double* __restrict__ xT, double* med, double* mean) {
  const int64_t P = n * (n - 1) / 2;
  for (int64_t c = 0; c < d; ++c) {  // centre in float64 (cancellation in the differences)
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += double(x[i * d + c]);
    s /= double(n);
    for (int64_t i = 0; i < n; ++i) xT[c * n + i] = double(x[i * d + c]) - s;
  }
  for (int64_t i = 1; i < n; ++i) {  // row i: the pairs (i, j < i) at offset i (i - 1) / 2
    double* row = r2 + i * (i - 1) / 2;
#pragma omp simd
    for (int64_t j = 0; j < i; ++j) row[j] = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      const double xic = xT[c * n + i];
      const double* xc = xT + c * n;
#pragma omp simd
      for (int64_t j = 0; j < i; ++j) row[j] += (xic - xc[j]) * (xic - xc[j]);
    }
  }
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < P; ++t) total += std::sqrt(r2[t]);
  if (P == 0 || !std::isfinite(total)) {  // nth_element needs a strict weak order: no NaN in the list
    *med = *mean = P == 0 ? 0.0 : total;
    return;
  }
  const int64_t k = (P - 1) / 2;  // the lower median of the squared distances (monotone)
  *med = std::sqrt(select_nonneg(r2, P, k));
  *mean = total / double(P);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pairwise_median(const at::Tensor& x) {
  const int64_t B = x.size(0), n = x.size(1), d = x.size(2), P = n * (n - 1) / 2;
  at::Tensor med = at::empty({B}, x.options().dtype(at::kDouble));
  at::Tensor mean = at::empty({B}, x.options().dtype(at::kDouble));
  double* mp = med.data_ptr<double>();
  double* ap = mean.data_ptr<double>();
  const int64_t n_dist = std::max<int64_t>(P, 1), per_thread = n_dist + n * d;  // squared distances, centred set
  at::Tensor work = at::empty({at::get_num_threads(), per_thread}, x.options().dtype(at::kDouble));
  double* w = work.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "steinops_pairwise_median", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      double* r2 = w + at::get_thread_num() * per_thread;
      for (int64_t b = b0; b < b1; ++b) median_one<scalar_t>(xp + b * n * d, n, d, r2, r2 + n_dist, mp + b, ap + b);
    });
  });
  return {med, mean};
}

}  // namespace cpu
}  // namespace steinops
