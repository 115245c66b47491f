// Per-ISA task body of gram_forward. NO include guard (see cpu/isa_instantiate.h).
// One task = one (batch, row tile): r2 -> K (written out) and, with stein, k' -> rs += rowsum k',
// acc += k' . y, S = 2 (acc - rs x).
namespace steinops {
namespace cpu {
namespace STEINOPS_ISA_NS {

template <class T, int KID>
void gram_task_k(const Problem<T>& p, int64_t task, const Workspace<T>& ws) {
  const TaskGeom tg = task_geom(task, p.nrt, p.N);
  const int64_t d = p.d, M = p.M;
  const bool small = d <= kSmallF;
  const int64_t Fa = small ? d : p.Fp;
  const T* x = p.x + (tg.b * p.N + tg.n0) * d;
  load_rows(x, d, tg.tn, tg.tnp, ws.xbuf);
  if (p.stein) {
    std::memset(ws.acc, 0, sizeof(T) * Fa * tg.tnp);
    std::memset(ws.rs, 0, sizeof(T) * tg.tnp);
  }
  const T coef = kernel_coef<T>(KID, p.h[tg.b]);
  T* Kout = p.out + (tg.b * p.N + tg.n0) * M;
  for (int64_t ct = 0; ct < p.nct; ++ct) {
    const ColGeom cg = col_geom<T>(ct, M);
    const T* yT = p.yT + (tg.b * p.nct + ct) * d * kTM;
    pair_tile_full<T, true>(ws.xbuf, d, yT, ws.R, d, tg.nrb, cg.ncb);
    if (p.stein) {
      kernel_values_derivs<T, KID>(ws.R, ws.G, tg.tnp, cg.nv, cg.tm, coef);
    } else {
      kernel_values<T, KID>(ws.R, tg.tnp, cg.nv, coef);
    }
    for (int i = 0; i < tg.tn; ++i) std::memcpy(Kout + i * M + cg.m0, ws.R + i * kTM, sizeof(T) * cg.tm);
    if (p.stein) {
      row_sums<T>(ws.G, tg.tnp, cg.nv, ws.rs);
      if (small) {
        acc_small<T>(ws.G, yT, tg.tnp, cg.nv, ws.acc, (int)d);
      } else {
        acc_large<T>(ws.G, p.yP + (tg.b * M + cg.m0) * p.Fp, p.Fp, cg.tm, ws.acc, tg.tnp);
      }
    }
  }
  if (p.stein) {
    T* S = p.out2 + (tg.b * p.N + tg.n0) * d;
    for (int i = 0; i < tg.tn; ++i) {
      const T r = ws.rs[i];
      const T* a = ws.acc + i * Fa;
      for (int64_t k = 0; k < d; ++k) S[i * d + k] = T(2) * (a[k] - r * x[i * d + k]);
    }
  }
}

template <class T>
void gram_task(const Problem<T>& p, int64_t task, const Workspace<T>& ws) {
  switch (p.kernel) {
    case kRBF:
      gram_task_k<T, kRBF>(p, task, ws);
      break;
    case kIMQ:
      gram_task_k<T, kIMQ>(p, task, ws);
      break;
    case kIMQ3:
      gram_task_k<T, kIMQ3>(p, task, ws);
      break;
    default:
      gram_task_k<T, kIMQ5>(p, task, ws);
      break;
  }
}

template void gram_task<float>(const Problem<float>&, int64_t, const Workspace<float>&);
template void gram_task<double>(const Problem<double>&, int64_t, const Workspace<double>&);

}  // namespace STEINOPS_ISA_NS
}  // namespace cpu
}  // namespace steinops
