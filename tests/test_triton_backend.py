"""The Triton launchers of ``steinops/ops/_triton`` against the float64 reference ops.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``,
which must be in the environment before triton is imported; it is set below when there is no CUDA
device). The sizes are small and awkward on purpose: every block is partial somewhere, one case has
d = 784 (several distance chunks and several output-feature programs) and one E = 70 (E split
over programs in the forward, looped in the gradient).
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch  # importing torch does not import triton

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import importlib
import pathlib
import sys
import types

import pytest
import torch

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_modules():
    """(reference, kernel_matvec, gram). Through the package when it imports; otherwise (the package
    __init__ may be mid-edit) the files are loaded under a private package name, bypassing it."""
    try:
        from steinops.ops import reference
        from steinops.ops._triton import gram, kernel_matvec

        return reference, kernel_matvec, gram
    except Exception:
        pass
    alias = "_steinops_triton_test_pkg"
    for name, path in ((alias, ROOT / "steinops"),
                       (f"{alias}.ops", ROOT / "steinops" / "ops"),
                       (f"{alias}.ops._triton", ROOT / "steinops" / "ops" / "_triton")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    return (importlib.import_module(f"{alias}.ops.reference"),
            importlib.import_module(f"{alias}.ops._triton.kernel_matvec"),
            importlib.import_module(f"{alias}.ops._triton.gram"))


ref, tkm, tgram = _load_modules()

INTERPRET = tkm.INTERPRET
HAS_CUDA = torch.cuda.is_available()

cpu_interpreter = pytest.mark.skipif(
    not INTERPRET,
    reason="CPU tensors need the Triton interpreter: TRITON_INTERPRET=1 before triton is imported",
)

KERNELS = [(0, "rbf"), (1, "imq")]
# IMQ cubed (id 2), the internal Stein profile of IMQ, and IMQ^5 (id 3), the trace term of the IMQ
# KSD, where the package defines them
for _kid, _kname in ((2, "imq3"), (3, "imq5")):
    try:
        ref.get_kernel(_kname)
        KERNELS.append((_kid, _kname))
    except Exception:
        pass
# (B, N, M, d, E)
CASES = [
    (1, 1, 1, 1, 1),
    (2, 7, 33, 3, 4),
    (1, 33, 7, 17, 5),
    (2, 70, 70, 64, 1),
    (1, 33, 70, 1, 5),
    (2, 7, 1, 17, 4),
    (1, 5, 7, 784, 5),
    (1, 7, 5, 3, 70),
]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _inputs(B, N, M, d, E, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x, y, v, g = rnd(B, N, d), rnd(B, M, d), rnd(B, M, E), rnd(B, N, E)
    # per-batch bandwidths on the scale of the distances, so kernel values are neither all ~0 nor ~1
    h = (0.5 + 1.5 * torch.rand(B, generator=gen, dtype=torch.float64)) * d ** 0.5
    return [t.to(dtype=dtype, device=device).contiguous() for t in (x, y, v, g, h)]


def _f64(*ts):
    """The inputs as the reference sees them: the exact values the kernel got, in float64 on CPU."""
    return [t.detach().to("cpu", torch.float64) for t in ts]


def _assert_close(got, want, dtype, what):
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    rtol = RTOL[dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.to("cpu", torch.float64), want, rtol=rtol, atol=rtol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def _check_all(B, N, M, d, E, dtype, device, kid, kname):
    x, y, v, g, h = _inputs(B, N, M, d, E, dtype, device)
    X, Y, V, G, H = _f64(x, y, v, g, h)
    tag = f"{kname} {dtype} B={B} N={N} M={M} d={d} E={E}"

    _assert_close(tkm.kmv_forward(x, y, v, h, kid), ref.kmv_forward(X, Y, V, H, kname), dtype, "kmv_forward " + tag)
    _assert_close(tkm.kmv_xgrad(x, y, v, g, h, kid), ref.kmv_xgrad(X, Y, V, G, H, kname), dtype, "kmv_xgrad " + tag)

    K, S = tgram.gram_forward(x, y, h, kid, True)
    rK, rS = ref.gram_forward(X, Y, H, kname, True)
    _assert_close(K, rK, dtype, "gram K " + tag)
    _assert_close(S, rS, dtype, "gram S " + tag)

    K, S = tgram.gram_forward(x, y, h, kid, False)
    _assert_close(K, rK, dtype, "gram K (no stein) " + tag)
    assert S.numel() == 0


@cpu_interpreter
@pytest.mark.usefixtures("poison_uninitialized_memory")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kid,kname", KERNELS, ids=[k for _, k in KERNELS])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}N{}M{}d{}E{}".format(*c))
def test_matches_reference_cpu(case, kid, kname, dtype):
    _check_all(*case, dtype, "cpu", kid, kname)


@cpu_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [(2, 7, 33, 3, 4), (1, 7, 5, 3, 70)], ids=lambda c: "B{}N{}M{}d{}E{}".format(*c))
def test_half_inputs_cpu(case, dtype):
    # float32 accumulation, output in the input dtype; bfloat16 goes through float32 under the
    # interpreter (its tl.dot cannot multiply bfloat16), so this mainly checks the dtype plumbing
    for kid, kname in KERNELS:
        _check_all(*case, dtype, "cpu", kid, kname)


@cpu_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gram_coincident_points(dtype):
    # x == y: the dot form gives r2 slightly off 0 on the diagonal; the clamp keeps K_nn <= 1, and the
    # Stein term's self-contribution (y_n - x_n) must vanish
    x, _, _, _, h = _inputs(2, 33, 33, 5, 1, dtype, "cpu", seed=1)
    for kid, kname in KERNELS:
        K, S = tgram.gram_forward(x, x, h, kid, True)
        rK, rS = ref.gram_forward(*_f64(x, x, h), kname, True)
        _assert_close(K, rK, dtype, f"gram K x==y {kname}")
        _assert_close(S, rS, dtype, f"gram S x==y {kname}")
        assert K.diagonal(dim1=1, dim2=2).le(1).all()


@cpu_interpreter
def test_empty_and_degenerate_sizes():
    dtype = torch.float64
    # no samples: sums are empty
    x, y, v, g, h = _inputs(2, 5, 0, 3, 4, dtype, "cpu")
    assert torch.equal(tkm.kmv_forward(x, y, v, h, 0), torch.zeros(2, 5, 4, dtype=dtype))
    assert torch.equal(tkm.kmv_xgrad(x, y, v, g, h, 1), torch.zeros(2, 5, 3, dtype=dtype))
    K, S = tgram.gram_forward(x, y, h, 0, True)
    assert K.shape == (2, 5, 0) and torch.equal(S, torch.zeros(2, 5, 3, dtype=dtype))
    # no queries
    x, y, v, g, h = _inputs(1, 0, 4, 3, 2, dtype, "cpu")
    assert tkm.kmv_forward(x, y, v, h, 0).shape == (1, 0, 2)
    assert tkm.kmv_xgrad(x, y, v, g, h, 0).shape == (1, 0, 3)
    # d = 0: every distance is 0
    x, y, v, g, h = _inputs(1, 3, 4, 0, 2, dtype, "cpu")
    h = torch.ones(1, dtype=dtype)
    assert torch.allclose(tkm.kmv_forward(x, y, v, h, 1), v.sum(1, keepdim=True).expand(1, 3, 2))
    K, _ = tgram.gram_forward(x, y, h, 0, False)
    assert torch.equal(K, torch.ones(1, 3, 4, dtype=dtype))
    with pytest.raises(ValueError):
        tkm.kmv_forward(x, y, v, h, 4)


# the interpreter takes ~30 s for d = 3072, E = 3073 even at N = M = 3; the logic is the same as for
# d = 784, E = 70 (more chunks), so the widest sizes are checked on a GPU only
GPU_CASES = CASES + [
    (2, 300, 1000, 3, 2),
    (1, 130, 70, 3072, 3073),  # the widest features the backend promises
    (3, 257, 129, 784, 785),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.skipif(INTERPRET, reason="checks the compiled kernels: run with TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("kid,kname", KERNELS, ids=[k for _, k in KERNELS])
def test_matches_reference_cuda(kid, kname, dtype):
    for case in GPU_CASES:
        _check_all(*case, dtype, "cuda", kid, kname)
