"""The plan: which action every unit takes at every denoising step.

A *unit* is a transformer block, or one module of a block (self-attention, cross-attention,
MLP). A :class:`Plan` holds exactly one :class:`Action` per (step, unit) plus what the solver
predicted for it (FLOPs, modelled error) and how it was found (solver, status, wall time). It is
plain frozen data: rewrites consume only the plan, and ``load`` replays a saved plan without
solving again.

Rules every plan obeys (re-checked by :meth:`Plan.validate`):

* step 0 computes every unit (there is no cache yet);
* ``REUSE``, ``FORECAST``, ``PRUNE`` and ``CFG`` read the unit's cache, written by its last
  ``COMPUTE`` at most ``max_age`` steps earlier (``PRUNE``, ``WIDTH``, ``SKIP`` and ``CFG`` do not
  refresh the cache);
* ``FORECAST`` of order ``k`` extrapolates from the unit's last ``k + 1`` ``COMPUTE`` steps (the
  polynomial through them, at their actual spacing), so it needs ``k + 1`` of them, each at most
  ``max_age`` steps after the one before;
* ``WIDTH`` applies only to an MLP (role ``mlp``) or a whole block (role ``None``);
* ``STEP`` (the whole step forecast: no unit and none of the glue runs, the model's output is
  the polynomial of order ``k`` through its outputs at the last ``k + 1`` *full* steps, those at
  which every unit computes; order 0 reuses the last one's) is taken by every unit of a step or
  by none, at the same order, after ``k + 1`` full steps, the newest at most ``max_age`` steps
  earlier and each at most ``max_age + 1`` after the one before;
* the predicted FLOPs are within ``budget * full_flops``; the glue (``flops_fixed``) is spent at
  every step but a ``STEP`` one, ``flops_fixed / num_steps`` each.

Example:
    >>> plan = Plan.from_json(open("plan.json").read())      # doctest: +SKIP
    >>> print(plan.summary())                                # doctest: +SKIP
    >>> plan.action(3, Unit.parse("transformer_blocks.5.mlp"))  # doctest: +SKIP
    Action(kind=<ActionKind.REUSE: 'reuse'>, rate=None, width=None)
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from itertools import pairwise
from pathlib import Path
from typing import Any

from dit_opt.errors import ArtifactError, ConfigError

__all__ = [
    "PLAN_VERSION",
    "ActionKind",
    "Action",
    "Role",
    "Unit",
    "Plan",
    "COMPUTE",
    "REUSE",
    "FORECAST",
    "SKIP",
    "cfg_action",
    "MAX_FORECAST_ORDER",
    "FORECAST_FORMS",
    "check_budget",
    "compute_history",
    "after_step",
    "forecast_weights",
    "step_action",
    "step_forecasts",
    "full_steps",
]

#: Version of the serialised plan format; bumped on any incompatible change.
PLAN_VERSION = 1

#: Highest polynomial order of ``FORECAST`` (TaylorSeer's published DiT results use order 3).
MAX_FORECAST_ORDER = 3

#: How a forecast extrapolates from a unit's last computes (:func:`forecast_weights`): the
#: polynomial through them, or TaylorSeer's divided-difference Taylor expansion.
FORECAST_FORMS = ("lagrange", "taylor")


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float if it is a FLOP fraction in (0, 1].

    Raises:
        ConfigError: the budget is not a finite number in (0, 1].

    Example:
        >>> check_budget(0.5)
        0.5
    """
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ConfigError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(
            f"budget must be a fraction of the full FLOPs in (0, 1], got {budget!r}; "
            "e.g. budget=0.5 keeps at most half of the transformer's FLOPs"
        )
    return value


class ActionKind(Enum):
    """What a unit does at one step."""

    COMPUTE = "compute"
    REUSE = "reuse"
    FORECAST = "forecast"
    PRUNE = "prune"
    WIDTH = "width"
    SKIP = "skip"
    CFG = "cfg"
    STEP = "step"

    @property
    def code(self) -> str:
        """One-letter code used in :class:`Action` strings and the summary table."""
        return _KIND_CODE[self]


_KIND_CODE = {
    ActionKind.COMPUTE: "C",
    ActionKind.REUSE: "R",
    ActionKind.FORECAST: "F",
    ActionKind.PRUNE: "P",
    ActionKind.WIDTH: "W",
    ActionKind.SKIP: "S",
    ActionKind.CFG: "G",
    ActionKind.STEP: "T",
}
_CODE_KIND = {code: kind for kind, code in _KIND_CODE.items()}


@dataclass(frozen=True)
class Action:
    """One action of one unit at one step.

    Attributes:
        kind: the action family.
        rate: for ``PRUNE``, the fraction of tokens recomputed, in (0, 1); otherwise ``None``.
        width: for ``WIDTH``, the MLP prefix width, in (0, 1); otherwise ``None``.
        order: for ``FORECAST``, the polynomial order ``1 .. MAX_FORECAST_ORDER`` (default 1), for
            ``STEP`` ``0 .. MAX_FORECAST_ORDER`` (0: the last full step's output reused, TeaCache's
            whole-step reuse); otherwise ``None``. Written ``F`` (order 1), ``F2``, ``F3``; ``T0``,
            ``T``, ``T2``, ``T3``. ``STEP`` is the whole step forecast (see the module docstring):
            every unit of the step takes it, and the model's output is extrapolated from its last
            full steps.
        branch: for ``CFG``, which half of a classifier-free-guidance batch is derived rather
            than computed (0: the first, 1: the second); otherwise ``None``. Written ``G0``, ``G1``.
            The unit runs on the other half only, and the derived half's residual is the
            computed half's plus the difference of the two halves' residuals cached at the
            unit's last ``COMPUTE`` (FasterCache's CFG reuse, per unit).

    Raises:
        ValueError: the parameters do not fit the kind.

    Example:
        >>> str(Action(ActionKind.PRUNE, rate=0.25))
        'P0.25'
        >>> Action.parse("W0.5") == Action(ActionKind.WIDTH, width=0.5)
        True
        >>> str(Action(ActionKind.FORECAST, order=3))
        'F3'
    """

    kind: ActionKind
    rate: float | None = None
    width: float | None = None
    order: int | None = None
    branch: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ActionKind):
            raise ValueError(f"Action.kind must be an ActionKind, got {self.kind!r}")
        if self.kind is ActionKind.CFG:
            if self.branch not in (0, 1) or isinstance(self.branch, bool):
                raise ValueError(f"CFG needs branch 0 or 1 (the derived half of the batch), got {self.branch!r}")
        elif self.branch is not None:
            raise ValueError(f"{self.kind.name} takes no branch, got branch={self.branch!r}")
        if self.kind in (ActionKind.FORECAST, ActionKind.STEP):
            order = 1 if self.order is None else self.order
            lowest = 0 if self.kind is ActionKind.STEP else 1  # a STEP of order 0 reuses the last full step's output
            if isinstance(order, bool) or not isinstance(order, int) or not lowest <= order <= MAX_FORECAST_ORDER:
                raise ValueError(f"{self.kind.name} needs order in {lowest}..{MAX_FORECAST_ORDER}, got {self.order!r}")
            object.__setattr__(self, "order", order)
        elif self.order is not None:
            raise ValueError(f"{self.kind.name} takes no order, got order={self.order!r}")
        for name, needed in (("rate", ActionKind.PRUNE), ("width", ActionKind.WIDTH)):
            value = getattr(self, name)
            if self.kind is needed:
                if value is None or not (0.0 < float(value) < 1.0):
                    raise ValueError(f"{self.kind.name} needs {name} in (0, 1), got {value!r}")
                object.__setattr__(self, name, float(value))
            elif value is not None:
                raise ValueError(f"{self.kind.name} takes no {name}, got {name}={value!r}")

    @property
    def needs_cache(self) -> bool:
        """Whether the action reads the unit's cached residual (``REUSE``, ``FORECAST``, ``PRUNE``, ``CFG``)."""
        return self.kind in (ActionKind.REUSE, ActionKind.FORECAST, ActionKind.PRUNE, ActionKind.CFG)

    def __str__(self) -> str:
        # repr() of a float is its shortest exact spelling, so parse(str(a)) == a.
        if self.kind is ActionKind.PRUNE:
            return f"P{self.rate!r}"
        if self.kind is ActionKind.WIDTH:
            return f"W{self.width!r}"
        if self.kind in (ActionKind.FORECAST, ActionKind.STEP) and self.order != 1:
            return f"{self.kind.code}{self.order}"
        if self.kind is ActionKind.CFG:
            return f"G{self.branch}"
        return self.kind.code

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the short form written by ``str``: ``C``, ``R``, ``F``, ``F2``, ``F3``, ``P0.25``, ``W0.5``, ``S``,
        ``G0``, ``G1``, ``T``, ``T2``, ``T3``.

        Raises:
            ValueError: the text is not an action.
        """
        text = text.strip()
        kind = _CODE_KIND.get(text[:1])
        if kind is None:
            raise ValueError(f"unknown action {text!r}; expected one of C, R, F<order>, P<rate>, W<width>, S, "
                             f"G<branch>, T<order>")
        arg = text[1:]
        if kind in (ActionKind.FORECAST, ActionKind.STEP):
            if arg and not arg.isdigit():
                raise ValueError(f"action {text!r}: {kind.name} takes an order up to {MAX_FORECAST_ORDER}, "
                                 f"e.g. {kind.code}2")
            return cls(kind, order=int(arg) if arg else 1)
        if kind is ActionKind.CFG:
            if arg not in ("0", "1"):
                raise ValueError(f"action {text!r}: CFG takes the derived branch 0 or 1, e.g. G1")
            return cls(kind, branch=int(arg))
        if kind in (ActionKind.PRUNE, ActionKind.WIDTH):
            try:
                value = float(arg)
            except ValueError:
                raise ValueError(f"action {text!r} needs a number after {kind.code!r}, e.g. P0.25") from None
            return cls(kind, rate=value) if kind is ActionKind.PRUNE else cls(kind, width=value)
        if arg:
            raise ValueError(f"action {text!r}: {kind.name} takes no argument")
        return cls(kind)


def compute_history(actions: Sequence[Sequence[Action]], u: int, depth: int = MAX_FORECAST_ORDER + 1
                    ) -> Iterator[tuple[int, Action, tuple[int, ...]]]:
    """Along unit ``u`` of an action grid: ``(step, action, the last COMPUTE steps, newest first)``,
    at most ``depth`` of them, the step itself counted when it computes."""
    computes: tuple[int, ...] = ()
    for t, row in enumerate(actions):
        computes = after_step(t, row[u], computes, depth)
        yield t, row[u], computes


def after_step(t: int, action: Action, computes: tuple[int, ...], depth: int = MAX_FORECAST_ORDER + 1
               ) -> tuple[int, ...]:
    """A unit's last ``COMPUTE`` steps (newest first, at most ``depth``) once step ``t`` has run
    ``action``: only ``COMPUTE`` adds to them."""
    return (t, *computes)[:depth] if action.kind is ActionKind.COMPUTE else computes


def forecast_weights(step: int | float, computes: Sequence[int | float], form: str = "lagrange"
                     ) -> tuple[float, ...]:
    """Weights of the polynomial extrapolation to ``step`` through the values at ``computes``.

    ``FORECAST`` of order ``k`` predicts a unit's output (or residual) at ``step`` as
    ``sum_i w_i * value(computes[i])`` from the last ``k + 1`` computes (newest first), at their
    actual spacing, in one of two forms (:data:`FORECAST_FORMS`, a plan's ``forecast_form``):

    * ``"lagrange"``: the degree-``k`` polynomial through the ``k + 1`` values, exact when the
      output is a polynomial of degree ``<= k`` in the step index;
    * ``"taylor"``: TaylorSeer's expansion (diffusers' ``TaylorSeerCacheConfig``): derivatives at
      the newest compute estimated by divided differences, each from the one before at the
      previous compute, and ``sum_i d_i n^i / i!`` at ``n = step - computes[0]``. Exact for
      degree ``<= 1``; its higher terms are smaller than Lagrange's (``n^2 / 2`` against
      ``n (n + d) / 2`` at order 2), which extrapolates better over long gaps on some models.

    Order 1 is the same in both, TaylorSeer's first-order step
    ``value(c0) + (n / d) * (value(c0) - value(c1))``.

    Raises:
        ValueError: two computes at the same step, or an unknown form.

    Example:
        >>> forecast_weights(5, [4, 2])     # n = 1, d = 2: 1.5 * v(4) - 0.5 * v(2)
        (1.5, -0.5)
        >>> forecast_weights(6, [4, 2, 0], "taylor")
        (2.5, -2.0, 0.5)
    """
    xs = [float(c) for c in computes]
    if len(set(xs)) != len(xs):
        raise ValueError(f"forecast_weights needs distinct compute steps, got {list(computes)}")
    if form == "taylor":
        return _taylor_weights(float(step), xs)
    if form != "lagrange":
        raise ValueError(f"unknown forecast form {form!r}; use one of {', '.join(FORECAST_FORMS)}")
    out = []
    for i, xi in enumerate(xs):
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w *= (float(step) - xj) / (xi - xj)
        out.append(w)
    return tuple(out)


def _taylor_weights(step: float, xs: list[float]) -> tuple[float, ...]:
    k = len(xs) - 1
    # derivative i at compute j as weights over the values: each compute's estimate differences
    # the previous compute's, as TaylorSeer updates its factors
    deriv = [[[float(i == j) for i in range(k + 1)]] for j in range(k + 1)]
    for order in range(1, k + 1):
        for j in range(k + 1 - order):
            d = xs[j] - xs[j + 1]
            deriv[j].append([(a - b) / d for a, b in zip(deriv[j][order - 1], deriv[j + 1][order - 1], strict=True)])
    n = step - xs[0]
    out = [0.0] * (k + 1)
    for order, weights in enumerate(deriv[0]):
        coeff = n ** order / math.factorial(order)
        out = [o + coeff * w for o, w in zip(out, weights, strict=True)]
    return tuple(out)


def full_steps(actions: Sequence[Sequence[Action]]) -> list[bool]:
    """Per step, whether every unit computes (the model's output there is exact for its input:
    what a later ``STEP`` extrapolates from)."""
    return [bool(row) and all(a.kind is ActionKind.COMPUTE for a in row) for row in actions]


def step_action(row: Sequence[Action], t: int = 0) -> Action | None:
    """The ``STEP`` a step's row takes (every unit the same), or ``None`` if it is no ``STEP``.

    Raises:
        ValueError: some units of the row take a ``STEP`` and others not, or at another order.
    """
    if not any(a.kind is ActionKind.STEP for a in row):
        return None
    if any(a != row[0] for a in row):
        raise ValueError(f"step {t}: a STEP (whole step forecast) must be every unit's action at that "
                         f"step, at one order (got {sorted({str(a) for a in row})})")
    return row[0]


def step_forecasts(actions: Sequence[Sequence[Action]], depth: int = MAX_FORECAST_ORDER + 1
                   ) -> Iterator[tuple[int, Action | None, tuple[int, ...]]]:
    """Along the steps of an action grid: ``(step, its STEP action or None, the last full steps
    before it, newest first)``, at most ``depth`` of them.

    Raises:
        ValueError: a row mixes ``STEP`` with other actions (:func:`step_action`).
    """
    full: tuple[int, ...] = ()
    for t, (row, is_full) in enumerate(zip(actions, full_steps(actions), strict=True)):
        yield t, step_action(row, t), full
        if is_full:
            full = (t, *full)[:depth]


#: The parameterless actions, shared instances.
COMPUTE = Action(ActionKind.COMPUTE)
REUSE = Action(ActionKind.REUSE)
FORECAST = Action(ActionKind.FORECAST)
SKIP = Action(ActionKind.SKIP)


def cfg_action(branch: int) -> Action:
    """``CFG`` deriving half ``branch`` (0 or 1) of a guidance batch from the other half."""
    return Action(ActionKind.CFG, branch=branch)


class Role(str, Enum):
    """Role of a module inside a transformer block (a ``str`` so ``Role.MLP == "mlp"``)."""

    ATTN = "attn"
    CROSS_ATTN = "cross_attn"
    MLP = "mlp"


@dataclass(frozen=True, order=True)
class Unit:
    """A block of a block list, or one module of it.

    Attributes:
        list_name: name of the block list in the model, e.g. ``transformer_blocks``.
        index: position of the block in that list.
        role: the module (:class:`Role`, or its string value), or ``None`` for the whole block.

    Example:
        >>> str(Unit("transformer_blocks", 3, "mlp"))
        'transformer_blocks.3.mlp'
        >>> Unit.parse("transformer_blocks.3")
        Unit(list_name='transformer_blocks', index=3, role=None)
    """

    list_name: str
    index: int
    role: Role | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.list_name, str) or not self.list_name:
            raise ValueError(f"Unit.list_name must be a non-empty string, got {self.list_name!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"Unit.index must be an int >= 0, got {self.index!r}")
        if self.role is not None:
            try:
                object.__setattr__(self, "role", Role(self.role))
            except ValueError:
                valid = ", ".join(r.value for r in Role)
                raise ValueError(f"Unit.role must be one of {valid} or None, got {self.role!r}") from None

    @property
    def allows_width(self) -> bool:
        """Whether ``WIDTH`` applies: the unit is an MLP or a whole block."""
        return self.role is None or self.role is Role.MLP

    @property
    def block(self) -> tuple[str, int]:
        """The block this unit belongs to, as ``(list_name, index)``."""
        return (self.list_name, self.index)

    def __str__(self) -> str:
        base = f"{self.list_name}.{self.index}"
        return base if self.role is None else f"{base}.{self.role.value}"

    @classmethod
    def parse(cls, text: str) -> Unit:
        """Parse ``list.index`` or ``list.index.role`` (the list name may contain dots).

        Raises:
            ValueError: the text is not a unit.
        """
        parts = text.strip().split(".")
        role = None
        if len(parts) >= 3 and parts[-1] in {r.value for r in Role}:
            role = parts.pop()
        if len(parts) < 2 or not parts[-1].isdigit() or not all(parts[:-1]):
            raise ValueError(f"unit {text!r} is not 'list_name.index' or 'list_name.index.role'")
        return cls(".".join(parts[:-1]), int(parts[-1]), role)


@dataclass(frozen=True)
class Plan:
    """The solver's decision: one :class:`Action` per step and unit, and its predictions.

    Attributes:
        num_steps: number of denoising steps ``T``.
        units: the ``U`` units, in the order of the inner action tuples.
        actions: ``actions[t][u]``, a tuple of ``T`` tuples of ``U`` actions.
        budget: FLOP fraction the plan was solved for, in (0, 1].
        full_flops: FLOPs of the unoptimised loop (all units computed, plus ``flops_fixed``).
        flops_fixed: FLOPs outside the units (embeddings, final layer) over the loop, spent at
            every step but a ``STEP`` one (:meth:`glue_flops`).
        predicted_flops: FLOPs of the plan, ``sum(step_flops) + flops_fixed * glue_steps / num_steps``.
        step_flops: FLOPs of the units at each step.
        predicted_error: modelled error of the plan (sum over steps and units).
        max_age: oldest cache (in steps) that ``REUSE``/``PRUNE`` may read.
        solver: name of the solver that made the plan.
        status: how it was found, e.g. ``OPTIMAL``, ``FEASIBLE`` or ``HEURISTIC``.
        wall_time_s: solver wall time in seconds.
        gap: relative optimality gap where the solver knows it, else ``None``.
        timesteps: scheduler timestep value of each step, if known.
        forecast_form: how its ``FORECAST`` and ``STEP`` actions extrapolate, one of
            :data:`FORECAST_FORMS` (:func:`forecast_weights`; the same graphs, other weights).
        version: serialisation format version, :data:`PLAN_VERSION`.

    Raises:
        ValueError: shapes do not match or the plan breaks a rule (see :meth:`validate`).
        ConfigError: the budget is not in (0, 1].
    """

    num_steps: int
    units: tuple[Unit, ...]
    actions: tuple[tuple[Action, ...], ...]
    budget: float
    full_flops: float
    flops_fixed: float
    predicted_flops: float
    step_flops: tuple[float, ...]
    predicted_error: float
    max_age: int
    solver: str
    status: str
    wall_time_s: float
    gap: float | None = None
    timesteps: tuple[float, ...] | None = None
    forecast_form: str = "lagrange"
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise sequences to tuples once, here
        set_(self, "units", tuple(self.units))
        set_(self, "actions", tuple(tuple(row) for row in self.actions))
        set_(self, "step_flops", tuple(float(f) for f in self.step_flops))
        if self.timesteps is not None:
            set_(self, "timesteps", tuple(float(t) for t in self.timesteps))
        set_(self, "budget", check_budget(self.budget))
        if self.version != PLAN_VERSION:
            raise ValueError(f"plan version {self.version!r} is not supported (expected {PLAN_VERSION})")
        if self.forecast_form not in FORECAST_FORMS:
            raise ValueError(f"Plan.forecast_form must be one of {', '.join(FORECAST_FORMS)}, "
                             f"got {self.forecast_form!r}")
        if self.num_steps < 1 or self.max_age < 0:
            raise ValueError(f"need num_steps >= 1 and max_age >= 0, got {self.num_steps}, {self.max_age}")
        if len(set(self.units)) != len(self.units) or not all(isinstance(u, Unit) for u in self.units):
            raise ValueError("Plan.units must be distinct Unit objects")
        for name in ("full_flops", "flops_fixed", "predicted_flops", "predicted_error", "wall_time_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Plan.{name} must be a finite number >= 0, got {value!r}")
        self.validate()

    # ----------------------------------------------------------------------------------- rules
    def validate(self) -> None:
        """Re-check the plan's shape and rules; raise on the first violation.

        Raises:
            ValueError: naming the step, the unit and the rule broken.
        """
        T, U = self.num_steps, len(self.units)
        if len(self.actions) != T or any(len(row) != U for row in self.actions):
            raise ValueError(f"Plan.actions must be {T} rows of {U} actions (steps x units)")
        if len(self.step_flops) != T:
            raise ValueError(f"Plan.step_flops must have {T} entries, got {len(self.step_flops)}")
        if self.timesteps is not None and len(self.timesteps) != T:
            raise ValueError(f"Plan.timesteps must have {T} entries, got {len(self.timesteps)}")
        for row in self.actions:
            for action in row:
                if not isinstance(action, Action):
                    raise ValueError(f"{action!r} in Plan.actions is not an Action")
        for t, step, full in step_forecasts(self.actions):  # (a row mixing STEP with others raises)
            if step is not None and t > 0:  # step 0: the rule that every unit computes says it
                used = full[:step.order + 1]
                if len(used) < step.order + 1 or t - used[0] > self.max_age \
                        or any(a - b > self.max_age + 1 for a, b in pairwise(used)):
                    raise ValueError(
                        f"step {t}: {step} extrapolates the model's output from the last {step.order + 1} full steps "
                        f"(every unit COMPUTE), the newest at most max_age = {self.max_age} steps earlier and each "
                        f"at most {self.max_age + 1} after the one before (they are {list(reversed(used))})")
        for u, unit in enumerate(self.units):
            for t, action, computes in compute_history(self.actions, u):
                where = f"step {t}, unit {unit}: {action}"
                if t == 0 and action.kind is not ActionKind.COMPUTE:
                    raise ValueError(f"{where}: step 0 must COMPUTE every unit (no cache exists yet)")
                if action.needs_cache and (t - computes[0]) > self.max_age:
                    raise ValueError(
                        f"{where} reads a cache {t - computes[0]} steps old (last COMPUTE at step "
                        f"{computes[0]}), more than max_age={self.max_age}"
                    )
                if action.kind is ActionKind.FORECAST:
                    used = computes[:action.order + 1]
                    if len(used) < action.order + 1 or any(a - b > self.max_age + 1 for a, b in pairwise(used)):
                        raise ValueError(
                            f"{where} extrapolates from the last {action.order + 1} COMPUTE steps, each at most "
                            f"max_age + 1 = {self.max_age + 1} after the one before (they are {list(reversed(used))})"
                        )
                if action.kind is ActionKind.WIDTH and not unit.allows_width:
                    raise ValueError(f"{where}: WIDTH applies only to an MLP or a whole block")
        total = math.fsum(self.step_flops) + self.flops_fixed * self.glue_steps / T
        if not math.isclose(total, self.predicted_flops, rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(
                f"predicted_flops={self.predicted_flops!r} but sum(step_flops) + flops_fixed x (steps that run "
                f"the glue) / num_steps = {total!r}"
            )
        if self.predicted_flops > self.budget * self.full_flops:
            raise ValueError(
                f"predicted_flops={self.predicted_flops!r} exceed budget {self.budget!r} x full_flops "
                f"{self.full_flops!r} = {self.budget * self.full_flops!r}"
            )

    # ---------------------------------------------------------------------------------- access
    def _unit_index(self, unit: Unit | str | int) -> int:
        if isinstance(unit, int):
            return unit
        key = Unit.parse(unit) if isinstance(unit, str) else unit
        try:
            return self.units.index(key)
        except ValueError:
            known = ", ".join(map(str, self.units))
            raise KeyError(f"unit {key} is not in the plan; units are {known}") from None

    def action(self, step: int, unit: Unit | str | int) -> Action:
        """The action of ``unit`` (a :class:`Unit`, its string form or its index) at ``step``."""
        return self.actions[step][self._unit_index(unit)]

    def actions_at(self, step: int) -> dict[Unit, Action]:
        """All actions at ``step``, keyed by unit in plan order."""
        return dict(zip(self.units, self.actions[step], strict=True))

    def is_step_forecast(self, step: int) -> bool:
        """Whether ``step`` is a whole step forecast (``STEP``: no unit and none of the glue runs)."""
        return step_action(self.actions[step], step) is not None

    @property
    def glue_steps(self) -> int:
        """How many steps run the model's glue (embeddings, final layer): all but the ``STEP`` ones."""
        return sum(not self.is_step_forecast(t) for t in range(self.num_steps))

    def glue_flops(self, step: int) -> float:
        """FLOPs of the glue at ``step``: ``flops_fixed / num_steps``, none at a ``STEP``."""
        return 0.0 if self.is_step_forecast(step) else self.flops_fixed / self.num_steps

    @property
    def flop_fraction(self) -> float:
        """Predicted FLOPs as a fraction of the full FLOPs."""
        return self.predicted_flops / self.full_flops if self.full_flops > 0 else 0.0

    def counts(self) -> dict[ActionKind, int]:
        """How many (step, unit) pairs take each action kind (every kind listed, zeros included)."""
        out = dict.fromkeys(ActionKind, 0)
        for row in self.actions:
            for action in row:
                out[action.kind] += 1
        return out

    # ------------------------------------------------------------------------------ rendering
    def summary(self) -> str:
        """A text table: per step one letter per unit (blocks separated by spaces), plus totals.

        Returns:
            The rendered table (no colour codes).

        Example:
            >>> print(plan.summary())   # doctest: +SKIP
        """
        from rich.console import Console
        from rich.table import Table

        step_full = self.full_flops - self.flops_fixed
        table = Table(title=f"Plan: {self.solver} {self.status}", show_lines=False)
        for column in ("step", "timestep", "actions (one letter per unit)", "FLOPs % of mean step"):
            table.add_column(column, justify="left" if column.startswith("actions") else "right")
        for t, row in enumerate(self.actions):
            share = 100.0 * self.step_flops[t] * self.num_steps / step_full if step_full > 0 else 0.0
            ts = "" if self.timesteps is None else f"{self.timesteps[t]:g}"
            table.add_row(str(t), ts, self._compact_row(row), f"{share:.1f}")
        counts = self.counts()
        total = sum(counts.values())
        params = sorted({str(a) for row in self.actions for a in row if a.rate or a.width or (a.order or 1) > 1})
        lines = [
            "units: " + ", ".join(str(u) for u in self.units[:6]) + (" ..." if len(self.units) > 6 else ""),
            "counts: " + ", ".join(f"{k.value} {n} ({100.0 * n / total:.1f} %)" for k, n in counts.items()),
            "letters: " + ", ".join(f"{k.code} {k.value}" for k in ActionKind)
            + f"; parameters used: {', '.join(params) or '-'}"
            + ("" if self.forecast_form == "lagrange" else f"; forecasts in {self.forecast_form} form"),
            f"FLOPs: {self.predicted_flops:.4g} of {self.full_flops:.4g} = {100 * self.flop_fraction:.2f} % "
            f"(budget {100 * self.budget:.2f} %)",
            f"predicted error: {self.predicted_error:.6g}; max_age {self.max_age}; "
            f"wall time {self.wall_time_s:.3f} s"
            + ("" if self.gap is None else f"; gap {100 * self.gap:.3f} %"),
        ]
        widest = max(len(self._compact_row(row)) for row in self.actions)
        console = Console(file=io.StringIO(), width=max(100, widest + 50), color_system=None)
        console.print(table)
        for line in lines:
            console.print(line, highlight=False, markup=False)
        return console.file.getvalue()

    def _compact_row(self, row: Sequence[Action]) -> str:
        chunks: list[str] = []
        previous = None
        for unit, action in zip(self.units, row, strict=True):
            if previous is not None and unit.block != previous:
                chunks.append(" ")
            chunks.append(action.kind.code)
            previous = unit.block
        return "".join(chunks)

    def heatmap(self, path: str | Path, title: str | None = None) -> Path:
        """Write a PNG of steps x units coloured by action kind, with a legend.

        Args:
            path: file to write.
            title: figure title (defaults to solver, status and FLOP fraction).

        Returns:
            The path written.
        """
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        # A bare Figure with the Agg canvas: no pyplot global state, no display needed.
        kinds = list(ActionKind)
        colours = ["#3b6ea5", "#59a14f", "#9ad17f", "#f28e2b", "#b07aa1", "#e15759", "#76b7b2", "#edc948"]
        grid = np.array([[kinds.index(a.kind) for a in row] for row in self.actions]).T
        fig = Figure(figsize=(max(6.0, 0.16 * self.num_steps + 3), max(3.0, 0.12 * len(self.units) + 1.5)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(colours),
                  vmin=-0.5, vmax=len(kinds) - 0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("unit")
        if len(self.units) <= 40:
            ax.set_yticks(range(len(self.units)), [str(u) for u in self.units], fontsize=6)
        ax.set_title(title or f"{self.solver} {self.status}: {100 * self.flop_fraction:.1f} % FLOPs")
        ax.legend(handles=[Patch(color=c, label=k.value) for k, c in zip(kinds, colours, strict=True)],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png", dpi=100)
        return path

    # -------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; actions and units in their short string forms."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["units"] = [str(u) for u in self.units]
        out["actions"] = [[str(a) for a in row] for row in self.actions]
        out["step_flops"] = list(self.step_flops)
        out["timesteps"] = None if self.timesteps is None else list(self.timesteps)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan written by :meth:`to_dict`.

        Raises:
            ArtifactError: unknown or missing keys, another version, or an invalid plan.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ArtifactError(f"plan has unknown keys {unknown}; known keys are {sorted(names)}")
        if data.get("version") != PLAN_VERSION:
            raise ArtifactError(
                f"plan version {data.get('version')!r} is not supported by this dit-opt "
                f"(expected {PLAN_VERSION}); re-solve the plan from the stored profile"
            )
        try:
            kwargs = dict(data)
            kwargs["units"] = tuple(Unit.parse(u) for u in data["units"])
            kwargs["actions"] = tuple(tuple(Action.parse(a) for a in row) for row in data["actions"])
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"invalid plan: {exc}") from exc

    def to_json(self, indent: int | None = None) -> str:
        """Serialise to JSON (floats keep their exact value)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse JSON written by :meth:`to_json`.

        Raises:
            ArtifactError: not JSON, or not a valid plan.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"plan is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ArtifactError(f"plan JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

