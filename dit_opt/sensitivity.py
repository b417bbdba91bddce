"""The sensitivity profile: modelled error of every action at every step and block.

A :class:`SensitivityProfile` is an artifact: measured once on calibration trajectories
(``passes.annotate_sensitivity``), saved as safetensors + JSON, and reused across budgets and
step counts. :meth:`SensitivityProfile.to_problem` turns it into a solver
:class:`~solvers.problem.Problem`.

Errors are relative squared perturbations of the block's output streams,
``||out_action - out||^2 / ||out||^2``, averaged over calibration samples and generations:
one scale for every action, so the solver can trade a reuse in one block against a narrower
MLP in another.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

from dit_opt import distributed
from dit_opt.errors import ArtifactError, ConfigError
from dit_opt.plan import Unit

__all__ = ["PROFILE_VERSION", "ACTION_FAMILIES", "DEFAULT_ACTIONS", "DEFAULT_MAX_AGE", "LONG_CACHE_BUDGET",
           "SHORT_MAX_AGE", "SensitivityProfile", "check_actions"]

#: Version of the saved profile format.
PROFILE_VERSION = 1

_OPTIONAL = ("step_gain", "e_module_reuse", "flops_module", "e_forecast", "e_module_skip", "e_module_prune",
             "flops_module_prune", "e_module_forecast", "e_cfg", "e_module_cfg", "e_step")
#: The action families a plan may use besides ``compute`` (``actions=`` of ``to_problem`` and ``optimize``).
ACTION_FAMILIES = ("reuse", "forecast", "prune", "width", "skip", "cfg")
#: The default ``actions``: every family (``cfg`` where the calibration ran guidance batches).
DEFAULT_ACTIONS = ACTION_FAMILIES
#: The oldest cache a profile measures by default (``max_age``): TaylorSeer's intervals up to 8
#: (computes ``max_age + 1`` apart) are then in the action space. At 4 (intervals up to 5), the
#: low budgets had only skips and long reuses left: on ``digits-dit`` at 0.2 and 0.25 the kept
#: plans measured 35.10 and 41.73 dB, with 7 40.63 and 44.65 (the benchmark's seeds). Plans at
#: high budgets use fewer (:data:`LONG_CACHE_BUDGET`).
DEFAULT_MAX_AGE = 7
#: Plans at budgets from this one up read caches at most :data:`SHORT_MAX_AGE` steps old (below
#: it, every age the profile measured). The older caches pay at low budgets and cost fidelity at
#: high ones, where the solvers' additive error model rates long reuses too well and CP-SAT's
#: larger problem stops further from its optimum: with every age up to 7 at every budget, the
#: kept plans measured 64.76 / 55.91 dB on ``digits-dit`` at 0.7 / 0.5 (65.60 / 57.14 at 4) and
#: 40.16 on ``crops-pixart`` at 0.7 (42.53 at 4), against 40.63 / 44.65 at 0.2 / 0.25 (35.10 /
#: 41.73 at 4) and 35.38 on ``digits-mmdit`` at 0.2 (26.26 at 4).
LONG_CACHE_BUDGET = 0.4
#: See :data:`LONG_CACHE_BUDGET`.
SHORT_MAX_AGE = 4


def check_actions(actions: Any) -> tuple[str, ...]:
    """``actions`` as a tuple if every entry is one of :data:`ACTION_FAMILIES`.

    Raises:
        ConfigError: a family that does not exist (the message lists the valid ones), or
            ``forecast`` without ``reuse`` (a forecast is a reuse extrapolated).
    """
    if isinstance(actions, str):
        actions = (actions,)
    out = tuple(actions)
    unknown = [a for a in out if a not in ACTION_FAMILIES]
    if unknown:
        raise ConfigError(f"unknown action families {unknown}; valid ones are {', '.join(ACTION_FAMILIES)} "
                          f"(compute is always allowed)")
    if "forecast" in out and "reuse" not in out:
        raise ConfigError("actions has 'forecast' without 'reuse': a forecast extrapolates a reused cache; "
                          "add 'reuse' or drop 'forecast'")
    return out


#: Module roles of the module-level units, in the order of ``e_module_reuse``'s third axis.
MODULE_ROLES = ("attn", "cross_attn", "mlp")
#: Share of a block's FLOPs its role modules must do for module-granularity plans to split it
#: into module units; a block below this is planned whole (:meth:`SensitivityProfile.whole_blocks`).
MODULE_COVERAGE = 0.9
_ARRAYS = ("e_reuse", "e_prune", "e_width", "e_skip", "flops_compute", "flops_reuse", "flops_prune", "flops_width")


def _rescaled_ages(errors: np.ndarray, near: np.ndarray, ratio: float) -> np.ndarray:
    """Errors with a cache-age axis third, ``(T_cal, X, M + 1, ...)``, for another schedule: step
    ``t`` takes the calibrated step ``near[t]``, age ``n`` the calibrated age ``round(n * ratio)``;
    ages that maps outside ``1 .. M`` get a huge error (1e6: never worth taking)."""
    M = errors.shape[2] - 1
    out = np.full((len(near), *errors.shape[1:]), 1e6)
    for n in range(1, M + 1):
        src = int(round(n * ratio))
        if 1 <= src <= M:
            out[:, :, n] = errors[near, :, src]
    return out


def _rescaled_forecasts(e_forecast: np.ndarray, near: np.ndarray, ratio: float) -> np.ndarray:
    """``e_forecast``-shaped errors ``(T_cal, X, K, M + 1, M + 1)`` for another schedule: step
    ``t`` takes the calibrated step ``near[t]``, ages and spacings rescaled by ``ratio``; a step
    too early for ``k + 1`` computes stays NaN."""
    T, K, M = len(near), e_forecast.shape[2], e_forecast.shape[-1] - 1
    out = np.full((T, *e_forecast.shape[1:]), np.nan)
    for k in range(1, K + 1):
        for n in range(1, M + 1):
            for d in range(1, M + 1):
                sn, sd = int(round(n * ratio)), int(round(d * ratio))
                if 1 <= sn <= M and 1 <= sd <= M:
                    ok = np.arange(T) - n - k * d >= 0
                    out[ok, :, k - 1, n, d] = e_forecast[near[ok], :, k - 1, sn, sd]
    return out


@dataclass
class SensitivityProfile:
    """Measured errors and modelled FLOPs per (step, unit, action).

    Attributes:
        units: the block units, in execution order.
        timesteps: the calibrated schedule's timestep values, one per step.
        max_age: oldest cache age measured.
        prune_rates, widths: the candidate pruning rates and MLP widths.
        e_reuse: ``(T, U, max_age + 1)``; ``e_prune``: ``(T, U, max_age + 1, K)`` (NaN where
            the block cannot be pruned); ``e_width``: ``(T, U, J)`` (NaN where no MLP can be
            narrowed); ``e_skip``: ``(T, U)``.
        e_forecast: ``(T, U, K, max_age + 1, max_age + 1)``: ``FORECAST`` of order ``k = 1 .. K``
            (third axis) at age ``n`` (fourth axis) extrapolating from ``k + 1`` computes ``d``
            steps apart (fifth axis); NaN where step ``t - n - k d`` would precede the first step.
            ``None`` in profiles made before it existed; profiles made before higher orders
            existed load with ``K = 1``.
        e_module_reuse: ``(T, U, 3, max_age + 1)``: ``REUSE`` of each block's attention,
            cross-attention and MLP outputs (``MODULE_ROLES``; NaN where a block has no such
            module); ``flops_module``: ``(U, 3)`` their FLOPs.
        e_module_skip: ``(T, U, 3)``: ``SKIP`` of each role's sub-modules (outputs replaced by
            zeros). ``None`` in profiles made before module ``SKIP`` existed.
        e_module_prune: ``(T, U, 3, max_age + 1, K)``: ``PRUNE`` of each role's sub-modules at
            each age and rate (NaN where the role cannot be pruned, see
            ``passes.rewrite_modules.module_token_input``); ``flops_module_prune``: ``(U, 3, K)``
            their FLOPs. ``None`` in profiles made before module ``PRUNE`` existed.
        e_cfg: ``(T, U, max_age + 1)``: ``CFG`` at age ``n``, the error of deriving half
            ``cfg_branch`` of each guidance batch from the other half plus the difference of the
            two halves' residuals ``n`` steps earlier. ``None`` where the calibration ran no
            guidance batches (both halves of ``hidden_states`` equal), or in older profiles.
        e_module_cfg: ``(T, U, 3, max_age + 1)``: ``CFG`` of each role's sub-modules (their outputs on
            half ``cfg_branch`` derived from the other half's plus the halves' difference ``n``
            steps earlier); ``None`` with ``e_cfg``, or in profiles made before module ``CFG`` existed.
        e_step: ``(T, K + 1, max_age + 1, max_age + 1)``: ``STEP``, the whole step forecast of order
            ``k = 0 .. K`` (the index; 0: the output reused, the same at every ``d``) at age ``n``
            from the model's outputs ``d`` steps apart, relative to the model's
            output (NaN where not available); ``None`` in profiles made before it existed.
        cfg_branch: the derived half (0 or 1): the one whose output the sampler weighs less
            in its guided update (the unconditional one), measured from the calibration's
            steps (``None`` with ``e_cfg``).
        flops_*: FLOPs of one call per unit (from the cost model), shapes ``(U,)`` or ``(U, K)``/``(U, J)``.
        flops_fixed: FLOPs outside the blocks, per call.
        channel_order: per ``"<block>.<mlp>"``, hidden channels from most to least important.
        step_gain: ``(T,)`` how much a local error at each step grows into the final output
            (``dit_opt.validation.measure_step_gains``); the errors handed to the
            solver are multiplied by it. ``None``: all steps weigh the same.
        model: class name, config and weight fingerprint of the profiled model.
        report: how the profile was made (cost, samples, rank correlation, ...).
    """

    units: tuple[Unit, ...]
    timesteps: tuple[float, ...]
    max_age: int
    prune_rates: tuple[float, ...]
    widths: tuple[float, ...]
    e_reuse: np.ndarray
    e_prune: np.ndarray
    e_width: np.ndarray
    e_skip: np.ndarray
    flops_compute: np.ndarray
    flops_reuse: np.ndarray
    flops_prune: np.ndarray
    flops_width: np.ndarray
    flops_fixed: float
    e_module_reuse: np.ndarray | None = None
    e_forecast: np.ndarray | None = None
    flops_module: np.ndarray | None = None
    e_module_skip: np.ndarray | None = None
    e_module_prune: np.ndarray | None = None
    flops_module_prune: np.ndarray | None = None
    e_module_forecast: np.ndarray | None = None
    e_cfg: np.ndarray | None = None
    e_module_cfg: np.ndarray | None = None
    e_step: np.ndarray | None = None
    cfg_branch: int | None = None
    channel_order: dict[str, torch.Tensor] = field(default_factory=dict)
    step_gain: np.ndarray | None = None
    model: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    # ---- to a solver problem ---------------------------------------------------------------
    def planned_max_age(self, budget: float, max_age: int | None = None) -> int:
        """The oldest cache a plan at ``budget`` may read: ``max_age`` if given (at most the
        profile's), else the profile's below :data:`LONG_CACHE_BUDGET` and at most
        :data:`SHORT_MAX_AGE` from it up.

        Raises:
            ConfigError: ``max_age`` is above what the profile measured, or not a positive int.
        """
        if max_age is None:
            return self.max_age if budget < LONG_CACHE_BUDGET else min(self.max_age, SHORT_MAX_AGE)
        if isinstance(max_age, bool) or not isinstance(max_age, int) or not 1 <= max_age <= self.max_age:
            raise ConfigError(f"max_age={max_age!r}: the profile measured caches up to {self.max_age} steps old; "
                              f"give an int in 1..{self.max_age}, or profile again with a larger max_age")
        return max_age

    def to_problem(self, budget: float, *, num_steps: int | None = None, timesteps: Any = None,
                   actions: tuple[str, ...] = DEFAULT_ACTIONS,
                   granularity: str = "block", max_age: int | None = None) -> Any:
        """The solver :class:`~solvers.problem.Problem` at ``budget``.

        Args:
            budget: FLOP fraction in (0, 1].
            timesteps: the schedule to plan for, if it differs from the calibrated one; errors
                are taken from the calibrated step nearest in timestep value, and cache ages
                are rescaled by the ratio of step sizes (no re-profiling).
            num_steps: shorthand when only the count differs: the calibrated range is
                resampled evenly to ``num_steps`` steps.
            actions: action families offered to the solver besides ``compute``; ``forecast``
                (with ``reuse``) lets a plan's ``REUSE`` steps extrapolate from the unit's last
                computes (orders 1 .. 3) where that is measured to be better.
            granularity: ``"block"`` (units are blocks) or ``"module"`` (units are each block's
                attention, cross-attention and MLP: ``REUSE`` of their outputs, ``SKIP`` (zeros),
                ``FORECAST`` of their outputs, ``PRUNE`` where the module can be pruned and
                ``WIDTH`` for MLPs; the rest of each block is always computed; profiles made
                before module ``SKIP``/``PRUNE``/``FORECAST`` existed offer only ``REUSE`` and ``WIDTH``).
            max_age: the oldest cache the plan may read (:meth:`planned_max_age`; default: by
                the budget).
        """
        from solvers.problem import Problem

        ages = self.planned_max_age(budget, max_age)
        if granularity == "module":
            return self._module_problem(budget, num_steps, timesteps, check_actions(actions)).with_max_age(ages)
        if granularity != "block":
            raise ConfigError(f"granularity must be 'block' or 'module', got {granularity!r}")

        e_reuse, e_prune, e_width, e_skip, ts, gain, e_forecast, e_cfg = self._errors_for(num_steps, timesteps)
        T, U = e_skip.shape
        if gain is not None:
            e_cfg = None if e_cfg is None else e_cfg * gain[:, None, None]
            e_reuse = e_reuse * gain[:, None, None]
            e_forecast = None if e_forecast is None else e_forecast * gain[:, None, None, None, None]
            e_prune = e_prune * gain[:, None, None, None]
            e_width = e_width * gain[:, None, None]
            e_skip = e_skip * gain[:, None]
        actions = check_actions(actions)
        inf_safe = 1e6  # a huge error where an action does not apply; it is also disallowed
        prunable = ~np.isnan(e_prune).all(axis=(0, 2, 3)) if e_prune.size else np.zeros(U, bool)
        narrowable = ~np.isnan(e_width).all(axis=(0, 2)) if e_width.size else np.zeros(U, bool)
        use_prune = "prune" in actions and bool(self.prune_rates) and prunable.any()
        use_width = "width" in actions and bool(self.widths) and narrowable.any()
        kw: dict[str, Any] = {}
        tile = lambda a: np.broadcast_to(a, (T, *a.shape)).copy()  # noqa: E731
        if "reuse" in actions:
            kw.update(e_reuse=e_reuse, flops_reuse=tile(self.flops_reuse))
            if "forecast" in actions and e_forecast is not None:
                kw.update(e_forecast=np.nan_to_num(e_forecast, nan=np.inf))
        if use_prune:
            kw.update(prune_rates=self.prune_rates, e_prune=np.nan_to_num(e_prune, nan=inf_safe),
                      flops_prune=tile(self.flops_prune))
        if use_width:
            kw.update(widths=self.widths, e_width=np.nan_to_num(e_width, nan=inf_safe),
                      flops_width=tile(self.flops_width))
        if "skip" in actions:
            kw.update(e_skip=e_skip)
        if "cfg" in actions and e_cfg is not None:
            # the unit runs on half the batch: half its FLOPs (attention included: it is per sample)
            kw.update(e_cfg=np.nan_to_num(e_cfg, nan=inf_safe), flops_cfg=tile(self.flops_compute / 2),
                      cfg_branch=self.cfg_branch)
        if "forecast" in actions and self.e_step is not None and (
                timesteps is None and (num_steps is None or num_steps == self.num_steps)):
            # the whole step forecast, on the calibrated schedule only (STEP rows are made by
            # solvers.uniform's whole rhythms, never by a re-solve for another schedule)
            kw.update(e_step=np.nan_to_num(self.e_step if gain is None else self.e_step * gain[:, None, None, None],
                                           nan=np.inf))
        problem = Problem(units=self.units, num_steps=T, max_age=self.max_age, budget=budget,
                          flops_compute=tile(self.flops_compute), flops_fixed=float(self.flops_fixed) * T,
                          timesteps=tuple(ts), **kw)
        allowed = problem.allowed.copy()
        names = [str(a) for a in problem.actions]
        for a, name in enumerate(names):
            if name.startswith("P"):
                allowed[..., a] &= prunable if allowed.ndim == 2 else prunable[None, :]
            if name.startswith("W"):
                allowed[..., a] &= narrowable if allowed.ndim == 2 else narrowable[None, :]
        return dataclasses.replace(problem, allowed=allowed).with_max_age(ages)

    def _module_problem(self, budget: float, num_steps: int | None, timesteps: Any, actions: tuple[str, ...]) -> Any:
        from solvers.problem import Problem

        if self.e_module_reuse is None or self.flops_module is None:
            raise ValueError("this profile has no module-level errors; profile the model again")
        # the block-level problem: its timesteps and (step-gain scaled) MLP width errors, and the
        # units of the blocks planned whole
        block = self.to_problem(budget, num_steps=num_steps, timesteps=timesteps, actions=actions,
                                max_age=self.max_age)  # every measured age: the caller cuts them
        T, M = block.num_steps, self.max_age
        cal = np.asarray(self.timesteps, dtype=np.float64)
        near = np.abs(cal[None, :] - np.asarray(block.timesteps)[:, None]).argmin(axis=1)
        whole = self.whole_blocks()
        pairs = [(u, r) for u in range(len(self.units)) if u not in whole for r in range(len(MODULE_ROLES))
                 if not np.isnan(self.flops_module[u, r])]
        if not pairs:
            return block
        units = tuple(Unit(self.units[u].list_name, self.units[u].index, MODULE_ROLES[r]) for u, r in pairs)
        fm = np.array([self.flops_module[u, r] for u, r in pairs])
        # norms, modulation, ... of the blocks planned by module: always computed
        rest = float(sum(self.flops_compute[u] for u in {u for u, _ in pairs}) - fm.sum())
        e_reuse = np.stack([self.e_module_reuse[near][:, u, r] for u, r in pairs], axis=1)
        rescale = block.num_steps != len(cal) or np.any(near != np.arange(len(near)))
        ratio = self._age_ratio(block.timesteps)
        if rescale:  # ages rescaled like the block problem does
            e_reuse = _rescaled_ages(np.stack([self.e_module_reuse[:, u, r] for u, r in pairs], axis=1), near, ratio)
        kw: dict[str, Any] = {}
        if "reuse" in actions:
            # a module REUSE returns the cached output: no arithmetic at all
            kw.update(e_reuse=np.nan_to_num(e_reuse, nan=1e6), flops_reuse=np.zeros((T, len(pairs))))
            if "forecast" in actions and self.e_module_forecast is not None:
                e_fc = np.stack([self.e_module_forecast[:, u, r] for u, r in pairs], axis=1)
                e_fc = _rescaled_forecasts(e_fc, near, ratio) if rescale else e_fc[near]
                kw.update(e_forecast=np.nan_to_num(e_fc, nan=np.inf))
        if "skip" in actions and self.e_module_skip is not None:
            kw.update(e_skip=np.nan_to_num(np.stack([self.e_module_skip[near][:, u, r] for u, r in pairs], axis=1),
                                           nan=1e6))
        prunable = np.zeros(len(pairs), bool)
        if "prune" in actions and self.e_module_prune is not None and self.flops_module_prune is not None:
            prunable = np.array([not np.isnan(self.flops_module_prune[u, r]).any() for u, r in pairs])
        if prunable.any() and self.prune_rates:
            e_prune = np.stack([self.e_module_prune[near][:, u, r] for u, r in pairs], axis=1)
            # ages at which module PRUNE is not measured (MODULE_PRUNE_MAX_AGE): the reuse error at
            # that age, which a prune (recomputing some tokens) is not expected to exceed; at more
            # FLOPs than the reuse the solver never takes it there. (A huge placeholder instead
            # would set the solvers' error scale and round every small error to nothing.)
            unmeasured = np.isnan(e_prune) & prunable[None, :, None, None]
            e_prune = np.where(unmeasured, np.nan_to_num(e_reuse, nan=1e6)[..., None], e_prune)
            # a module that cannot be pruned: any finite FLOPs and error (PRUNE is not allowed there)
            fp = np.stack([self.flops_module_prune[u, r] if ok else np.full(len(self.prune_rates), fm[i])
                           for i, ((u, r), ok) in enumerate(zip(pairs, prunable, strict=True))])
            kw.update(prune_rates=self.prune_rates, e_prune=np.nan_to_num(e_prune, nan=1e6),
                      flops_prune=np.broadcast_to(fp, (T, *fp.shape)).copy())
        if "cfg" in actions and self.e_module_cfg is not None and self.cfg_branch is not None:
            e_cfg = np.stack([self.e_module_cfg[:, u, r] for u, r in pairs], axis=1)
            e_cfg = _rescaled_ages(e_cfg, near, ratio) if rescale else e_cfg[near]
            # the sub-modules run on half the batch: half their FLOPs
            kw.update(e_cfg=np.nan_to_num(e_cfg, nan=1e6), flops_cfg=np.broadcast_to(fm / 2, (T, len(pairs))).copy(),
                      cfg_branch=self.cfg_branch)
        gain = None if self.step_gain is None else np.asarray(self.step_gain, dtype=np.float64)[near]
        if gain is not None:  # as in the block problem (WIDTH's errors come from it already scaled)
            for name in ("e_reuse", "e_skip", "e_prune", "e_forecast", "e_cfg"):
                if name in kw:
                    kw[name] = kw[name] * gain.reshape(-1, *[1] * (kw[name].ndim - 1))
        mlp = [i for i, (u, r) in enumerate(pairs) if MODULE_ROLES[r] == "mlp"]
        if "width" in actions and block.e_width is not None and mlp:
            J = len(self.widths)
            e_width = np.full((T, len(pairs), J), 1e6)
            flops_width = np.broadcast_to(fm[None, :, None], (T, len(pairs), J)).copy()
            for i in mlp:
                e_width[:, i] = np.nan_to_num(block.e_width[:, pairs[i][0]], nan=1e6)
                flops_width[:, i] = fm[i] * np.asarray(self.widths)[None, :]
            kw.update(widths=self.widths, e_width=e_width, flops_width=flops_width)
        problem = Problem(units=units, num_steps=T, max_age=M, budget=budget,
                          flops_compute=np.broadcast_to(fm, (T, len(pairs))).copy(),
                          flops_fixed=(float(self.flops_fixed) + rest) * T, timesteps=block.timesteps,
                          e_step=block.e_step, **kw)
        allowed = problem.allowed.copy()
        for a, act in enumerate(problem.actions):
            if str(act).startswith("W"):
                ok = np.array([MODULE_ROLES[r] == "mlp" for _, r in pairs])
                allowed[..., a] &= ok if allowed.ndim == 2 else ok[None, :]
            if str(act).startswith("P"):
                allowed[..., a] &= prunable if allowed.ndim == 2 else prunable[None, :]
        problem = dataclasses.replace(problem, allowed=allowed)
        if not whole:
            return problem
        from solvers.problem import join_units

        # blocks planned whole sit among the module units in block order (the plan reads alike)
        columns: dict[int, list[int]] = {}
        for i, (u, _) in enumerate(pairs):
            columns.setdefault(u, []).append(i)
        parts = [(block, [u]) if u in whole else (problem, columns[u])
                 for u in range(len(self.units)) if u in whole or u in columns]
        return join_units(parts, flops_fixed=problem.flops_fixed)

    def whole_blocks(self) -> set[int]:
        """Indices of the blocks that module-granularity plans treat as one unit: those whose
        attention, cross-attention and MLP modules do less than ``MODULE_COVERAGE`` of the
        block's FLOPs (a block with a large projection outside every role), so that serving
        those modules from a cache would still leave most of the block to compute."""
        if self.flops_module is None:
            return set()
        covered = np.nansum(self.flops_module, axis=1)
        return {u for u in range(len(self.units)) if covered[u] < MODULE_COVERAGE * self.flops_compute[u]}

    def _errors_for(self, num_steps: int | None, timesteps: Any):
        cal = np.asarray(self.timesteps, dtype=np.float64)
        gain = None if self.step_gain is None else np.asarray(self.step_gain, dtype=np.float64)
        if timesteps is None and (num_steps is None or num_steps == len(cal)):
            return self.e_reuse, self.e_prune, self.e_width, self.e_skip, cal, gain, self.e_forecast, self.e_cfg
        if timesteps is None:
            ts = np.linspace(cal[0], cal[-1], int(num_steps))
        else:
            ts = np.asarray([float(t) for t in timesteps], dtype=np.float64)
        near = np.abs(cal[None, :] - ts[:, None]).argmin(axis=1)
        ratio = self._age_ratio(ts)
        e_reuse = _rescaled_ages(self.e_reuse, near, ratio)
        e_prune = _rescaled_ages(self.e_prune, near, ratio)
        e_prune[np.isnan(self.e_prune[near])] = np.nan
        e_forecast = None if self.e_forecast is None else _rescaled_forecasts(self.e_forecast, near, ratio)
        e_cfg = None if self.e_cfg is None else _rescaled_ages(self.e_cfg, near, ratio)
        return (e_reuse, e_prune, self.e_width[near], self.e_skip[near], ts, None if gain is None else gain[near],
                e_forecast, e_cfg)

    def _age_ratio(self, timesteps: Any) -> float:
        """Mean step size of ``timesteps`` over the calibrated one's: cache ages scale by it."""
        cal = np.asarray(self.timesteps, dtype=np.float64)
        ts = np.asarray([float(t) for t in timesteps], dtype=np.float64)
        cal_step = float(np.abs(np.diff(cal)).mean()) if len(cal) > 1 else 1.0
        new_step = float(np.abs(np.diff(ts)).mean()) if len(ts) > 1 else cal_step
        return new_step / cal_step if cal_step else 1.0

    def tables(self) -> dict[str, np.ndarray]:
        """Every error and FLOP table the profile holds (those it measured), by name, as saved."""
        return {name: np.asarray(getattr(self, name)) for name in (*_ARRAYS, *_OPTIONAL)
                if getattr(self, name) is not None}

    # ---- artifact --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``profile.safetensors`` and ``profile.json`` into directory ``path``.

        Each file is written whole under a temporary name and then renamed, the JSON last (a save
        that stops leaves the previous profile, or none, never half of one). Under
        ``torch.distributed`` only rank 0 writes (every rank holds the same profile).
        """
        path = Path(path)
        if not distributed.is_writer():
            return path
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: np.ascontiguousarray(table, dtype=np.float64) for name, table in self.tables().items()}
        for k, v in self.channel_order.items():
            tensors[f"order/{k}"] = v.cpu().numpy().astype(np.int64)
        partial = path / "profile.safetensors.partial"
        save_np(tensors, str(partial))
        partial.replace(path / "profile.safetensors")
        meta = {
            "version": PROFILE_VERSION,
            "units": [str(u) for u in self.units],
            "timesteps": list(self.timesteps),
            "max_age": self.max_age,
            "prune_rates": list(self.prune_rates),
            "widths": list(self.widths),
            "flops_fixed": self.flops_fixed,
            "cfg_branch": self.cfg_branch,
            "model": self.model,
            "report": self.report,
        }
        partial = path / "profile.json.partial"
        partial.write_text(json.dumps(meta, indent=1))
        partial.replace(path / "profile.json")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SensitivityProfile:
        """Read a profile written by :meth:`save`.

        Raises:
            ArtifactError: files missing, corrupt, of another version or inconsistent.
        """
        path = Path(path)
        try:
            meta = json.loads((path / "profile.json").read_text())
            arrays = load_np(str(path / "profile.safetensors"))
        except FileNotFoundError as e:
            raise ArtifactError(f"{path}: no saved profile there ({e.filename} is missing); "
                                f"write one with profile.save(dir) or dit-opt profile") from e
        except Exception as e:
            raise ArtifactError(f"{path}: the saved profile is corrupt ({type(e).__name__}: {e}); "
                                f"delete it and profile the model again") from e
        if meta.get("version") != PROFILE_VERSION:
            raise ArtifactError(f"{path}: profile format version {meta.get('version')!r}, this dit-opt reads "
                                f"version {PROFILE_VERSION}; profile the model again")
        try:
            prof = cls(
                units=tuple(Unit.parse(u) for u in meta["units"]),
                timesteps=tuple(float(t) for t in meta["timesteps"]),
                max_age=int(meta["max_age"]),
                prune_rates=tuple(meta["prune_rates"]),
                widths=tuple(meta["widths"]),
                flops_fixed=float(meta["flops_fixed"]),
                cfg_branch=meta.get("cfg_branch"),
                channel_order={k[6:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("order/")},
                **{name: arrays.get(name) for name in _OPTIONAL},
                model=meta.get("model", {}),
                report=meta.get("report", {}),
                **{name: arrays[name] for name in _ARRAYS},
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ArtifactError(f"{path}: the saved profile is incomplete ({type(e).__name__}: {e}); "
                                f"profile the model again") from e
        if prof.e_forecast is not None and prof.e_forecast.ndim == 4:
            prof.e_forecast = prof.e_forecast[:, :, None]  # saved before higher orders: order 1 only
        T, U = len(prof.timesteps), len(prof.units)
        if (prof.e_cfg is None) != (prof.cfg_branch is None):
            raise ArtifactError(f"{path}: the saved profile has CFG errors without their branch (or the other "
                                f"way round); profile the model again")
        if prof.e_module_cfg is not None and prof.e_cfg is None:
            raise ArtifactError(f"{path}: the saved profile has module CFG errors without block ones; "
                                f"profile the model again")
        if (prof.e_skip.shape != (T, U) or prof.e_reuse.shape != (T, U, prof.max_age + 1)
                or (prof.e_cfg is not None and prof.e_cfg.shape != prof.e_reuse.shape)
                or (prof.e_module_cfg is not None and prof.e_module_cfg.shape[:2] + prof.e_module_cfg.shape[3:]
                    != prof.e_reuse.shape)):
            raise ArtifactError(f"{path}: array shapes do not match {T} steps x {U} units; profile again")
        return prof
