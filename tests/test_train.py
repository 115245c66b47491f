"""The train driver: end-to-end runs of every method, bit-exact resume, atomic checkpoints, non-finite
losses, option validation, --help and the demo."""
import json
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.__main__ import main
from train.config import METHODS, Config, build_parser, resolve
from train.loop import CHECKPOINT, NonFiniteLoss, Run

SMOKE = ["--preset", "smoke", "--no-progress"]


def rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if l.strip()]


PLOTTED = ("dsm", "stein")  # the pictures do not depend on the method; the others check --no-plots


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_its_outputs(tmp_path, method):
    out = tmp_path / method
    plots = [] if method in PLOTTED else ["--no-plots"]
    assert main(SMOKE + ["--method", method, "--out", str(out), "--samplers", "annealed", "langevin", "pc", "ode",
                         "training_free"] + plots) == 0
    assert json.loads((out / "config.json").read_text())["method"] == method
    r = rows(out)
    train_rows = [x for x in r if "loss" in x]
    assert [x["step"] for x in train_rows] == [5, 10, 15, 20]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in train_rows)
    evals = [x for x in r if x.get("kind") == "eval"]
    assert [x["step"] for x in evals] == [10, 20] and len(evals[-1]["fisher_net"]) == 10
    assert ("fisher_estimator" in evals[-1]) == (method == "stein")
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["samplers"]) >= {"annealed", "langevin", "pc", "ode", "training_free", "exact:annealed",
                                        "exact:langevin"}
    for m in summary["samplers"].values():
        assert all(isinstance(m[k], float) for k in ("energy", "mmd", "sliced_w2", "mode_weight_error"))
    assert checkpoint.load(out / CHECKPOINT)["step"] == 20
    if plots:  # metrics only
        assert not (out / "plots").exists()
        return
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    for name in ("samples.png", "loss.png", "fisher.png", "fisher_per_level.png"):
        assert name in pngs
    assert any(p.startswith("score_field") for p in pngs) and any(p.startswith("trajectories") for p in pngs)


@pytest.mark.parametrize("method", ["dsm", "stein", "ssm", "stein --window-neff 4"])  # smoke: window_neff 0
def test_resume_is_bit_exact(tmp_path, method):
    base = SMOKE + ["--method", *method.split(), "--ckpt-every", "7", "--log-every", "1", "--eval-every", "7"]
    straight = Run(resolve(base + ["--out", str(tmp_path / "a"), "--steps", "20"]))
    straight.train()
    first = Run(resolve(base + ["--out", str(tmp_path / "b"), "--steps", "14"]))
    first.train()
    resumed = Run(resolve(base + ["--out", str(tmp_path / "b"), "--steps", "20", "--resume"]))
    resumed.train()
    for a, b in ((straight.model, resumed.model), (straight.ema, resumed.ema)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb), ka
    drop = lambda r: {k: v for k, v in r.items() if k != "sec_per_step"}
    assert [drop(r) for r in rows(tmp_path / "a")] == [drop(r) for r in rows(tmp_path / "b")]


class _PoisonAt:
    """Wraps an objective so that its loss becomes NaN from a given call on."""

    def __init__(self, obj, at):
        self.obj, self.at, self.calls, self.min_group = obj, at, 0, obj.min_group

    def __call__(self, model, batch, generator=None):
        loss, info = self.obj(model, batch, generator=generator)
        self.calls += 1
        return (loss * float("nan") if self.calls >= self.at else loss), info

    def state_dict(self):
        return self.obj.state_dict()

    def load_state_dict(self, d):
        self.obj.load_state_dict(d)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = Run(resolve(SMOKE + ["--out", str(tmp_path), "--ckpt-every", "5", "--eval-every", "0"]))
    run.objective = _PoisonAt(run.objective, at=13)
    with pytest.raises(NonFiniteLoss, match=r"step 13.*last good checkpoint"):
        run.train()
    state = checkpoint.load(tmp_path / CHECKPOINT)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert main(SMOKE + ["--out", str(tmp_path), "--resume", "--samplers", "annealed"]) == 0  # resumable


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        checkpoint.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("argv, match", [
    (["--sigma-min", "2", "--sigma-max", "1"], "sigma_min"),
    (["--sigma-min", "-1"], "sigma_min"),
    (["--steps", "0"], "steps"),
    (["--ema-decay", "1"], "ema_decay"),
    (["--bandwidth", "wide"], "bandwidth"),
    (["--regularization", "-3"], "regularization"),
    (["--regularization", "median"], "regularization must be a positive number or one of auto, default"),
    (["--n-levels", "1"], "n_levels"),
    (["--sigma-bandwidth", "-1"], "sigma_bandwidth"),
])
def test_invalid_options(argv, match):
    with pytest.raises(ValueError, match=match):
        resolve(SMOKE + argv)


def test_sigma_bandwidth_reaches_the_objective_and_refuses_auto(tmp_path):
    run = Run(resolve(SMOKE + ["--method", "stein", "--sigma-bandwidth", "3", "--out", str(tmp_path)]))
    assert run.objective.sigma_bandwidth == 3.0 and run.objective.low_bias_knob
    run.train_step()
    assert bool((run.objective.estimator.bandwidth_ <= 3.0 * run.sigmas.max()).all())
    with pytest.raises(ValueError, match="sigma_bandwidth"):
        Run(resolve(SMOKE + ["--method", "stein", "--sigma-bandwidth", "3", "--bandwidth", "auto",
                             "--out", str(tmp_path)]))


def test_batch_smaller_than_the_estimator_needs():
    with pytest.raises(ValueError, match="batch_size"):
        Run(resolve(SMOKE + ["--method", "stein", "--batch-size", "8", "--levels-per-step", "2"]))
    with pytest.raises(ValueError, match="batch_size"):
        Run(resolve(SMOKE + ["--method", "ksd", "--batch-size", "10", "--levels-per-step", "4"]))


def test_unknown_method_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        resolve(["--method", "magic"])
    assert e.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="method"):
        Config(method="magic").validate()
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text


def test_demo_writes_the_comparison(tmp_path):
    from train.demo import main as demo
    assert demo(["--preset", "smoke", "--methods", "dsm", "stein", "--out", str(tmp_path), "--no-progress"]) == 0
    for name in ("comparison.png", "comparison.md", "comparison.json"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "comparison.md").read_text()
    assert "| dsm |" in md and "| stein |" in md and "plain Langevin" in md


def test_every_bandwidth_rule_reaches_the_estimator_and_ksd():
    from steinops.bandwidth import RULES
    from train.config import objective_options
    for rule in RULES:
        assert objective_options(resolve(SMOKE + ["--method", "stein", "--bandwidth", rule]))["bandwidth"] == rule
        assert objective_options(resolve(SMOKE + ["--method", "ksd", "--bandwidth", rule]))["bandwidth"] == rule


def test_fisher_row_window_targets_match_the_exact_score_at_the_coarse_levels():
    """The evaluation's window targets are made as the objective makes them (each level from its finer level's
    samples, windowed at sqrt(sigma_l^2 - sigma_{l+1}^2)): near the exact score where the windows are dense."""
    from steinops.distributions import get_distribution
    from train.evaluate import fisher_row
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0])
    row = fisher_row(lambda x, s: torch.zeros_like(x), get_distribution("two_mode"), sigmas, 256, step=0,
                     generator=torch.Generator().manual_seed(0), group_size=256, window=20.0)
    assert row["fisher_window"][-1] is None and row["window_neff"][-1] is None
    assert all(e < 0.1 for e in row["fisher_window"][:2]), row["fisher_window"]
    assert row["fisher_window_mean"] is not None
