"""The C++ CPU backend (``torch.ops.steinops_C``, built into ``steinops._C``) against the float64
reference of ``steinops/ops/reference.py``.

The compiled ops are called directly on flattened ``(B, ., .)`` tensors, as the contract of
``csrc/README.md`` specifies. The module is skipped when the extension is not built
(``python setup.py build_ext --inplace``). It loads the reference and the extension without
importing ``steinops`` when that package cannot be imported.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_reference():
    try:
        return importlib.import_module("steinops.ops.reference")
    except Exception:  # the package may be mid-edit: load the two files it needs by path
        pass
    name = "_steinops_cpu_test_pkg"
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(ROOT / "steinops")]
    ops_pkg = types.ModuleType(name + ".ops")
    ops_pkg.__path__ = [str(ROOT / "steinops" / "ops")]
    sys.modules.setdefault(name, pkg)
    sys.modules.setdefault(name + ".ops", ops_pkg)
    for mod, path in (("kernels", ROOT / "steinops" / "kernels.py"), ("ops.reference", ROOT / "steinops" / "ops" / "reference.py")):
        spec = importlib.util.spec_from_file_location(f"{name}.{mod}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"{name}.{mod}"] = module
        spec.loader.exec_module(module)
    return sys.modules[name + ".ops.reference"]


def _load_extension():
    try:
        return importlib.import_module("steinops._C")
    except Exception:
        pass
    built = sorted(glob.glob(str(ROOT / "steinops" / "_C*.so")) + glob.glob(str(ROOT / "steinops" / "_C*.pyd")))
    if not built:
        return None
    spec = importlib.util.spec_from_file_location("steinops._C", built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers torch.ops.steinops_C
    return module


C = _load_extension()
if C is None or not hasattr(torch.ops, "steinops_C") or not hasattr(torch.ops.steinops_C, "kmv_forward"):
    pytest.skip("steinops._C is not built (python setup.py build_ext --inplace)", allow_module_level=True)

ref = _load_reference()
OPS = torch.ops.steinops_C
KERNELS = {0: "rbf", 1: "imq", 2: "imq3", 3: "imq5"}  # 2: IMQ cubed, the Stein profile of IMQ; 3: IMQ^5 (IMQ KSD)


def _reference_knows(name):
    try:
        ref.get_kernel(name)
    except Exception:
        return False
    return True


KIDS = [kid for kid, name in KERNELS.items() if _reference_knows(name)]
KID_IDS = [KERNELS[k] for k in KIDS]
ISAS = list(C.supported_cpu_isas()) if hasattr(C, "supported_cpu_isas") else []


@pytest.fixture
def isa(request):
    """Force one instruction set of the CPU tiles for the test, restore automatic selection after."""
    name = request.param
    if name not in ISAS:
        pytest.skip(f"{name} not supported here")
    C.set_cpu_isa(name)
    yield name
    C.set_cpu_isa("auto")


def _inputs(B, N, M, d, E, seed, shift=0.0, hscale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g, dtype=torch.float64) + shift
    y = torch.randn(B, M, d, generator=g, dtype=torch.float64) + shift
    v = torch.randn(B, M, E, generator=g, dtype=torch.float64)
    gg = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    h = (0.5 + torch.rand(B, generator=g, dtype=torch.float64)) * math.sqrt(d) * hscale  # per-batch bandwidths
    return x, y, v, gg, h


def _check(out, expected, dtype, what):
    assert out.dtype == dtype and out.shape == expected.shape, (what, out.dtype, out.shape, expected.shape)
    assert torch.isfinite(out).all(), what
    scale = expected.abs().max().item() if expected.numel() else 1.0
    if dtype == torch.float64:
        rtol, atol = 1e-10, 1e-12 * max(scale, 1e-300)
    else:
        rtol, atol = 1e-5, 4e-6 * max(scale, 1e-30)
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _run_all(B, N, M, d, E, kid, dtype, seed, gradients=True, **kw):
    x, y, v, g, h = _inputs(B, N, M, d, E, seed, **kw)
    # float32: compare with the float64 reference on the float32-rounded inputs
    x, y, v, g, h = (t.to(dtype) for t in (x, y, v, g, h))
    X, Y, V, G, H = (t.double() for t in (x, y, v, g, h))
    name = KERNELS[kid]
    tag = f"B={B} N={N} M={M} d={d} E={E} {name} {dtype}"
    _check(OPS.kmv_forward(x, y, v, h, kid), ref.kmv_forward(X, Y, V, H, name), dtype, "kmv_forward " + tag)
    K, S = OPS.gram_forward(x, y, h, kid, True)
    Kr, Sr = ref.gram_forward(X, Y, H, name, True)
    _check(K, Kr, dtype, "gram K " + tag)
    if gradients:  # rowsum(P) x - P y cancels for uncentred float32 data (the Python layer centres)
        _check(OPS.kmv_xgrad(x, y, v, g, h, kid), ref.kmv_xgrad(X, Y, V, G, H, name), dtype, "kmv_xgrad " + tag)
        _check(S, Sr, dtype, "gram S " + tag)
    K2, S2 = OPS.gram_forward(x, y, h, kid, False)
    assert torch.equal(K2, K) and S2.shape == (0,) and S2.dtype == dtype


# Sizes straddle the tiles (32 rows x 256 columns, 4-row / 64-column register blocks, feature chunks
# of 64, narrow (<= 16) vs wide right-hand sides).
SIZES = [
    (1, 1, 1, 1, 1),
    (3, 7, 33, 3, 4),
    (1, 33, 130, 2, 5),
    (3, 130, 7, 17, 1),
    (2, 33, 300, 64, 5),
    (1, 7, 130, 784, 4),
    (1, 40, 33, 64, 65),
    (2, 70, 290, 3, 20),
    (1, 5, 9, 130, 17),
]


@pytest.mark.usefixtures("poison_uninitialized_memory")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kid", KIDS, ids=KID_IDS)
@pytest.mark.parametrize("B,N,M,d,E", SIZES)
def test_matches_reference(B, N, M, d, E, kid, dtype):
    _run_all(B, N, M, d, E, kid, dtype, seed=hash((B, N, M, d, E)) % 10_000)


@pytest.mark.usefixtures("poison_uninitialized_memory")
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kid", KIDS, ids=KID_IDS)
def test_every_instruction_set(isa, kid, dtype):
    assert C.cpu_isa() == isa
    for B, N, M, d, E in [(2, 37, 270, 3, 4), (1, 9, 40, 33, 18), (1, 3, 5, 1, 1)]:
        _run_all(B, N, M, d, E, kid, dtype, seed=7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kid", KIDS, ids=KID_IDS)
def test_uncentred_and_extreme_bandwidths(kid, dtype):
    # distances by direct differences: no cancellation in r2 even far from the origin
    _run_all(2, 20, 40, 3, 2, kid, dtype, seed=1, shift=50.0, gradients=dtype == torch.float64)
    _run_all(2, 20, 40, 5, 2, kid, dtype, seed=2, hscale=0.02)  # nearly all kernel values underflow to 0
    _run_all(2, 20, 40, 5, 2, kid, dtype, seed=3, hscale=1e3)  # nearly constant kernel


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_underflow_is_exact_zero(dtype):
    x = torch.tensor([[[0.0], [1.0], [40.0], [1e3], [float("inf")]]], dtype=dtype)
    y = torch.zeros(1, 1, 1, dtype=dtype)
    K, S = OPS.gram_forward(x, y, torch.ones(1, dtype=dtype), 0, True)
    assert K[0, :, 0].tolist()[:2] == pytest.approx([1.0, math.exp(-0.5)], rel=1e-6)
    assert (K[0, 2:, 0] == 0).all()  # exp of very negative arguments: exactly 0, no NaN / denormal
    assert torch.isfinite(S[0, :4]).all()
    out = OPS.kmv_forward(x[:, :4], y, torch.ones(1, 1, 1, dtype=dtype), torch.ones(1, dtype=dtype), 0)
    assert torch.isfinite(out).all() and out[0, 2:, 0].eq(0).all()


def test_thread_count_does_not_change_results():
    x, y, v, g, h = (t.float() for t in _inputs(2, 100, 300, 5, 3, seed=11))
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = (OPS.kmv_forward(x, y, v, h, 0), OPS.kmv_xgrad(x, y, v, g, h, 1), *OPS.gram_forward(x, y, h, 0, True))
        torch.set_num_threads(max(2, prev))
        b = (OPS.kmv_forward(x, y, v, h, 0), OPS.kmv_xgrad(x, y, v, g, h, 1), *OPS.gram_forward(x, y, h, 0, True))
    finally:
        torch.set_num_threads(prev)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_empty_sizes(dtype):
    h = torch.ones(2, dtype=dtype)
    x = torch.randn(2, 0, 3, dtype=dtype)
    y = torch.randn(2, 5, 3, dtype=dtype)
    assert OPS.kmv_forward(x, y, torch.randn(2, 5, 4, dtype=dtype), h, 0).shape == (2, 0, 4)
    x = torch.randn(2, 6, 3, dtype=dtype)
    y0 = torch.randn(2, 0, 3, dtype=dtype)
    out = OPS.kmv_forward(x, y0, torch.randn(2, 0, 4, dtype=dtype), h, 1)
    assert out.shape == (2, 6, 4) and out.eq(0).all()
    dx = OPS.kmv_xgrad(x, y0, torch.randn(2, 0, 4, dtype=dtype), torch.randn(2, 6, 4, dtype=dtype), h, 0)
    assert dx.shape == (2, 6, 3) and dx.eq(0).all()
    K, S = OPS.gram_forward(x, y0, h, 0, True)
    assert K.shape == (2, 6, 0) and S.shape == (2, 6, 3) and S.eq(0).all()


def _good(dtype=torch.float32):
    return dict(
        x=torch.randn(2, 5, 3, dtype=dtype),
        y=torch.randn(2, 7, 3, dtype=dtype),
        v=torch.randn(2, 7, 4, dtype=dtype),
        g=torch.randn(2, 5, 4, dtype=dtype),
        h=torch.ones(2, dtype=dtype),
    )


def _call_all(t, kernel=0):
    """Calls every op that takes the tensors of ``t``."""
    OPS.kmv_forward(t["x"], t["y"], t["v"], t["h"], kernel)
    OPS.kmv_xgrad(t["x"], t["y"], t["v"], t["g"], t["h"], kernel)
    OPS.gram_forward(t["x"], t["y"], t["h"], kernel, True)


BAD = {
    "x not 3-D": lambda t: t.update(x=t["x"][0]),
    "y 4-D": lambda t: t.update(y=t["y"][None]),
    "mismatched d": lambda t: t.update(y=torch.randn(2, 7, 4)),
    "mismatched B": lambda t: t.update(y=torch.randn(3, 7, 3), v=torch.randn(3, 7, 4)),
    "non-contiguous x": lambda t: t.update(x=torch.randn(2, 3, 5).transpose(1, 2)),
    "non-contiguous y": lambda t: t.update(y=torch.randn(2, 3, 7).transpose(1, 2)),
    "int x": lambda t: t.update(x=torch.ones(2, 5, 3, dtype=torch.int32)),
    "int everything": lambda t: t.update({k: v.long() for k, v in t.items()}),
    "float16": lambda t: t.update({k: v.half() for k, v in t.items()}),
    "mixed dtypes": lambda t: t.update(y=t["y"].double()),
    "h wrong shape": lambda t: t.update(h=torch.ones(3)),
    "h 2-D": lambda t: t.update(h=torch.ones(2, 1)),
    "h wrong dtype": lambda t: t.update(h=torch.ones(2, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise(case):
    t = _good()
    BAD[case](t)
    with pytest.raises(RuntimeError):
        _call_all(t)


@pytest.mark.parametrize("kernel", [7, -1, 4])
def test_bad_kernel_id_raises(kernel):
    t = _good()
    with pytest.raises(RuntimeError, match="kernel"):
        OPS.kmv_forward(t["x"], t["y"], t["v"], t["h"], kernel)
    with pytest.raises(RuntimeError, match="kernel"):
        OPS.kmv_xgrad(t["x"], t["y"], t["v"], t["g"], t["h"], kernel)
    with pytest.raises(RuntimeError, match="kernel"):
        OPS.gram_forward(t["x"], t["y"], t["h"], kernel, False)


@pytest.mark.parametrize(
    "which,shape",
    [("v", (2, 6, 4)), ("v", (2, 7)), ("g", (2, 5, 3)), ("g", (2, 4, 4)), ("g", (1, 5, 4))],
)
def test_bad_v_g_shapes_raise(which, shape):
    t = _good()
    t[which] = torch.randn(*shape)
    with pytest.raises(RuntimeError):
        if which == "v":
            OPS.kmv_forward(t["x"], t["y"], t["v"], t["h"], 0)
        OPS.kmv_xgrad(t["x"], t["y"], t["v"], t["g"], t["h"], 0)


def test_module_queries():
    assert C.has_cuda() in (True, False)
    assert C.num_threads() >= 1
    assert C.cpu_isa() in ("default", "avx2", "avx512")
    assert "default" in C.supported_cpu_isas()
    with pytest.raises(RuntimeError):
        C.set_cpu_isa("sse9")
