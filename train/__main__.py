"""python -m train [--preset NAME] [--method dsm|ssm|ssm-vr|sm|stein|ksd] [options]: train, sample, evaluate, plot."""
from __future__ import annotations

import sys

from .config import resolve
from .evaluate import final_evaluation
from .loop import NonFiniteLoss, Run
from .report import sampler_table


def main(argv=None) -> int:
    cfg = resolve(argv)
    run = Run(cfg)
    try:
        run.train()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = final_evaluation(run)
    print(sampler_table(summary))
    print(f"\nrun folder: {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
