"""The ``train`` driver: ``python -m train --help``. Thin: configuration (``config``), the loop with EMA
and atomic checkpoints (``loop``, ``checkpoint``), evaluation (``evaluate``), pictures (``plots``) and the
``make demo`` comparison (``demo``). The reusable pieces live in ``steinops.sgm``."""
