"""Reusable pieces of a noise-conditional score-based generative model: noise schedules and the VE SDE
(``noise``), score networks and EMA (``networks``), training objectives (``objectives``: dsm, ssm,
ssm-vr, sm, stein, ksd), samplers (``samplers``) and sample metrics (``metrics``)."""
from .networks import ScoreMLP, ema_model
from .noise import VESDE, NoiseSchedule
from .unet import ScoreUNet

__all__ = ["NoiseSchedule", "ScoreMLP", "ScoreUNet", "VESDE", "ema_model"]
