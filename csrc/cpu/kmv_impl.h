// Per-ISA task bodies of kmv_forward / kmv_xgrad. NO include guard (see cpu/isa_instantiate.h).
// One task = one (batch, row tile); it sweeps every column tile:
//   kmv_forward: r2 -> k -> acc += K . v
//   kmv_xgrad:   r2, G = g.v^T -> P = k'(r2) G -> rs += rowsum P, acc += P . y
namespace steinops {
namespace cpu {
namespace STEINOPS_ISA_NS {

template <class T, int KID>
void kmv_forward_task_k(const Problem<T>& p, int64_t task, const Workspace<T>& ws) {
  const TaskGeom tg = task_geom(task, p.nrt, p.N);
  const int64_t d = p.d, E = p.E;
  const bool small = E <= kSmallF;
  const int64_t Fa = small ? E : p.Fp;
  load_rows(p.x + (tg.b * p.N + tg.n0) * d, d, tg.tn, tg.tnp, ws.xbuf);
  std::memset(ws.acc, 0, sizeof(T) * Fa * tg.tnp);
  const T coef = kernel_coef<T>(KID, p.h[tg.b]);
  for (int64_t ct = 0; ct < p.nct; ++ct) {
    const ColGeom cg = col_geom<T>(ct, p.M);
    const T* yT = p.yT + (tg.b * p.nct + ct) * d * kTM;
    pair_tile_full<T, true>(ws.xbuf, d, yT, ws.R, d, tg.nrb, cg.ncb);
    kernel_values<T, KID>(ws.R, tg.tnp, cg.nv, coef);
    if (small) {
      acc_small<T>(ws.R, p.vT + (tg.b * p.nct + ct) * E * kTM, tg.tnp, cg.nv, ws.acc, (int)E);
    } else {
      acc_large<T>(ws.R, p.vP + (tg.b * p.M + cg.m0) * p.Fp, p.Fp, cg.tm, ws.acc, tg.tnp);
    }
  }
  T* out = p.out + (tg.b * p.N + tg.n0) * E;
  for (int i = 0; i < tg.tn; ++i) std::memcpy(out + i * E, ws.acc + i * Fa, sizeof(T) * E);
}

template <class T>
void kmv_forward_task(const Problem<T>& p, int64_t task, const Workspace<T>& ws) {
  switch (p.kernel) {
    case kRBF:
      kmv_forward_task_k<T, kRBF>(p, task, ws);
      break;
    case kIMQ:
      kmv_forward_task_k<T, kIMQ>(p, task, ws);
      break;
    case kIMQ3:
      kmv_forward_task_k<T, kIMQ3>(p, task, ws);
      break;
    default:
      kmv_forward_task_k<T, kIMQ5>(p, task, ws);
      break;
  }
}

template <class T, int KID>
void kmv_xgrad_task_k(const Problem<T>& p, int64_t task, const Workspace<T>& ws) {
  const TaskGeom tg = task_geom(task, p.nrt, p.N);
  const int64_t d = p.d, E = p.E;
  const bool small = d <= kSmallF;
  const int64_t Fa = small ? d : p.Fp;
  const T* x = p.x + (tg.b * p.N + tg.n0) * d;
  load_rows(x, d, tg.tn, tg.tnp, ws.xbuf);
  load_rows(p.g + (tg.b * p.N + tg.n0) * E, E, tg.tn, tg.tnp, ws.gbuf);
  std::memset(ws.acc, 0, sizeof(T) * Fa * tg.tnp);
  std::memset(ws.rs, 0, sizeof(T) * tg.tnp);
  const T coef = kernel_coef<T>(KID, p.h[tg.b]);
  for (int64_t ct = 0; ct < p.nct; ++ct) {
    const ColGeom cg = col_geom<T>(ct, p.M);
    const T* yT = p.yT + (tg.b * p.nct + ct) * d * kTM;
    const T* vT = p.vT + (tg.b * p.nct + ct) * E * kTM;
    pair_tile_full<T, true>(ws.xbuf, d, yT, ws.R, d, tg.nrb, cg.ncb);
    pair_tile_full<T, false>(ws.gbuf, E, vT, ws.G, E, tg.nrb, cg.ncb);  // zero past M (vT padded)
    kernel_derivs_times<T, KID>(ws.R, ws.G, tg.tnp, cg.nv, coef);
    row_sums<T>(ws.R, tg.tnp, cg.nv, ws.rs);
    if (small) {
      acc_small<T>(ws.R, yT, tg.tnp, cg.nv, ws.acc, (int)d);
    } else {
      acc_large<T>(ws.R, p.yP + (tg.b * p.M + cg.m0) * p.Fp, p.Fp, cg.tm, ws.acc, tg.tnp);
    }
  }
  T* out = p.out + (tg.b * p.N + tg.n0) * d;
  for (int i = 0; i < tg.tn; ++i) {
    const T r = ws.rs[i];
    const T* a = ws.acc + i * Fa;
    for (int64_t k = 0; k < d; ++k) out[i * d + k] = T(2) * (r * x[i * d + k] - a[k]);
  }
}

template <class T>
void kmv_xgrad_task(const Problem<T>& p, int64_t task, const Workspace<T>& ws) {
  switch (p.kernel) {
    case kRBF:
      kmv_xgrad_task_k<T, kRBF>(p, task, ws);
      break;
    case kIMQ:
      kmv_xgrad_task_k<T, kIMQ>(p, task, ws);
      break;
    case kIMQ3:
      kmv_xgrad_task_k<T, kIMQ3>(p, task, ws);
      break;
    default:
      kmv_xgrad_task_k<T, kIMQ5>(p, task, ws);
      break;
  }
}

template void kmv_forward_task<float>(const Problem<float>&, int64_t, const Workspace<float>&);
template void kmv_forward_task<double>(const Problem<double>&, int64_t, const Workspace<double>&);
template void kmv_xgrad_task<float>(const Problem<float>&, int64_t, const Workspace<float>&);
template void kmv_xgrad_task<double>(const Problem<double>&, int64_t, const Workspace<double>&);

}  // namespace STEINOPS_ISA_NS
}  // namespace cpu
}  // namespace steinops
