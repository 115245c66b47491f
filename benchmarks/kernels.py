#!/usr/bin/env python
"""Kernel benchmark of steinops: every fused backend against naive PyTorch and torch.compile of it,
each row against its roofline floor (``benchmarks/roofline.py``).

    python benchmarks/kernels.py                    # default grid for the default device
    python benchmarks/kernels.py --device cpu --quick
    python benchmarks/kernels.py --help

Ops (RBF kernel ``k = exp(-|x - y|^2 / (2 h^2))``, bandwidth ``h = sqrt(d)`` so that k is O(1)):

    kmv          K(x, y) @ v          x (N, d), y (M, d), v (M, E)      steinops.kernel_matvec
    stein        S = sum_j grad_{x_j} k(x_i, x_j), x (M, d), matrix-free steinops.stein_term
    gram+stein   K(x, x) and S in one pass                               steinops.gram(stein_term=True)
    sge          G = -(K + eta I)^{-1} S, eta = 0.3 (in-sample SGE)      steinops.stein_score(solver="cholesky")
    kmv+bwd, stein+bwd, sge+bwd
                 the op, then the gradient of (out * g).sum() with respect to every input (x, y, v)

Methods per (op, M = N, d, E) case: each available steinops backend; "naive" (``torch.cdist`` ->
``exp`` -> matmul, the Stein term as ``(rowsum(K) x - K x) / h^2``, the SGE by
``torch.linalg.cholesky`` + ``torch.cholesky_solve``, backward by autograd); "compile" (``torch.compile``
of naive, fresh per case); on CUDA "keops" (pykeops LazyTensor, kmv and stein, forward and backward)
and "cublas_matmul" (``x @ x.T`` of the gram+stein shape, the yardstick of the GPU Gram target).

What is timed: one call of the method on inputs already on the device, after ``--warmup`` calls
(the first includes compilation / autotuning and is reported separately), median of ``--repeats``
calls rotating over ``--input-sets`` pre-generated input sets. CPU: ``time.perf_counter``; CUDA:
CUDA events around the call, the L2 cache flushed before each one. Memory: the peak bytes allocated
during one extra call, output included (CUDA: ``torch.cuda.max_memory_allocated`` minus the bytes
allocated before; CPU: the torch allocator's events as recorded by the torch profiler). Accuracy:
each output against a float64 naive evaluation of its first ``--check-rows`` rows, as
``max |out - ref| / max |ref|``. Roofline: the device's copy bandwidth, matmul and exp rates are
measured once per run; every row gets ``floor_ms`` (the least time the op's FLOPs, exps and bytes
allow), the binding term ``bound`` and ``floor_fraction = floor_ms / ms``.

Writes a table to stdout and JSON (device, peaks, versions, settings, rows, issue targets) to ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

try:
    import steinops
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(REPO))
    import steinops
from steinops.ops import backends as steinops_backends

if str(HERE) not in sys.path:  # the roofline module next to this file
    sys.path.insert(0, str(HERE))
import roofline  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None

FORWARD_OPS = ("kmv", "stein", "gram+stein", "sge")
BACKWARD_OPS = ("kmv+bwd", "stein+bwd", "sge+bwd")  # the forward op, then the gradient of (out * g).sum()
OPS = FORWARD_OPS + BACKWARD_OPS
BASELINES = ("naive", "compile", "keops", "cublas_matmul")
METHODS = ("cpu", "cuda", "triton", "reference") + BASELINES  # also the order of the rows in a group
# the methods that make sense on each device type (what runs when --backends is not given)
DEVICE_METHODS = {
    "cpu": ("cpu", "triton", "reference", "naive", "compile"),
    "cuda": ("cuda", "triton", "reference", "naive", "compile", "keops", "cublas_matmul"),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |out - ref| / max |ref| above which a row is flagged MISMATCH
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
SGE_ETA = 0.3  # the ridge of the sge op (steinops' default)

SIZES_1K_1M = (1024, 4096, 10_000, 16384, 65536, 100_000, 262_144, 1_048_576)


@dataclasses.dataclass(frozen=True)
class Grid:
    """Default settings of one device kind. The cases are ops x ``sizes`` x ``dims`` (x ``E`` for kmv),
    where ``per_op`` may give an op its own (sizes, dims), plus the ``extra`` (op, M, d) cases; a case
    whose roofline floor exceeds ``max_floor_ms`` is left out."""

    sizes: tuple[int, ...]
    dims: tuple[int, ...]
    E: tuple[int, ...]
    extra: tuple[tuple[str, int, int], ...]
    repeats: int
    warmup: int
    max_dense_gb: float
    max_seconds: float
    max_floor_ms: float
    per_op: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()


DEFAULTS = {
    # the dense SGE's O(M^3) Cholesky (and torch's O(M^3) backward of it) stops at M = 4096 on a CPU
    "cpu": Grid(sizes=(1024, 4096, 8192), dims=(3, 64), E=(4,), extra=(), repeats=5, warmup=1,
                max_dense_gb=4.0, max_seconds=15.0, max_floor_ms=10_000.0,
                per_op=(("sge", (1024, 2048, 4096), (3, 64)), ("sge+bwd", (1024, 2048, 4096), (3, 64)))),
    # the issue's grid: the kernel product at d = 3, 64, 784, 3072 and N = M from 1k to 1M (where the
    # memory model and the floor cap allow), the Stein term, Gram and SGE, forward and backward
    "cuda": Grid(sizes=(4096, 16384, 65536, 100_000), dims=(3, 64), E=(4,),
                 per_op=(("kmv", SIZES_1K_1M, (3, 64, 784, 3072)), ("kmv+bwd", SIZES_1K_1M, (3, 64, 784, 3072)),
                         ("sge", (1024, 4096, 16384), (3, 64)), ("sge+bwd", (1024, 4096, 16384), (3, 64))),
                 extra=(("stein", 4096, 3072), ("stein+bwd", 4096, 3072), ("gram+stein", 4096, 3072),
                        ("sge", 4096, 3072), ("sge+bwd", 4096, 3072)),
                 repeats=20, warmup=3, max_dense_gb=40.0, max_seconds=20.0, max_floor_ms=1000.0),
}
QUICK = Grid(sizes=(256, 512), dims=(3,), E=(4,), extra=(), repeats=3, warmup=1, max_dense_gb=1.0, max_seconds=5.0,
             max_floor_ms=1000.0)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    M: int  # = N
    d: int
    E: int | None  # kmv only

    @property
    def h(self) -> float:
        return math.sqrt(self.d)

    @property
    def forward_op(self) -> str:
        return self.op.removesuffix("+bwd")

    @property
    def backward(self) -> bool:
        return self.op.endswith("+bwd")


# ---- the functions that are timed ------------------------------------------------------------------

def rbf_matrix(x, y, h, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """The dense RBF kernel matrix, naively: ``exp(-cdist(x, y)^2 / (2 h^2))``."""
    return torch.exp(-torch.cdist(x, y, compute_mode=compute_mode) ** 2 / (2 * h * h))


def stein_from_matrix(K, x, y, h):
    """``S_i = sum_j K_ij (x_i - y_j) / h^2``, the RBF Stein term, from a dense K."""
    return (K.sum(-1, keepdim=True) * x - K @ y) / (h * h)


def sge_from_matrix(K, S, eta):
    """``G = -(K + eta I)^{-1} S`` by ``torch.linalg.cholesky`` and ``torch.cholesky_solve``."""
    L = torch.linalg.cholesky(K + eta * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device))
    return -torch.cholesky_solve(S, L)


def naive_kmv(x, y, v, *, h):
    return rbf_matrix(x, y, h) @ v


def naive_stein(x, *, h):
    return stein_from_matrix(rbf_matrix(x, x, h), x, x, h)


def naive_gram(x, *, h):
    K = rbf_matrix(x, x, h)
    return K, stein_from_matrix(K, x, x, h)


def naive_sge(x, *, h, eta=SGE_ETA):
    """In-sample SGE from the dense K; half inputs are computed in float32 (LAPACK has no half Cholesky)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    K = rbf_matrix(xf, xf, h)
    return sge_from_matrix(K, stein_from_matrix(K, xf, xf, h), eta).to(x.dtype)


NAIVE = {"kmv": naive_kmv, "stein": naive_stein, "gram+stein": naive_gram, "sge": naive_sge}


def steinops_kmv(x, y, v, *, h, backend):
    return steinops.kernel_matvec(x, y, v, kernel="rbf", bandwidth=h, backend=backend)


def steinops_stein(x, *, h, backend):
    return steinops.stein_term(x, kernel="rbf", bandwidth=h, backend=backend)


def steinops_gram(x, *, h, backend):
    return steinops.gram(x, kernel="rbf", bandwidth=h, stein_term=True, backend=backend)


def steinops_sge(x, *, h, backend):
    return steinops.stein_score(x, kernel="rbf", bandwidth=h, eta=SGE_ETA, solver="cholesky", backend=backend)


STEINOPS = {"kmv": steinops_kmv, "stein": steinops_stein, "gram+stein": steinops_gram, "sge": steinops_sge}


def keops_rbf(x, y, h):
    """The RBF kernel matrix as a symbolic pykeops LazyTensor (nothing N x M is stored)."""
    from pykeops.torch import LazyTensor

    sq = ((LazyTensor(x[:, None, :]) - LazyTensor(y[None, :, :])) ** 2).sum(-1)
    return (-sq / (2 * h * h)).exp()


def keops_kmv(x, y, v, *, h):
    return keops_rbf(x, y, h) @ v


def keops_stein(x, *, h):
    p = keops_rbf(x, x, h) @ torch.cat([torch.ones_like(x[:, :1]), x], 1)
    return (p[:, :1] * x - p[:, 1:]) / (h * h)


KEOPS = {"kmv": keops_kmv, "stein": keops_stein}


def cublas_matmul(x, *, h):
    """One (M x d) . (d x M) matmul: the yardstick of the Gram + Stein target on a GPU."""
    return x @ x.T


def with_backward(forward: Callable) -> Callable:
    """``forward`` and then the gradient of ``loss = (out * g).sum()`` with respect to every input, as
    ``torch.autograd.grad(out, inputs, grad_outputs=g)``. The returned function takes ``(*inputs, g)``
    and returns ``(out, *grads)``."""

    def fn(*inputs):
        *args, g = inputs
        with torch.enable_grad():
            out = forward(*args)
            grads = torch.autograd.grad(out, args, grad_outputs=g)
        return (out.detach(), *grads)

    return fn


# ---- methods: what runs, on which ops, and how much it materialises -------------------------------

@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    ops: tuple[str, ...]
    forward: Callable[[Case], Callable]  # case -> the forward of c.forward_op, fn(*inputs)
    dense_elems: Callable[[Case], int]  # model of the N x M (x d) elements it materialises

    def build(self, c: Case) -> Callable:
        """The timed function of case ``c``: the forward, and for a ``+bwd`` op its backward too."""
        fwd = self.forward(c)
        return with_backward(fwd) if c.backward else fwd


def forward_model(per_op: dict[str, Callable[[Case], int]]) -> Callable[[Case], int]:
    """A dense-elements model from one per forward op; a ``+bwd`` op keeps the forward's matrices for
    autograd and makes as many gradients: twice the forward."""
    return lambda c: per_op[c.forward_op](c) * (2 if c.backward else 1)


# cdist's output and one elementwise temporary (K for gram+stein); sge: also K + eta I and its factor
_naive_dense = forward_model({"kmv": lambda c: 2 * c.M * c.M, "stein": lambda c: 2 * c.M * c.M,
                              "gram+stein": lambda c: 2 * c.M * c.M, "sge": lambda c: 4 * c.M * c.M})
# nothing N x M, except the Gram output itself and the dense SGE's K, K + eta I and factor
_fused_dense = forward_model({"kmv": lambda c: 0, "stein": lambda c: 0, "gram+stein": lambda c: c.M * c.M,
                              "sge": lambda c: 3 * c.M * c.M})
# reference.sqdist's (N, M, d) differences and squares (plus the SGE's matrices)
_reference_dense = forward_model({op: (lambda c, k=k: 2 * c.M * c.M * c.d + 3 * c.M * c.M + k * c.M * c.M)
                                  for op, k in (("kmv", 0), ("stein", 0), ("gram+stein", 0), ("sge", 3))})


def steinops_method(backend: str) -> Method:
    dense = _reference_dense if backend == "reference" else _fused_dense
    return Method(backend, OPS, lambda c: functools.partial(STEINOPS[c.forward_op], h=c.h, backend=backend), dense)


def compile_naive(c: Case, mode: str | None) -> Callable:
    """A fresh ``torch.compile`` of the naive forward (static shapes, one case); the backward of a
    ``+bwd`` op is compiled by AOTAutograd on the first call."""
    torch.compiler.reset()
    return torch.compile(functools.partial(NAIVE[c.forward_op], h=c.h), mode=mode, dynamic=False)


def select_methods(requested, device: torch.device, compile_mode):
    """The methods to run on ``device`` and a note for each one left out."""
    keops_ops = tuple(op for op in OPS if op.removesuffix("+bwd") in KEOPS)
    candidates = {b: steinops_method(b) for b in steinops_backends.BACKENDS}
    candidates.update(
        naive=Method("naive", OPS, lambda c: functools.partial(NAIVE[c.forward_op], h=c.h), _naive_dense),
        compile=Method("compile", OPS, lambda c: compile_naive(c, compile_mode), _naive_dense),
        keops=Method("keops", keops_ops, lambda c: functools.partial(KEOPS[c.forward_op], h=c.h), lambda c: 0),
        cublas_matmul=Method("cublas_matmul", ("gram+stein",), lambda c: functools.partial(cublas_matmul, h=c.h),
                             lambda c: c.M * c.M),
    )
    names = DEVICE_METHODS[device.type] if requested is None else requested
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    chosen, notes = [], {}
    for name in sorted(set(names), key=METHODS.index):
        why = unavailable_reason(name, device)
        if why is None:
            chosen.append(candidates[name])
        else:
            notes[name] = why
    return chosen, notes


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why method ``name`` cannot (or should not) run on ``device``; None when it can."""
    if name in steinops_backends.BACKENDS:
        if steinops_backends.available(name, device):
            return None
        if name == "cpu":
            if device.type != "cpu":
                return "C++ backend runs on CPU tensors only"
            return "steinops._C is not built (python setup.py build_ext --inplace)"
        if name == "triton" and device.type == "cpu":
            return ("Triton on CPU runs only under the interpreter (set TRITON_INTERPRET=1; "
                    "it is a correctness path, not a performance one)")
        if name == "cuda":
            return "needs a CUDA device and steinops._C built with CUDA"
        return f"not available on {device.type}"
    if name == "keops":
        if device.type != "cuda":
            return "pykeops is benchmarked on CUDA only"
        try:
            importlib.import_module("pykeops.torch")
        except Exception as e:  # ImportError, or a pykeops that cannot find its compiler
            return f"pykeops does not import: {first_line(e)}"
    if name == "cublas_matmul" and device.type != "cuda":
        return "the cuBLAS reference row is for CUDA devices"
    return None


# ---- inputs and the float64 check -----------------------------------------------------------------

def make_inputs(c: Case, n_sets: int, dtype, device, seed: int):
    """``n_sets`` independent input tuples for case ``c`` (standard normal points and v). A ``+bwd`` op's
    points (and v) require grad, and its tuple ends with the output cotangent g."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, grad=False):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    def one_set():
        if c.forward_op == "kmv":
            xs = (randn(c.M, c.d, grad=c.backward), randn(c.M, c.d, grad=c.backward),
                  randn(c.M, c.E, grad=c.backward))
            out_shape = (c.M, c.E)
        else:
            xs, out_shape = (randn(c.M, c.d, grad=c.backward),), (c.M, c.d)
        return xs + (randn(*out_shape),) if c.backward else xs

    return [one_set() for _ in range(n_sets)]


def check_outputs(c: Case, inputs, rows: int):
    """Float64 naive outputs for the first ``rows`` rows of every output (distances by direct
    differences): forward outputs, then for a ``+bwd`` op the gradients in the order of the inputs."""
    t = [a.detach().double() for a in inputs]
    if c.backward:
        return {"kmv+bwd": _check_kmv_backward, "stein+bwd": _check_stein_backward,
                "sge+bwd": _check_sge_backward}[c.op](t, c.h, rows)
    if c.op == "sge":
        return (_sge64(t[0], c.h)[:rows],)
    x = t[0][:rows]
    y = t[1] if c.op == "kmv" else t[0]
    K = _rbf64(x, y, c.h)
    if c.op == "kmv":
        return (K @ t[2],)
    S = stein_from_matrix(K, x, y, c.h)
    return (S,) if c.op == "stein" else (K, S)


def _rbf64(x, y, h):
    return rbf_matrix(x, y, h, compute_mode="donot_use_mm_for_euclid_dist")


def _stein64(x, y, h):
    """``S_n = sum_m k(x_n, y_m) (x_n - y_m) / h^2`` for queries x and samples y."""
    return stein_from_matrix(_rbf64(x, y, h), x, y, h)


def _sge64(x, h):
    K = _rbf64(x, x, h)
    return sge_from_matrix(K, stein_from_matrix(K, x, x, h), SGE_ETA)


def _grad(out, wrt, g):
    with torch.enable_grad():
        return torch.autograd.grad(out, wrt, grad_outputs=g)


def _check_kmv_backward(t, h, R):
    """out, dx for the first R queries (from those queries alone); dy, dv for the first R samples (from
    those samples against every query): each row gets all of its terms."""
    x, y, v, g = t
    with torch.enable_grad():
        xq = x[:R].clone().requires_grad_()
        out = _rbf64(xq, y, h) @ v
        (dx,) = _grad(out, xq, g[:R])
        ys, vs = y[:R].clone().requires_grad_(), v[:R].clone().requires_grad_()
        dy, dv = _grad(_rbf64(x, ys, h) @ vs, (ys, vs), g)
    return out.detach(), dx, dy, dv


def _check_stein_backward(t, h, R):
    """S and dx for the first R points: x_j enters as a query (its own S_j) and as a sample (every S_i)."""
    x, g = t
    with torch.enable_grad():
        xq = x[:R].clone().requires_grad_()
        S = _stein64(xq, x, h)
        (as_query,) = _grad(S, xq, g[:R])
        ys = x[:R].clone().requires_grad_()
        (as_sample,) = _grad(_stein64(x, ys, h), ys, g)
    return S.detach(), as_query + as_sample


def _check_sge_backward(t, h, R):
    x, g = t
    with torch.enable_grad():
        xg = x.clone().requires_grad_()
        G = _sge64(xg, h)
        (dx,) = _grad(G, xg, g)
    return G.detach()[:R], dx[:R]


def relative_error(out, ref) -> float:
    """``max |out - ref| / max |ref|`` over the outputs, compared on the rows of ``ref``."""
    out = out if isinstance(out, tuple) else (out,)
    errs = []
    for o, r in zip(out, ref):
        o = o[: r.shape[0]].detach().double()
        errs.append(((o - r).abs().max() / r.abs().max().clamp_min(1e-300)).item())
    return max(errs)


# ---- timing and memory ----------------------------------------------------------------------------

class CpuClock:
    """Wall time of one call with ``time.perf_counter`` (CPU ops are synchronous)."""

    def __call__(self, fn, inputs) -> float:
        t0 = time.perf_counter()
        fn(*inputs)
        return (time.perf_counter() - t0) * 1e3

    def peak_bytes(self, fn, inputs):
        """(output, peak bytes the torch allocator held during the call) from the profiler's
        memory events; the bytes are None if the profiler gives no events."""
        from torch.profiler import ProfilerActivity, profile

        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(*inputs)
        try:
            events = prof.profiler.kineto_results.events()
            deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        except AttributeError:
            return out, None
        live = peak = 0
        for _, nbytes in deltas:
            live += nbytes
            peak = max(peak, live)
        return out, peak


class CudaClock:
    """Time of one call between two CUDA events, with the L2 cache flushed (outside the events)."""

    def __init__(self, device):
        self.device = device
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn, inputs) -> float:
        self.flush.zero_()
        self.start.record()
        fn(*inputs)
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)

    def peak_bytes(self, fn, inputs):
        """(output, ``max_memory_allocated`` during the call minus the bytes allocated before)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        out = fn(*inputs)
        torch.cuda.synchronize(self.device)
        return out, torch.cuda.max_memory_allocated(self.device) - before


@contextlib.contextmanager
def quiet_stderr():
    """Silence the C-level stderr (the profiler's start/stop log lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def time_method(fn, input_sets, clock, warmup: int, repeats: int, max_seconds: float) -> dict:
    """Warm up (the first call, which compiles / autotunes, timed on its own), then the median of
    ``repeats`` timed calls, or of fewer when the timed calls already took ``max_seconds``."""
    n = len(input_sets)
    first = clock(fn, input_sets[0])
    for i in range(1, warmup):
        clock(fn, input_sets[i % n])
    times = []
    while len(times) < repeats and sum(times) < max_seconds * 1e3:
        times.append(clock(fn, input_sets[(warmup + len(times)) % n]))
    return {"ms": statistics.median(times), "ms_min": min(times), "times_ms": times, "repeats": len(times),
            "first_call_ms": first}


# ---- one case, all methods --------------------------------------------------------------------------

def run_case(c: Case, methods, args, clock, progress) -> list[dict]:
    """All methods on case ``c``; every outcome (timed, skipped, failed) is a row."""
    inputs = make_inputs(c, args.input_sets, args.dtype, args.device, args.seed)
    ref = check_outputs(c, inputs[0], args.check_rows)
    itemsize = inputs[0][0].element_size()
    rows = []
    for m in methods:
        if c.op not in m.ops:
            continue
        progress(f"{c.op} M={c.M} d={c.d} {m.name}")
        row = {"op": c.op, "M": c.M, "N": c.M, "d": c.d, "E": c.E, "method": m.name, "status": "ok", "note": "",
               "dense_bytes": m.dense_elems(c) * itemsize, "io_bytes": case_work(c, itemsize).bytes}
        if row["dense_bytes"] > args.max_dense_gb * 2**30:
            row.update(status="OOM-skip", note=f"would materialise {row['dense_bytes'] / 2**30:.1f} GiB "
                                                f"> --max-dense-gb {args.max_dense_gb:g}")
        else:
            row.update(measure(m, c, inputs, ref, args, clock))
        row.update(row_floor(c, m.name, args.peaks, args.dtype, row.get("ms")))
        rows.append(row)
        release(args.device)
    add_speedups(rows)
    return rows


def measure(m: Method, c: Case, inputs, ref, args, clock) -> dict:
    """Timing, peak memory and error of method ``m`` on case ``c``, or the reason it failed."""
    try:
        fn = m.build(c)
        result = time_method(fn, inputs, clock, max(1, args.warmup), args.repeats, args.max_seconds)
        out, result["peak_bytes"] = clock.peak_bytes(fn, inputs[0])
        if m.name != "cublas_matmul":
            result["rel_err"] = relative_error(out, ref)
            result["tolerance"] = tol = tolerance(args.dtype, c)
            if not result["rel_err"] <= tol:
                result.update(status="MISMATCH", note=f"rel_err > {tol:g}")
        return result
    except Exception as e:  # a failing method is a row, not the end of the benchmark
        if is_oom(e):
            return {"status": "OOM", "note": first_line(e)}
        prefix = "torch.compile: " if m.name == "compile" else ""
        return {"status": "error", "note": prefix + f"{type(e).__name__}: {first_line(e)}"}


def tolerance(dtype, c: Case) -> float:
    """The largest ``rel_err`` accepted: ``TOLERANCE[dtype]``; for the SGE ops the solve multiplies the
    rounding errors of K and S by up to ``cond(K + eta I) <= 1 + M / eta``, so there it grows with M:
    ``max(TOLERANCE[dtype], TOLERANCE[compute dtype] * M / 512)`` (half inputs are solved in float32)."""
    if c.forward_op != "sge":
        return TOLERANCE[dtype]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return max(TOLERANCE[dtype], TOLERANCE[compute] * c.M / 512)


def case_work(c: Case, itemsize: int, method: str | None = None) -> roofline.Work:
    """The roofline work of case ``c`` (of one ``x @ x.T`` for the cublas_matmul row). Its bytes, the
    inputs read and outputs written once, are the ``io_bytes`` of every row of the case."""
    op = "matmul" if method == "cublas_matmul" else c.op
    return roofline.op_work(op, c.M, c.d, c.E, itemsize)


def row_floor(c: Case, method: str, peaks: dict, dtype, ms: float | None) -> dict:
    """The row's roofline: ``floor_ms``, ``bound``, the terms, the work counted and ``floor_fraction =
    floor_ms / ms`` (None when the row has no time)."""
    work = case_work(c, dtype.itemsize, method)
    fl = roofline.floor(work, peaks, dtype)
    return {"floor_ms": fl["floor_ms"], "bound": fl["bound"], "floor_fraction": fl["floor_ms"] / ms if ms else None,
            "floor_terms_ms": fl["terms_ms"], "matmul_precision": fl["matmul_precision"],
            "work": dataclasses.asdict(work)}


def add_speedups(rows: list[dict]) -> None:
    """``speedup = naive ms / method ms`` within one case."""
    naive = next((r["ms"] for r in rows if r["method"] == "naive" and "ms" in r), None)
    for r in rows:
        r["speedup"] = naive / r["ms"] if naive is not None and "ms" in r else None


def is_oom(e: Exception) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "defaultcpuallocator" in text


def first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the grid, the environment, the report -----------------------------------------------------------

def build_cases(args, grid: Grid) -> list[Case]:
    """The product grid over ops x sizes x dims (x E for kmv), plus the device's extra cases when the
    grid is the default one (which may also give an op its own sizes and dims, ``Grid.per_op``)."""
    per_op = {op: (sizes, dims) for op, sizes, dims in grid.per_op} if args.default_grid else {}
    cases = []
    for op in args.ops:
        sizes, dims = per_op.get(op, (args.sizes, args.dims))
        for M, d in itertools.product(sizes, dims):
            cases += [Case(op, M, d, E) for E in args.E] if op.startswith("kmv") else [Case(op, M, d, None)]
    if args.default_grid:
        cases += [Case(op, M, d, args.E[0] if op.startswith("kmv") else None)
                  for op, M, d in grid.extra if op in args.ops]
    return list(dict.fromkeys(cases))  # without repeats, in order


def cap_by_floor(cases: list[Case], peaks: dict, dtype, max_floor_ms: float):
    """(cases whose roofline floor is at most ``max_floor_ms``, the others as JSON-able notes)."""
    kept, left_out = [], []
    for c in cases:
        fl = roofline.floor(case_work(c, dtype.itemsize), peaks, dtype)["floor_ms"]
        if fl <= max_floor_ms:
            kept.append(c)
        else:
            left_out.append({**dataclasses.asdict(c), "floor_ms": fl})
    return kept, left_out


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_num_threads": torch.get_num_threads(), "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                    total_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["name"] = info["cpu_model"]
    return info


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (None where there is none or no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown-cpu"


def cpu_isa() -> str:
    """The widest x86 vector extension the CPU reports ("avx512f", "avx2" or "baseline"): the compiled ops pick
    their clone by it, so CPU timings are comparable only within one ISA."""
    flags = _cpuinfo("flags")
    if flags is None:
        return "unknown"
    return next((isa for isa in ("avx512f", "avx2") if isa in flags.split()), "baseline")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "steinops": getattr(steinops, "__version__", None), "steinops_path": str(Path(steinops.__file__).parent),
           "git": git_revision()}
    for mod in ("triton", "pykeops", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:
            out[mod] = None
    return out


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("-dirty" if dirty else "")) or None


def busy_warning(info: dict) -> str | None:
    """A warning when other processes already keep a good part of the CPUs busy."""
    load, cpus = info["loadavg_at_start"], info["cpu_affinity"] or info["cpu_count"] or 1
    if load is None or load[0] <= max(0.5, 0.25 * cpus):
        return None
    return (f"  warning: load average {load[0]:.1f} on {cpus} CPUs before the start; timings will be noisy "
            "(compare min ms with ms)")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_out(args, info: dict) -> Path:
    name = slug(info["name"]) if args.device.type == "cuda" else "cpu-" + slug(info["name"])
    if args.dtype != torch.float32:
        name += "-" + str(args.dtype).removeprefix("torch.")
    if args.threads:
        name += f"-{args.threads}threads"
    if args.quick:
        name += "-quick"
    return HERE / "results" / f"kernels-{name}.json"


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def megabytes(nbytes) -> str:
    return fmt(None if nbytes is None else nbytes / 2**20, ".1f")


def table(rows: list[dict]) -> str:
    """One line per (op, M, d, E, method): median and fastest time, speed-up of the median over naive,
    roofline floor, the fraction of it reached and the binding term."""
    head = (f"{'op':<11}{'M=N':>8}{'d':>6}{'E':>4}  {'method':<14}{'ms':>11}{'min ms':>11}{'speedup':>9}"
            f"{'floor ms':>10}{'%floor':>8}  {'bound':<7}{'peak MB':>9}{'dense MB':>10}{'rel err':>10}  status")
    lines = [head, "-" * len(head)]
    prev = None
    for r in rows:
        key = (r["op"], r["M"], r["d"], r["E"])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        speedup = fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else "")
        frac = fmt(None if r.get("floor_fraction") is None else 100 * r["floor_fraction"], ".1f")
        lines.append(
            f"{r['op']:<11}{r['M']:>8}{r['d']:>6}{fmt(r['E'], 'd'):>4}  {r['method']:<14}"
            f"{fmt(r.get('ms'), '.3f'):>11}{fmt(r.get('ms_min'), '.3f'):>11}{speedup:>9}"
            f"{fmt(r.get('floor_ms'), '.3g'):>10}{frac:>8}  {r.get('bound', '-'):<7}"
            f"{megabytes(r.get('peak_bytes')):>9}{megabytes(r['dense_bytes']):>10}{fmt(r.get('rel_err'), '.1e'):>10}"
            f"  {r['status']}{('  ' + r['note']) if r['note'] else ''}"
        )
    return "\n".join(lines)


def find(rows, op, M, d, E=None, methods=None):
    return [r for r in rows if (r["op"], r["M"], r["d"], r["E"]) == (op, M, d, E) and "ms" in r
            and r["status"] == "ok" and (methods is None or r["method"] in methods)]


FUSED = ("cpu", "triton", "cuda")  # the steinops backends that are the product (reference is not)


def best(rows, op, M, d, E=None):
    """The fastest fused steinops row of (op, M, d, E), or None."""
    cands = find(rows, op, M, d, E, FUSED)
    return min(cands, key=lambda r: r["ms"]) if cands else None


def targets(rows: list[dict], device: torch.device, dtype) -> list[dict]:
    """The issues' performance targets that the rows allow to judge (fused = the fastest steinops backend)."""
    out = []
    if device.type == "cpu":
        f, naive = best(rows, "kmv", 8192, 3, 4), find(rows, "kmv", 8192, 3, 4, ("naive",))
        if f and naive:
            ratio = naive[0]["ms"] / f["ms"]
            mem = f.get("peak_bytes")
            mem_ratio = None if mem is None else mem / f["io_bytes"]
            out.append({"target": "CPU kmv M=N=8192 d=3 E=4: fused >= 2x faster than naive, extra memory "
                                  "O((M+N)(d+E))",
                        "method": f["method"], "fused_ms": f["ms"], "naive_ms": naive[0]["ms"], "speedup": ratio,
                        "peak_over_io": mem_ratio,
                        "pass": ratio >= 2 and (mem_ratio is None or mem_ratio <= 10)})
        return out
    if dtype == torch.float32:
        f = best(rows, "kmv", 100_000, 3, 4)
        if f:
            out.append({"target": "GPU kmv M=N=100000 d=3 float32 under 5 ms", "method": f["method"],
                        "fused_ms": f["ms"], "pass": f["ms"] < 5})
        f, mm = best(rows, "gram+stein", 4096, 3072), find(rows, "gram+stein", 4096, 3072, None, ("cublas_matmul",))
        if f and mm:
            ratio = f["ms"] / mm[0]["ms"]
            out.append({"target": "GPU K and S at M=4096 d=3072 within 2.5x of one float32 cuBLAS matmul "
                                  "(4096x3072)(3072x4096)",
                        "method": f["method"], "fused_ms": f["ms"], "matmul_ms": mm[0]["ms"],
                        "ratio": ratio, "pass": ratio <= 2.5})
        out += issue6_speed_targets(rows)
    out += issue6_floor_targets(rows, dtype)
    return out


def issue6_speed_targets(rows: list[dict]) -> list[dict]:
    """Issue 6, float32 on a GPU: kmv d=3 at N=M=10k >= 3x faster than KeOps and >= 10x faster than naive;
    at N=M=1M under 0.5 s."""
    out = []
    f = best(rows, "kmv", 10_000, 3, 4)
    for method, factor in (("keops", 3), ("naive", 10)):
        base = find(rows, "kmv", 10_000, 3, 4, (method,))
        if f and base:
            ratio = base[0]["ms"] / f["ms"]
            out.append({"target": f"GPU kmv N=M=10000 d=3 float32: fused >= {factor}x faster than {method}",
                        "method": f["method"], "fused_ms": f["ms"], f"{method}_ms": base[0]["ms"],
                        "speedup": ratio, "pass": ratio >= factor})
    f = best(rows, "kmv", 1_048_576, 3, 4)
    if f:
        out.append({"target": "GPU kmv N=M=1M (1048576) d=3 float32 under 500 ms", "method": f["method"],
                    "fused_ms": f["ms"], "pass": f["ms"] < 500})
    return out


def issue6_floor_targets(rows: list[dict], dtype) -> list[dict]:
    """Issue 6 on a GPU: kmv at d <= 64, N=M >= 100k reaches >= 50% of the exp floor (exps / exp rate);
    the Stein term at d=3072, M=4096 >= 70% of the tensor-core floor (matmul FLOPs / tensor-core rate)."""
    out = []
    name = str(dtype).removeprefix("torch.")
    groups = sorted({(r["op"], r["M"], r["d"], r["E"]) for r in rows if r["op"] == "kmv" and r["d"] <= 64
                     and r["M"] >= 100_000})
    for op, M, d, E in groups:
        f = best(rows, op, M, d, E)
        if f:
            frac = f["floor_terms_ms"]["exp"] / f["ms"]
            out.append({"target": f"GPU kmv N=M={M} d={d} {name}: >= 50% of the exp floor", "method": f["method"],
                        "fused_ms": f["ms"], "exp_floor_ms": f["floor_terms_ms"]["exp"], "fraction": frac,
                        "pass": frac >= 0.5})
    f = best(rows, "stein", 4096, 3072)
    if f:
        frac = f["floor_terms_ms"]["matmul"] / f["ms"]
        out.append({"target": f"GPU stein M=4096 d=3072 {name}: >= 70% of the tensor-core floor "
                              f"({f['matmul_precision']} matmul rate)",
                    "method": f["method"], "fused_ms": f["ms"], "matmul_floor_ms": f["floor_terms_ms"]["matmul"],
                    "fraction": frac, "pass": frac >= 0.7})
    return out


ROOFLINE_NOTE = ("benchmarks/roofline.py: floor_ms = max(matmul_flops / matmul rate, exps / exp rate, "
                 "elementwise_flops / float32 FMA rate, bytes / copy bandwidth), bound = the largest term, "
                 "floor_fraction = floor_ms / ms; work counts per row in 'work', terms in 'floor_terms_ms'")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


# ---- command line ---------------------------------------------------------------------------------

def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(float(t)) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.replace(",", " ").split() if t)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to benchmark (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of all inputs (default float32)")
    p.add_argument("--sizes", type=int_list, help="M = N values, e.g. 1024,4096,8192 (default: per device, "
                   f"cpu {DEFAULTS['cpu'].sizes}, sge and sge+bwd (1024, 2048, 4096); cuda "
                   f"{DEFAULTS['cuda'].sizes}, kmv and kmv+bwd {SIZES_1K_1M}, sge and sge+bwd (1024, 4096, 16384))")
    p.add_argument("--dims", type=int_list, help=f"d values (default: cpu {DEFAULTS['cpu'].dims}, "
                   f"cuda {DEFAULTS['cuda'].dims}, kmv and kmv+bwd (3, 64, 784, 3072), plus the cases "
                   f"{DEFAULTS['cuda'].extra}); --sizes or --dims replace the whole default grid")
    p.add_argument("--E", type=int_list, help="columns of v for kmv and kmv+bwd (default 4)")
    p.add_argument("--ops", type=name_list, default=OPS, help=f"ops to run, from {', '.join(OPS)} (default all)")
    p.add_argument("--backends", type=name_list, metavar="METHODS",
                   help="methods to run: steinops backends (cpu, cuda, triton, reference) and baselines "
                        f"({', '.join(BASELINES)}); default: every one available on the device "
                        "(Triton on CPU only with TRITON_INTERPRET=1)")
    p.add_argument("--repeats", type=int, help="timed calls per row, the median is reported (default: cpu 5, cuda 20)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing, at least 1 (default: cpu 1, cuda 3)")
    p.add_argument("--max-seconds", type=float, help="stop a row's timed calls early once they took this many "
                   "seconds (at least one call; default: cpu 15, cuda 20)")
    p.add_argument("--input-sets", type=int, default=3, help="input sets rotated between calls (default 3)")
    p.add_argument("--max-dense-gb", type=float, help="skip (OOM-skip) a method whose model says it would "
                   "materialise more GiB than this (default: cpu 4, cuda 40)")
    p.add_argument("--check-rows", type=int, default=256, help="rows checked against float64 naive (default 256)")
    p.add_argument("--compile-mode", default=None, help="mode of torch.compile, e.g. max-autotune (default: none)")
    p.add_argument("--no-value-checks", action="store_true",
                   help="call steinops.set_value_checks(False) (skips the finiteness checks and their sync)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny grid (M=N 256, 512; d=3) for a smoke test "
                   "(and smaller roofline measurements)")
    p.add_argument("--max-floor-ms", type=float, help="leave out a case whose roofline floor exceeds this many ms "
                   "(default: cpu 10000, cuda 1000, quick 1000)")
    p.add_argument("--peaks", type=Path, metavar="JSON", help="take the roofline peaks from this file (a JSON "
                   "written by this script or by roofline.py) instead of measuring them")
    p.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/kernels-<device-slug>"
                   "[-<dtype>][-<n>threads][-quick].json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    unknown_ops = set(args.ops) - set(OPS)
    if unknown_ops:
        p.error(f"unknown op(s) {sorted(unknown_ops)}; choose from {list(OPS)}")
    return args


def resolve_settings(args) -> Grid:
    """Fill the unset options from the device's defaults (or the quick grid)."""
    grid = QUICK if args.quick else DEFAULTS[args.device]
    args.default_grid = args.sizes is None and args.dims is None
    for field in ("sizes", "dims", "E", "repeats", "warmup", "max_dense_gb", "max_seconds", "max_floor_ms"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(grid, field))
    args.device = torch.device(args.device)
    args.dtype = DTYPES[args.dtype]
    return grid


def load_peaks(path: Path, dtype) -> dict:
    """Roofline peaks from a JSON of this script (``roofline.peaks``) or of ``roofline.py``."""
    data = json.loads(Path(path).read_text())
    peaks = data.get("roofline", {}).get("peaks", data)
    try:
        roofline.floor(roofline.Work(), peaks, dtype)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"--peaks {path}: no usable peaks for {dtype} ({type(e).__name__}: {e})") from None
    return peaks


def main(argv=None) -> int:
    args = parse_args(argv)
    grid = resolve_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_value_checks:
        steinops.set_value_checks(False)
    methods, notes = select_methods(args.backends, args.device, args.compile_mode)
    info, vers = device_info(args.device), versions()
    out_path = args.out or default_out(args, info)

    print(f"device {info['name']} ({args.device.type}), {info['cpu_count']} CPUs, torch threads "
          f"{info['torch_num_threads']}; torch {vers['torch']}, triton {vers['triton']}, steinops {vers['steinops']}")
    busy = busy_warning(info)
    if busy:
        print(busy)
    peaks_from = args.peaks
    args.peaks = load_peaks(peaks_from, args.dtype) if peaks_from else roofline.measure_peaks(
        args.device, args.dtype, quick=args.quick)
    print(roofline.describe(args.peaks) + (f" (from {peaks_from})" if peaks_from else ""))
    cases, left_out = cap_by_floor(build_cases(args, grid), args.peaks, args.dtype, args.max_floor_ms)
    print(f"dtype {str(args.dtype).removeprefix('torch.')}, {len(cases)} cases, methods "
          f"{', '.join(m.name for m in methods)}; repeats {args.repeats}, warmup {args.warmup}")
    for name, why in notes.items():
        print(f"  skipped {name}: {why}")
    if left_out:
        print(f"  left out {len(left_out)} case(s) with a roofline floor over --max-floor-ms {args.max_floor_ms:g}: "
              + ", ".join(f"{c['op']} M={c['M']} d={c['d']}" for c in left_out))

    clock = CudaClock(args.device) if args.device.type == "cuda" else CpuClock()
    bar = tqdm(total=len(cases), unit="case", file=sys.stderr) if tqdm else None
    rows = []
    for c in cases:
        progress = bar.set_description if bar else (lambda text: print(text, file=sys.stderr, flush=True))
        rows += run_case(c, methods, args, clock, progress)
        if bar:
            bar.update()
    if bar:
        bar.close()

    print()
    print(table(rows))
    goals = targets(rows, args.device, args.dtype)
    if goals:
        print("\nissue targets:")
        for g in goals:
            nums = ", ".join(f"{k} {v:.3g}" for k, v in g.items() if isinstance(v, float))
            print(f"  [{'PASS' if g['pass'] else 'FAIL'}] {g['target']}: {g['method']}, {nums}")

    settings = {k: (str(v).removeprefix("torch.") if isinstance(v, (torch.dtype, torch.device)) else v)
                for k, v in vars(args).items() if k not in ("out", "peaks")}
    settings["peaks_from"] = peaks_from
    settings.update(bandwidth="sqrt(d)", kernel="rbf", tolerance=TOLERANCE[args.dtype], sge_eta=SGE_ETA,
                    value_checks=not args.no_value_checks)
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = os.getloadavg()
    write_json(out_path, {"benchmark": "kernels", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "device": info, "versions": vers, "dtype": settings["dtype"], "settings": settings,
                          "skipped_methods": notes,
                          "roofline": {"peaks": args.peaks, "peaks_from": peaks_from, "model": ROOFLINE_NOTE,
                                       "left_out_cases": left_out},
                          "rows": rows, "targets": goals})
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
