"""The benchmark scripts run end to end on a tiny grid and write well-formed JSON (so they never rot)."""
import json
import subprocess
import sys
from pathlib import Path

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


def test_kernel_benchmark_quick(tmp_path):
    data = _run(["benchmarks/kernels.py", "--device", "cpu", "--quick", "--backends", "cpu,reference,naive"], tmp_path)
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
