"""The training loop: data, noise levels, network, optimiser, EMA, objective; logging, evaluation and
checkpoints. Everything reusable lives in ``steinops.sgm``; this file only wires it together."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import steinops
from steinops.data import load_image_data, random_flip
from steinops.distributions import get_distribution
from steinops.sgm import NoiseSchedule, ScoreMLP, ScoreUNet, ema_model
from steinops.sgm.distributed import rank_and_world
from steinops.sgm.objectives import get_objective, perturb

from . import checkpoint, ddp
from .config import Config, estimator_options, objective_options
from .evaluate import final_evaluation, fisher_row, heldout_row

CHECKPOINT = "checkpoint.pt"


class NonFiniteLoss(RuntimeError):
    """Raised when the loss or the gradients stop being finite; the last good checkpoint is kept."""


def build_network(cfg: Config, shape: tuple[int, ...]) -> torch.nn.Module:
    """The score network for data of per-sample ``shape``: the MLP for vectors (d,), the U-Net for images (C, H, W)."""
    if len(shape) == 1:
        return ScoreMLP(shape[0], cfg.hidden, cfg.depth, activation=cfg.activation)
    return ScoreUNet(tuple(shape), width=cfg.width, channel_mult=cfg.unet_channel_mult(), n_res_blocks=cfg.n_res_blocks,
                     attention=cfg.attention, dropout=cfg.dropout)


class Run:
    """Everything a training run holds. Build with ``Run(cfg)``; ``train()`` runs (or resumes) it.

    Vector data come from a distribution with exact scores (``self.dist``); image data from
    ``steinops.data`` (``self.images``: train / held-out split; ``self.dist`` is None). Under torchrun the
    model is wrapped in DistributedDataParallel (``self.net``) and each rank trains on its slice of the
    global batch (see ``train/ddp.py``)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg.validate()
        self.out = Path(cfg.out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = ddp.setup(cfg.device)
        self.rank, self.world = rank_and_world()
        torch.manual_seed(cfg.seed)
        self.dtype = torch.float32
        self.dist, self.images = None, None
        if cfg.is_image:
            self.images = load_image_data(cfg.data, root=cfg.data_dir, scale=cfg.pixel_scale, heldout=cfg.heldout,
                                          seed=cfg.seed, pad_to=cfg.pad_to or None)
            self.data = self.images.train.to(self.dtype)
        else:
            self.dist = get_distribution(cfg.data)
            data_gen = torch.Generator().manual_seed(cfg.seed)
            self.data = self.dist.sample(cfg.n_train, generator=data_gen).to(self.dtype)  # the fixed training set
        self.schedule = NoiseSchedule.ncsnv2(self.data, sigma_min=cfg.sigma_min, n_levels=cfg.n_levels or None,
                                             sigma_max=cfg.sigma_max or None)
        self.data = self.data.to(self.device)
        self.sigmas = self.schedule.sigmas.to(self.dtype)
        self.model = build_network(cfg, tuple(self.data.shape[1:])).to(self.device)
        self.ema = ema_model(self.model, cfg.ema_decay)
        self.net = self.model
        if self.world > 1:
            # broadcast_buffers=False: the only buffers are fixed Fourier frequencies (identical on every rank), and
            # DDP's per-forward buffer copy_ breaks the forward-mode jvp of ssm / sm under torch.func
            self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                               broadcast_buffers=False)
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
        if self.group_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} gives groups of {self.group_size} per noise level, which "
                             f"{self.world} processes cannot split evenly; use a batch_size such that "
                             f"batch_size // levels_per_step is divisible by the number of processes")
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
        x = self.data[idx.to(self.device)]
        if cfg.flip:
            x = random_flip(x, generator=self.gen)
        # every rank draws the same global batch and noise and keeps its slice of each level's group
        batch = perturb(x, self.sigmas, cfg.levels_per_step, generator=self.gen)
        obj_gen = self.gen
        if self.world > 1:
            batch = batch.shard(self.rank, self.world)
            # per-rank randomness of the objective (ssm projections), a function of (seed, step, rank): resumable
            obj_gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + self.step) * 4099 + self.rank)
        manual_sync = self.world > 1 and self.objective.forward_mode_ad  # see train/ddp.py
        loss, info = self.objective(self.model if manual_sync else self.net, batch, generator=obj_gen)
        info = ddp.mean_over_ranks(dict(loss=loss.item(), **info), self.device)  # all ranks see the same numbers
        if not math.isfinite(info["loss"]):
            raise NonFiniteLoss(f"the {cfg.method} loss is {info['loss']} at step {self.step + 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if manual_sync:
            ddp.average_gradients(self.model)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if not torch.isfinite(grad_norm):
            raise NonFiniteLoss(f"the gradient norm is {grad_norm.item()} at step {self.step + 1}")
        self.opt.step()
        self.lr_sched.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        return dict(info, grad_norm=grad_norm.item(), lr=self.lr_sched.get_last_lr()[0])

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> Path:
        """Run (or resume) the training loop. Rank 0 alone writes the run folder."""
        cfg, out = self.cfg, self.out
        main = self.rank == 0
        log_path = out / "metrics.jsonl"
        if cfg.resume:
            self.load_state_dict(checkpoint.load(out / CHECKPOINT))
        if main:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.resume:
                _truncate_log(log_path, self.step)  # rows written after the checkpoint are redone
            else:
                log_path.write_text("")
            checkpoint.write_text_atomic(json.dumps(dict(dataclasses.asdict(cfg), world_size=self.world, schedule=dict(
                sigma_max=self.schedule.sigma_max, sigma_min=self.schedule.sigma_min, n_levels=len(self.schedule))),
                indent=2), out / "config.json")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and main), desc=f"{cfg.method}",
                   dynamic_ncols=True)
        acc, n_acc, t0 = {}, 0, time.perf_counter()
        with (open(log_path, "a") if main else contextlib.nullcontext()) as log:
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
                if not main:
                    continue
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
            if main and not (cfg.eval_every and self.step % cfg.eval_every == 0):  # the final step's evaluation
                log.write(json.dumps(dict(self.evaluate_fisher(), final=True)) + "\n")
        return out

    def evaluate_fisher(self) -> dict:
        """Vector data: relative Fisher error per level of the EMA network against the exact score (and of the
        raw estimator for stein). Image data (no exact score): the held-out denoising loss per level. The draws
        depend only on (seed, step), never on the training stream, so resumed runs log the same numbers."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step + 2)
        if self.images is not None:
            return heldout_row(self.ema.module, self.images.heldout, self.sigmas, self.cfg.n_eval, step=self.step,
                               generator=gen)
        est = None
        if self.cfg.method == "stein":
            est = steinops.score_estimator(self.cfg.estimator, **estimator_options(self.cfg))
        return fisher_row(self.ema.module, self.dist, self.sigmas, self.cfg.n_eval, step=self.step,
                          generator=gen, estimator=est, group_size=self.group_size,
                          window=self.cfg.window_neff if self.cfg.method == "stein" else 0.0)


def train_and_evaluate(cfg: Config):
    """Train (or resume) the run of ``cfg``, then sample, evaluate and plot. Returns ``(run, summary)``;
    a non-finite loss propagates as :class:`NonFiniteLoss` (the last good checkpoint is kept)."""
    run = Run(cfg)
    run.train()
    if run.rank != 0:  # rank 0 samples, evaluates and plots
        return run, None
    return run, final_evaluation(run)


def _truncate_log(path: Path, step: int):
    """Keep the metrics.jsonl rows up to ``step`` (the checkpoint's)."""
    if not path.exists():
        return
    keep = lambda r: r["step"] <= step and not r.get("final")  # the final evaluation is redone after resuming
    rows = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    checkpoint.write_text_atomic("".join(r + "\n" for r in rows), path)
