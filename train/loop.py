"""The training loop: data, noise levels, network, optimiser, EMA, objective; logging, evaluation and
checkpoints. Everything reusable lives in ``steinops.sgm``; this file only wires it together."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import steinops
from steinops.distributions import get_distribution
from steinops.sgm import NoiseSchedule, ScoreMLP, ema_model
from steinops.sgm.objectives import get_objective, perturb

from . import checkpoint
from .config import Config, estimator_options, objective_options
from .evaluate import final_evaluation, fisher_row

CHECKPOINT = "checkpoint.pt"


class NonFiniteLoss(RuntimeError):
    """Raised when the loss or the gradients stop being finite; the last good checkpoint is kept."""


class Run:
    """Everything a training run holds. Build with ``Run(cfg)``; ``train()`` runs (or resumes) it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg.validate()
        self.out = Path(cfg.out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.dtype = torch.float32
        self.dist = get_distribution(cfg.data)
        data_gen = torch.Generator().manual_seed(cfg.seed)
        self.data = self.dist.sample(cfg.n_train, generator=data_gen).to(self.dtype)  # the fixed training set
        self.schedule = NoiseSchedule.ncsnv2(self.data, sigma_min=cfg.sigma_min, n_levels=cfg.n_levels or None,
                                             sigma_max=cfg.sigma_max or None)
        self.sigmas = self.schedule.sigmas.to(self.dtype)
        self.model = ScoreMLP(self.dist.dim, cfg.hidden, cfg.depth, activation=cfg.activation)
        self.ema = ema_model(self.model, cfg.ema_decay)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / cfg.warmup) if cfg.warmup else 1.0)
        self.objective = get_objective(cfg.method, **objective_options(cfg))
        G = min(cfg.levels_per_step, len(self.schedule))
        self.group_size = cfg.batch_size // G
        if self.group_size < self.objective.min_group:
            raise ValueError(
                f"batch_size {cfg.batch_size} gives groups of {self.group_size} samples per noise level "
                f"(levels_per_step={G}); --method {cfg.method} needs at least {self.objective.min_group} per group: "
                f"raise batch_size or lower levels_per_step")
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # batches, levels, noise, projections
        self.step = 0

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(step=self.step, model=self.model.state_dict(), ema=self.ema.state_dict(),
                    opt=self.opt.state_dict(), lr_sched=self.lr_sched.state_dict(),
                    objective=self.objective.state_dict(), gen=self.gen.get_state(),
                    torch_rng=torch.get_rng_state(),
                    config=dataclasses.asdict(self.cfg))

    def load_state_dict(self, s: dict):
        self.model.load_state_dict(s["model"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["opt"])
        self.lr_sched.load_state_dict(s["lr_sched"])
        self.objective.load_state_dict(s["objective"])
        self.gen.set_state(s["gen"])
        torch.set_rng_state(s["torch_rng"])
        self.step = s["step"]

    def save(self):
        checkpoint.save_atomic(self.state_dict(), self.out / CHECKPOINT)

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        idx = torch.randint(self.data.shape[0], (cfg.batch_size,), generator=self.gen)
        batch = perturb(self.data[idx], self.sigmas, cfg.levels_per_step, generator=self.gen)
        loss, info = self.objective(self.model, batch, generator=self.gen)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the {cfg.method} loss is {loss.item()} at step {self.step + 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if not torch.isfinite(grad_norm):
            raise NonFiniteLoss(f"the gradient norm is {grad_norm.item()} at step {self.step + 1}")
        self.opt.step()
        self.lr_sched.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        return dict(loss=loss.item(), grad_norm=grad_norm.item(), lr=self.lr_sched.get_last_lr()[0], **info)

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> Path:
        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / "metrics.jsonl"
        if cfg.resume:
            self.load_state_dict(checkpoint.load(out / CHECKPOINT))
            _truncate_log(log_path, self.step)  # rows written after the checkpoint are redone
        else:
            log_path.write_text("")
        checkpoint.write_text_atomic(json.dumps(dict(dataclasses.asdict(cfg), schedule=dict(
            sigma_max=self.schedule.sigma_max, sigma_min=self.schedule.sigma_min, n_levels=len(self.schedule))),
            indent=2), out / "config.json")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=f"{cfg.method}", dynamic_ncols=True)
        acc, n_acc, t0 = {}, 0, time.perf_counter()
        with open(log_path, "a") as log:
            while self.step < cfg.steps:
                try:
                    info = self.train_step()
                except NonFiniteLoss as e:
                    bar.close()
                    raise NonFiniteLoss(f"{e}; stopped. The last good checkpoint is kept at {out / CHECKPOINT}"
                                        f" (resume with --resume after changing e.g. --lr)") from None
                for k, v in info.items():
                    acc[k] = acc.get(k, 0.0) + v
                n_acc += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    row = dict(step=self.step, **{k: v / n_acc for k, v in acc.items()},
                               sec_per_step=(time.perf_counter() - t0) / n_acc)
                    bar.set_postfix(loss=f"{row['loss']:.4g}")
                    log.write(json.dumps(row) + "\n")
                    acc, n_acc, t0 = {}, 0, time.perf_counter()
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    log.write(json.dumps(self.evaluate_fisher()) + "\n")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    log.flush()
                    self.save()
            bar.close()
            if not (cfg.eval_every and self.step % cfg.eval_every == 0):  # the final step's evaluation
                log.write(json.dumps(dict(self.evaluate_fisher(), final=True)) + "\n")
        return out

    def evaluate_fisher(self) -> dict:
        """Relative Fisher error per level of the EMA network (and of the raw estimator for stein). The draws
        depend only on (seed, step), never on the training stream, so resumed runs log the same numbers."""
        est = None
        if self.cfg.method == "stein":
            est = steinops.score_estimator(self.cfg.estimator, **estimator_options(self.cfg))
        return fisher_row(self.ema.module, self.dist, self.sigmas, self.cfg.n_eval, step=self.step,
                          generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step + 2),
                          estimator=est, group_size=self.group_size)


def train_and_evaluate(cfg: Config):
    """Train (or resume) the run of ``cfg``, then sample, evaluate and plot. Returns ``(run, summary)``;
    a non-finite loss propagates as :class:`NonFiniteLoss` (the last good checkpoint is kept)."""
    run = Run(cfg)
    run.train()
    return run, final_evaluation(run)


def _truncate_log(path: Path, step: int):
    """Keep the metrics.jsonl rows up to ``step`` (the checkpoint's)."""
    if not path.exists():
        return
    keep = lambda r: r["step"] <= step and not r.get("final")  # the final evaluation is redone after resuming
    rows = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    checkpoint.write_text_atomic("".join(r + "\n" for r in rows), path)
