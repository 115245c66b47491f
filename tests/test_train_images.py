"""The train driver on images (digits, MNIST from IDX files, the U-Net) and with several processes
(torchrun, gloo): every method runs, resume is bit-exact, and 2 processes train like 1 with the same
global batch."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steinops.data import write_idx
from steinops.sgm.distributed import gather_groups, local_rows
from steinops.sgm.objectives import perturb
from train import checkpoint
from train.__main__ import main
from train.config import METHODS, resolve
from train.loop import CHECKPOINT, Run

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("classifier-cache"))  # the FD classifier is trained once for the module


def smoke(out, cache, *extra):
    return ["--preset", "smoke_image", "--out", str(out), "--cache-dir", cache, *extra]


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_samples_and_scores_digits(tmp_path, cache, method):
    out = tmp_path / method
    assert main(smoke(out, cache, "--method", method)) == 0
    train_rows = [r for r in rows(out) if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in train_rows)
    evals = [r for r in rows(out) if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(np.isfinite(v) and v > 0 for v in evals[-1]["dsm_heldout"])
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["samplers"]) == {"annealed", "pc", "ode", "training_free"}
    for m in summary["samplers"].values():
        assert m["fd"] > 0 and np.isfinite(m["kid_mean"]) and m["nn_ratio"] > 0
    assert summary["classifier_accuracy"] > 0.9 and summary["fd_real"] > 0
    assert np.isfinite(summary["bpd"]["mean"]) and summary["bpd"]["n_images"] == 4
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    assert {"real.png", "samples_annealed.png", "loss.png", "heldout.png", "heldout_per_level.png"} <= pngs


def test_image_resume_is_bit_exact(tmp_path, cache):
    base = ["--method", "stein", "--log-every", "1", "--eval-every", "2", "--ckpt-every", "2", "--n-bpd", "0"]
    a = Run(resolve(smoke(tmp_path / "a", cache, *base, "--steps", "5")))
    a.train()
    b = Run(resolve(smoke(tmp_path / "b", cache, *base, "--steps", "3")))
    b.train()
    b = Run(resolve(smoke(tmp_path / "b", cache, *base, "--steps", "5", "--resume")))
    b.train()
    for (ka, va), (kb, vb) in zip(a.ema.state_dict().items(), b.ema.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    drop = lambda r: {k: v for k, v in r.items() if k != "sec_per_step"}
    assert [drop(r) for r in rows(tmp_path / "a")] == [drop(r) for r in rows(tmp_path / "b")]


def test_mnist_from_idx_files_at_28_and_32(tmp_path, cache):
    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), compress=True)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(60, dtype=np.uint8) % 10, compress=True)
    for pad in (0, 32):
        run = Run(resolve(smoke(tmp_path / f"m{pad}", cache, "--data", "mnist", "--data-dir", str(root), "--pad-to",
                                str(pad), "--pixel-scale", "pm1", "--steps", "2")))
        size = pad or 28
        assert tuple(run.data.shape[1:]) == (1, size, size) and run.data.shape[0] == 48
        assert float(run.data.min()) >= -1 and float(run.data.max()) <= 1
        assert np.isfinite(run.train_step()["loss"])


def test_missing_mnist_folder_is_a_clear_error(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="MNIST root directory not found"):
        Run(resolve(smoke(tmp_path / "x", cache, "--data", "mnist", "--data-dir", str(tmp_path / "nowhere"))))


# ---- several processes ------------------------------------------------------------------------
def test_shard_and_gather_are_the_identity_in_one_process():
    x = torch.randn(24, 3, dtype=torch.float64)
    b = perturb(x, torch.tensor([2.0, 1.0, 0.5]), 3, generator=torch.Generator().manual_seed(0))
    halves = [b.shard(r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h.noisy for h in halves], 1), b.noisy)
    assert all(torch.equal(h.sigma, b.sigma) for h in halves)
    with pytest.raises(ValueError, match="divisible|evenly"):
        b.shard(0, 3)
    assert gather_groups(b.noisy) is b.noisy and local_rows(b.noisy, 4) is b.noisy


def _torchrun(args, out, env_threads="1"):
    env = dict(os.environ, OMP_NUM_THREADS=env_threads, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
           *args, "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("method", ["dsm", "stein", "ksd", "sm"])
def test_two_processes_with_gloo_equal_one_process(tmp_path, method):
    """2 ranks x half the batch (DDP, gloo) = 1 process x the whole batch: the same losses and weights.
    stein / ksd gather each noise-level group across the ranks; sm goes through the manual gradient average."""
    args = ["--preset", "smoke", "--method", method, "--gather", "--steps", "4", "--log-every", "1",
            "--eval-every", "4", "--ckpt-every", "4", "--samplers", "annealed", "--threads", "1", "--no-plots"]
    _torchrun(args, tmp_path / "two")
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    one, two = ([r["loss"] for r in rows(tmp_path / d) if "loss" in r] for d in ("one", "two"))
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-7)
    w1 = checkpoint.load(tmp_path / "one" / CHECKPOINT)["model"]
    w2 = checkpoint.load(tmp_path / "two" / CHECKPOINT)["model"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert (tmp_path / "two" / "metrics.json").exists()  # rank 0 evaluated


def test_two_processes_without_gather_differ_for_stein(tmp_path):
    """Without --gather each rank estimates from its own half of a group: a different (noisier) target."""
    args = ["--preset", "smoke", "--method", "stein", "--steps", "2", "--log-every", "1", "--samplers", "annealed", "--no-plots",
            "--threads", "1", "--eval-every", "2", "--ckpt-every", "2"]
    _torchrun(args, tmp_path / "two")
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    one, two = ([r["loss"] for r in rows(tmp_path / d) if "loss" in r] for d in ("one", "two"))
    assert abs(one[0] - two[0]) > 1e-4 * abs(one[0])


def test_two_processes_with_window_targets_and_gather_run(tmp_path):
    """Window targets under torchrun --gather: every rank windows its own rows against the gathered group (its
    own query noise and n_eff decisions, so not bit-identical to one process); the run completes and logs them."""
    args = ["--preset", "smoke", "--method", "stein", "--gather", "--window-neff", "4", "--steps", "4", "--log-every",
            "1", "--eval-every", "4", "--ckpt-every", "4", "--samplers", "annealed", "--threads", "1", "--no-plots"]
    _torchrun(args, tmp_path / "two")
    logged = [r for r in rows(tmp_path / "two") if "loss" in r]
    assert len(logged) == 4 and all(math.isfinite(r["loss"]) and 0 <= r["window_groups"] <= 1 for r in logged)
    assert "fisher_window" in [r for r in rows(tmp_path / "two") if r.get("kind") == "eval"][-1]
