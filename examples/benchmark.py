"""Benchmark dit-opt against its baseline schedules and diffusers' cache hooks on the reference models.

    python examples/benchmark.py                 # full run: writes BENCHMARKS.md and docs/pareto.png
    python examples/benchmark.py --quick --no-timing --models digits-dit --budgets 0.5

The logic lives in :mod:`dit_opt.benchmark` so that the installed ``dit-opt bench`` runs it too.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_opt.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
