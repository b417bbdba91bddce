"""validate_sensitivity: does the additive per-action error model track the real output error?

The solver minimises a sum of per-action errors measured locally (at each block's output).
What matters is the error in the final sample. For a seeded sample of single actions (one
unit deviates from ``COMPUTE`` at one step), this pass runs a complete calibration with that
one change through the real runtime, measures the relative squared error of the final output
against the full-compute output, and reports the Spearman rank correlation between modelled
and measured errors (plus the data, so it can be plotted).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from dit_opt.ir import DiTGraph
from dit_opt.plan import COMPUTE, Action
from dit_opt.sensitivity import SensitivityProfile

__all__ = ["validate_sensitivity", "final_output"]


def final_output(result: Any) -> torch.Tensor:
    """The tensor a calibration returned (a tensor, or a pipeline output with ``images``)."""
    if isinstance(result, torch.Tensor):
        return result.detach().float()
    images = getattr(result, "images", None)
    if images is not None:
        return torch.as_tensor(np.asarray(images), dtype=torch.float32)
    raise TypeError(
        f"the calibration returned a {type(result).__name__}; to validate the profile it must return the "
        f"generated samples (a tensor, or a pipeline output with .images)"
    )


def validate_sensitivity(
    graph: DiTGraph,
    profile: SensitivityProfile,
    calibration: Callable[[torch.nn.Module], Any],
    *,
    probes: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Rank correlation between modelled and measured final-output error of single actions.

    Args:
        graph: the captured graph the profile was measured on.
        profile: the profile.
        calibration: the calibration used for profiling; it must return its samples.
        probes: how many single actions to try (each costs one calibration run).
        seed: seed of the sample of actions.

    Returns:
        ``{"spearman": rho, "pvalue": p, "probes": [{"step", "unit", "action", "modelled",
        "measured"}, ...], "seconds": s}``; ``spearman`` is ``None`` with fewer than 3 probes.
    """
    from dit_opt.runtime import OptimizedTransformer

    if probes <= 0:
        return {"spearman": None, "pvalue": None, "probes": [], "seconds": 0.0}
    t0 = time.perf_counter()
    problem = profile.to_problem(1.0)
    T, U = problem.num_steps, len(problem.units)
    menu = [(a, act) for a, act in enumerate(problem.actions) if act != COMPUTE]
    errors = problem.error_table[..., 1]  # (T, U, A): cache actions at age 1 (the step before computed)
    allowed = problem.allowed
    if allowed.ndim == 2:
        allowed = np.broadcast_to(allowed, (T, *allowed.shape))
    rng = random.Random(seed)
    candidates = [(t, u, a) for t in range(1, T) for u in range(U) for a, _ in menu if allowed[t, u, a]]
    # Spread the probes over action kinds, then over steps and units.
    by_kind: dict[str, list] = {}
    for c in candidates:
        by_kind.setdefault(problem.actions[c[2]].kind.value, []).append(c)
    picks: list[tuple[int, int, int]] = []
    kinds = sorted(by_kind)
    while len(picks) < probes and any(by_kind.values()):
        for k in kinds:
            if by_kind[k] and len(picks) < probes:
                picks.append(by_kind[k].pop(rng.randrange(len(by_kind[k]))))
    model = graph.model
    with torch.no_grad():
        reference = final_output(calibration(model))
    base = [[COMPUTE] * U for _ in range(T)]
    rows = []
    opt = None
    for t, u, a in picks:
        grid = [list(r) for r in base]
        grid[t][u] = problem.actions[a]
        plan = problem.to_plan([tuple(r) for r in grid], solver="probe", status="PROBE", wall_time_s=0.0)
        if opt is None:
            opt = OptimizedTransformer(model, plan, profile=profile, graph=graph, compile=False)
        else:
            opt.plan = plan
            opt._runners.clear()
            opt._runners[opt._signature(graph.example_inputs)] = opt._make_runner(graph)
        opt.reset()
        with torch.no_grad():
            out = final_output(calibration(opt))
        measured = float((out - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))
        action: Action = problem.actions[a]
        rows.append({"step": t, "unit": str(problem.units[u]), "action": str(action),
                     "modelled": float(errors[t, u, a]), "measured": measured})
    rho, p = (None, None)
    if len(rows) >= 3:
        res = spearmanr([r["modelled"] for r in rows], [r["measured"] for r in rows])
        rho, p = float(res.statistic), float(res.pvalue)
    return {"spearman": rho, "pvalue": p, "probes": rows, "seconds": time.perf_counter() - t0}
