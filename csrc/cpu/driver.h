// Generic (baseline-ISA) driver helpers shared by kernel_matvec.cpp and gram.cpp: packing,
// workspace layout and the OpenMP loop over tasks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/cpu_ops.h"

namespace steinops {
namespace cpu {

// torch.get_num_threads() (so torch.set_num_threads is honoured), capped by the work available.
inline int num_threads_for(int64_t tasks) {
  int64_t nt = at::get_num_threads();
  if (nt < 1) nt = 1;
  if (tasks < nt) nt = tasks < 1 ? 1 : tasks;
  return (int)nt;
}

// src (B, M, F) -> dst [B][nct][F][kTM]: transposed per column tile, zero past M.
template <class T>
void pack_transposed(const T* src, int64_t B, int64_t M, int64_t F, int64_t nct, T* dst, int nthreads) {
  const int64_t n = B * nct;
  (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
  for (int64_t t = 0; t < n; ++t) {
    const int64_t b = t / nct, m0 = (t % nct) * kTM;
    const int64_t tm = std::min<int64_t>(kTM, M - m0);
    const T* s = src + (b * M + m0) * F;
    T* o = dst + t * F * kTM;
    constexpr int64_t FB = 16;
    for (int64_t f0 = 0; f0 < F; f0 += FB) {
      const int64_t f1 = std::min(F, f0 + FB);
      for (int64_t j = 0; j < tm; ++j)
        for (int64_t f = f0; f < f1; ++f) o[f * kTM + j] = s[j * F + f];
      for (int64_t f = f0; f < f1; ++f)
        if (tm < kTM) std::memset(o + f * kTM + tm, 0, sizeof(T) * (kTM - tm));
    }
  }
}

// src (B, M, F) -> dst (B, M, Fp), each row zero padded.
template <class T>
void pack_rows(const T* src, int64_t B, int64_t M, int64_t F, int64_t Fp, T* dst, int nthreads) {
  const int64_t n = B * M;
  (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(dst + r * Fp, src + r * F, sizeof(T) * F);
    if (Fp > F) std::memset(dst + r * Fp + F, 0, sizeof(T) * (Fp - F));
  }
}

// Sizes (in elements) of one thread's workspace; every part a multiple of kPad so that each
// stays 64-byte aligned when the base is.
struct WorkspaceSizes {
  int64_t xbuf, gbuf, R, G, acc, rs;
  int64_t total() const { return xbuf + gbuf + R + G + acc + rs; }
};

inline WorkspaceSizes workspace_sizes(int64_t d, int64_t E, int64_t acc_width, bool need_g, bool need_G) {
  WorkspaceSizes s;
  s.xbuf = round_up(kTN * std::max<int64_t>(d, 1), kPad);
  s.gbuf = need_g ? round_up(kTN * std::max<int64_t>(E, 1), kPad) : 0;
  s.R = (int64_t)kTN * kTM;
  s.G = need_G ? (int64_t)kTN * kTM : 0;
  s.acc = round_up(kTN * std::max<int64_t>(acc_width, 1), kPad);
  s.rs = round_up(kTN, kPad);
  return s;
}

template <class T>
Workspace<T> carve_workspace(T* base, const WorkspaceSizes& s) {
  Workspace<T> w;
  w.xbuf = base;
  w.gbuf = w.xbuf + s.xbuf;
  w.R = w.gbuf + s.gbuf;
  w.G = w.R + s.R;
  w.acc = w.G + s.G;
  w.rs = w.acc + s.acc;
  return w;
}

template <class T>
using TaskFn = void (*)(const Problem<T>&, int64_t, const Workspace<T>&);

// Runs fn(p, task, workspace) for every task, OpenMP-parallel with dynamic scheduling (tasks are
// equal-sized except the ragged last row tile of each batch). All scratch is allocated up front.
template <class T>
void run_tasks(const Problem<T>& p, int64_t ntasks, TaskFn<T> fn, const WorkspaceSizes& sizes,
               const at::TensorOptions& opts) {
  if (ntasks <= 0) return;
  const int nt = num_threads_for(ntasks);
  const int64_t per = sizes.total();
  at::Tensor scratch = at::empty({per * nt + kPad}, opts);
  T* base = scratch.data_ptr<T>();
  // align to 64 bytes (the torch allocator already does; this is belt and braces)
  const uintptr_t mis = reinterpret_cast<uintptr_t>(base) % 64;
  if (mis != 0) base += (64 - mis) / sizeof(T);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    const Workspace<T> ws = carve_workspace<T>(base + per * tid, sizes);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) fn(p, t, ws);
  }
}

}  // namespace cpu
}  // namespace steinops
