"""What the benchmark runs, as plain data: dit-opt's solver and baseline schedules (:data:`SOLVERS`),
the peer methods (:data:`PEERS`) with their report titles and swept settings, the evaluation and
calibration seeds, the configuration of one run (:class:`BenchConfig`) and one measured row
(:class:`Row`). It holds no model code; every other module of :mod:`dit_opt.benchmark` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: dit-opt's own solver and its baseline schedules, all solved from the same profile.
SOLVERS = ("cpsat", "fora", "delta_dit", "toca", "soda")
#: Peer names in report order: diffusers hooks, then the optional ``cache-dit`` package.
PEERS = ("fbc", "pab", "fastercache", "taylorseer", "magcache", "cachedit_dbcache", "cachedit_taylorseer",
         "cachedit_foca", "cachedit_dmd", "cachedit_scm")
_CACHE_DIT_PEERS = ("cachedit_dbcache", "cachedit_taylorseer", "cachedit_foca", "cachedit_dmd", "cachedit_scm")
_PEER_TITLES = {
    "fbc": "diffusers FirstBlockCache",
    "pab": "diffusers PyramidAttentionBroadcast",
    "fastercache": "diffusers FasterCache",
    "taylorseer": "diffusers TaylorSeer",
    "magcache": "diffusers MagCache",
    "cachedit_dbcache": "cache-dit DBCache",
    "cachedit_taylorseer": "cache-dit DBCache + TaylorSeer",
    "cachedit_foca": "cache-dit DBCache + FoCa",
    "cachedit_dmd": "cache-dit DBCache + DMD",
    "cachedit_scm": "cache-dit SCM step mask",
}
#: The swept parameter of each peer (full sweep; ``--quick`` takes every other value). Chosen by
#: trial runs so that the FLOP fractions they reach bracket the target budgets where the method can.
_SWEEPS: dict[str, tuple[float, ...]] = {
    "fbc": (0.05, 0.1, 0.2, 0.3, 0.45, 0.7, 1.0),
    "pab": (2, 3, 4, 6, 10),
    "fastercache": (2, 3, 4, 6),
    # TaylorSeer's three knobs swept together (interval, warm-up, order), as a user tuning it would
    "taylorseer": tuple((n, w, o) for n in (2, 3, 4, 5, 6, 8) for w in (1, 2, 3) for o in (1, 2)),
    "magcache": (0.02, 0.06, 0.15, 0.3, 0.6, 1.0),
    "cachedit_dbcache": (0.1, 0.25, 0.5, 0.8, 1.2, 2.0),
    "cachedit_taylorseer": (0.1, 0.25, 0.5, 0.8, 1.2, 2.0),
    "cachedit_foca": (0.1, 0.25, 0.5, 0.8, 1.2, 2.0),
    "cachedit_dmd": (0.1, 0.25, 0.5, 0.8, 1.2, 2.0),
    "cachedit_scm": ("slow", "medium", "fast", "ultra"),
}
_SWEEP_PARAM = {"fbc": "threshold", "pab": "skip_range", "fastercache": "skip_range",
                "taylorseer": "interval,warm-up,order", "magcache": "threshold",
                "cachedit_dbcache": "residual_diff_threshold",
                "cachedit_taylorseer": "residual_diff_threshold", "cachedit_foca": "residual_diff_threshold",
                "cachedit_dmd": "residual_diff_threshold", "cachedit_scm": "mask_policy"}
_EVAL_SEED = 0
_CALIBRATION_SEED = 1000


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures.

    Args:
        models: reference model names (``dit_opt.zoo.available()``).
        budgets: target FLOP fractions in (0, 1].
        samples: generated images per row (labels cycle through the model's classes).
        steps: denoising steps (``None``: each model's default).
        solvers: dit-opt solvers to run (a subset of :data:`SOLVERS`).
        peers: peer methods to run (a subset of :data:`PEERS`).
        quick: sweep every other peer setting only.
        timing: measure wall-clock ratios.
        timing_scope: ``"all"`` rows, or ``"dit-opt"`` (only dit-opt's cpsat rows, to save time).
        timing_samples: images per timed generation (smaller than ``samples`` to keep it short).
        timing_repeats: timed runs per side (median taken).
        calibration_samples: images of the calibration generation (seed 1000, other than the evaluation's).
        progress: show rich progress bars.
    """

    models: tuple[str, ...] = ("digits-dit", "digits-mmdit", "crops-pixart")
    budgets: tuple[float, ...] = (0.7, 0.5, 0.35, 0.25, 0.2)
    samples: int = 20
    steps: int | None = None
    solvers: tuple[str, ...] = SOLVERS
    peers: tuple[str, ...] = PEERS
    quick: bool = False
    timing: bool = True
    timing_scope: str = "all"
    timing_samples: int = 4
    timing_repeats: int = 3
    calibration_samples: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        from dit_opt import zoo

        for m in self.models:
            if m not in zoo.available():
                raise ValueError(f"unknown model {m!r}; choose from {', '.join(zoo.available())}")
        for b in self.budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budget {b} is outside (0, 1]; a budget is a FLOP fraction such as 0.5")
        bad = [s for s in self.solvers if s not in SOLVERS] + [p for p in self.peers if p not in PEERS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; solvers: {', '.join(SOLVERS)}; peers: {', '.join(PEERS)}")
        if self.timing_scope not in ("all", "dit-opt"):
            raise ValueError(f"timing_scope={self.timing_scope!r}; use 'all' or 'dit-opt'")
        if self.samples < 2:
            raise ValueError(f"samples={self.samples}: the Frechet distance needs at least 2 images")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples={self.calibration_samples}: calibrate on at least 1 image")


@dataclass
class Row:
    """One measured configuration of one model."""

    model: str
    method: str
    setting: str
    target: float | None
    flop_fraction: float
    psnr: float
    ssim: float
    accuracy: float
    frechet: float
    speedup: float | None = None
    timing: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
