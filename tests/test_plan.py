"""Tests of dit_opt.plan: actions, units, and the Plan data type."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_opt.errors import ArtifactError, ConfigError
from dit_opt.plan import COMPUTE, PLAN_VERSION, REUSE, SKIP, Action, ActionKind, Plan, Role, Unit

ROLES = [None, "attn", "cross_attn", "mlp"]


def random_plan(seed: int, num_steps: int, num_units: int, max_age: int) -> Plan:
    """A valid plan with random actions obeying the rules (step 0 computes, ages, width)."""
    rng = random.Random(seed)
    units = tuple(Unit("transformer_blocks", i // 2, ROLES[rng.randrange(4)] if i % 2 else None)
                  for i in range(num_units))
    units = tuple(dict.fromkeys(units))  # roles may collide: keep distinct units
    actions, step_flops = [], []
    last = [0] * len(units)
    for t in range(num_steps):
        row = []
        for u, unit in enumerate(units):
            options = [COMPUTE, SKIP]
            if t > 0 and t - last[u] <= max_age:
                options += [REUSE, Action(ActionKind.PRUNE, rate=rng.choice([0.25, 0.5, 0.1 + rng.random() * 0.8]))]
            if unit.allows_width:
                options.append(Action(ActionKind.WIDTH, width=rng.choice([0.25, 0.5, 0.75])))
            action = COMPUTE if t == 0 else rng.choice(options)
            if action.kind is ActionKind.COMPUTE:
                last[u] = t
            row.append(action)
        actions.append(tuple(row))
        step_flops.append(rng.random() * 10.0)
    fixed = rng.random()
    predicted = math.fsum([*step_flops, fixed])
    return Plan(
        num_steps=num_steps, units=units, actions=tuple(actions), budget=1.0,
        full_flops=predicted * (1.0 + rng.random()), flops_fixed=fixed, predicted_flops=predicted,
        step_flops=tuple(step_flops), predicted_error=rng.random(), max_age=max_age, solver="test",
        status="OPTIMAL", wall_time_s=rng.random(), gap=rng.choice([None, 0.0, rng.random()]),
        timesteps=rng.choice([None, tuple(float(999 - 20 * t) for t in range(num_steps))]),
    )


@pytest.fixture
def plan() -> Plan:
    units = (Unit("blocks", 0, "attn"), Unit("blocks", 0, "mlp"), Unit("blocks", 1))
    C, R = COMPUTE, REUSE
    actions = (
        (C, C, C),
        (R, Action(ActionKind.WIDTH, width=0.5), Action(ActionKind.PRUNE, rate=0.25)),
        (C, SKIP, R),
        (R, C, C),
    )
    return Plan(num_steps=4, units=units, actions=actions, budget=0.9, full_flops=100.0, flops_fixed=10.0,
                predicted_flops=70.0, step_flops=(30.0, 10.0, 10.0, 10.0), predicted_error=0.5, max_age=2,
                solver="test", status="OPTIMAL", wall_time_s=0.1, gap=0.0, timesteps=(999, 666, 333, 0))


# ------------------------------------------------------------------------------------ Action
@given(st.sampled_from(list(ActionKind)), st.floats(min_value=1e-6, max_value=1 - 1e-6))
def test_action_str_parse_round_trip(kind: ActionKind, value: float) -> None:
    action = Action(kind, rate=value if kind is ActionKind.PRUNE else None,
                    width=value if kind is ActionKind.WIDTH else None,
                    branch=int(value > 0.5) if kind is ActionKind.CFG else None)
    assert Action.parse(str(action)) == action, f"{action} -> {str(action)!r}"


def test_cfg_action_forms_and_errors() -> None:
    assert [str(Action(ActionKind.CFG, branch=b)) for b in (0, 1)] == ["G0", "G1"]
    assert Action.parse("G1").branch == 1 and Action.parse("G1").needs_cache
    for bad in ("G", "G2", "Gx"):
        with pytest.raises(ValueError, match="CFG takes the derived branch"):
            Action.parse(bad)
    with pytest.raises(ValueError, match="CFG needs branch"):
        Action(ActionKind.CFG)
    with pytest.raises(ValueError, match="takes no branch"):
        Action(ActionKind.REUSE, branch=1)


def test_action_short_forms() -> None:
    assert [str(a) for a in (COMPUTE, REUSE, SKIP)] == ["C", "R", "S"]
    assert str(Action(ActionKind.PRUNE, rate=0.25)) == "P0.25"
    assert str(Action(ActionKind.WIDTH, width=0.5)) == "W0.5"
    assert Action.parse("P0.25").rate == 0.25


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": ActionKind.PRUNE},
        {"kind": ActionKind.PRUNE, "rate": 1.0},
        {"kind": ActionKind.WIDTH, "width": 0.0},
        {"kind": ActionKind.REUSE, "rate": 0.5},
        {"kind": ActionKind.COMPUTE, "width": 0.5},
        {"kind": "compute"},
    ],
)
def test_action_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Action(**kwargs)


@pytest.mark.parametrize("text", ["", "X", "P", "Pabc", "C1", "W2.0"])
def test_action_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Action.parse(text)


# -------------------------------------------------------------------------------------- Unit
@pytest.mark.parametrize("text", ["transformer_blocks.3", "transformer_blocks.3.mlp",
                                  "model.blocks.0.cross_attn", "single_transformer_blocks.12.attn"])
def test_unit_round_trip(text: str) -> None:
    assert str(Unit.parse(text)) == text


def test_unit_role_is_enum_and_string() -> None:
    unit = Unit("blocks", 1, "mlp")
    assert unit.role is Role.MLP and unit.role == "mlp" and unit.allows_width
    assert not Unit("blocks", 1, "attn").allows_width and Unit("blocks", 1).allows_width
    with pytest.raises(ValueError, match="role"):
        Unit("blocks", 1, "ffn")
    with pytest.raises(ValueError):
        Unit.parse("blocks")


# -------------------------------------------------------------------------------------- Plan
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 6), st.integers(0, 3))
def test_plan_json_round_trip_is_exact(seed: int, steps: int, units: int, max_age: int) -> None:
    plan = random_plan(seed, steps, units, max_age)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert sum(plan.counts().values()) == steps * len(plan.units)


def test_plan_rejects_unknown_keys_and_versions(plan: Plan) -> None:
    data = plan.to_dict()
    data["colour"] = "blue"
    with pytest.raises(ArtifactError, match="unknown keys \\['colour'\\]"):
        Plan.from_dict(data)
    data = plan.to_dict()
    data["version"] = PLAN_VERSION + 1
    with pytest.raises(ArtifactError, match="version"):
        Plan.from_dict(data)
    with pytest.raises(ArtifactError, match="JSON"):
        Plan.from_json("{not json")
    data = plan.to_dict()
    data["actions"][1][0] = "Q"
    with pytest.raises(ArtifactError, match="unknown action"):
        Plan.from_dict(data)


def test_plan_accessors(plan: Plan) -> None:
    assert plan.action(1, "blocks.0.mlp") == Action(ActionKind.WIDTH, width=0.5)
    assert plan.action(1, Unit("blocks", 1)) == Action(ActionKind.PRUNE, rate=0.25)
    assert plan.action(2, 2) == REUSE
    assert list(plan.actions_at(0).values()) == [COMPUTE] * 3
    assert plan.flop_fraction == pytest.approx(0.7)
    assert plan.counts() == {ActionKind.COMPUTE: 6, ActionKind.REUSE: 3, ActionKind.FORECAST: 0, ActionKind.PRUNE: 1,
                             ActionKind.WIDTH: 1, ActionKind.SKIP: 1, ActionKind.CFG: 0, ActionKind.STEP: 0}
    with pytest.raises(KeyError, match="not in the plan"):
        plan.action(0, "blocks.7")


def test_summary_lists_steps_and_counts(plan: Plan) -> None:
    text = plan.summary()
    for expected in ("compute 6", "reuse 3", "prune 1", "width 1", "skip 1", "CC C", "RW P", "P0.25", "W0.5",
                     "70.00 %"):
        assert expected in text, f"{expected!r} missing from summary:\n{text}"


def test_heatmap_writes_png(plan: Plan, tmp_path) -> None:
    path = plan.heatmap(tmp_path / "plan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    big = random_plan(1, 50, 84, 4)
    assert big.heatmap(tmp_path / "big.png").stat().st_size > 1000


def test_validate_catches_bad_plans(plan: Plan) -> None:
    rows = [list(r) for r in plan.actions]
    bad = [row[:] for row in rows]
    bad[0][1] = REUSE
    with pytest.raises(ValueError, match="step 0 must COMPUTE"):
        replace(plan, actions=bad)
    bad = [row[:] for row in rows]
    bad[3][1] = REUSE
    bad[1][1] = SKIP  # blocks.0.mlp last computed at step 0, read at step 3 > max_age 2
    with pytest.raises(ValueError, match="max_age=2"):
        replace(plan, actions=bad)
    bad = [row[:] for row in rows]
    bad[1][0] = Action(ActionKind.WIDTH, width=0.5)
    with pytest.raises(ValueError, match="WIDTH applies only"):
        replace(plan, actions=bad)
    with pytest.raises(ValueError, match="exceed budget"):
        replace(plan, budget=0.5)
    with pytest.raises(ValueError, match="step_flops"):
        replace(plan, predicted_flops=71.0)
    plan.validate()  # the original is fine


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, float("nan"), float("inf"), "half"])
def test_plan_rejects_bad_budget(plan: Plan, budget: object) -> None:
    with pytest.raises(ConfigError, match="budget"):
        replace(plan, budget=budget)


def test_forecast_form_round_trips_and_is_checked():
    """A plan's forecast form is saved and loaded; a plan saved before forms existed loads as the
    polynomial; an unknown form names the valid ones."""
    import dataclasses

    from dit_opt.errors import ArtifactError
    from dit_opt.plan import COMPUTE, Plan, Unit

    plan = Plan(num_steps=2, units=(Unit("blocks", 0),), actions=[[COMPUTE], [COMPUTE]], budget=1.0,
                full_flops=2.0, flops_fixed=0.0, predicted_flops=2.0, step_flops=[1.0, 1.0], predicted_error=0.0,
                max_age=1, solver="x", status="HEURISTIC", wall_time_s=0.0)
    assert plan.forecast_form == "lagrange"
    taylor = dataclasses.replace(plan, forecast_form="taylor")
    assert Plan.from_json(taylor.to_json()).forecast_form == "taylor"
    assert "taylor form" in taylor.summary() and "taylor form" not in plan.summary()
    old = plan.to_dict()
    del old["forecast_form"]
    assert Plan.from_dict(old) == plan
    with pytest.raises(ValueError, match="lagrange, taylor"):
        dataclasses.replace(plan, forecast_form="hermite")
    with pytest.raises(ArtifactError, match="lagrange, taylor"):
        Plan.from_dict({**plan.to_dict(), "forecast_form": "hermite"})
