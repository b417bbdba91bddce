"""Validation of a profile: does the additive per-action error model track the real output error?

The solver minimises a sum of per-action errors measured locally (at each block's output).
What matters is the error in the final sample. For a seeded sample of single actions (one
unit deviates from ``COMPUTE`` at one step), this module runs a complete calibration with that
one change through the real runtime (which is why this lives beside the runtime, not among the
passes), measures the relative squared error of the final output
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

from dit_opt.calibration import returned_tensors
from dit_opt.ir import DiTGraph
from dit_opt.plan import COMPUTE, Action
from dit_opt.selection import relative_error
from dit_opt.sensitivity import SensitivityProfile

__all__ = ["validate_sensitivity", "measure_step_gains", "final_output"]


def final_output(result: Any) -> list[torch.Tensor]:
    """The samples a calibration returned (a tensor, a list of them, or a pipeline output with
    ``images``), as float tensors.

    Raises:
        TypeError: it returned none.
    """
    samples = returned_tensors(result)
    if not samples:
        raise TypeError(
            f"the calibration returned a {type(result).__name__}; to validate the profile it must return the "
            f"generated samples (a tensor, or a pipeline output with .images)"
        )
    return samples


class _SingleActions:
    """Runs complete calibrations in which one unit deviates from ``COMPUTE`` at one step."""

    def __init__(self, graph: DiTGraph, profile: SensitivityProfile, calibration: Callable[[torch.nn.Module], Any]):
        from dit_opt.runtime import OptimizedTransformer

        self.graph, self.calibration = graph, calibration
        self.problem = profile.to_problem(1.0)
        T, U = self.problem.num_steps, len(self.problem.units)
        self.errors = profile_errors(self.problem)
        allowed = self.problem.allowed
        self.allowed = np.broadcast_to(allowed, (T, *allowed.shape)) if allowed.ndim == 2 else allowed
        with torch.no_grad():
            self.reference = final_output(calibration(graph.model))
        self.base = [[COMPUTE] * U for _ in range(T)]
        plan = self.problem.to_plan([tuple(r) for r in self.base], solver="probe", status="PROBE", wall_time_s=0.0)
        self.opt = OptimizedTransformer(graph.model, plan, profile=profile, graph=graph, compile=False)

    def measured(self, t: int, u: int, a: int) -> float:
        """Relative squared error of the final output when unit ``u`` takes action ``a`` at step ``t``."""
        grid = [list(r) for r in self.base]
        grid[t][u] = self.problem.actions[a]
        opt = self.opt
        opt.plan = self.problem.to_plan([tuple(r) for r in grid], solver="probe", status="PROBE", wall_time_s=0.0)
        opt._runners.clear()
        opt._runners[opt._runner_key(self.graph.example_inputs)] = opt._make_runner(self.graph)
        opt.reset()
        with torch.no_grad():
            out = final_output(self.calibration(opt))
        return relative_error(out, self.reference)


def profile_errors(problem: Any) -> np.ndarray:
    """``(T, U, A)`` modelled error of each action, cache actions at age 1."""
    return problem.error_table[..., 1]


def measure_step_gains(
    graph: DiTGraph, profile: SensitivityProfile, calibration: Callable[[torch.nn.Module], Any], *, points: int = 6
) -> np.ndarray:
    """How much a local error at each step grows into the final output: ``(T,)`` gains.

    A block's output error at an early step is carried (and often amplified) by every later
    step; at a late step it is mostly damped. The local errors the profile measures do not
    see that, so the solver would spread work evenly over the steps. This runs ``points``
    single ``SKIP``s of the middle block at steps spread over the schedule, takes
    ``measured / modelled`` at each, and interpolates ``log(gain)`` over all steps. The
    profile's errors are multiplied by these gains (``SensitivityProfile.step_gain``).
    """
    runs = _SingleActions(graph, profile, calibration)
    problem = runs.problem
    T, U = problem.num_steps, len(problem.units)
    if T < 3 or points < 2:
        return np.ones(T)
    kinds = [a for a, act in enumerate(problem.actions) if act.kind.value == "skip"]
    if not kinds:
        kinds = [a for a, act in enumerate(problem.actions) if act.kind.value == "reuse"]
    a = kinds[0]
    u = U // 2
    steps = sorted({int(round(x)) for x in np.linspace(1, T - 1, points)})
    xs, ys = [], []
    for t in steps:
        modelled = float(runs.errors[t, u, a])
        if modelled <= 0 or not runs.allowed[t, u, a]:
            continue
        measured = max(runs.measured(t, u, a), 1e-30)
        xs.append(t)
        ys.append(np.log(measured / modelled))
    if len(xs) < 2:
        return np.ones(T)
    gains = np.exp(np.interp(np.arange(T), xs, ys))
    return gains / gains.max()


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
    if probes <= 0:
        return {"spearman": None, "pvalue": None, "probes": [], "seconds": 0.0}
    t0 = time.perf_counter()
    runs = _SingleActions(graph, profile, calibration)
    problem = runs.problem
    T, U = problem.num_steps, len(problem.units)
    rng = random.Random(seed)
    candidates = [
        (t, u, a)
        for t in range(1, T)
        for u in range(U)
        for a, act in enumerate(problem.actions)
        if act != COMPUTE and runs.allowed[t, u, a]
    ]
    # Spread the probes over action kinds, then over steps and units.
    by_kind: dict[str, list] = {}
    for c in candidates:
        by_kind.setdefault(problem.actions[c[2]].kind.value, []).append(c)
    picks: list[tuple[int, int, int]] = []
    while len(picks) < probes and any(by_kind.values()):
        for k in sorted(by_kind):
            if by_kind[k] and len(picks) < probes:
                picks.append(by_kind[k].pop(rng.randrange(len(by_kind[k]))))
    rows = []
    for t, u, a in picks:
        action: Action = problem.actions[a]
        rows.append({"step": t, "unit": str(problem.units[u]), "action": str(action),
                     "modelled": float(runs.errors[t, u, a]), "measured": runs.measured(t, u, a)})
    rho, p = (None, None)
    if len(rows) >= 3:
        res = spearmanr([r["modelled"] for r in rows], [r["measured"] for r in rows])
        rho, p = float(res.statistic), float(res.pvalue)
    return {"spearman": rho, "pvalue": p, "probes": rows, "seconds": time.perf_counter() - t0}
