"""python -m train [--preset NAME] [--method dsm|ssm|ssm-vr|sm|stein|ksd] [options]: train, sample, evaluate, plot.

Several processes (DistributedDataParallel; NCCL on GPUs, gloo on CPU):
    torchrun --nproc_per_node N -m train [options]
"""
from __future__ import annotations

import sys

from . import ddp
from .config import resolve
from .loop import NonFiniteLoss, train_and_evaluate
from .report import sampler_table


def main(argv=None) -> int:
    cfg = resolve(argv)
    try:
        _, summary = train_and_evaluate(cfg)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        ddp.teardown()
    if summary is None:  # not rank 0
        return 0
    print(sampler_table(summary))
    print(f"\nrun folder: {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
