"""The benchmark scripts run end to end on a tiny grid and write well-formed JSON (so they never rot)."""
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    out = tmp_path / "out.json"
    res = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(out.read_text())


def test_hyperparameter_benchmark_quick(tmp_path):
    data = _run(["benchmarks/hyperparameters.py", "--quick"], tmp_path)
    row = data["rows"][0]
    assert row["best"] > 0 and row["rules"]["default"] >= row["best"] * (1 - 1e-9)


@pytest.fixture(scope="module")
def kernel_quick(tmp_path_factory):
    """One quick CPU run of benchmarks/kernels.py (every op, fused and naive methods), shared by the tests."""
    out = tmp_path_factory.mktemp("kernels") / "out.json"
    res = subprocess.run([sys.executable, "benchmarks/kernels.py", "--device", "cpu", "--quick", "--threads", "1",
                          "--backends", "cpu,reference,naive", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(out.read_text()), res.stdout, out


def test_kernel_benchmark_quick(kernel_quick):
    data, _, _ = kernel_quick
    assert data["rows"] and data["device"]["type"] == "cpu"
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert ok and all(r["ms"] > 0 for r in ok)


def test_accuracy_benchmark_quick(tmp_path):
    data = _run(["benchmarks/accuracy.py", "--quick"], tmp_path)
    import steinops
    assert {r["estimator"] for r in data["rows"]} == set(steinops.ESTIMATORS) | {"kef:curl_free"}
    for row in data["rows"]:
        # the oracle searches auto's candidates (the default among them) with the exact score
        assert 0 < row["oracle_in"] <= min(row["default_in"], row["auto_in"]) * (1 + 1e-9)
        assert all(0 < row[k] < 10 for k in ("default_out", "auto_in", "auto_out", "oracle_out"))


def test_accuracy_extend_edge_widens_the_oracle_grid(tmp_path):
    data = _run(["benchmarks/accuracy.py", "--quick", "--estimators", "stein", "ssge"],
                tmp_path)
    assert data["bandwidth_mults"] == [0.25, 0.5, 1.0, 2.0, 4.0] and data["edge_mults"] == [0.125, 0.0625]
    # by default every estimator extends below the grid (and its oracle searches there too)
    assert [r["extend_edge"] for r in data["rows"]] == [True, True]
    for row in data["rows"]:  # the oracle still searches every candidate auto can reach
        assert 0 < row["oracle_in"] <= min(row["default_in"], row["auto_in"]) * (1 + 1e-9)
    off = _run(["benchmarks/accuracy.py", "--quick", "--estimators", "stein", "ssge", "--extend-edge", "off"], tmp_path)
    on = _run(["benchmarks/accuracy.py", "--quick", "--estimators", "ssge", "--extend-edge", "on"], tmp_path)
    assert [r["extend_edge"] for r in off["rows"]] == [False, False] and on["rows"][0]["extend_edge"] is True


def _widened_with_reference(widened, ref):
    """Pairs (widened row, the reference run's row of its estimator), checking that their errors agree to 1e-12."""
    for w in widened:
        r = next(r for r in ref if r["estimator"] == w["estimator"])
        for k in ("default_in", "auto_in", "auto_out", "oracle_in", "oracle_out", "oracle_out_best"):
            assert w[k] == pytest.approx(r[k], rel=1e-12), k
        yield w, r


def test_accuracy_widen_oracle_for_the_knob_extension(tmp_path):
    # rows measured without the knob extension whose auto knob is not the grid's least-regularised value: widening
    # only the oracle (every multiple x knob_edge_values) gives the rows of a run with the library's default; a row
    # at eta = 0.01 needs a full run; estimators without the knob extension are left alone
    names = ["stein", "kef", "landweber"]
    off = _run(["benchmarks/accuracy.py", "--quick", "--estimators", *names, "--extend-knob", "off"], tmp_path)
    assert [r["extend_knob"] for r in off["rows"]] == [False, False, False]
    at_edge = dict(off["rows"][0], auto_params={"bandwidth_mult": 1.0, "eta": 0.01}, replicate=7)
    src = tmp_path / "off.json"
    src.write_text(json.dumps(dict(off, rows=off["rows"] + [at_edge])))
    wide = _run(["benchmarks/accuracy.py", "--widen-oracle", str(src), "--samples", "48", "--sigmas", "0.5",
                 "--queries", "64"], tmp_path)
    ref = _run(["benchmarks/accuracy.py", "--quick", "--estimators", *names], tmp_path)["rows"]
    assert [r["extend_knob"] for r in ref] == [True, True, False]
    assert [r["estimator"] for r in wide["rows"]] == ["stein", "kef"]
    assert wide["needs_full_run"] == ["stein two_mode M=48 sigma=0.5 draw 7"]
    for w, r in _widened_with_reference(wide["rows"], ref):
        assert w["extend_knob"] and w["oracle_widened"]
        assert w["oracle_params"] == pytest.approx(r["oracle_params"])


def test_accuracy_widen_oracle_matches_a_run_with_the_extension(tmp_path):
    # rows measured without the extension whose auto choice lies inside the grid: widening only the oracle gives
    # the rows a run with the library's default gives (auto unchanged by construction, the oracle on the wider grid)
    names = ["stein", "landweber", "ssge"]
    off = _run(["benchmarks/accuracy.py", "--quick", "--estimators", *names, "--extend-edge", "off"], tmp_path)
    at_edge = dict(off["rows"][0], auto_params={"bandwidth_mult": 0.25, "eta": 0.1}, replicate=7)
    src = tmp_path / "off.json"
    src.write_text(json.dumps(dict(off, rows=off["rows"] + [at_edge])))
    wide = _run(["benchmarks/accuracy.py", "--widen-oracle", str(src), "--samples", "48", "--sigmas", "0.5",
                 "--queries", "64"], tmp_path)
    ref = _run(["benchmarks/accuracy.py", "--quick", "--estimators", *names], tmp_path)["rows"]
    assert [r["estimator"] for r in wide["rows"]] == names  # all three extend by default
    assert wide["needs_full_run"] == ["stein two_mode M=48 sigma=0.5 draw 7"]
    for w, r in _widened_with_reference(wide["rows"], ref):
        assert r["auto_params"]["bandwidth_mult"] > 0.25 and w["extend_edge"] and w["oracle_widened"]
        assert w["oracle_params"] == r["oracle_params"]
    bad = _run(["benchmarks/accuracy.py", "--quick", "--estimators", "stein", "--extend-edge", "off", "--seed", "5"],
               tmp_path)
    src.write_text(json.dumps(dict(bad, rows=[dict(bad["rows"][0], replicate=0)])))
    res = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--widen-oracle", str(src), "--samples", "48",
                          "--sigmas", "0.5", "--queries", "64", "--out", str(tmp_path / "x.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "another draw" in res.stderr  # a row from another draw is refused


def test_accuracy_replicates_are_independent_draws_and_summarised(tmp_path):
    data = _run(["benchmarks/accuracy.py", "--quick", "--estimators", "stein", "--replicates", "2",
                 "--first-replicate", "1"], tmp_path)
    rows = data["rows"]
    assert [r["replicate"] for r in rows] == [1, 2]
    assert rows[0]["oracle_in"] != rows[1]["oracle_in"]  # different draws
    first = _run(["benchmarks/accuracy.py", "--quick", "--estimators", "stein"], tmp_path)["rows"][0]
    assert first["replicate"] == 0 and first["oracle_in"] not in (rows[0]["oracle_in"], rows[1]["oracle_in"])


def test_accuracy_replicate_summary_pools_the_draws(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import accuracy

    def row(rep, auto, oracle, name="ssge"):
        return dict(estimator=name, distribution="gmm", M=128, sigma=0.1, replicate=rep, default_in=2 * oracle,
                    default_out=1.0, auto_in=auto, auto_out=1.0, oracle_in=oracle, oracle_out=1.0, oracle_out_best=1.0)

    # one draw over 1.3x, the mean over the draws within: (1.6 + 1.0 + 1.0) / (1.0 + 1.0 + 1.0) = 1.2
    rows = [row(0, 1.6, 1.0), row(1, 1.0, 1.0), row(2, 1.0, 1.0), row(0, 1.0, 1.0, "stein")]
    text = accuracy.replicate_summary(rows)
    assert "| ssge | 1 | 3 | 1.20x (1.20x) | 1 / 1 | 2 / 3 |" in text
    assert "stein" not in text  # one draw only: not in the table over draws
    single = accuracy.summary(rows)
    assert "auto over 1.3x the in-sample oracle in 1 of 2 cases" in single  # replicate 0 only
    rows.append(row(3, 3.0, 1.0))  # (1.6 + 1 + 1 + 3) / 4 = 1.65
    assert "in 1 of 1 cases: ssge gmm M=128 sigma=0.1: 1.65x" in accuracy.replicate_summary(rows)
    later = accuracy.summary([r for r in rows if r["replicate"] > 0])  # a continued run: no replicate 0
    assert "in-sample oracle" not in later and "| ssge | 1 | 3 | 1.67x (1.67x) | 0 / 1 | 2 / 3 |" in later


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spectral_oracle_equals_the_fits(dtype, monkeypatch):
    """The accuracy oracle's eigendecomposition path gives the estimators' own fits and predictions, for every
    candidate of the grid, and so the same oracle as fitting each candidate."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import accuracy
    import spectral_oracle
    import steinops
    from steinops.bandwidth import median_distance
    from steinops.distributions import get_distribution
    gen = torch.Generator().manual_seed(7)
    dist = get_distribution("eight_gaussians")
    x, q = dist.sample(45, 0.3, generator=gen), dist.sample(13, 0.3, generator=gen)
    sx, sq = dist.score(x, 0.3), dist.score(q, 0.3)
    x, q = x.to(dtype), q.to(dtype)
    med = float(median_distance(x))
    tol = 1e-10 if dtype == torch.float64 else 2e-3
    for name in spectral_oracle.SPECTRAL:
        proto = steinops.score_estimator(name)
        for mult in (0.5, 2.0):
            basis = spectral_oracle.SpectralBasis(x, q, mult)
            for val in proto.knob_grid(45)[::2]:
                est = steinops.score_estimator(name, bandwidth=mult * med, **{proto.knob: val})
                G, P = basis.scores(est)
                fit = est.fit(x)
                assert G.dtype == P.dtype == dtype
                torch.testing.assert_close(G, fit.scores_, rtol=tol, atol=tol * float(fit.scores_.abs().max()))
                pred = fit.predict(q)
                torch.testing.assert_close(P, pred, rtol=tol, atol=tol * float(pred.abs().max()))
        if dtype == torch.float64:
            by_fits = accuracy.run_case(name, x, q, sx, sq)
            by_eigh = accuracy.run_case(name, x, q, sx, sq, bases={})
            assert (by_fits["oracle_by"], by_eigh["oracle_by"]) == ("fits", "eigendecomposition")
            assert by_eigh["oracle_params"] == by_fits["oracle_params"]
            for key in ("oracle_in", "oracle_out", "oracle_out_best"):
                assert by_eigh[key] == pytest.approx(by_fits[key], rel=1e-9)
    with pytest.raises(ValueError, match="no spectral form"):
        spectral_oracle.SpectralBasis(x, q, 1.0).scores(steinops.score_estimator("stein"))


def test_window_targets_benchmark_quick(tmp_path):
    data = _run(["benchmarks/window_targets.py", "--data", "two_mode", "--queries", "16", "--replicates", "4",
                 "--group-size", "64"], tmp_path)
    rows = data["rows"]
    assert (tmp_path / "out.png").stat().st_size > 10_000  # the per-level picture beside the JSON
    assert [r["level"] for r in rows] == list(range(len(rows))) and all(r["finer"] < r["sigma"] for r in rows)
    for r in rows:
        assert 0 < r["regression"]["total"] and 0 < r["window"]["total"] and r["window"]["neff_median"] >= 1
    # the coarsest level: the window's smoothing is the noise itself, its n_eff is large and its bias tiny
    assert rows[0]["window"]["neff_median"] > 10 and rows[0]["window"]["total"] < rows[0]["regression"]["total"]


def test_level_attribution_on_a_smoke_run(tmp_path):
    from train.config import resolve
    from train.loop import train_and_evaluate
    run_dir = tmp_path / "run"
    train_and_evaluate(resolve(["--preset", "smoke", "--out", str(run_dir), "--samplers", "annealed"]))
    data = _run(["benchmarks/level_attribution.py", str(run_dir), "--n-samples", "64", "--every", "5"], tmp_path)
    (run,) = data["runs"]
    L = len(run["sigmas"])
    splits = {(r["split"], r["k"]) for r in run["rows"]}
    assert ("high", 0) in splits and ("high", L) in splits and ("low", 5) in splits
    by = {(r["split"], r["k"]): r for r in run["rows"]}
    assert by[("high", 0)]["network_levels"] == [] and by[("high", L)]["network_levels"] == list(range(L))
    assert by[("low", 5)]["network_levels"] == list(range(5, L))
    for r in run["rows"]:  # the smoke data is the two-mode mixture: weights per mode, summing to 1
        assert abs(sum(r["mode_weights"]) - 1) < 1e-6 and 0 <= r["mode_weight_error"] <= 1
    res = subprocess.run([sys.executable, "benchmarks/level_attribution.py", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "has no checkpoint.pt" in res.stderr


# ---- the roofline model and the kernel benchmark's use of it (benchmarks/roofline.py) -------------------

def _load(name):
    """A benchmarks/ script as a module (benchmarks/ is not a package)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def roofline():
    return _load("roofline")


@pytest.fixture(scope="module")
def kbench():
    return _load("kernels")


# made-up peaks with round numbers: 1 GB/s, float32 1 TFLOP/s, tf32 4 TFLOP/s, 1 G exp/s
PEAKS = {"bandwidth_bytes_per_s": 1e9, "matmul_flops_per_s": {"float32": 1e12, "tf32": 4e12},
         "exp_per_s": {"float32": 1e9}}


def test_roofline_counts_by_hand(roofline):
    w = roofline.op_work("kmv", M=5, d=2, E=4, itemsize=4, N=3)  # 15 pairs
    assert w.matmul_flops == 2 * 15 * 2 + 2 * 15 * 4  # x.y dot products + K @ v
    assert (w.elementwise_flops, w.exps, w.solve_flops) == (3 * 15, 15, 0)
    assert w.bytes == 4 * (3 * 2 + 5 * 2 + 5 * 4 + 3 * 4)  # x, y, v read, out written, float32
    assert roofline.op_work("kmv", M=5, d=2, E=4, itemsize=2, N=3).bytes == w.bytes / 2  # bfloat16

    # forward + backward: 4 products of 2 P d (distances twice, C y, C^T x), 3 of 2 P E (K v, g v^T, K^T g)
    w = roofline.op_work("kmv+bwd", M=10, d=3, E=2, itemsize=4)
    assert w.matmul_flops == 100 * (4 * 2 * 3 + 3 * 2 * 2) and w.exps == 200 and w.elementwise_flops == 1000
    assert w.bytes == 4 * ((30 + 30 + 20 + 20) + (30 + 30 + 20 + 20) + (30 + 30 + 20))  # fwd io, bwd reads, writes

    w = roofline.op_work("stein", M=4, d=3, itemsize=4)  # one product with [1 | x]: E = 4
    assert (w.matmul_flops, w.exps, w.bytes) == (16 * 2 * 3 + 16 * 2 * 4, 16, 4 * 2 * 12)
    assert roofline.op_work("stein+bwd", M=4, d=3, itemsize=4).bytes == 4 * 5 * 12  # x, S; x, g, dx
    g = roofline.op_work("gram+stein", M=4, d=3, itemsize=4)
    assert g.matmul_flops == w.matmul_flops and g.bytes == 4 * (2 * 12 + 16)  # and the 4 x 4 output

    w = roofline.op_work("sge", M=4, d=3, itemsize=4)  # Gram + Stein, Cholesky 4^3 / 3, two solves 2 * 16 * 3
    assert math.isclose(w.matmul_flops, 224 + 64 / 3 + 96) and math.isclose(w.solve_flops, 64 / 3 + 96)
    assert (w.exps, w.bytes) == (16, 4 * 2 * 12)
    b = roofline.op_work("sge+bwd", M=4, d=3, itemsize=4)
    assert math.isclose(b.matmul_flops, w.matmul_flops + 14 * 16 * 3) and b.exps == 32
    assert roofline.op_work("matmul", M=4, d=3, itemsize=4).matmul_flops == 2 * 16 * 3
    with pytest.raises(ValueError):
        roofline.op_work("nope", M=4, d=3)


def test_roofline_floor_is_the_max_term(roofline):
    f32 = torch.float32
    # d = 1: 2 * 2 N M FLOPs at 4e12 (tf32 is the faster float32 rate) vs N M exps at 1e9 -> exp binds
    w = roofline.op_work("kmv", M=1000, d=1, E=1, itemsize=4)
    fl = roofline.floor(w, PEAKS, f32)
    assert fl["bound"] == "exp" and math.isclose(fl["floor_ms"], 1e6 / 1e9 * 1e3)
    assert fl["matmul_precision"] == "tf32" and math.isclose(fl["terms_ms"]["matmul"], 4e6 / 4e12 * 1e3)
    assert fl["floor_ms"] == max(fl["terms_ms"].values())
    # d = 3000 with a 1 TB/s memory (at 1 GB/s the 24 MB of x and y would bind): matmul binds
    fl = roofline.floor(roofline.op_work("kmv", M=1000, d=3000, E=1, itemsize=4),
                        {**PEAKS, "bandwidth_bytes_per_s": 1e12}, f32)
    assert fl["bound"] == "matmul" and math.isclose(fl["floor_ms"], 2e6 * 3001 / 4e12 * 1e3)
    # one query against many samples: bytes 4 (1 + 2 M + 1) at 1 GB/s beat M exps at 1 G/s
    fl = roofline.floor(roofline.op_work("kmv", M=10**6, d=1, E=1, itemsize=4, N=1), PEAKS, f32)
    assert fl["bound"] == "memory" and math.isclose(fl["floor_ms"], 4 * (2 + 2e6) / 1e9 * 1e3)
    # elementwise runs at the float32 (FMA) rate
    fl = roofline.floor(roofline.Work(elementwise_flops=5e9), PEAKS, f32)
    assert fl["bound"] == "elementwise" and math.isclose(fl["floor_ms"], 5.0)
    # bfloat16 without a measured bfloat16 rate falls back to the fastest float32 one; solves run at IEEE float32
    fl = roofline.floor(roofline.Work(matmul_flops=3e12, solve_flops=1e12), PEAKS, torch.bfloat16)
    assert fl["matmul_precision"] == "tf32" and math.isclose(fl["floor_ms"], (2e12 / 4e12 + 1e12 / 1e12) * 1e3)


def test_roofline_measures_the_cpu(roofline):
    peaks = roofline.measure_peaks("cpu", torch.bfloat16, quick=True)
    assert peaks["bandwidth_bytes_per_s"] > 1e8 and peaks["exp_per_s"]["float32"] > 1e7
    assert set(peaks["matmul_flops_per_s"]) == {"float32", "bfloat16"}  # no TF32 on a CPU
    assert all(r > 1e8 for r in peaks["matmul_flops_per_s"].values())
    # no exp unit on a CPU: at least the polynomial model (FMA rate / CPU_EXP_FLOPS), or torch.exp if faster
    model = peaks["matmul_flops_per_s"]["float32"] / roofline.CPU_EXP_FLOPS
    assert math.isclose(peaks["exp_spec_per_s"]["float32"], model) and peaks["exp_per_s"]["float32"] >= model
    assert "torch.exp" in peaks["exp_source"]["float32"]
    json.dumps(peaks)  # goes into the benchmark's JSON


def test_kernel_benchmark_rows_carry_the_roofline(kernel_quick, roofline):
    data, stdout, _ = kernel_quick
    ops = {r["op"] for r in data["rows"]}
    assert {"sge", "kmv+bwd", "stein+bwd", "sge+bwd"} <= ops
    assert "floor ms" in stdout and "%floor" in stdout and "roofline peaks" in stdout
    peaks = data["roofline"]["peaks"]
    for r in data["rows"]:
        # every method, the fused C++ one included, matches the float64 reference on every op
        assert r["status"] == "ok" and r["rel_err"] <= r["tolerance"], r
        assert r["tolerance"] == data["settings"]["tolerance"]  # = float32's 1e-3 at M <= 512, sge included
        assert r["floor_ms"] > 0 and r["floor_fraction"] > 0 and r["bound"] in r["floor_terms_ms"]
        assert math.isclose(r["floor_fraction"], r["floor_ms"] / r["ms"])
        fl = roofline.floor(roofline.op_work(r["op"], r["M"], r["d"], r["E"], 4), peaks, torch.float32)
        assert math.isclose(r["floor_ms"], fl["floor_ms"]) and r["bound"] == fl["bound"]
        assert r["io_bytes"] == r["work"]["bytes"]
    methods = {(r["op"], r["method"]) for r in data["rows"]}
    assert {("sge", "cpu"), ("sge+bwd", "naive"), ("kmv+bwd", "cpu"), ("stein+bwd", "reference")} <= methods


def test_kernel_benchmark_bfloat16_with_reused_peaks(kernel_quick, tmp_path):
    """bfloat16 inputs through the C++ backend (computed in float32) and naive, forward and backward, against
    float64; the float32 run's peaks serve (bfloat16 matmuls may run at the float32 rate)."""
    _, _, first = kernel_quick
    data = _run(["benchmarks/kernels.py", "--device", "cpu", "--dtype", "bfloat16", "--ops", "kmv+bwd,sge",
                 "--sizes", "64", "--dims", "2", "--backends", "cpu,naive", "--repeats", "1", "--peaks", str(first)],
                tmp_path)
    assert data["roofline"]["peaks"] == json.loads(first.read_text())["roofline"]["peaks"]
    assert {(r["op"], r["method"]) for r in data["rows"]} == {(op, m) for op in ("kmv+bwd", "sge")
                                                              for m in ("cpu", "naive")}
    for r in data["rows"]:
        assert r["status"] == "ok" and 0 < r["rel_err"] <= r["tolerance"] == 5e-2, r
        assert r["floor_fraction"] > 0 and r["matmul_precision"] == "float32"
    # a floor cap of 0 ms leaves every case out
    data = _run(["benchmarks/kernels.py", "--device", "cpu", "--ops", "kmv", "--sizes", "64", "--dims", "2",
                 "--backends", "naive", "--peaks", str(first), "--max-floor-ms", "0"], tmp_path)
    assert data["rows"] == [] and data["roofline"]["left_out_cases"][0]["op"] == "kmv"


@pytest.mark.parametrize("op", ["kmv+bwd", "stein+bwd"])
def test_backward_check_rows_match_full_autograd(kbench, op):
    """The benchmark checks the first R rows of the gradients from R-row sub-problems; they must equal the rows
    of the full float64 autograd gradient."""
    c = kbench.Case(op, 40, 3, 2 if op == "kmv+bwd" else None)
    (inputs,) = kbench.make_inputs(c, 1, torch.float64, torch.device("cpu"), seed=3)
    full = kbench.with_backward(lambda *a: kbench.NAIVE[c.forward_op](*a, h=c.h))(*inputs)
    ref = kbench.check_outputs(c, inputs, rows=7)
    assert len(ref) == len(full)
    for r, f in zip(ref, full):
        assert r.shape[0] == 7 and torch.allclose(r, f[:7].double(), rtol=1e-9, atol=1e-12)


def test_default_cuda_grid_is_the_issues(kbench):
    """kmv at d = 3, 64, 784, 3072 and N = M from 1k to 1M, every op forward and backward, the floor cap
    leaving out what an H100-like device cannot do in a second."""
    import argparse
    args = argparse.Namespace(quick=False, device="cuda", dtype="float32", sizes=None, dims=None, E=None,
                              repeats=None, warmup=None, max_dense_gb=None, max_seconds=None, max_floor_ms=None,
                              ops=kbench.OPS)
    grid = kbench.resolve_settings(args)
    cases = kbench.build_cases(args, grid)
    kmv = {(c.M, c.d) for c in cases if c.op == "kmv"}
    assert {(M, 3) for M in (1024, 10_000, 100_000, 1_048_576)} <= kmv and {3, 64, 784, 3072} <= {d for _, d in kmv}
    assert {c.op for c in cases} == set(kbench.OPS)
    assert kbench.Case("stein", 4096, 3072, None) in cases and kbench.Case("gram+stein", 4096, 3072, None) in cases
    h100 = {"bandwidth_bytes_per_s": 3e12, "matmul_flops_per_s": {"float32": 5e13, "tf32": 4e14},
            "exp_per_s": {"float32": 4e12}}
    kept, left_out = kbench.cap_by_floor(cases, h100, torch.float32, args.max_floor_ms)
    assert kbench.Case("kmv", 1_048_576, 3, 4) in kept and kbench.Case("stein", 4096, 3072, None) in kept
    assert {"op": "kmv", "M": 1_048_576, "d": 3072, "E": 4} in [{k: c[k] for k in ("op", "M", "d", "E")}
                                                                 for c in left_out]


def test_default_cpu_grid_is_the_documented_one(kbench):
    import argparse
    args = argparse.Namespace(quick=False, device="cpu", dtype="float32", sizes=None, dims=None, E=None,
                              repeats=None, warmup=None, max_dense_gb=None, max_seconds=None, max_floor_ms=None,
                              ops=kbench.OPS)
    cases = kbench.build_cases(args, kbench.resolve_settings(args))
    for op in ("kmv", "stein", "gram+stein", "kmv+bwd", "stein+bwd"):
        assert {(c.M, c.d) for c in cases if c.op == op} == {(M, d) for M in (1024, 4096, 8192) for d in (3, 64)}
    for op in ("sge", "sge+bwd"):  # the O(M^3) dense solve stops at 4096
        assert {(c.M, c.d) for c in cases if c.op == op} == {(M, d) for M in (1024, 2048, 4096) for d in (3, 64)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_benchmark_gpu_smoke(tmp_path):
    data = _run(["benchmarks/kernels.py", "--device", "cuda", "--quick", "--ops", "kmv,stein,gram+stein,sge,kmv+bwd",
                 "--backends", "cuda,triton,naive,keops,cublas_matmul", "--repeats", "2"], tmp_path)
    peaks = data["roofline"]["peaks"]
    assert {"float32", "tf32"} <= set(peaks["matmul_flops_per_s"]) and peaks["exp_source"]["float32"]
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["op"] for r in ok} == {"kmv", "stein", "gram+stein", "sge", "kmv+bwd"}
    assert all(r["floor_fraction"] > 0 for r in ok)
    assert not [r for r in data["rows"] if r["status"] == "MISMATCH"]


def test_large_m_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/large_m.py on a tiny grid: every solver configuration converges, pivoted Cholesky in fewer
    iterations than plain CG, and the JSON records the residual history."""
    data = _run(["benchmarks/large_m.py", "--device", "cpu", "--cases", "300:3", "200:20",
                 "--configs", "none", "pivchol:20", "nystrom:30", "--max-iter", "300"], tmp_path)
    assert data["device"]["type"] == "cpu" and [c["d"] for c in data["cases"]] == [3, 20]
    for case in data["cases"]:
        assert [r["preconditioner"] for r in case["rows"]] == ["none", "pivchol", "nystrom"]
        for r in case["rows"]:
            assert r["converged"] and r["iterations"] == len(r["residual_history"]) - 1
            assert r["true_residual_float64"] < 1e-3
            assert r["peak_bytes"] is None or r["peak_bytes"] > 0
        plain, piv = case["rows"][0], case["rows"][1]
        assert piv["iterations"] <= plain["iterations"] and piv["setup_s"] > 0


@pytest.mark.parametrize("name,M,draws,criterion", [("stein", 60, 3, "sure"), ("landweber", 40, 1, "sure"),
                                                    ("ssge", 24, 2, "sure"), ("nu", 24, 2, "loo")])  # Landweber's 31 fits: ~1000 steps each
def test_selection_rules_autos_rule_is_autos_choice(name, M, draws, criterion, monkeypatch):
    """selection_rules.py's rule marked "(auto)", on the criterion terms it computes, picks the candidate that
    ``bandwidth="auto"`` picks (the SGE's closed form; Landweber's and the SSGE's exact SURE at small M; nu's
    leave-one-out by refits at small M): the study evaluates auto itself, not a re-implementation that could drift."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import selection_rules
    import steinops
    from steinops.distributions import get_distribution
    from steinops.estimators import autotune
    from steinops.estimators.autotune import tune
    dist = get_distribution("eight_gaussians")
    (label, (rule, k)), = [(lab, r) for lab, r in selection_rules.rules_for(criterion).items() if lab.endswith("(auto)")]
    se_rule = autotune.LOO_SE_RULE if criterion == "loo" else autotune.SURE_SE_RULE
    assert label == ("argmin (auto)" if se_rule == 0 else f"anchor {se_rule:g} (auto)") and k == se_rule
    for seed in range(draws):
        x = dist.sample(M, 0.3, generator=torch.Generator().manual_seed(seed)).double()
        T, err, s2 = selection_rules.score_draw(name, x, dist.score(x, 0.3), criterion)
        assert T.shape == (len(err), M) and torch.isfinite(T).all() and s2 > 0
        cands = autotune.fresh_grid(steinops.score_estimator(name, bandwidth="auto"), M)
        mult, knob = cands[rule(T, cands, k)]
        est = steinops.score_estimator(name, bandwidth="auto")
        chosen = tune(est, x)
        assert float(chosen["bandwidth_mult"]) == pytest.approx(mult) and float(chosen[est.knob]) == pytest.approx(knob)


def test_selection_rules_nearest_tie(monkeypatch):
    """"anchor k, nearest tie": where the argmin beats the anchor, a candidate within 1 paired SE of it that lies
    nearer the anchor on the grid is chosen instead; a candidate outside that band is not; the anchor stays
    where nothing beats it."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import selection_rules
    cands = [(2.0, 0.3), (0.25, 3.0), (1.0, 0.3), (4.0, 0.01)]
    noise = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = torch.stack([noise + 1.0, noise - 1.0, noise - 0.99, noise + 0.5])  # 1 the argmin, 2 tied with it
    wiggle = torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    base[2] += 0.5 * (wiggle - wiggle.mean())  # mean 0.01 behind the argmin, paired SE ~0.035
    assert selection_rules.rule_anchor(base, cands, 1.0) == 1
    assert selection_rules.rule_anchor_nearest(base, cands, 1.0) == 2
    far = base.clone()
    far[2] += 0.5  # now many SEs behind the argmin: no tie
    assert selection_rules.rule_anchor_nearest(far, cands, 1.0) == 1
    flat = torch.stack([noise, noise + 1e-3, noise + 1.0, noise + 0.5])
    assert selection_rules.rule_anchor_nearest(flat, cands, 1.0) == 0


def test_selection_rules_fixed_oracle(monkeypatch):
    """The best fixed candidate of a case is the one with the least mean error over the draws (not the one that
    wins most draws), and the rules are scored against it as well as against the per-draw oracles."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import selection_rules
    cands = [(2.0, 0.3), (0.25, 3.0), (1.0, 0.3)]
    errs = [[0.5, 0.10, 0.30], [0.5, 0.12, 0.30], [0.5, 2.00, 0.35]]  # 1 wins two draws; 2 has the least mean
    T = torch.stack([torch.zeros(5), -torch.ones(5), torch.ones(5)]).double()  # every rule picks 1 (a clear argmin)
    draws = [dict(T=T + 1e-3 * torch.arange(5.0).double(), err=torch.tensor(e, dtype=torch.float64), s2=1.0, cands=cands)
             for e in errs]
    fixed = selection_rules.fixed_oracle(draws)
    assert fixed["index"] == 2 and fixed["cand"] == [1.0, 0.3]
    assert fixed["ratio"] == pytest.approx(0.95 / (0.10 + 0.12 + 0.35))
    assert fixed["draws_over"] == 2 and fixed["worst_draw"] == pytest.approx(3.0)
    res = selection_rules.evaluate_rules({("toy", 8, 0.1): draws})["anchor 1 (auto)"]
    assert res["geo"] == pytest.approx(2.22 / 0.57) and res["geo_fixed"] == pytest.approx(2.22 / 0.95)
    assert res["over_fixed"] == 1 and res["misses_fixed"] == ["toy M=8 sigma=0.1: 2.34x"]


def test_selection_rules_calibration(monkeypatch):
    """The calibration's spread is the sd over draws of the criterion difference over its mean per-point SE, and the
    fixed oracle's correlation is -1 where the in-sample error difference moves exactly against the criterion."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import selection_rules
    wiggle = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # the same per-point spread on every draw
    draws = []
    for m in (0.1, -0.2, 0.3, 0.05):
        T = torch.stack([torch.zeros(4, dtype=torch.float64), m + wiggle])
        err = torch.tensor([1.0, 1.0 - 2 * m], dtype=torch.float64)  # true difference 1/2 (err_1 - err_0) s2 = -m
        draws.append(dict(T=T, err=err, s2=1.0, cands=[(2.0, 0.3), (1.0, 0.1)]))
    c = selection_rules.calibration(draws)
    se = float(wiggle.std() / math.sqrt(3))
    assert c["spread_median"] == pytest.approx(statistics.stdev([0.1, -0.2, 0.3, 0.05]) / se)
    assert c["median"] == pytest.approx(2 * statistics.stdev([0.1, -0.2, 0.3, 0.05]) / se)  # criterion - true = 2m
    fixed = selection_rules.fixed_oracle([dict(dr, err=torch.tensor([1.0 + 2 * m, 0.5], dtype=torch.float64))
                                          for dr, m in zip(draws, (0.1, -0.2, 0.3, 0.05))])
    assert fixed["index"] == 1 and fixed["corr_median"] == pytest.approx(-1.0)  # candidate 0 against the best fixed, 1


def test_grid_edge_extension(monkeypatch):
    """The edge extension halves the bandwidth only while auto's choice sits at the smallest multiple searched and the
    best candidate one step below wins by more than the SE rule; a choice inside the grid is never extended."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import grid_edge
    cands = [(2.0, 0.3), (0.25, 0.1), (0.5, 0.1), (0.125, 0.1), (0.125, 1.0), (0.0625, 0.1)]
    base = [0, 1, 2]
    noise = torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    T = torch.stack([noise, noise - 1.0, noise - 0.5, noise - 2.0, noise - 1.5, noise - 1.9])
    assert grid_edge.edge_extension(T, cands, base, 1.0) == 3  # 0.25 -> 0.125 (best of its knobs); 0.0625 loses
    T[5] = noise - 3.0
    assert grid_edge.edge_extension(T, cands, base, 1.0) == 5  # and on to 0.0625
    w = torch.randn(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    T[3] = T[4] = noise - 1.0 + 1e-3 * (w - w.mean())  # the same mean as the choice at 0.25
    assert grid_edge.edge_extension(T, cands, base, 1.0) == 1  # a tie within the SE: stay on auto's grid
    inner = torch.stack([noise, noise - 0.5, noise - 1.0, noise - 5.0, noise, noise])
    assert grid_edge.edge_extension(inner, cands, base, 1.0) == 2  # auto chose 0.5: no extension
    row = grid_edge.evaluate([dict(T=T, err=torch.tensor([1.0, 0.5, 0.8, 0.4, 0.45, 0.3], dtype=torch.float64))],
                             cands, base, 1.0)
    assert row["oracle"] == 0.5 and row["oracle_wide"] == 0.3 and row["auto"] == 0.5 and row["edge"] == 0.5


def test_grid_edge_knob_extension(monkeypatch):
    """The knob extension moves past the grid's weak end only while the choice sits there and the next value wins by
    more than the SE rule, at the choice's own bandwidth; the wider grids' oracles and the rules are scored apart."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import grid_edge
    cands = [(2.0, 0.3), (0.25, 0.01), (0.25, 0.1), (0.25, 0.003), (0.25, 0.001), (0.5, 0.01), (0.5, 0.003)]
    noise = torch.randn(300, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    T = torch.stack([noise, noise - 1.0, noise - 0.5, noise - 2.0, noise - 1.9, noise - 0.2, noise - 9.0])
    grid, extra = (0.01, 0.1), (0.003, 0.001)
    assert grid_edge.knob_extension(T, cands, 1, grid, extra, 1.0) == 3  # 0.01 -> 0.003; 0.001 does not win
    T[4] = noise - 3.0
    assert grid_edge.knob_extension(T, cands, 1, grid, extra, 1.0) == 4  # and on to 0.001
    assert grid_edge.knob_extension(T, cands, 2, grid, extra, 1.0) == 2  # eta = 0.1 is not the weak end
    err = torch.tensor([1.0, 0.5, 0.6, 0.4, 0.45, 0.9, 0.1], dtype=torch.float64)
    base = [0, 1, 2, 5]
    row = grid_edge.evaluate([dict(T=T, err=err)], cands, base, 1.0, grid, extra)
    # auto picks (0.25, 0.01) on its grid (the (0.5, 0.003) candidate is off the knob grid: only the widest oracle)
    assert row["auto"] == 0.5 and row["oracle"] == 0.5 and row["oracle_wide"] == 0.5 and row["oracle_knobs"] == 0.1
    assert row["edge_knob"] == 0.45 and row["knob_moves"] == 1


def test_grid_edge_quick(tmp_path):
    data = _run(["benchmarks/grid_edge.py", "--quick"], tmp_path)
    (row,) = data["rows"]
    assert row["oracle_wide"] <= row["oracle"] * (1 + 1e-12) and row["draws"] == 2
    assert row["edge"] >= row["oracle_wide"] * (1 - 1e-12) and row["auto_wide"] >= row["oracle_wide"] * (1 - 1e-12)


def test_selection_rules_quick(tmp_path):
    data = _run(["benchmarks/selection_rules.py", "--quick"], tmp_path)
    rules = data["rules"]
    assert set(rules) == set(["anchor 1 (auto)", "anchor 2", "argmin", "anchor 1, nearest tie", "argmin, nearest tie",
                              "smoothest within 1 SE", "smoothest within 0.5 SE", "penalised 1", "penalised 2"])
    for r in rules.values():
        assert r["geo"] >= 1.0 - 1e-12 and r["draws"] == 3  # no rule beats the per-draw oracle
    (case,) = data["calibration"].values()
    assert case["largest"] >= case["median"] > 0 and case["spread_largest"] >= case["spread_median"] > 0
    (fixed,) = data["fixed_oracle"].values()
    assert fixed["ratio"] >= 1.0 - 1e-12 and 0 <= fixed["draws_over"] <= 3 and -1 <= fixed["corr_median"] <= 1


def test_aggregation_weights(monkeypatch):
    """The aggregation QP: an interior minimiser of 1/2 w^T A w + b^T w is found as it is; the simplex and the
    non-negative orthant clip it where they must."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import numpy as np
    import aggregation
    A = np.diag([1.0, 2.0, 4.0])
    np.testing.assert_allclose(aggregation.sure_weights(A, -A @ np.array([0.2, 0.3, 0.5]), True), [0.2, 0.3, 0.5],
                               atol=1e-6)
    np.testing.assert_allclose(aggregation.sure_weights(A, np.array([1.0, -4.0, -4.0]), False), [0.0, 2.0, 1.0],
                               atol=1e-6)
    # the unconstrained minimiser (0, 2, 1) is off the simplex: there the minimiser is (0, 2/3, 1/3) by KKT
    np.testing.assert_allclose(aggregation.sure_weights(A, np.array([1.0, -4.0, -4.0]), True), [0.0, 2 / 3, 1 / 3],
                               atol=1e-6)


def test_aggregation_rules_are_tunes_choices(monkeypatch):
    """aggregation.py's candidates and closed-form terms are the library's: its argmin and plain-anchor rules pick
    the errors of the candidates ``autotune.tune`` picks without its extensions, with se_rule 0 and by default."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import aggregation
    import steinops
    from steinops.distributions import get_distribution
    from steinops.bandwidth import median_distance
    from steinops.estimators.autotune import tune
    dist = get_distribution("moons")
    for seed in range(3):
        x = dist.sample(57, 0.3, generator=torch.Generator().manual_seed(seed)).double()
        sx = dist.score(x, 0.3)
        row = aggregation.aggregate_errors(x, sx, float(median_distance(x)))
        est = steinops.score_estimator("stein", bandwidth="auto")
        for rule, se_rule in (("argmin", 0), ("plain anchor", None)):
            chosen = tune(est, x, se_rule=se_rule, extend_edge=False, extend_knob=False)
            fit = steinops.score_estimator("stein", bandwidth=float(chosen["bandwidth"]), eta=float(chosen["eta"]))
            G = fit.fit(x).scores_
            assert row[rule] == pytest.approx(float(((G - sx) ** 2).sum() / (sx ** 2).sum()), rel=1e-9)
        assert 1 <= row["simplex weights"] <= 31 and row["top 5 weights"] <= 5


def test_aggregation_quick(tmp_path):
    data = _run(["benchmarks/aggregation.py", "--quick"], tmp_path)
    assert len(data["rows"]) == 4 and set(data["summary"]) == set(data["rules"]) | {"auto scaled out of sample"}
    for r in data["rows"]:
        assert all(math.isfinite(r[t]) and r[t] > 0 for t in data["rules"])
        assert r["argmin"] >= r["oracle_in"] * (1 - 1e-12) and r["auto"] >= r["oracle_in"] * (1 - 1e-12)
        assert r["oracle scaled"] <= r["oracle_in"] * (1 + 1e-12) and r["auto scale"] > 0  # scale 1 is on its grid
        assert math.isfinite(r["auto_scaled_out"]) and r["auto_out"] > 0
