#!/usr/bin/env python
"""Roofline model of the kernel benchmark: the work each op must do and the rates a device can do it at.

    python benchmarks/roofline.py --device cpu            # measure and print the peaks as JSON
    from roofline import op_work, measure_peaks, floor    # as benchmarks/kernels.py uses it

**Work** (:class:`Work`) of one call, for N query rows x (N, d), M sample rows y (M, d), E right-hand
sides v (M, E), s bytes per element of the input dtype, P = N M pairs. Lower-order terms, O((N + M)(d + E))
FLOPs (the squared norms |x_n|^2, the final scaling by 1/h^2, ...), are left out.

- ``matmul_flops``: the FLOPs that run as matrix products (tensor cores, BLAS): the distance dot products
  ``x_n . y_m`` (2 P d), the products of the kernel matrix with right-hand sides (2 P E), the Cholesky
  factorisation (M^3 / 3) and triangular solves (M^2 per right-hand side per solve).
- ``solve_flops``: the part of ``matmul_flops`` that is the dense factorisation and its solves (``sge``),
  which needs at least float32 precision (see the floor).
- ``elementwise_flops``: the per-pair scalar FLOPs: ``r2 = |x|^2 + |y|^2 - 2 x.y`` and its scaling by
  ``-1 / (2 h^2)`` (3 per pair and kernel evaluation), in the backward the coefficients and row/column sums.
- ``exps``: one exponential per kernel evaluation (P per pass over the pairs).
- ``bytes``: the minimum traffic: every input read once and every output written once, in the input
  dtype (for ``gram+stein`` that includes the M x M output; for ``sge`` the M x M matrix of the dense
  solve is *not* counted: it is an intermediate, which a fused solver may keep on chip).

Per op (``kmv`` is ``K(x, y) @ v``; the other ops have y = x, N = M):

===========  ==========================  ===============  ======  ===============================
op           matmul FLOPs                elementwise      exps    bytes / s
===========  ==========================  ===============  ======  ===============================
kmv          2 P (d + E)                 3 P              P       N d + M d + M E + N E
kmv+bwd      2 P (4 d + 3 E)             10 P             2 P     3 N d + 3 M d + 3 M E + 2 N E
stein        2 M^2 (2 d + 1)             3 M^2            M^2     2 M d
stein+bwd    2 M^2 (4 d + 3 (d + 1))     10 M^2           2 M^2   5 M d
gram+stein   2 M^2 (2 d + 1)             3 M^2            M^2     2 M d + M^2
sge          gram+stein + M^3/3 + 2M^2d  3 M^2            M^2     2 M d
sge+bwd      sge + 14 M^2 d              13 M^2           2 M^2   5 M d
matmul       2 M^2 d                     0                0       2 M d + M^2
===========  ==========================  ===============  ======  ===============================

Solve FLOPs (part of the matmul FLOPs): ``sge`` M^3/3 + 2 M^2 d, ``sge+bwd`` M^3/3 + 4 M^2 d.

``stein`` is one kernel product with the E = d + 1 right-hand sides ``[1 | x]`` (``S = (P[:, :1] x -
P[:, 1:]) / h^2``); ``gram+stein`` does the same work and also writes K. A backward (``+bwd``: loss
``(out * g).sum()``, gradients to every input) is modelled as the forward plus ONE more pass over the
pairs that recomputes the kernel (flash-attention style; nothing N x M stored):

- ``kmv`` backward: distances 2 P d, ``G_nm = g_n . v_m`` 2 P E, ``dv = K^T g`` 2 P E, ``dx = 2 (rowsum(C) x -
  C y)`` and ``dy`` likewise with ``C^T`` (2 x 2 P d), ``C = k' o G``; elementwise r2 (3 P), C (2 P),
  row and column sums of C (2 P); reads x, y, v, g, writes dx, dy, dv.
- ``stein`` backward: the ``kmv`` backward with N = M, E = d + 1 (x is both the queries, the samples and
  the right-hand sides); reads x, g, writes dx.
- ``sge`` backward: with ``A = K + eta I``, ``G = -A^{-1} S`` and ``mu = A^{-1} g``: ``dL/dS = -mu`` and
  ``dL/dK = mu G^T`` (rank d, never formed), so no O(M^3) work: two triangular solves for mu
  (2 M^2 d), then one pass over the pairs: distances, ``mu . G^T``, ``mu . x^T``, ``K^T mu`` (2 M^2 d
  each) and the two coefficient-matrix products with x (2 x 2 M^2 d); 10 M^2 elementwise, M^2 exps.
- ``matmul`` is the ``cublas_matmul`` row, ``x @ x.T``.

**Peaks** (:func:`measure_peaks`, once per run, on the benchmark's device and thread count; each the
fastest of a few timed calls after a warm-up):

- ``bandwidth``: ``dst.copy_(src)`` of a large tensor (CUDA 1 GiB, ``quick`` 256 MiB; CPU 128 MiB,
  ``quick`` 64 MiB), ``2 * bytes / time``, the fastest of 10 copies.
- ``matmul``: ``torch.mm`` of two square matrices (CUDA n = 8192, ``quick`` 4096; CPU n grown from 256
  until one call takes >= 10 ms, at most 2048, ``quick`` 1024, the fastest of 10 calls), ``2 n^3 / time``,
  per precision: float32 (on CUDA with TF32 off), tf32 (CUDA, TF32 on), bfloat16, float16 and float64
  as the dtype needs.
- ``exp``: CUDA: a ``torch.compile`` kernel that applies ``exp(-y / 2)`` 64 times to every element it
  loads (compute-bound, the MUFU ex2 rate plus one multiply), else the spec table
  :data:`GPU_BOOST_CLOCK_HZ` (SMs x 16 ex2 / clock / SM x boost clock). CPU: there is no exp unit, exp
  is a polynomial on the FMA units; the larger of ``torch.exp`` over a cache-resident tensor (65536
  float32, 20 calls per timing) and the model ``float32 matmul rate / CPU_EXP_FLOPS`` (30: a
  Cody-Waite reduction and a degree-5 polynomial, about 15 FMA-slot instructions; a fused kernel with
  an inline polynomial exp, as steinops' C++ backend, beats a separate ``torch.exp`` call).
  ``exp_source`` in the peaks says which was used, ``exp_spec_per_s`` holds the GPU spec / CPU model.
- ``elementwise``: the float32 (float64 for float64 inputs) matmul rate without tensor cores, i.e.
  the FMA rate: optimistic for the adds and multiplies of the elementwise part.

**Floor** (:func:`floor`): ``max(matmul, exp, elementwise, memory)`` with the terms (in ``terms_ms``,
the largest named as ``bound``)::

    matmul      = (matmul_flops - solve_flops) / matmul rate + solve_flops / solve rate
    exp         = exps / exp rate
    elementwise = elementwise_flops / elementwise rate
    memory      = bytes / copy bandwidth

The matmul rate is the fastest measured precision that may compute the dtype (:data:`MATMUL_PRECISIONS`):
for float32 inputs that is tf32 on a GPU (the "tensor-core floor"), for bfloat16 the bfloat16 rate. The
solve rate is IEEE float32 (float64 for float64 inputs): a Cholesky of ``K + eta I`` in TF32 or bfloat16
would lose the solution. The max assumes the terms overlap perfectly, as on a GPU where matrix
products, MUFU exps, FMAs and memory traffic run on separate units; on a CPU all compute shares the
same vector units, so there the floor is optimistic (a sum of the compute terms would be tighter).
``floor_fraction = floor_ms / measured ms`` is then at most about 1 (above 1 only where a kernel beats a
measured peak, e.g. a cheaper exp than torch's).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch

# precisions whose matmul rate may stand in for a dtype's (one can always compute a half dtype in float32)
MATMUL_PRECISIONS = {
    torch.float64: ("float64",),
    torch.float32: ("float32", "tf32"),
    torch.bfloat16: ("bfloat16", "float32", "tf32"),
    torch.float16: ("float16", "float32", "tf32"),
}
PRECISION_DTYPE = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}

# Spec table for the exp rate when it cannot be measured: boost clock by GPU name fragment (the first
# fragment found in torch.cuda.get_device_name wins, so specific names come first). Every architecture
# from sm_50 to sm_90 issues 16 MUFU ex2 per clock per SM (CUDA C++ programming guide, "arithmetic
# instructions" throughput table); H100 SXM: 132 SMs x 16 x 1.98 GHz = 4.18e12 exp/s.
GPU_BOOST_CLOCK_HZ = (
    ("H100 PCIe", 1.755e9), ("H100 NVL", 1.785e9), ("H100", 1.98e9), ("H200", 1.98e9), ("GH200", 1.98e9),
    ("A100", 1.41e9), ("L40S", 2.52e9), ("L4", 2.04e9), ("A10", 1.695e9), ("RTX 4090", 2.52e9),
)
MUFU_EX2_PER_CLOCK_PER_SM = 16
# A CPU has no exp unit: a vectorised exp is a Cody-Waite reduction (2-3 FMAs), a degree-5 polynomial
# (5 FMAs) and the exponent bits built by integer ops, about 15 vector instructions each taking an
# FMA-pipe slot, i.e. the time of 30 FLOPs at the float32 matmul (FMA) rate.
CPU_EXP_FLOPS = 30

OPS = ("kmv", "kmv+bwd", "stein", "stein+bwd", "gram+stein", "sge", "sge+bwd", "matmul")


# ---- work ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Work:
    """What one call must do: FLOPs in matrix products and elementwise, exponentials, bytes moved."""

    matmul_flops: float = 0.0
    solve_flops: float = 0.0  # the part of matmul_flops that is a dense factorisation / triangular solve
    elementwise_flops: float = 0.0
    exps: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def with_bytes(self, nbytes: float) -> Work:
        return dataclasses.replace(self, bytes=float(nbytes))


def kmv_forward(N: int, M: int, d: int, E: int, s: int) -> Work:
    """``out = K(x, y) @ v``: matmul ``2 N M (d + E)``, elementwise ``3 N M``, ``N M`` exps,
    bytes ``s (N d + M d + M E + N E)``."""
    P = N * M
    return Work(2.0 * P * (d + E), 0.0, 3.0 * P, float(P), float(s * (N * d + M * d + M * E + N * E)))


def kmv_backward(N: int, M: int, d: int, E: int, s: int) -> Work:
    """dx, dy, dv of ``(out * g).sum()`` in one pass that recomputes K: matmul ``2 N M (3 d + 2 E)``,
    elementwise ``7 N M``, ``N M`` exps, bytes ``s (2 N d + 2 M d + 2 M E + N E)``."""
    P = N * M
    return Work(2.0 * P * (3 * d + 2 * E), 0.0, 7.0 * P, float(P),
                float(s * (2 * N * d + 2 * M * d + 2 * M * E + N * E)))


def stein_forward(M: int, d: int, s: int) -> Work:
    """The Stein term: one kernel product of x with the ``d + 1`` right-hand sides ``[1 | x]``; reads x,
    writes S: bytes ``2 s M d``."""
    return kmv_forward(M, M, d, d + 1, s).with_bytes(2 * s * M * d)


def stein_backward(M: int, d: int, s: int) -> Work:
    """The kmv backward with N = M, E = d + 1; reads x and g, writes dx: bytes ``3 s M d``."""
    return kmv_backward(M, M, d, d + 1, s).with_bytes(3 * s * M * d)


def gram_stein(M: int, d: int, s: int) -> Work:
    """K (M, M) and S: the Stein term's work, plus the M x M output: bytes ``s (2 M d + M^2)``."""
    return stein_forward(M, d, s).with_bytes(s * (2 * M * d + M * M))


def cholesky_solve(M: int, n_rhs: int) -> Work:
    """Cholesky of an M x M matrix (``M^3 / 3``) and two triangular solves (``2 M^2 n_rhs``), all solve FLOPs."""
    flops = M**3 / 3 + 2.0 * M * M * n_rhs
    return Work(matmul_flops=flops, solve_flops=flops)


def sge_forward(M: int, d: int, s: int) -> Work:
    """In-sample SGE ``G = -(K + eta I)^{-1} S``: the Gram + Stein work, a Cholesky and two solves with d
    right-hand sides; reads x, writes G: bytes ``2 s M d``."""
    return (stein_forward(M, d, s) + cholesky_solve(M, d)).with_bytes(2 * s * M * d)


def sge_backward(M: int, d: int, s: int) -> Work:
    """Two triangular solves (``2 M^2 d``, solve FLOPs) and one pass over the pairs (``12 M^2 d``): matmul
    ``14 M^2 d``, elementwise ``10 M^2``, ``M^2`` exps; reads x, g, writes dx: bytes ``3 s M d``."""
    return Work(14.0 * M * M * d, 2.0 * M * M * d, 10.0 * M * M, float(M * M), float(3 * s * M * d))


def matmul(M: int, d: int, s: int) -> Work:
    """``x @ x.T`` (the cublas_matmul row): ``2 M^2 d`` FLOPs, bytes ``s (2 M d + M^2)`` (x read twice)."""
    return Work(matmul_flops=2.0 * M * M * d, bytes=float(s * (2 * M * d + M * M)))


def op_work(op: str, M: int, d: int, E: int | None = None, itemsize: int = 4, N: int | None = None) -> Work:
    """The :class:`Work` of benchmark op ``op`` (see the module docstring); ``N`` defaults to M."""
    N = M if N is None else N
    s = itemsize
    if op == "kmv":
        return kmv_forward(N, M, d, E, s)
    if op == "kmv+bwd":
        return kmv_forward(N, M, d, E, s) + kmv_backward(N, M, d, E, s)
    if op == "stein":
        return stein_forward(M, d, s)
    if op == "stein+bwd":
        return stein_forward(M, d, s) + stein_backward(M, d, s)
    if op == "gram+stein":
        return gram_stein(M, d, s)
    if op == "sge":
        return sge_forward(M, d, s)
    if op == "sge+bwd":
        return sge_forward(M, d, s) + sge_backward(M, d, s)
    if op == "matmul":
        return matmul(M, d, s)
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


# ---- the floor ------------------------------------------------------------------------------------

def matmul_rate(peaks: dict, dtype: torch.dtype) -> tuple[str, float]:
    """(precision, FLOP/s): the fastest measured matmul precision that may compute ``dtype``."""
    rates = peaks["matmul_flops_per_s"]
    cands = [(p, rates[p]) for p in MATMUL_PRECISIONS[dtype] if rates.get(p)]
    if not cands:
        raise ValueError(f"no matmul rate measured for {dtype}: {rates}")
    return max(cands, key=lambda pr: pr[1])


def floor(work: Work, peaks: dict, dtype: torch.dtype) -> dict:
    """The roofline floor of ``work`` on the device of ``peaks``: ``floor_ms = max(terms_ms)`` with the
    terms matmul (``(matmul_flops - solve_flops) / matmul rate + solve_flops / solve rate``), exp
    (``exps / exp rate``), elementwise (``elementwise_flops / elementwise rate``) and memory
    (``bytes / bandwidth``); ``bound`` is the term that binds, ``matmul_precision`` the precision whose
    rate was used for the matrix products."""
    precision, mm_rate = matmul_rate(peaks, dtype)
    wide = "float64" if dtype == torch.float64 else "float32"
    solve_rate = peaks["matmul_flops_per_s"][wide]
    terms = {
        "matmul": (work.matmul_flops - work.solve_flops) / mm_rate + work.solve_flops / solve_rate,
        "exp": work.exps / peaks["exp_per_s"][wide],
        "elementwise": work.elementwise_flops / peaks["matmul_flops_per_s"][wide],
        "memory": work.bytes / peaks["bandwidth_bytes_per_s"],
    }
    terms_ms = {k: v * 1e3 for k, v in terms.items()}
    bound = max(terms_ms, key=terms_ms.get)
    return {"floor_ms": terms_ms[bound], "bound": bound, "terms_ms": terms_ms, "matmul_precision": precision}


# ---- measuring the device -----------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timed calls of ``fn()`` (after ``warmup`` untimed ones), in seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Copy bandwidth in bytes/s: ``dst.copy_(src)`` of ``nbytes``, counted as read + written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src), device, repeats=repeats)


@dataclasses.dataclass
class _Tf32:
    """Context manager: float32 matmuls with TF32 on (``True``) or off, restored afterwards."""

    on: bool

    def __enter__(self):
        self.saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if self.on else "highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.saved)


def measure_matmul(device: torch.device, precision: str, n: int | None = None, min_seconds: float = 0.01,
                   max_n: int = 2048) -> float:
    """Matmul rate in FLOP/s of ``precision`` (float32, tf32, bfloat16, float16, float64): ``torch.mm`` of
    two n x n matrices, ``2 n^3 / time``, the fastest of 10 calls (5 with a given n). Without ``n`` the
    size doubles from 256 until one call takes ``min_seconds`` or n reaches ``max_n`` (short calls, many
    of them: on a shared CPU the fastest is the one no other process interrupted)."""
    dtype = PRECISION_DTYPE[precision]
    with _Tf32(precision == "tf32"):
        size = n or 256
        while True:
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            c = torch.empty(size, size, device=device, dtype=dtype)
            t = best_seconds(lambda: torch.mm(a, b, out=c), device, repeats=10 if n is None else 5)
            if n is not None or t >= min_seconds or 2 * size > max_n:
                return 2.0 * size**3 / t
            size *= 2


def _exp_chain(y: torch.Tensor, steps: int = 64) -> torch.Tensor:
    for _ in range(steps):
        y = torch.exp(y * -0.5)
    return y


def measure_exp_compiled(device: torch.device, dtype: torch.dtype, numel: int, steps: int = 64) -> float:
    """exp/s of a ``torch.compile`` kernel doing ``steps`` exps per element loaded (compute-bound)."""
    fn = torch.compile(lambda t: _exp_chain(t, steps), dynamic=False)
    x = torch.rand(numel, device=device, dtype=dtype)
    return steps * numel / best_seconds(lambda: fn(x), device, warmup=2)


def measure_exp_in_cache(device: torch.device, dtype: torch.dtype, numel: int = 1 << 16, calls: int = 20) -> float:
    """exp/s of ``torch.exp(x, out=y)`` on a tensor that stays in cache (``calls`` calls per timing)."""
    x = torch.rand(numel, device=device, dtype=dtype)
    y = torch.empty_like(x)

    def run():
        for _ in range(calls):
            torch.exp(x, out=y)
    return calls * numel / best_seconds(run, device)


def gpu_exp_spec(device: torch.device) -> float | None:
    """exp/s from the spec table (SMs x 16 ex2 / clock x boost clock), None for a GPU not in the table."""
    name = torch.cuda.get_device_name(device)
    clock = next((hz for frag, hz in GPU_BOOST_CLOCK_HZ if frag in name), None)
    if clock is None:
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count * MUFU_EX2_PER_CLOCK_PER_SM * clock


def measure_exp(device: torch.device, dtype: torch.dtype, quick: bool = False,
                fma_flops_per_s: float | None = None) -> tuple[float, str, float | None]:
    """(exp/s, how it was obtained, spec or model exp/s or None). CUDA: the compiled many-exps kernel,
    else the spec table, else torch.exp on a large tensor (memory-bound: a lower bound). CPU: the larger
    of torch.exp in cache and the polynomial model ``fma_flops_per_s / CPU_EXP_FLOPS``."""
    if device.type != "cuda":
        measured = measure_exp_in_cache(device, dtype)
        model = fma_flops_per_s / CPU_EXP_FLOPS if fma_flops_per_s else None
        if model is not None and model > measured:
            return model, (f"polynomial model: float32 FMA rate / {CPU_EXP_FLOPS} (above torch.exp over a "
                           f"cache-resident tensor, {measured / 1e9:.3g} G/s)"), model
        return measured, "torch.exp over a cache-resident tensor (65536 elements)", model
    spec = gpu_exp_spec(device) if dtype == torch.float32 else None
    try:
        rate = measure_exp_compiled(device, dtype, 1 << (22 if quick else 26))
        return rate, "torch.compile kernel, 64 exp(-y/2) per element loaded", spec
    except Exception as e:  # no working compiler: the table, or a memory-bound lower bound
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
        if spec is not None:
            return spec, f"spec table (SMs x 16 ex2/clock x boost clock); compile failed: {why}", spec
        rate = measure_exp_in_cache(device, dtype, numel=1 << 26, calls=1)
        return rate, f"torch.exp over 2^26 elements (memory-bound lower bound); compile failed: {why}", None


def precisions_for(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The matmul precisions to measure: those that may compute ``dtype``, plus the elementwise one."""
    wanted = set(MATMUL_PRECISIONS[dtype]) | {"float64" if dtype == torch.float64 else "float32"}
    if device.type != "cuda":
        wanted.discard("tf32")  # TF32 is a tensor-core mode; a CPU runs float32 as float32
    return tuple(p for p in PRECISION_DTYPE if p in wanted)


def measure_peaks(device, dtype: torch.dtype = torch.float32, quick: bool = False) -> dict:
    """Measure the device once: copy bandwidth, matmul rate per precision, exp rate (see the module
    docstring). Returns a JSON-able dict (rates per second) with the sources and sizes used."""
    device = torch.device(device)
    t0 = time.perf_counter()
    cuda = device.type == "cuda"
    nbytes = (1 << 28 if quick else 1 << 30) if cuda else (1 << 26 if quick else 1 << 27)
    peaks = {"device": device.type, "dtype": str(dtype).removeprefix("torch."),
             "torch_num_threads": torch.get_num_threads(),
             "bandwidth_bytes_per_s": measure_bandwidth(device, nbytes), "bandwidth_copy_bytes": nbytes,
             "matmul_flops_per_s": {}, "exp_per_s": {}, "exp_source": {}, "exp_spec_per_s": {}}
    for p in precisions_for(device, dtype):
        n = (4096 if quick else 8192) if cuda else None
        peaks["matmul_flops_per_s"][p] = measure_matmul(device, p, n=n, max_n=1024 if quick else 2048)
    wide = "float64" if dtype == torch.float64 else "float32"
    rate, source, spec = measure_exp(device, PRECISION_DTYPE[wide], quick, peaks["matmul_flops_per_s"][wide])
    peaks["exp_per_s"][wide], peaks["exp_source"][wide], peaks["exp_spec_per_s"][wide] = rate, source, spec
    peaks["elementwise_source"] = "the matmul rate without tensor cores (FMA rate) of float32 (float64 inputs: float64)"
    peaks["seconds"] = time.perf_counter() - t0
    return peaks


def describe(peaks: dict) -> str:
    """One line per peak, for the benchmark's header."""
    mm = ", ".join(f"{p} {r / 1e12:.3g}" for p, r in peaks["matmul_flops_per_s"].items())
    exp = ", ".join(f"{w} {r / 1e9:.3g} G/s ({peaks['exp_source'][w]})" for w, r in peaks["exp_per_s"].items())
    return (f"roofline peaks: copy bandwidth {peaks['bandwidth_bytes_per_s'] / 1e9:.3g} GB/s; matmul TFLOP/s {mm}; "
            f"exp {exp}; measured in {peaks['seconds']:.1f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--quick", action="store_true", help="smaller measurement sizes")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = measure_peaks(args.device, getattr(torch, args.dtype), args.quick)
    print(describe(peaks))
    print(json.dumps(peaks, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
