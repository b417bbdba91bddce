"""Closed-loop plan search: the solver's plan re-solved with errors measured on its own trajectory.

The profile measures each action's error alone, on the full model's trajectory, and the solver
adds them up. A plan's real error differs step by step: several units served from caches at one
step compound, and the plan's own drift moves the inputs its caches and forecasts meet. This
module measures that difference where it arises and gives it back to the solver:

1. Run the calibration with the plan (eager), and after every call of it run the full model on
   the same inputs (on the side: the plan's trajectory is unchanged). The relative error of
   the plan's output against the full model's, per step, is the error the plan makes at that
   step on its own trajectory (:func:`on_policy_errors`).
2. Divide it by the error the problem models for the plan at that step
   (:meth:`solvers.problem.Problem.step_errors`): one correction per step
   (:func:`corrections`; steps where the plan computes everything get theirs interpolated from
   their neighbours).
3. Re-solve with every error at step ``t`` multiplied by the step's correction to the power
   :data:`DAMPING` (:meth:`~solvers.problem.Problem.weighted`), run the new plan the same way,
   and repeat while its calibration error improves, at most :data:`ROUNDS` times. Corrections
   measured in earlier rounds are kept (their geometric mean per step), so that a step the new
   plan computes in full keeps what was measured there before.

Each round costs a solve, one calibration run of the plan and one of the full model beside it.
``optimize(..., closed_loop=True)`` runs it from the solver's plan, next to the other candidates
of :func:`dit_opt.selection.candidate_plans`, and keeps whichever plan measures best. It is off
by default: on the reference models it improves the solver's own plan on ``digits-mmdit`` and
makes it worse on ``digits-dit``, and the kept plan is a measured rhythm there either way
(``docs/solvers.md``, "Closed-loop search").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dit_opt.calibration import returned_tensors
from dit_opt.errors import ConfigError
from dit_opt.executor import model_sample
from dit_opt.plan import Plan
from dit_opt.selection import measure_outputs

__all__ = ["ROUNDS", "DAMPING", "OnPolicy", "OtherLoopError", "check_rounds", "on_policy_errors", "corrections",
           "step_weights", "refine"]

#: Most re-solves per ``optimize`` (each costs a calibration run of the plan and one of the full
#: model beside it); the loop stops earlier when the calibration error stops improving.
ROUNDS = 3

#: How far each re-solve moves the step weights towards the measured corrections (in log space:
#: ``weights = corrections ** DAMPING``). Going all the way overshoots on ``digits-mmdit`` at
#: budget 0.5 (its second round measures worse than its first); half way, it improves at each of
#: three there, and further (``docs/solvers.md``, ``examples/closed_loop.py --damping``).
DAMPING = 0.5

#: Steps whose modelled or measured error is below this share of the plan's largest are taken as
#: exact (computed in full): their correction is interpolated, not measured.
_EXACT_SHARE = 1e-6


def check_rounds(value: Any) -> int:
    """The number of re-solves ``optimize(closed_loop=value)`` asks for: ``True`` is :data:`ROUNDS`,
    ``False`` none.

    Raises:
        ConfigError: not a bool or an int >= 0.
    """
    if isinstance(value, bool):
        return ROUNDS if value else 0
    if isinstance(value, int) and value >= 0:
        return value
    raise ConfigError(f"closed_loop must be True, False or a number of re-solves >= 0, got {value!r}")


class OtherLoopError(ValueError):
    """The calibration ran a loop the plan was not made for (another number of steps): its
    errors cannot be set against the plan's."""


@dataclass(frozen=True)
class OnPolicy:
    """One calibration run of a plan with the full model beside it.

    Attributes:
        outputs: what :func:`dit_opt.selection.measure_outputs` compares (the calibration's return
            value, or the module's outputs at every call).
        step_errors: ``(T,)`` relative squared error of the plan's output against the full model's
            on the same inputs, per step (pooled over calls and generations); ``nan`` where no
            call ran that step.
    """

    outputs: list[torch.Tensor]
    step_errors: np.ndarray


def on_policy_errors(calibration: Callable[[nn.Module], Any], module: nn.Module, model: nn.Module,
                     num_steps: int) -> OnPolicy:
    """Run ``calibration(module)`` once; after each call of ``module`` (an eager
    :class:`~dit_opt.runtime.OptimizedTransformer`), ``model`` on the same inputs.

    Raises:
        OtherLoopError: ``module`` ran a loop the plan was not made for (it ran a plan
            re-solved for that loop's schedule).
    """
    num, den = np.zeros(num_steps), np.zeros(num_steps)

    def beside(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        got = returned_tensors(model_sample(out))
        full = returned_tensors(model_sample(model(*args, **kwargs)))
        step = mod.stats()["steps"][-1]["step"]
        if mod.active_plan is not mod.plan or not 0 <= step < num_steps:
            raise OtherLoopError(f"the calibration ran a loop of another schedule (a plan re-solved for "
                                 f"{mod.active_plan.num_steps} steps, not the plan's {num_steps})")
        for g, f in zip(got, full, strict=True):
            num[step] += float((g - f).pow(2).sum())
            den[step] += float(f.pow(2).sum())

    outputs = measure_outputs(calibration, module, beside)
    with np.errstate(invalid="ignore", divide="ignore"):
        errors = np.where(den > 0, num / np.maximum(den, 1e-30), np.nan)
    return OnPolicy(outputs, errors)


def corrections(measured: np.ndarray, modelled: np.ndarray) -> np.ndarray:
    """``(T,)`` per-step log factors ``log(measured / modelled)``, ``nan`` where either is ~0 (a
    step computed in full) or not measured."""
    measured, modelled = np.asarray(measured, dtype=np.float64), np.asarray(modelled, dtype=np.float64)
    scale_m = np.where(np.isfinite(measured), measured, 0.0).max(initial=0.0)
    scale_e = modelled.max(initial=0.0)
    ok = np.isfinite(measured) & (measured > _EXACT_SHARE * scale_m) & (modelled > _EXACT_SHARE * scale_e)
    out = np.full(len(measured), np.nan)
    if scale_m > 0 and scale_e > 0:
        out[ok] = np.log(measured[ok] / modelled[ok])
    return out


def step_weights(logs: list[np.ndarray]) -> np.ndarray | None:
    """Per-step weights from the log factors of every round so far (:func:`corrections`): at each
    step the geometric mean of the rounds that measured it, interpolated (in log space, from the
    nearest measured steps) at the others, to the power :data:`DAMPING`, normalised to a
    geometric mean of 1; ``None`` where no step was measured."""
    stack = np.asarray(logs, dtype=np.float64)
    measured = np.isfinite(stack).any(axis=0)
    if not measured.any():
        return None
    steps = np.arange(stack.shape[1])
    mean = np.nanmean(stack[:, measured], axis=0)
    out = DAMPING * np.interp(steps, steps[measured], mean)
    return np.exp(out - out.mean())


def refine(plan: Plan, problem: Any, solve: Callable[[Any], Plan], run: Callable[[Plan], OnPolicy],
           error: Callable[[list[torch.Tensor]], float], rounds: int = ROUNDS) -> list[tuple[Plan, float]]:
    """Re-solve ``plan`` (a plan of ``problem``) with per-step corrections measured on its own
    trajectory, while the calibration error improves.

    Args:
        plan: the starting plan (the solver's).
        problem: its problem (budget and errors as the solver saw them).
        solve: the solver (a problem in, a plan out).
        run: a plan's on-policy run (:func:`on_policy_errors` through the calibration).
        error: a calibration run's error against the full model's (the selection's metric).
        rounds: most re-solves.

    Returns:
        ``plan`` and every re-solved plan, each with its measured error, in order (the re-solved
        ones named ``<solver>+closed<k>``); the loop stops at the first that does not improve
        on the one before, or that repeats an earlier plan.
    """
    current = run(plan)
    best = error(current.outputs)
    out: list[tuple[Plan, float]] = [(plan, best)]
    logs: list[np.ndarray] = []
    seen = {plan.actions}
    actions = plan.actions
    for k in range(1, rounds + 1):
        logs.append(corrections(current.step_errors, problem.step_errors(actions)))
        weights = step_weights(logs)
        if weights is None:
            break
        solved = solve(problem.weighted(weights))
        new = problem.to_plan(solved.actions, f"{plan.solver}+closed{k}", solved.status, solved.wall_time_s,
                              solved.gap)
        if new.actions in seen:
            break
        seen.add(new.actions)
        current = run(new)
        measured = error(current.outputs)
        out.append((new, measured))
        if not math.isfinite(measured) or measured >= best:
            break
        best, actions = measured, new.actions
    return out
