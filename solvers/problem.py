"""The optimisation problem: per (step, unit, action) its FLOPs and modelled error, and the rules.

A :class:`Problem` is what the sensitivity profile and the cost model produce and what every
solver consumes. Actions come in families; a family that is not profiled is ``None``:

======================  ===============================  ======================================
action                  error                            FLOPs
======================  ===============================  ======================================
``COMPUTE``             0                                ``flops_compute[t, u]``
``REUSE`` (age n)       ``e_reuse[t, u, n]``             ``flops_reuse[t, u]``
``FORECAST`` k (n, d)   ``e_forecast[t, u, k-1, n, d]``  ``flops_reuse[t, u]``
``PRUNE(rate k)`` (n)   ``e_prune[t, u, n, k]``          ``flops_prune[t, u, k]``
``WIDTH(width j)``      ``e_width[t, u, j]``             ``flops_width[t, u, j]``
``SKIP``                ``e_skip[t, u]``                 0
``CFG`` (age n)         ``e_cfg[t, u, n]``               ``flops_cfg[t, u]``
======================  ===============================  ======================================

``CFG`` (one menu entry, deriving half ``cfg_branch`` of a guidance batch) runs the unit on the
other half and serves the derived half from the difference of the halves' residuals cached at
the unit's last ``COMPUTE``; like ``PRUNE`` it reads the cache and does not refresh it.

``FORECAST`` of order ``k`` is ``REUSE`` with the residual extrapolated by the polynomial through
the unit's last ``k + 1`` computes; its error is measured at age ``n`` from computes ``d`` steps
apart (for ``k >= 2``, evenly ``d`` apart). It is not a menu entry. Solvers see, in the ``REUSE``
column of :attr:`Problem.error_table`, the smallest of the reuse error and, over the orders, the
forecast error for a typical spacing (the mean over ``d`` in ``n + 1 .. max_age``: spacings as
long as the interval itself), and :meth:`Problem.to_plan` then turns each ``REUSE`` into the
``FORECAST`` order that, with the plan's actual spacing, is measured best, where it beats the
reuse. Plans with forecasts are therefore never worse in modelled error than the same plan
without.

The age ``n`` of a cache is the number of steps since the unit's last ``COMPUTE``
(``1 <= n <= max_age``); column 0 of ``e_reuse``/``e_prune`` is unused. Errors add up over
steps and units. ``full_flops = sum(flops_compute) + flops_fixed``; a plan is feasible when its
FLOPs are ``<= budget * full_flops`` (checked in floats, exactly as :meth:`Plan.validate` does).

Integer scaling (shared by every exact solver, so DP and CP-SAT see the same feasible set): FLOPs
are counted in quanta ``q``. When all FLOP values are integers (as FlopCounterMode gives) ``q`` is
their greatest common divisor and the scaling is exact; otherwise ``q`` is a power of two near
``full_flops / 2**30`` and every rounding is conservative. The budget is written as a *saving*
against full compute: action ``a`` saves ``floor(flops_compute / q) - ceil(flops_a / q)`` quanta
(``COMPUTE`` saves exactly 0), and a plan must save at least :meth:`Problem.need_quanta` quanta,
derived from the budget with exact rational arithmetic. Every integer-feasible plan is therefore
feasible in floats; the conservatism is at most ``2 q`` per (step, unit), i.e. < 1e-5 of the
full FLOPs for a 50 x 84 problem, and zero with integer FLOPs.

Example:
    >>> p = Problem(units=(Unit("blocks", 0),), num_steps=3, max_age=2, budget=0.7,
    ...             flops_compute=np.full((3, 1), 10.0), e_reuse=np.ones((3, 1, 3)),
    ...             flops_reuse=np.zeros((3, 1)))
    >>> p.min_feasible_budget()
    0.3333333333333333
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import cached_property, reduce
from types import SimpleNamespace

import numpy as np

from dit_opt.errors import InfeasibleBudgetError
from dit_opt.plan import (
    COMPUTE,
    MAX_FORECAST_ORDER,
    REUSE,
    SKIP,
    Action,
    ActionKind,
    Plan,
    Unit,
    after_step,
    cfg_action,
    check_budget,
    step_forecasts,
)

__all__ = ["Problem", "min_cost_sequences", "infeasible_error", "join_units"]

#: Values of :attr:`Problem.forecast_policy`.
FORECAST_POLICIES = ("measured", "always")

_MAX_EXACT_QUANTA = 2**40  # integer FLOP scaling used as is when full_flops / gcd stays below this
_FALLBACK_QUANTA = 2**30  # otherwise ~this many quanta in full_flops


@dataclass(frozen=True, eq=False)
class Problem:
    """FLOPs and modelled errors of every action at every (step, unit), and the FLOP budget.

    Attributes:
        units: the ``U`` units.
        num_steps: number of denoising steps ``T``.
        max_age: oldest cache (steps since the last ``COMPUTE``) that ``REUSE``/``PRUNE`` may read.
        budget: FLOP fraction in (0, 1].
        flops_compute: ``(T, U)`` FLOPs of computing each unit.
        flops_fixed: FLOPs outside the units (embeddings, final layer) over the loop, spent at
            every step (``flops_fixed / num_steps`` each) but a ``STEP`` one.
        e_reuse, flops_reuse: ``(T, U, max_age + 1)`` and ``(T, U)``, or ``None`` (no REUSE).
        prune_rates: fractions of tokens recomputed by ``PRUNE``, one per index ``k``.
        e_prune, flops_prune: ``(T, U, max_age + 1, K)`` and ``(T, U, K)``, or ``None``.
        widths: MLP prefix widths of ``WIDTH``, one per index ``j``.
        e_width, flops_width: ``(T, U, J)`` each, or ``None``.
        e_skip: ``(T, U)`` or ``None`` (no SKIP).
        e_forecast: ``(T, U, K, max_age + 1, max_age + 1)`` error of ``FORECAST`` of order
            ``k = 1 .. K`` at age ``n`` from computes ``d`` steps apart (``inf`` where not
            available), or ``None`` (no forecasts). A ``(T, U, max_age + 1, max_age + 1)`` array
            is order 1 only. Needs ``e_reuse``.
        e_cfg, flops_cfg: ``(T, U, max_age + 1)`` and ``(T, U)``, or ``None`` (no CFG): the
            action that derives half ``cfg_branch`` (0 or 1) of a classifier-free-guidance batch.
        allowed: ``(U, A)`` or ``(T, U, A)`` booleans over :attr:`actions`, or ``None``: all
            allowed except ``WIDTH`` on units that are not an MLP or a whole block.
        timesteps: scheduler timestep value of each step, if known.
        e_step: ``(T, K + 1, max_age + 1, max_age + 1)`` error of ``STEP`` (the whole step forecast:
            the model's output of order ``k = 0 .. K``, the index, from its outputs at the last full
            steps, at age ``n``, ``d`` apart; order 0 reuses the last one's, at any ``d``; ``inf``
            where not available), relative to the model's output, or ``None`` (no ``STEP``). No
            solver chooses it; :meth:`with_step_forecasts` turns whole rows into it
            (:mod:`solvers.uniform`'s ``whole`` rhythms). Its modelled error counts once per unit
            (every unit's output is replaced).
        forecast_policy: which ``REUSE`` steps of a plan become ``FORECAST`` (:meth:`with_forecasts`):
            ``"measured"``, where a forecast is measured better than the reuse; ``"always"``,
            wherever one is measured at all (TaylorSeer's policy: the error of each action
            measured alone ranks reuse above forecast at early steps, where forecasts measure
            better end to end). The order is the one measured best either way.

    Raises:
        ValueError: an array has the wrong shape or holds negative / non-finite values, naming
            the array and the expected shape.
        ConfigError: the budget is not in (0, 1].
    """

    units: tuple[Unit, ...]
    num_steps: int
    max_age: int
    budget: float
    flops_compute: np.ndarray
    flops_fixed: float = 0.0
    e_reuse: np.ndarray | None = None
    flops_reuse: np.ndarray | None = None
    prune_rates: tuple[float, ...] = ()
    e_prune: np.ndarray | None = None
    flops_prune: np.ndarray | None = None
    widths: tuple[float, ...] = ()
    e_width: np.ndarray | None = None
    flops_width: np.ndarray | None = None
    e_skip: np.ndarray | None = None
    e_forecast: np.ndarray | None = None
    e_cfg: np.ndarray | None = None
    flops_cfg: np.ndarray | None = None
    cfg_branch: int = 1
    allowed: np.ndarray | None = None
    timesteps: tuple[float, ...] | None = None
    forecast_policy: str = "measured"
    e_step: np.ndarray | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "units", tuple(self.units))
        set_(self, "budget", check_budget(self.budget))
        set_(self, "prune_rates", tuple(float(r) for r in self.prune_rates))
        set_(self, "widths", tuple(float(w) for w in self.widths))
        T, U, M = self.num_steps, len(self.units), self.max_age
        if self.e_forecast is not None and np.ndim(self.e_forecast) == 4:
            set_(self, "e_forecast", np.asarray(self.e_forecast)[:, :, None])  # order 1 only
        if not all(isinstance(u, Unit) for u in self.units) or len(set(self.units)) != U or U == 0:
            raise ValueError("Problem.units must be a non-empty sequence of distinct Unit objects")
        if int(T) != T or T < 1 or int(M) != M or M < 0:
            raise ValueError(f"need num_steps >= 1 and max_age >= 0 (ints), got {T!r}, {M!r}")
        if not (math.isfinite(self.flops_fixed) and self.flops_fixed >= 0):
            raise ValueError(f"Problem.flops_fixed must be finite and >= 0, got {self.flops_fixed!r}")
        for name, values in (("prune_rates", self.prune_rates), ("widths", self.widths)):
            if len(set(values)) != len(values) or not all(0 < v < 1 for v in values):
                raise ValueError(f"Problem.{name} must be distinct numbers in (0, 1), got {values}")
        K, J = len(self.prune_rates), len(self.widths)
        shapes = {
            "flops_compute": ((T, U), "(num_steps, num_units)"),
            "e_reuse": ((T, U, M + 1), "(num_steps, num_units, max_age + 1)"),
            "flops_reuse": ((T, U), "(num_steps, num_units)"),
            "e_prune": ((T, U, M + 1, K), "(num_steps, num_units, max_age + 1, len(prune_rates))"),
            "flops_prune": ((T, U, K), "(num_steps, num_units, len(prune_rates))"),
            "e_width": ((T, U, J), "(num_steps, num_units, len(widths))"),
            "flops_width": ((T, U, J), "(num_steps, num_units, len(widths))"),
            "e_skip": ((T, U), "(num_steps, num_units)"),
            "e_cfg": ((T, U, M + 1), "(num_steps, num_units, max_age + 1)"),
            "flops_cfg": ((T, U), "(num_steps, num_units)"),
            "e_forecast": ((T, U, self.forecast_orders, M + 1, M + 1),
                           "(num_steps, num_units, orders, max_age + 1, max_age + 1)"),
            "e_step": ((T, self.step_orders + 1, M + 1, M + 1), "(num_steps, orders + 1, max_age + 1, max_age + 1)"),
        }
        for name, (shape, spelled) in shapes.items():
            value = getattr(self, name)
            if value is None:
                continue
            array = np.array(value, dtype=np.float64)
            array.setflags(write=False)
            set_(self, name, array)
            if array.shape != shape:
                raise ValueError(f"Problem.{name} has shape {array.shape}, expected {spelled} = {shape}")
            # Column 0 (age 0) of the cache errors is unused, so it may hold anything.
            checked = array[:, :, 1:] if name in ("e_reuse", "e_prune", "e_cfg") else array
            if name in ("e_forecast", "e_step"):  # inf marks a forecast that is not available
                checked = np.where(np.isposinf(array), 0.0, array)[..., 1:, 1:]
            if not np.all(np.isfinite(checked)) or np.any(checked < 0):
                raise ValueError(f"Problem.{name} must be finite and >= 0 (ages 1..max_age for errors)")
        for family, arrays in (
            ("REUSE", ("e_reuse", "flops_reuse")),
            ("PRUNE", ("e_prune", "flops_prune")),
            ("WIDTH", ("e_width", "flops_width")),
            ("CFG", ("e_cfg", "flops_cfg")),
        ):
            given = [getattr(self, a) is not None for a in arrays]
            if any(given) != all(given):
                raise ValueError(f"{family} needs both {arrays[0]} and {arrays[1]} (or neither)")
        if self.cfg_branch not in (0, 1) or isinstance(self.cfg_branch, bool):
            raise ValueError(f"Problem.cfg_branch must be 0 or 1, got {self.cfg_branch!r}")
        if self.e_forecast is not None and self.e_reuse is None:
            raise ValueError("e_forecast needs e_reuse: FORECAST is a form of REUSE")
        if self.e_forecast is not None and not 1 <= self.forecast_orders <= MAX_FORECAST_ORDER:
            raise ValueError(f"Problem.e_forecast has {self.forecast_orders} orders, expected 1..{MAX_FORECAST_ORDER}")
        if (self.e_prune is None) != (K == 0) or (self.e_width is None) != (J == 0):
            raise ValueError("prune_rates/widths must be given exactly when e_prune/e_width are")
        if self.timesteps is not None:
            set_(self, "timesteps", tuple(float(t) for t in self.timesteps))
            if len(self.timesteps) != T:
                raise ValueError(f"Problem.timesteps has {len(self.timesteps)} entries, expected {T}")
        if self.forecast_policy not in FORECAST_POLICIES:
            raise ValueError(f"Problem.forecast_policy must be one of {FORECAST_POLICIES}, "
                             f"got {self.forecast_policy!r}")
        set_(self, "allowed", self._checked_allowed())

    def _checked_allowed(self) -> np.ndarray:
        T, U, A = self.num_steps, len(self.units), len(self.actions)
        widths = np.array([a.kind is ActionKind.WIDTH for a in self.actions])
        if self.allowed is None:
            mask = np.ones((T, U, A), dtype=bool)
            mask[:, [not u.allows_width for u in self.units]] &= ~widths
        else:
            mask = np.array(self.allowed, dtype=bool)
            if mask.shape == (U, A):
                mask = np.broadcast_to(mask, (T, U, A)).copy()
            if mask.shape != (T, U, A):
                raise ValueError(
                    f"Problem.allowed has shape {mask.shape}, expected (num_units, num_actions) = {(U, A)} "
                    f"or (num_steps, num_units, num_actions) = {(T, U, A)}; actions are "
                    f"{[str(a) for a in self.actions]}"
                )
            if not mask[:, :, 0].all():
                raise ValueError("Problem.allowed must allow COMPUTE everywhere (step 0 computes every unit)")
            for u, unit in enumerate(self.units):
                if not unit.allows_width and mask[:, u, widths].any():
                    raise ValueError(
                        f"Problem.allowed enables WIDTH on {unit}, which is not an MLP or a whole block"
                    )
        mask.setflags(write=False)
        return mask

    # ------------------------------------------------------------------------------ tables
    @property
    def forecast_orders(self) -> int:
        """How many ``FORECAST`` orders the problem has errors for (0: no forecasts)."""
        return 0 if self.e_forecast is None else int(np.shape(self.e_forecast)[2])

    @property
    def step_orders(self) -> int:
        """The highest ``STEP`` order the problem has errors for (-1: none; 0: reuse only)."""
        return -1 if self.e_step is None else int(np.shape(self.e_step)[1]) - 1

    def step_error(self, t: int, order: int, full: Sequence[int]) -> float:
        """Measured error of ``STEP`` of ``order`` at step ``t`` from the last full steps ``full``
        (newest first); ``inf`` where not measured (as :meth:`forecast_error`)."""
        if self.e_step is None or not 0 <= order <= self.step_orders or len(full) < order + 1:
            return math.inf
        n = t - full[0]
        d = full[0] - full[1] if order else 1
        if not (1 <= n <= self.max_age and 1 <= d <= self.max_age + 1) \
                or any(full[i] - full[i + 1] != d for i in range(1, order)):
            return math.inf
        return float(self.e_step[t, order, n, min(d, self.max_age)])

    def with_step_forecasts(self, actions: Sequence[Sequence[Action]], order: int | None = None
                            ) -> tuple[tuple[Action, ...], ...]:
        """The grid with every row in which no unit computes turned into a ``STEP``: of ``order``
        (or the highest order below it measured there, e.g. where fewer full steps precede), or,
        with ``order=None``, of the order measured best there. Rows where none is measured stay
        as they are. (One order throughout measures better than the best order per step: on
        ``digits-mmdit``, every second step a ``STEP``, 55.40 dB at order 3 and 55.29 at order 1
        against 51.21 per step; the calibration ranks the orders right, the modelled error not.)"""
        rows = [tuple(row) for row in actions]
        # (a row turned into a STEP computes nothing, so it was no full step: the walk stays valid)
        for t, _, full in step_forecasts(rows):
            if t > 0 and not any(a.kind is ActionKind.COMPUTE for a in rows[t]):
                errors = [self.step_error(t, k, full) for k in range(self.step_orders + 1)]
                measured = [k for k, e in enumerate(errors) if math.isfinite(e)]
                if order is not None:
                    measured = [k for k in measured if k <= order][-1:]
                if measured:
                    best = min(measured, key=errors.__getitem__)
                    rows[t] = (Action(ActionKind.STEP, order=best),) * len(rows[t])
        return tuple(rows)

    @cached_property
    def actions(self) -> tuple[Action, ...]:
        """The action menu, in the order of the last axis of :attr:`allowed` and the tables."""
        out = [COMPUTE]
        if self.e_reuse is not None:
            out.append(REUSE)
        out += [Action(ActionKind.PRUNE, rate=r) for r in self.prune_rates]
        out += [Action(ActionKind.WIDTH, width=w) for w in self.widths]
        if self.e_skip is not None:
            out.append(SKIP)
        if self.e_cfg is not None:
            out.append(cfg_action(self.cfg_branch))
        return tuple(out)

    def menu_index(self, action: Action) -> int:
        """Index of ``action`` in :attr:`actions` (``FORECAST`` is the ``REUSE`` entry).

        Raises:
            ValueError: the action is not in the menu.
        """
        return self.actions.index(REUSE if action.kind is ActionKind.FORECAST else action)

    @cached_property
    def needs_cache(self) -> np.ndarray:
        """``(A,)`` booleans: which menu actions read the cache."""
        return np.array([a.needs_cache for a in self.actions])

    @cached_property
    def flops_table(self) -> np.ndarray:
        """``(T, U, A)`` FLOPs of each menu action."""
        parts = [self.flops_compute[:, :, None]]
        if self.e_reuse is not None:
            parts.append(self.flops_reuse[:, :, None])
        if self.flops_prune is not None:
            parts.append(self.flops_prune)
        if self.flops_width is not None:
            parts.append(self.flops_width)
        if self.e_skip is not None:
            parts.append(np.zeros_like(self.flops_compute)[:, :, None])
        if self.e_cfg is not None:
            parts.append(self.flops_cfg[:, :, None])
        return np.concatenate(parts, axis=2)

    @cached_property
    def error_table(self) -> np.ndarray:
        """``(T, U, A, max_age + 1)`` error of each action by cache age (constant for non-cache
        actions; ``nan`` at age 0 for cache actions)."""
        T, U, M = self.num_steps, len(self.units), self.max_age
        parts = [np.zeros((T, U, 1, M + 1))]
        if self.e_reuse is not None:
            reuse = self.e_reuse if self.e_forecast is None else np.minimum(self.e_reuse, self.forecast_estimate)
            parts.append(reuse[:, :, None, :])  # np.concatenate below copies
        if self.e_prune is not None:
            parts.append(np.moveaxis(self.e_prune, 3, 2).copy())
        if self.e_width is not None:
            parts.append(np.repeat(self.e_width[:, :, :, None], M + 1, axis=3))
        if self.e_skip is not None:
            parts.append(np.repeat(self.e_skip[:, :, None, None], M + 1, axis=3))
        if self.e_cfg is not None:
            parts.append(self.e_cfg[:, :, None, :])
        table = np.concatenate(parts, axis=2)
        table[:, :, self.needs_cache, 0] = np.nan
        return table

    @cached_property
    def forecast_estimate(self) -> np.ndarray:
        """``(T, U, max_age + 1)`` forecast error at each age for a typical spacing: per order the
        mean of ``e_forecast`` over the available spacings ``d`` in ``n + 1 .. max_age`` (``d =
        max_age`` for the oldest age), the best order's; ``inf`` where none is available."""
        T, U, M = self.num_steps, len(self.units), self.max_age
        out = np.full((T, U, M + 1), np.inf)
        for k in range(self.forecast_orders):
            for n in range(1, M + 1):
                block = self.e_forecast[:, :, k, n, min(n + 1, M):]
                finite = np.isfinite(block)
                count = finite.sum(axis=2)
                mean = np.where(finite, block, 0.0).sum(axis=2) / np.maximum(count, 1)
                out[:, :, n] = np.minimum(out[:, :, n], np.where(count > 0, mean, np.inf))
        return out

    def forecast_error(self, t: int, u: int, order: int, computes: Sequence[int]) -> float:
        """Measured error of ``FORECAST`` of ``order`` at step ``t`` of unit ``u`` from its last
        computes (newest first); ``inf`` where not measured: too few computes, an age above
        ``max_age``, computes more than ``max_age + 1`` apart or, for order 2 and up, not evenly
        spaced. Computes ``max_age + 1`` apart (an interval of ``max_age + 1``) take the error
        measured at spacing ``max_age``, the nearest the profile keeps."""
        if not 1 <= order <= self.forecast_orders or len(computes) < order + 1:
            return math.inf
        n, d = t - computes[0], computes[0] - computes[1]
        if not (1 <= n <= self.max_age and 1 <= d <= self.max_age + 1):
            return math.inf
        for i in range(1, order):
            if computes[i] - computes[i + 1] != d:
                return math.inf
        return self._tables.e_forecast[t][u][order - 1][n][min(d, self.max_age)]

    @cached_property
    def _tables(self) -> SimpleNamespace:
        """The tables the column walks read, as nested lists (a numpy scalar read per step and
        unit costs more than the walk itself; fill and trim score thousands of columns)."""
        return SimpleNamespace(
            allowed=self.allowed.tolist(), flops=self.flops_table.tolist(), errors=self.error_table.tolist(),
            needs_cache=self.needs_cache.tolist(), e_reuse=self.e_reuse.tolist() if self.e_reuse is not None else None,
            e_forecast=self.e_forecast.astype(float).tolist() if self.e_forecast is not None else None,
            forecasts=tuple(Action(ActionKind.FORECAST, order=k) for k in range(1, self.forecast_orders + 1)))

    def with_forecasts(self, actions: Sequence[Sequence[Action]]) -> tuple[tuple[Action, ...], ...]:
        """The grid with each ``REUSE`` turned into the ``FORECAST`` order measured best with the
        grid's actual spacing of the unit's last computes, where it beats the reuse (policy
        ``"measured"``) or wherever one is measured (``"always"``)."""
        columns = [self.column_with_forecasts(u, [row[u] for row in actions]) for u in range(len(self.units))]
        return tuple(zip(*columns, strict=True)) if columns else tuple(tuple(row) for row in actions)

    def column_with_forecasts(self, u: int, column: Sequence[Action]) -> list[Action]:
        """:meth:`with_forecasts` for the actions of unit ``u`` alone."""
        column = list(column)
        if self.e_forecast is None:
            return column
        computes: tuple[int, ...] = ()
        # only COMPUTE moves the walk, so turning a REUSE into FORECAST on the way is safe
        for t, action in enumerate(column):
            column[t] = self.forecast_choice(t, u, action, computes)
            computes = after_step(t, action, computes)
        return column

    def forecast_choice(self, t: int, u: int, action: Action, computes: Sequence[int]) -> Action:
        """``action`` at step ``t`` of unit ``u`` after the unit's computes ``computes`` (newest
        first), a ``REUSE`` turned into the ``FORECAST`` that :meth:`with_forecasts` would choose."""
        if action.kind is not ActionKind.REUSE or self.e_forecast is None or not computes \
                or t - computes[0] > self.max_age:
            return action
        tables = self._tables
        errors = [self.forecast_error(t, u, k, computes) for k in range(1, self.forecast_orders + 1)]
        best = min(range(len(errors)), key=errors.__getitem__)  # the first of equal ones, as argmin
        if (self.forecast_policy == "always" and math.isfinite(errors[best])) \
                or errors[best] < tables.e_reuse[t][u][t - computes[0]]:
            return tables.forecasts[best]
        return action

    @cached_property
    def full_flops(self) -> float:
        """FLOPs of the unoptimised loop: every unit computed at every step, plus ``flops_fixed``."""
        return math.fsum([*self.flops_compute.ravel().tolist(), self.flops_fixed])

    # ------------------------------------------------------------------ integer FLOP scaling
    @cached_property
    def quantum(self) -> float:
        """FLOPs per integer quantum (see the module docstring)."""
        values = np.concatenate([self.flops_table.ravel(), [self.flops_fixed]])
        if np.all(values == np.round(values)) and values.max(initial=0.0) < 2.0**53:
            g = reduce(math.gcd, (int(v) for v in np.unique(values)), 0)
            if g > 0 and self.full_flops / g <= _MAX_EXACT_QUANTA:
                return float(g)
        if self.full_flops <= 0:
            return 1.0
        return 2.0 ** math.floor(math.log2(self.full_flops / _FALLBACK_QUANTA))

    @cached_property
    def savings_quanta(self) -> np.ndarray:
        """``(T, U, A)`` int64 quanta each action saves against ``COMPUTE`` (rounded down)."""
        q = self.quantum
        table = self.flops_table
        saved = np.floor(self.flops_compute / q)[:, :, None] - np.ceil(table / q)
        saved[:, :, 0] = 0
        return saved.astype(np.int64)

    @cached_property
    def _full_exact(self) -> Fraction:
        return sum(map(Fraction, self.flops_compute.ravel().tolist()), Fraction(self.flops_fixed))

    def need_quanta(self, budget: float | None = None) -> int:
        """Quanta a plan must save so that its FLOPs are ``<= budget * full_flops`` in floats.

        Args:
            budget: defaults to the problem's budget.
        """
        limit = check_budget(self.budget if budget is None else budget) * self.full_flops
        need = self._full_exact - Fraction(limit)
        if limit >= self.full_flops:
            # fsum rounds: a plan whose exact FLOPs do not exceed the exact full FLOPs rounds to at
            # most full_flops <= limit, so at the top of the range saving nothing is enough.
            need = min(need, Fraction(0))
        return math.ceil(need / Fraction(self.quantum))

    # ------------------------------------------------------------------------ evaluation
    def evaluate(self, actions: Sequence[Sequence[Action]]) -> tuple[float, float]:
        """FLOPs (``flops_fixed`` included) and modelled error of a full action grid.

        Args:
            actions: ``actions[t][u]``, ``T`` rows of ``U`` actions from :attr:`actions`.

        Returns:
            ``(flops, error)`` as exactly rounded sums.

        Raises:
            ValueError: an action is not in the menu or not allowed, or a rule is broken.
        """
        _, total, error = self._evaluate(actions)
        return total, error

    def _evaluate(self, actions: Sequence[Sequence[Action]]) -> tuple[list[float], float, float]:
        """Per-step FLOPs, total FLOPs and error; the total is one exactly rounded sum of every
        term (not of the rounded per-step sums), the figure the integer scaling guarantees."""
        terms, glue, whole = self._terms(actions)
        steps = [math.fsum(flops[t] for flops, _ in terms) for t in range(self.num_steps)]
        every = [*glue, *(f for flops, _ in terms for f in flops)]
        return steps, math.fsum(every), math.fsum([*(e for _, errors in terms for e in errors), *whole.values()])

    def step_errors(self, actions: Sequence[Sequence[Action]]) -> np.ndarray:
        """``(T,)`` modelled error of a full action grid at each step (they add up to
        :meth:`evaluate`'s error, up to rounding).

        Raises:
            ValueError: as :meth:`evaluate`.
        """
        terms, _, whole = self._terms(actions)
        out = np.sum([errors for _, errors in terms], axis=0) if terms else np.zeros(self.num_steps)
        for t, error in whole.items():
            out[t] += error
        return out

    def _terms(self, actions: Sequence[Sequence[Action]]
               ) -> tuple[list[tuple[list[float], list[float]]], list[float], dict[int, float]]:
        """Each unit's :meth:`unit_terms`, the glue FLOPs of the steps that run it, and the error
        of each ``STEP`` (by step).

        Raises:
            ValueError: not ``T`` rows of ``U`` actions, or as :meth:`unit_terms`.
        """
        T, U = self.num_steps, len(self.units)
        if len(actions) != T or any(len(row) != U for row in actions):
            raise ValueError(f"actions must be {T} rows (steps) of {U} actions (units)")
        terms = [self.unit_terms(u, [row[u] for row in actions]) for u in range(U)]
        glue, whole = [], {}  # a STEP runs no glue, and its error is the model output's, once per unit
        for t, step, full in step_forecasts(actions):
            if step is None:
                glue.append(self.flops_fixed / T)
                continue
            error = self.step_error(t, step.order, full)
            if not math.isfinite(error):
                raise ValueError(f"step {t}: {step} needs enough full steps before it, at an age and spacing "
                                 f"the profile measured")
            whole[t] = U * error
        return terms, glue, whole

    @cached_property
    def _action_index(self) -> dict[Action, int]:
        index = {a: i for i, a in enumerate(self.actions)}
        if REUSE in index:
            for k in range(1, self.forecast_orders + 1):
                # same FLOPs and rules as REUSE, its own error
                index[Action(ActionKind.FORECAST, order=k)] = index[REUSE]
        return index

    def unit_terms(self, u: int, column: Sequence[Action]) -> tuple[list[float], list[float]]:
        """FLOPs and modelled error of unit ``u`` at each step under ``column`` (its ``T`` actions).

        Errors add up over units, so a change to one unit's actions can be scored on its own.

        Raises:
            ValueError: an action is not in the menu or not allowed, or a rule is broken.
        """
        computes: tuple[int, ...] = ()
        flops, errors = [], []
        for t, action in enumerate(column):
            if action.kind is ActionKind.STEP and t > 0:  # the step's glue and error: _evaluate
                flops.append(0.0)
                errors.append(0.0)
                continue
            f, e = self.step_terms(t, u, action, computes)  # step 0 must compute: it raises otherwise
            flops.append(f)
            errors.append(e)
            computes = after_step(t, action, computes)
        return flops, errors

    def step_terms(self, t: int, u: int, action: Action, computes: Sequence[int]) -> tuple[float, float]:
        """FLOPs and modelled error of ``action`` at step ``t`` of unit ``u`` after the unit's
        computes ``computes`` (newest first; step 0 always computes).

        Raises:
            ValueError: the action is not in the menu or not allowed, or a rule is broken.
        """
        tables = self._tables
        a = self._action_index.get(action)
        if a is None or not tables.allowed[t][u][a]:
            raise ValueError(f"step {t}, unit {self.units[u]}: {action} is not an allowed action of this problem")
        if t == 0 and a != 0:
            raise ValueError(f"step {t}, unit {self.units[u]}: {action}: step 0 must COMPUTE every unit")
        needs_cache = tables.needs_cache[a]
        age = t - computes[0] if computes else 0
        if needs_cache and age > self.max_age:
            raise ValueError(f"step {t}, unit {self.units[u]}: {action} reads a cache {age} steps old "
                             f"> max_age={self.max_age}")
        if action.kind is ActionKind.FORECAST:
            error = self.forecast_error(t, u, action.order, computes)
            if not math.isfinite(error):
                raise ValueError(f"step {t}, unit {self.units[u]}: {action}: no measured forecast of order "
                                 f"{action.order} from computes {list(reversed(computes[:action.order + 1]))}")
        else:
            error = tables.errors[t][u][a][age if needs_cache else 0]
        return tables.flops[t][u][a], error

    def is_within_budget(self, flops: float, budget: float | None = None) -> bool:
        """Whether ``flops`` (with ``flops_fixed``) meet ``budget * full_flops``."""
        return flops <= check_budget(self.budget if budget is None else budget) * self.full_flops

    def to_plan(self, actions: Sequence[Sequence[Action]], solver: str, status: str,
                wall_time_s: float, gap: float | None = None) -> Plan:
        """Wrap an action grid in a :class:`Plan`, with FLOPs and error from :meth:`evaluate`.

        ``REUSE`` steps become ``FORECAST`` where that is measured to be better
        (:meth:`with_forecasts`); solvers that must not forecast drop ``e_forecast`` first.
        """
        actions = self.with_forecasts(actions)
        steps, total, error = self._evaluate(actions)
        return Plan(
            num_steps=self.num_steps, units=self.units, actions=actions, budget=self.budget,
            full_flops=self.full_flops, flops_fixed=self.flops_fixed,
            predicted_flops=total, step_flops=steps,
            predicted_error=error, max_age=self.max_age, solver=solver, status=status,
            wall_time_s=wall_time_s, gap=gap, timesteps=self.timesteps,
        )

    def grid(self, choice: np.ndarray) -> tuple[tuple[Action, ...], ...]:
        """Turn a ``(T, U)`` array of menu indices into an action grid."""
        return tuple(tuple(self.actions[a] for a in row) for row in np.asarray(choice).tolist())

    # ----------------------------------------------------------------------- feasibility
    def min_feasible_flops(self) -> float:
        """FLOPs (with ``flops_fixed``) of the cheapest valid plan, ignoring the budget."""
        cost = np.repeat(self.flops_table[:, :, :, None], self.max_age + 1, axis=3)
        _, choice = min_cost_sequences(self, cost)
        return self.evaluate(self.grid(choice))[0]

    @cached_property
    def _max_savings(self) -> int:
        cost = -np.repeat(self.savings_quanta[:, :, :, None], self.max_age + 1, axis=3).astype(np.float64)
        best, _ = min_cost_sequences(self, cost)
        return int(round(-best.sum()))

    def min_feasible_budget(self) -> float:
        """The smallest budget any valid plan meets, under the shared integer scaling.

        Equals ``min_feasible_flops() / full_flops`` (up to one float step) when the scaling is
        exact; otherwise it may be larger by the rounding bound of the module docstring.
        """
        best = self._max_savings

        def ok(b: float) -> bool:
            return self.need_quanta(b) <= best

        target = (self._full_exact - best * Fraction(self.quantum)) / Fraction(self.full_flops)
        b = min(1.0, max(float(target), math.ulp(0.0)))
        while not ok(b):
            b = min(1.0, math.nextafter(b, math.inf))
        while b > math.ulp(0.0) and ok(math.nextafter(b, 0.0)):
            b = math.nextafter(b, 0.0)
        return b

    def check_feasible(self, budget: float | None = None) -> None:
        """Raise :class:`InfeasibleBudgetError` if no valid plan meets the budget."""
        budget = self.budget if budget is None else budget
        if self.need_quanta(budget) > self._max_savings:
            raise infeasible_error(self, budget)

    # ------------------------------------------------------------------------- variants
    def weighted(self, weights: Sequence[float]) -> Problem:
        """The same problem with every error at step ``t`` multiplied by ``weights[t]`` (> 0).

        Raises:
            ValueError: not one positive finite weight per step.
        """
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.num_steps,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights must be {self.num_steps} positive finite numbers, one per step")
        changes = {}
        for name in ("e_reuse", "e_prune", "e_width", "e_skip", "e_forecast", "e_cfg", "e_step"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value * w.reshape((-1,) + (1,) * (value.ndim - 1))
        return replace(self, **changes)

    def without_forecasts(self) -> Problem:
        """The same problem with plain ``REUSE`` only (for schedules that, as published, do not
        extrapolate: the baselines)."""
        return self if self.e_forecast is None else replace(self, e_forecast=None)

    def with_budget(self, budget: float) -> Problem:
        """The same problem with another budget."""
        return replace(self, budget=budget)

    def with_max_age(self, max_age: int) -> Problem:
        """The same problem with caches at most ``max_age`` steps old (``<= self.max_age``): the
        errors at older ages dropped, a forecast over computes ``max_age + 1`` apart taking the
        error at spacing ``max_age``, as :meth:`forecast_error` does at any ``max_age``.

        Raises:
            ValueError: ``max_age`` is not an int in ``0..self.max_age``.
        """
        if isinstance(max_age, bool) or not isinstance(max_age, int) or not 0 <= max_age <= self.max_age:
            raise ValueError(f"max_age must be an int in 0..{self.max_age}, got {max_age!r}")
        if max_age == self.max_age:
            return self
        n = max_age + 1
        changes = {name: getattr(self, name)[:, :, :n] for name in ("e_reuse", "e_prune", "e_cfg")
                   if getattr(self, name) is not None}  # age is their third axis
        for name in ("e_forecast", "e_step"):  # (..., age, spacing)
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)[..., :n, :n]
        return replace(self, max_age=max_age, **changes)

    def restrict(self, actions: Iterable[ActionKind] = (ActionKind.COMPUTE, ActionKind.REUSE,
                                                        ActionKind.FORECAST)) -> Problem:
        """The same problem with only the given action families (``COMPUTE`` is always kept;
        ``FORECAST`` needs ``REUSE``).

        Example:
            >>> cr = problem.restrict()            # doctest: +SKIP  (COMPUTE/REUSE only, for solvers.dp)
        """
        keep = set(actions) | {ActionKind.COMPUTE}
        cols = [i for i, a in enumerate(self.actions) if a.kind in keep]
        drop = {
            ActionKind.REUSE: {"e_reuse": None, "flops_reuse": None},
            ActionKind.PRUNE: {"e_prune": None, "flops_prune": None, "prune_rates": ()},
            ActionKind.WIDTH: {"e_width": None, "flops_width": None, "widths": ()},
            ActionKind.SKIP: {"e_skip": None},
            ActionKind.FORECAST: {"e_forecast": None},
            ActionKind.CFG: {"e_cfg": None, "flops_cfg": None},
        }
        if ActionKind.REUSE not in keep:
            keep.discard(ActionKind.FORECAST)
        changes: dict[str, object] = {"allowed": self.allowed[:, :, cols]}
        for kind, fields_ in drop.items():
            if kind not in keep:
                changes.update(fields_)
        return replace(self, **changes)


def join_units(parts: Sequence[tuple[Problem, Sequence[int]]], flops_fixed: float) -> Problem:
    """One problem over some units of each of ``parts`` (``(problem, unit indices)``), in order.

    The parts share the steps, ``max_age``, budget and timesteps; an action family that one
    part lacks is disallowed on its units (with placeholder FLOPs and errors). Used to plan some
    blocks as whole blocks and others module by module.

    Args:
        parts: each problem with the indices of the units taken from it.
        flops_fixed: the joined problem's FLOPs outside the units.

    Raises:
        ValueError: the parts differ in steps, ``max_age``, budget or timesteps, or offer the
            same family at different prune rates or widths.
    """
    first = parts[0][0]
    T, M = first.num_steps, first.max_age
    for p, _ in parts:
        if (p.num_steps, p.max_age, p.budget, p.timesteps) != (T, M, first.budget, first.timesteps):
            raise ValueError("join_units: the problems differ in steps, max_age, budget or timesteps")
    rates = {p.prune_rates for p, _ in parts if p.prune_rates}
    widths = {p.widths for p, _ in parts if p.widths}
    if len(rates) > 1 or len(widths) > 1:
        raise ValueError(f"join_units: different prune rates {rates} or widths {widths}")
    orders = max(p.forecast_orders for p, _ in parts)
    K, J = len(next(iter(rates), ())), len(next(iter(widths), ()))
    placeholder = 1e6  # errors of a family a part lacks: disallowed below, finite so the arrays stay valid
    shapes = {"e_reuse": (M + 1,), "flops_reuse": (), "e_prune": (M + 1, K), "flops_prune": (K,),
              "e_width": (J,), "flops_width": (J,), "e_skip": (), "e_cfg": (M + 1,), "flops_cfg": ()}
    present = [name for name in shapes if any(getattr(p, name) is not None for p, _ in parts)]
    fields: dict[str, list[np.ndarray]] = {}
    for p, cols in parts:
        cols = list(cols)
        compute = np.asarray(p.flops_compute)[:, cols]
        fields.setdefault("flops_compute", []).append(compute)
        for name in present:
            shape, value = (T, len(cols), *shapes[name]), getattr(p, name)
            if value is not None:
                fields.setdefault(name, []).append(np.asarray(value)[:, cols])
            elif name.startswith("e_"):
                fields.setdefault(name, []).append(np.full(shape, placeholder))
            else:  # FLOPs of a family the part lacks: those of computing
                fields.setdefault(name, []).append(
                    np.broadcast_to(compute.reshape(T, len(cols), *[1] * len(shapes[name])), shape).copy())
        if orders:
            fc = np.full((T, len(cols), orders, M + 1, M + 1), np.inf)
            if p.e_forecast is not None:
                fc[:, :, :p.forecast_orders] = np.asarray(p.e_forecast)[:, cols]
            fields.setdefault("e_forecast", []).append(fc)
    joined = Problem(units=tuple(p.units[c] for p, cols in parts for c in cols), num_steps=T, max_age=M,
                     budget=first.budget, flops_fixed=flops_fixed, timesteps=first.timesteps,
                     forecast_policy=first.forecast_policy, cfg_branch=first.cfg_branch, e_step=first.e_step,
                     prune_rates=next(iter(rates), ()) if "e_prune" in present else (),
                     widths=next(iter(widths), ()) if "e_width" in present else (),
                     **{name: np.concatenate(v, axis=1) for name, v in fields.items()})
    mask = np.zeros((T, len(joined.units), len(joined.actions)), dtype=bool)
    at = 0
    for p, cols in parts:
        cols = list(cols)
        own = {a: i for i, a in enumerate(p.actions)}
        for a, action in enumerate(joined.actions):
            if action in own:
                mask[:, at:at + len(cols), a] = p.allowed[:, cols, own[action]]
        at += len(cols)
    return replace(joined, allowed=mask)


def infeasible_error(problem: Problem, budget: float, what: str = "No valid plan") -> InfeasibleBudgetError:
    """The error for a budget below the smallest feasible one, stating that budget."""
    smallest = problem.min_feasible_budget()
    return InfeasibleBudgetError(
        f"{what} meets budget={budget!r}: the smallest feasible budget for this problem is "
        f"{smallest!r} ({100 * smallest:.3f} % of the full FLOPs, with max_age={problem.max_age} and "
        f"actions {[str(a) for a in problem.actions]}); raise the budget to at least that, or allow "
        "cheaper actions / a larger max_age"
    )


def min_cost_sequences(problem: Problem, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the valid action sequence of least total cost (units independently).

    A dynamic programme over (step, cache age): the age is 1..max_age after a ``COMPUTE``, or
    *stale* beyond; ``REUSE``/``PRUNE`` need a non-stale cache, only ``COMPUTE`` resets it.

    Args:
        problem: gives the menu, ``allowed`` and ``max_age``.
        cost: ``(T, U, A, max_age + 1)`` cost of action ``a`` at cache age ``n`` (for actions that
            do not read the cache every column must hold the same value).

    Returns:
        ``(best, choice)``: ``(U,)`` least costs and ``(T, U)`` menu indices attaining them.
    """
    T, U, M = problem.num_steps, len(problem.units), problem.max_age
    S = M + 1  # states 0..M-1: cache age 1..M; state M: stale (or max_age = 0)
    cache = problem.needs_cache
    masked = np.where(problem.allowed[..., None], cost, np.inf)  # (T, U, A, S)
    value = np.full((U, S), np.inf)
    value[:, 0] = cost[0, :, 0, 0]  # step 0 computes: age 1 (or stale when max_age = 0)
    came_from = np.zeros((T, U, S, 2), dtype=np.int64)  # (previous state, action)
    rows = np.arange(U)
    for t in range(1, T):
        new = np.full((U, S), np.inf)
        for s in range(S):
            # every action but COMPUTE moves the cache one step older, so there are two targets
            step = masked[t, :, :, s + 1 if s < M else 0].copy()
            if s >= M:
                step[:, cache] = np.inf  # a stale cache cannot be read
            cand = value[:, s, None] + step
            for target, first, last in ((0, 0, 1), (min(s + 1, M), 1, cand.shape[1])):
                if first >= last:
                    continue
                best = np.argmin(cand[:, first:last], axis=1) + first
                val = cand[rows, best]
                better = val < new[:, target]
                new[better, target] = val[better]
                came_from[t, better, target, 0] = s
                came_from[t, better, target, 1] = best[better]
        value = new
    state = np.argmin(value, axis=1)
    best = value[rows, state]
    choice = np.zeros((T, U), dtype=np.int64)
    for t in range(T - 1, 0, -1):
        prev, act = came_from[t, rows, state].T
        choice[t] = act
        state = prev
    return best, choice
