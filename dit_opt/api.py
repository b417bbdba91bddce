"""The public entry points: :func:`optimize`, :func:`profile` and :func:`load`.

``optimize`` reads top to bottom as the pipeline it runs::

    capture -> annotate_flops -> profile -> solve -> rewrite -> lower

Each step is timed; a failure is re-raised naming the step and the steps that ran before it,
except an exception the user's calibration raised itself: that one comes through as itself,
with a note naming the step (``except TheirError`` still catches it).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_opt import closed_loop as loop
from dit_opt import errors
from dit_opt.artifacts import ARTIFACT_VERSION, check_model, read, save
from dit_opt.calibration import Generations, guarded, raised_by_calibration
from dit_opt.capture import check_capture_mode
from dit_opt.errors import ConfigError, DitOptError, InfeasibleBudgetError, InputMismatchError
from dit_opt.plan import Plan, check_budget
from dit_opt.routed import RoutedTransformer
from dit_opt.runtime import OptimizedTransformer, compile_mode, input_signature, timestep_as_tensor
from dit_opt.sensitivity import DEFAULT_ACTIONS, DEFAULT_MAX_AGE, SensitivityProfile, check_actions
from dit_opt.synthetic import call_names

__all__ = ["optimize", "profile", "load", "save", "ARTIFACT_VERSION"]

class _Stop(Exception):
    """Raised inside a calibration to stop it once the first call's inputs are recorded."""


#: ``optimize(..., dynamic=True)``: the static plan is solved at the budget times (1 + this), and
#: the routers close its computes per sample down to the budget
DYNAMIC_HEADROOM = 0.2


def _first_call_inputs(model: nn.Module, calibration: Callable[[nn.Module], Any]) -> dict[str, Any]:
    """The keyword inputs of the calibration's first model call (the loop is stopped there)."""
    import inspect

    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        seen.update(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
        raise _Stop

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            calibration(model)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise DitOptError(
            f"{type(model).__name__}: the calibration never called the model. It must run denoising loops "
            f"with the module it is given, e.g. lambda m: sample(m, seeds=range(8))."
        )
    seen.pop("return_dict", None)
    return {k: v for k, v in seen.items() if v is not None}


def _prepare(model, calibration, example_inputs):
    from dit_opt.calibration import synthetic_calibration
    from dit_opt.synthetic import example_inputs as synthetic_inputs

    calibration = _as_generations(calibration)
    if isinstance(calibration, str | Path):
        calibration = SensitivityProfile.load(calibration)
    if isinstance(calibration, list):
        from dit_opt.calibration import calibration_from_trajectories

        calibration = calibration_from_trajectories(calibration)
    if calibration is None:  # self-calibration, around the given inputs where there are some
        calibration = synthetic_calibration(model, example_inputs=example_inputs)
    if callable(calibration) and not isinstance(calibration, SensitivityProfile):
        calibration = guarded(calibration)
    if example_inputs is None:
        if callable(calibration):
            example_inputs = _first_call_inputs(model, calibration)
        else:
            try:
                example_inputs = synthetic_inputs(model)
            except InputMismatchError as e:
                raise InputMismatchError(f"{e} (With a saved profile as calibration, pass example_inputs=...)") from e
    return calibration, example_inputs


def _capture_inputs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs to capture ``model`` on: a timestep given as a Python number as a tensor where the
    model computes alike on it (:func:`dit_opt.runtime.timestep_as_tensor`), so that the graph
    serves every step and not only the first one's value (torch.export specialises to a number)."""
    tensor_timestep = timestep_as_tensor(model, inputs, call_names(model))
    return inputs if tensor_timestep is None else tensor_timestep


def _run_steps(steps: list[tuple[str, Callable[[], Any]]]) -> dict[str, float]:
    times: dict[str, float] = {}
    for name, fn in steps:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:
            done = ", ".join(times) or "none"
            if raised_by_calibration(e):
                # the user's own exception: let it through as itself, saying where it surfaced
                e.add_note(f"(raised by the calibration, while dit_opt.optimize ran its step '{name}'; "
                           f"steps done: {done})")
                raise
            msg = f"dit_opt.optimize failed in step '{name}' (steps done: {done}): {type(e).__name__}: {e}"
            if isinstance(e, DitOptError):
                raise type(e)(msg) from e
            raise DitOptError(msg) from e
        times[name] = time.perf_counter() - t0
    return times


def profile(
    model: nn.Module,
    calibration: Callable[[nn.Module], Any] | None = None,
    *,
    example_inputs: dict[str, Any] | None = None,
    blocks: list[str] | None = None,
    max_age: int = DEFAULT_MAX_AGE,
    prune_rates: tuple[float, ...] = (0.25, 0.5, 0.75),
    widths: tuple[float, ...] = (0.25, 0.5, 0.75),
    probe_rows: int | None = 4,
    gain_points: int = 0,
    probes: int = 6,
    progress: bool = True,
    distributed: bool | Any = False,
    capture_mode: str = "auto",
) -> SensitivityProfile:
    """Measure the sensitivity profile of ``model`` (reusable across budgets).

    Args:
        model: a diffusers transformer.
        calibration: runs complete denoising loops with the module it is given, or a list of
            such callables, one generation each (:class:`dit_opt.calibration.Generations`);
            ``None`` self-calibrates on synthetic inputs derived from the model
            (:mod:`dit_opt.synthetic`; warns).
        example_inputs: inputs of one forward; default: the calibration's first call.
        blocks, max_age, prune_rates, widths, probe_rows, progress: see
            ``passes.annotate_sensitivity.annotate_sensitivity``.
        gain_points: steps at which the growth of a local error into the final output is
            measured (``dit_opt.validation.measure_step_gains``); each costs one
            calibration run; 0 (the default) weighs all steps the same. On ``digits-dit`` the
            gains raise the rank correlation of modelled and measured error (0.95 against 0.79)
            but the plans they lead to score about 1-2 dB lower in PSNR, so they are opt-in.
        probes: single actions whose real final-output error is compared with the modelled
            one (``dit_opt.validation``); each costs one calibration run. The rank
            correlation lands in ``profile.report["validation"]``.
        distributed: ``True`` (the default process group) or a ``torch.distributed``
            ``ProcessGroup``: every rank of it calls ``profile`` with the same model, settings and
            list of generations, runs its share of them (``generations[rank::world]``), and gets
            the profile of all of them, the same on every rank (``docs/scale.md``); only rank 0
            writes it (``prof.save``). ``False``: one process.
        capture_mode: see :func:`optimize`.

    Raises:
        ConfigError: ``distributed`` asks for a group while none is initialised (the message
            gives the ``torchrun`` command), or the calibration is not a list of generations.
        DistributedError: the ranks' models, settings or calibration shapes differ (the same
            error on every rank); :class:`~dit_opt.errors.RankFailedError` where another rank
            raised.

    Example:
        >>> prof = dit_opt.profile(sampler.transformer, lambda m: run(m))
        >>> prof.save("profile/")
    """
    from dit_opt import distributed as spread_over
    from dit_opt.capture import capture
    from passes.annotate_flops import annotate_flops

    group = spread_over.resolve(distributed)
    calibration = _as_generations(calibration)
    total = None
    if group is not None:
        if not isinstance(calibration, Generations):
            raise ConfigError("profile(..., distributed=True) gives each rank a share of the calibration's "
                              "generations, so the calibration must be a list of callables, one denoising loop "
                              "each (e.g. [lambda m, s=s: sample(m, seed=s) for s in seeds]), the same list on "
                              f"every rank; got {type(calibration).__name__}")
        total = len(calibration)
        try:
            calibration = calibration.share(group.rank, group.world)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        progress = progress and group.rank == 0
    settings = {"blocks": blocks, "max_age": max_age, "prune_rates": list(prune_rates), "widths": list(widths),
                "probe_rows": probe_rows, "gain_points": gain_points, "probes": probes}
    with spread_over.spread(group):
        calibration, example_inputs = _prepare(model, calibration, example_inputs)
        if not callable(calibration):
            raise DitOptError("profile() needs a calibration callable, not a saved profile")
        fingerprint = None
        if group is not None:
            from dit_opt.fingerprint import model_fingerprint

            fingerprint = model_fingerprint(model)
            group.agree("the model (class, config and weight digest)", fingerprint,
                        "load the same model and weights on every rank")
            group.agree("the profile settings", settings, "call profile with the same arguments on every rank")
            group.agree("the number of calibration generations", total,
                        "give every rank the same list of generations (each runs its share)")
            group.agree("the calibration's first call (input shapes and dtypes)",
                        repr(input_signature(example_inputs, call_names(model))),
                        "every rank's generations must call the model with the same shapes and dtypes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = capture(model, _capture_inputs(model, example_inputs), blocks=blocks, mode=capture_mode)
        annotate_flops(graph)
        prof = _measure(graph, calibration, max_age=max_age, prune_rates=prune_rates, widths=widths,
                        probe_rows=probe_rows, gain_points=gain_points, probes=probes, progress=progress,
                        fingerprint=fingerprint)
        if group is not None:
            prof.report["ranks"] = group.world
    return prof


def _as_generations(calibration: Any) -> Any:
    """A list or tuple of callables as :class:`~dit_opt.calibration.Generations`; anything else as it is."""
    if isinstance(calibration, list | tuple) and calibration and all(callable(c) for c in calibration):
        return Generations(calibration)
    return calibration


def _measure(graph, calibration, *, max_age, prune_rates, widths, probe_rows, gain_points, probes, progress,
             fingerprint=None):
    """Sensitivity profile, step gains and (optionally) end-to-end validation, with their cost."""
    from dit_opt.validation import measure_step_gains, validate_sensitivity
    from passes.annotate_sensitivity import annotate_sensitivity

    _, prof = annotate_sensitivity(graph, calibration, max_age=max_age, prune_rates=prune_rates, widths=widths,
                                   probe_rows=probe_rows, progress=progress, fingerprint=fingerprint)
    extra = 0.0
    if gain_points:
        t0 = time.perf_counter()
        prof.step_gain = measure_step_gains(graph, prof, calibration, points=gain_points)
        extra += time.perf_counter() - t0
    if probes:
        report = validate_sensitivity(graph, prof, calibration, probes=probes)
        prof.report["validation"] = report
        extra += report["seconds"]
    seconds = prof.report["profile_seconds"] + extra
    prof.report["profile_seconds"] = seconds
    prof.report["cost_in_generations"] = seconds / max(prof.report["plain_calibration_seconds"], 1e-9)
    prof.report["gain_points"] = gain_points
    return prof


def optimize(
    model: nn.Module,
    budget: float = 0.5,
    *,
    calibration: Callable[[nn.Module], Any] | list[dict] | SensitivityProfile | str | Path | None = None,
    example_inputs: dict[str, Any] | None = None,
    solver: str = "cpsat",
    compile: bool | str = True,
    blocks: list[str] | None = None,
    actions: tuple[str, ...] = DEFAULT_ACTIONS,
    max_age: int = DEFAULT_MAX_AGE,
    prune_rates: tuple[float, ...] = (0.25, 0.5, 0.75),
    widths: tuple[float, ...] = (0.25, 0.5, 0.75),
    solver_options: dict[str, Any] | None = None,
    gain_points: int = 0,
    granularity: str = "block",
    select: bool | Callable[[nn.Module], Any] | None = None,
    closed_loop: bool | int = False,
    profile_cache: str | Path | None = None,
    progress: bool = True,
    capture_mode: str = "auto",
    dynamic: bool | float = False,
) -> OptimizedTransformer | RoutedTransformer:
    """Optimise ``model`` to at most ``budget`` of its FLOPs per generation.

    Args:
        model: a diffusers transformer (any class :func:`dit_opt.capture` supports), or a
            diffusers pipeline with one: its transformer is optimised, calibrated with the
            pipeline's own calls, and put in its place (:func:`dit_opt.attach`: every generation
            then runs a plan for its own step count and schedule; :func:`dit_opt.restore` undoes
            it).
        budget: FLOP fraction in (0, 1]; ``1.0`` computes everything (exact).
        calibration: for a pipeline, a dict of its call arguments (``dict(prompt=[...],
            num_inference_steps=10, generator=...)``: the pipeline runs with them, its generators
            re-seeded each run), or anything below. For a transformer: a callable that runs
            complete denoising loops with the module it is given
            (``lambda m: (setattr(sampler, "transformer", m), sampler(class_labels=[0, 1]))``), a list
            of such callables (one generation each, run in turn), recorded trajectories
            (a list of per-call keyword dicts, see ``dit_opt.calibration.record_trajectories``), a
            profile saved earlier (object or directory), or ``None`` to self-calibrate on
            synthetic inputs derived from the model (:mod:`dit_opt.synthetic`; warns).
        example_inputs: inputs of one forward; default: the calibration's first call.
        solver: ``"cpsat"`` (joint choice of all actions), ``"dp"`` (SODA interval DP, reuse
            only) or a baseline schedule (``"fora"``, ``"delta_dit"``, ``"toca"``, ``"soda"``).
        compile: how the plan is lowered with ``torch.compile`` (Inductor): ``True`` or
            ``"blocks"`` compiles each distinct block once and shares it across blocks and steps;
            ``"step"`` compiles each distinct step variant as one graph (faster at run time, one
            compile per distinct step on the first generation: see ``docs/speed.md``); ``False``
            keeps eager FX code.
        blocks: block list names, when discovery picks the wrong ones.
        actions: action families the solver may use besides compute: ``reuse``, ``forecast``
            (reuse extrapolated by the polynomial through the unit's last 2 to 4 computes, the
            order measured best), ``prune``, ``width``, ``skip``, ``cfg`` (a block runs on one
            half of a guidance batch and derives the other from the halves' cached difference;
            by default only where the calibration ran guidance batches, named explicitly a
            ``ConfigError`` where it did not).
        max_age, prune_rates, widths: the candidate actions measured by the profile (caches
            up to ``max_age`` steps old; a plan below budget 0.4 may read all of them, from 0.4 up
            at most 4: :meth:`dit_opt.sensitivity.SensitivityProfile.planned_max_age`). Without
            ``prune`` (``width``) in ``actions`` the profile measures no pruning rate (width).
        gain_points: see :func:`profile` (how errors at each step grow into the output).
        granularity: ``"block"`` (one action per block and step), ``"module"`` (one per
            attention, cross-attention and MLP of each block; reuse, forecast, skip, prune where
            the module can be pruned, and MLP width) or ``"auto"`` (block-level plans, and with
            ``select`` on the module-level candidates too: whichever measures best; the best
            fidelity, but a module-level plan runs slower than its FLOP ratio for now,
            ``docs/speed.md``).
        solver_options: passed to the solver (e.g. ``time_limit_s``).
        select: also make the solver's plans with late steps weighted more (block granularity),
            and the periodic and
            uniform plans (:func:`dit_opt.selection.candidate_plans`), and keep whichever gives
            outputs closest to the full model's on a calibration run
            (the solver's error model is optimistic at low budgets; :mod:`dit_opt.selection`). Only for the
            ``cpsat`` and ``dp`` solvers. ``None``: on when the calibration
            is a callable; a callable: the calibration to measure on (e.g. when ``calibration``
            is a saved profile); ``False``: keep the solver's plan. Costs one calibration run
            per candidate, plus one of the full model unless the profile was measured in the
            same call (its plain run is the reference) (``opt.report`` gives the total cost of
            ``optimize`` in calibration generations).
        closed_loop: also re-solve the solver's plan (at module granularity under ``"auto"``)
            with per-step corrections of its errors measured on its own trajectory, while its
            calibration error improves (:mod:`dit_opt.closed_loop`): ``True`` for up to
            :data:`dit_opt.closed_loop.ROUNDS` re-solves, or their number. Each costs a solve
            and two calibration runs (the plan's, and the full model's on its inputs). Needs
            ``select``.
        profile_cache: a directory to keep profiles in across processes (see
            :mod:`dit_opt.profile_cache`; within a process a profile is always reused when the
            same model, the same calibration object and the same profile settings come again,
            e.g. at another budget). ``opt.report["profile_cached"]`` says where the profile
            came from (``"memory"``, ``"disk"`` or ``None``: measured now).
        progress: show progress bars.
        capture_mode: ``"auto"`` captures the model's forward as one graph, or block by block
            where ``torch.export`` rejects it (the glue then runs as the model's own Python;
            :mod:`dit_opt.blockwise`); ``"whole"`` or ``"blocks"`` asks for one of the two.
            ``opt.report["capture"]`` says which was used and why.
        dynamic: combine the plan with per-sample routers (E-DiT, ``docs/routers.md``): a static
            plan (block granularity, reuse and forecast) is solved at ``budget * (1 + headroom)``
            less the routers' own FLOPs (``True``: headroom :data:`DYNAMIC_HEADROOM`; a float:
            that headroom), and routers trained with the model frozen close its computes per
            sample until the mean FLOPs per sample meet ``budget`` on the calibration
            (:func:`dit_opt.train_routers` with ``plan``, on the same capture). Needs a callable
            calibration (or a pipeline's call arguments).

    Returns:
        An :class:`~dit_opt.runtime.OptimizedTransformer`, a drop-in for ``pipe.transformer``;
        with ``dynamic``, a :class:`~dit_opt.routed.RoutedTransformer` (its ``plan`` the static
        plan, ``stats()`` the FLOPs spent per sample and the decisions).

    Raises:
        ConfigError: the budget is not in (0, 1].
        InfeasibleBudgetError: no plan meets the budget; the message gives the smallest one.
        DitOptError: a step failed; the message names it and the steps before it.
        Exception: whatever the calibration (or ``select``) raised itself, unchanged but for a
            note naming the step (``dit_opt.calibration.raised_by_calibration`` is true of it).

    Example:
        >>> opt = dit_opt.optimize(sampler.transformer, budget=0.5, calibration=cal)
        >>> sampler.transformer = opt
        >>> print(opt.plan.summary())
        >>> opt = dit_opt.optimize(pipe, budget=0.5, calibration=dict(prompt=["a cat", "a dog"]))
    """
    from dit_opt import pipelines

    if pipelines.is_pipeline(model):
        # every argument as given, but the transformer and a calibration made of the pipeline
        options = {k: v for k, v in locals().items() if k not in ("model", "pipelines")}
        options["calibration"] = pipelines.pipeline_calibration(model, calibration)
        return pipelines.attach(model, optimize(model.transformer, **options))
    budget = check_budget(budget)
    if dynamic is not False:
        return _optimize_dynamic(model, budget, dynamic, calibration=calibration, example_inputs=example_inputs,
                                 solver=solver, compile=compile, blocks=blocks, max_age=max_age,
                                 solver_options=solver_options, select=select, profile_cache=profile_cache,
                                 progress=progress, capture_mode=capture_mode)
    rounds = loop.check_rounds(closed_loop)
    if rounds and (select is False or solver not in ("cpsat", "dp")):
        raise ConfigError(f"closed_loop re-solves the solver's plan among the measured candidates, so it needs "
                          f"select and the 'cpsat' or 'dp' solver (got select={select!r}, solver={solver!r}); "
                          f"drop closed_loop or turn select on")
    compile_mode(compile)
    check_capture_mode(capture_mode)
    explicit = actions is not DEFAULT_ACTIONS
    actions = check_actions(actions)
    asked_cfg = explicit and "cfg" in actions
    if granularity not in ("auto", "block", "module"):
        raise ConfigError(f"granularity must be 'auto', 'block' or 'module', got {granularity!r}")
    if solver == "dp":
        actions = tuple(a for a in actions if a in ("reuse", "forecast"))
    ctx: dict[str, Any] = {}

    def do_capture() -> None:
        from dit_opt.capture import capture

        cal, inputs = _prepare(model, calibration, example_inputs)
        ctx["calibration"], ctx["inputs"] = cal, inputs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctx["graph"] = capture(model, _capture_inputs(model, inputs), blocks=blocks, mode=capture_mode)

    def do_flops() -> None:
        from passes.annotate_flops import annotate_flops

        annotate_flops(ctx["graph"])

    def do_profile() -> None:
        cal = ctx["calibration"]
        if isinstance(cal, SensitivityProfile):
            check_model(cal.model, model, "the given profile")
            ctx["profile"] = cal
            return
        from dit_opt import profile_cache as kept
        from dit_opt.fingerprint import model_fingerprint
        from dit_opt.selection import measure_outputs, repeat_error

        fingerprint = model_fingerprint(model)
        # a family the solver may not use is not measured: PRUNE and WIDTH cost block re-runs, and
        # a block that cannot run them is then never run that way
        measure = {"max_age": max_age, "prune_rates": prune_rates if "prune" in actions else (),
                   "widths": widths if "width" in actions else (), "probe_rows": 4,
                   "gain_points": gain_points, "probes": 0}
        # what the profile depends on besides the model and the calibration: the cache's key
        settings = {**measure, "prune_rates": list(measure["prune_rates"]), "widths": list(measure["widths"]),
                    "blocks": blocks,
                    "inputs": repr(input_signature(ctx["inputs"], call_names(model)))}
        hit, ctx["profile_cached"] = kept.lookup(fingerprint, cal, ctx["inputs"], settings, profile_cache,
                                                 names=call_names(model))
        if hit is not None:
            check_model(hit.profile.model, model, "the kept profile", now=fingerprint)
            ctx["profile"], ctx["reference"] = hit.profile, hit.reference
            return
        reference: list = []
        repeated: list = []

        def recording(m: nn.Module) -> Any:
            # the profile's first run is plain: its outputs are the selection's reference too
            if not reference:
                reference.append(measure_outputs(cal, m))
                return None
            if not repeated:
                # its next run follows the full model as well (the measurements are on the side):
                # whether the calibration repeats itself, which comparing plans on it needs
                repeated.append(repeat_error(measure_outputs(cal, m), reference[0]))
                return None
            return cal(m)

        ctx["profile"] = _measure(ctx["graph"], recording, **measure, progress=progress, fingerprint=fingerprint)
        ctx["reference"] = reference[0] if reference else None
        ctx["repeat_error"] = repeated[0] if repeated else None
        kept.store(kept.CachedProfile(ctx["profile"], ctx["reference"]), fingerprint, cal, ctx["inputs"], settings,
                   profile_cache, names=call_names(model))

    def do_solve() -> None:
        from solvers import solve, solver_defaults

        def run_solver(problem: Any) -> Plan:
            return solve(problem, solver, **solver_defaults(solver, solver_options))

        profile = ctx["profile"]
        if asked_cfg and profile.e_cfg is None:
            valid = [a for a in actions if a != "cfg"]
            raise ConfigError(f"actions has 'cfg', but the calibration never ran the model on a classifier-free "
                              f"guidance batch (one call with both batch halves of its latent "
                              f"{call_names(model).latent!r} equal; a latent given as a list of one per sample never "
                              f"is), so there is no guidance branch to derive; drop 'cfg' (valid here: "
                              f"{', '.join(valid)}) or calibrate with guidance on")
        main = "block" if granularity == "auto" else granularity
        problem = profile.to_problem(budget, actions=actions, granularity=main)
        try:
            ctx["plan"] = run_solver(problem)
        except InfeasibleBudgetError as e:
            # below what the blocks alone can meet (the glue is a large share of the FLOPs): the
            # whole step forecast runs no glue either, and may meet it
            from dit_opt.selection import step_rhythm_plans

            fits = step_rhythm_plans(dataclasses.replace(problem, forecast_policy="always"))
            if not fits or solver not in ("cpsat", "dp"):
                raise
            errors.warn(f"dit-opt: {e}. With whole step forecasts between computes (no block and no glue run "
                        f"there) the budget is met: the plan is chosen among those rhythms")
            ctx["plan"] = max(fits, key=lambda p: (p.predicted_flops, -p.predicted_error))
        ctx["candidates"] = [ctx["plan"]]
        # the closed-loop search starts from the solver's plan (not from a fallback rhythm)
        ctx["refine_from"] = (ctx["plan"], problem, run_solver) if ctx["plan"].solver == solver else None
        ctx["select_with"] = _selection_calibration(select, ctx["calibration"], solver)
        if rounds and ctx["select_with"] is None:
            raise ConfigError("closed_loop needs plans measured on a calibration, but this one is a saved profile or "
                              "recorded trajectories; pass select=<a callable that samples with the module it is "
                              "given>, or drop closed_loop")
        if ctx["select_with"] is not None:
            from dit_opt.selection import candidate_plans

            module_problem = None
            if granularity == "auto" and profile.e_module_reuse is not None:
                module_problem = profile.to_problem(budget, actions=actions, granularity="module")
            ctx["candidates"] = candidate_plans(problem, ctx["plan"], run_solver, module_problem, run_solver)
            module_plan = next((p for p in ctx["candidates"] if p.solver == f"module:{solver}"), None)
            if module_plan is not None and ctx["refine_from"] is not None:
                ctx["refine_from"] = (module_plan, module_problem, run_solver)

    def do_select() -> None:
        from dit_opt.selection import is_repeatable, select_plan

        ctx["selection"] = []
        if ctx["select_with"] is None or len(ctx["candidates"]) < 2:
            return
        if ctx["select_with"] is ctx["calibration"] and not is_repeatable(ctx.get("repeat_error")):
            errors.warn(
                f"dit-opt: two runs of the full model through the calibration differ (relative error "
                f"{ctx['repeat_error']:.3g}), so comparing plans on it would compare noise: the solver's plan is kept "
                f"without measuring the {len(ctx['candidates'])} candidates. Make the calibration draw the same noise "
                f"every run: seed its generator inside it, or pass generator=torch.Generator().manual_seed(0) to "
                f"calibration_from_pipeline (which re-seeds it per run)")
            return

        def build(plan: Plan) -> OptimizedTransformer:
            return OptimizedTransformer(model, plan, profile=ctx["profile"], graph=ctx["graph"], compile=False,
                                        solver=solver, solver_options=solver_options, blocks=blocks,
                                        capture_mode=capture_mode)

        same = ctx["select_with"] is ctx["calibration"]
        plans, refine, closed = ctx["candidates"], None, []
        if rounds and ctx["refine_from"] is not None:
            start, problem, run_solver = ctx["refine_from"]
            plans = [p for p in plans if p is not start]  # the closed loop measures it itself

            def refine(ref: list, score: Callable[[Plan], Any]) -> list:
                from dit_opt.selection import Candidate, relative_error

                def run(plan: Plan) -> Any:
                    return loop.on_policy_errors(ctx["select_with"], build(plan), model, problem.num_steps)

                try:
                    closed.extend(loop.refine(start, problem, run_solver, run, lambda out: relative_error(out, ref),
                                              rounds))
                except loop.OtherLoopError as e:
                    errors.warn(f"dit-opt: no closed-loop search: {e}; the solver's plan is measured as it is")
                    return [score(start)]
                return [Candidate(p, e) for p, e in closed]

        ctx["plan"], ctx["selection"] = select_plan(model, plans, ctx["select_with"], build,
                                                    reference=ctx.get("reference") if same else None, refine=refine)
        # a run per candidate measured (each closed-loop plan's with the full model's beside it)
        ctx["selection_runs"] = len(ctx["selection"]) + len(closed) + (0 if same and ctx.get("reference") else 1)
        ctx["closed_loop"] = [{"solver": p.solver, "flop_fraction": p.flop_fraction, "error": e} for p, e in closed]

    def do_rewrite_and_lower() -> None:
        ctx["opt"] = OptimizedTransformer(model, ctx["plan"], profile=ctx["profile"], graph=ctx["graph"],
                                          compile=compile, solver=solver, solver_options=solver_options,
                                          blocks=blocks, capture_mode=capture_mode)

    times = _run_steps([
        ("capture", do_capture),
        ("annotate_flops", do_flops),
        ("profile", do_profile),
        ("solve", do_solve),
        ("select", do_select),
        ("rewrite+lower", do_rewrite_and_lower),
    ])
    opt = ctx["opt"]
    opt.step_times = times
    opt.selection = ctx["selection"]
    # where the profile found PRUNE impossible (a block or module that cannot run on a token subset)
    opt.report = {**_cost_report(ctx, times), "closed_loop": ctx.get("closed_loop", []),
                  "prune_excluded": dict(ctx["profile"].report.get("prune_excluded", {})),
                  "capture_mode": ctx["graph"].capture_mode, "capture": ctx["graph"].describe_capture()}
    return opt


def _cost_report(ctx: dict[str, Any], times: dict[str, float]) -> dict[str, Any]:
    """``opt.report``: the cost of ``optimize`` in plain calibration generations (the wall time of
    one plain run of the calibration, measured by the profile): all of it (``generations``), and
    the profile's and the selection's shares; the rest is capture, solving and lowering."""
    report = ctx["profile"].report
    cached = ctx.get("profile_cached")
    measured_now = not isinstance(ctx["calibration"], SensitivityProfile) and not cached
    plain = report.get("plain_calibration_seconds")
    runs = ctx.get("selection_runs", 0) if ctx["selection"] else 0  # each candidate (and the full model) once
    seconds = sum(times.values())
    if not plain:  # no timing unit (a profile made elsewhere without one): count runs
        return {"profile_generations": 0.0, "selection_runs": runs, "selection_generations": float(runs),
                "other_generations": 0.0, "generations": float(runs), "plain_calibration_seconds": plain,
                "seconds": seconds, "profile_cached": cached}
    profile_s = times.get("profile", 0.0) if measured_now else 0.0
    select_s = times.get("select", 0.0) if runs else 0.0
    return {
        "profile_generations": profile_s / plain,
        "selection_runs": runs,
        "selection_generations": select_s / plain,
        "other_generations": (seconds - profile_s - select_s) / plain,
        "generations": seconds / plain,
        "plain_calibration_seconds": plain,
        "seconds": seconds,
        "profile_cached": cached,
    }


def _optimize_dynamic(model: nn.Module, budget: float, dynamic: bool | float, *, calibration: Any,
                      compile: bool | str, progress: bool, **options: Any) -> RoutedTransformer:
    """``optimize(..., dynamic=...)``: the static plan at the budget plus headroom, less what the
    routers cost, and routers on it."""
    from dit_opt.capture import capture
    from dit_opt.router_training import router_flop_share, train_routers
    from passes.annotate_flops import annotate_flops

    headroom = DYNAMIC_HEADROOM if dynamic is True else dynamic
    if isinstance(headroom, bool) or not isinstance(headroom, int | float) or not 0.0 <= headroom <= 1.0:
        raise ConfigError(f"dynamic={dynamic!r}: True, False, or the headroom in [0, 1] the static plan is "
                          f"solved above the budget (e.g. 0.2)")
    if not callable(calibration):
        raise ConfigError("dynamic routers are trained on the calibration's denoising loops: pass "
                          "calibration=<a callable that samples with the module it is given> (or, for a "
                          f"pipeline, its call arguments); got {type(calibration).__name__}")
    # the routers' own FLOPs come out of the plan's share: with no headroom, open routers on a
    # plan at the budget would spend more than the budget
    inputs = options.get("example_inputs") or _first_call_inputs(model, calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture(model, _capture_inputs(model, inputs), blocks=options.get("blocks"),
                        mode=options.get("capture_mode", "auto"))
    annotate_flops(graph)
    share = router_flop_share(graph)
    plan_budget = min(1.0, budget * (1.0 + headroom)) - share
    if plan_budget <= 0.0:
        raise InfeasibleBudgetError(f"budget {budget}: the routers alone cost {share:.3f} of the FLOPs; give a "
                                    f"higher budget or more headroom")
    static = optimize(model, plan_budget, calibration=calibration, compile=False, granularity="block",
                      actions=("reuse", "forecast"), progress=progress, **options)
    routed = train_routers(model, calibration, budget=budget, plan=static.plan, graph=graph, progress=progress)
    report = {**routed.routers.config.report, "plan_budget": plan_budget,
              "plan_flop_fraction": static.plan.flop_fraction,
              "plan_generations": static.report.get("generations")}
    routed.use(routed.routers.with_config(report=report))
    return routed.compiled() if compile_mode(compile) else routed


def _selection_calibration(select: Any, calibration: Any, solver: str) -> Any:
    """The calibration on which candidate plans are compared, or ``None`` (no selection: turned
    off, or a baseline schedule, which keeps its own plan)."""
    if select is False or solver not in ("cpsat", "dp"):
        return None
    if callable(select) and not isinstance(select, bool):
        return guarded(select)
    usable = callable(calibration) and not isinstance(calibration, SensitivityProfile)
    if select is True and not usable:
        raise ConfigError("select=True needs a calibration callable to measure plans on, but the calibration "
                          "is a saved profile; pass select=<a callable that samples with the module it is given>")
    return calibration if usable else None


def load(path: str | Path, model: nn.Module, *, compile: bool | str = True
         ) -> OptimizedTransformer | RoutedTransformer:
    """Replay a saved optimisation on ``model`` without solving again.

    Args:
        path: a directory written by ``opt.save``, or the file a routed module's ``save`` wrote
            (``optimize(..., dynamic=...)``, :func:`dit_opt.train_routers`: routers, their plan).
        model: the same model (class, config and weights are checked).
        compile: how to lower (as in :func:`optimize`: ``True``/``"blocks"``, ``"step"``, ``False``).

    Raises:
        ArtifactError: the directory is missing, corrupt (a checksum fails), of another format
            version, or was made for another model.
    """
    if Path(path).is_file():
        return RoutedTransformer.load(path, model, compile=bool(compile_mode(compile)))
    plan, prof, meta = read(path, model)
    return OptimizedTransformer(model, plan, profile=prof, compile=compile, solver=meta.get("solver", "cpsat"),
                                solver_options=meta.get("solver_options") or {}, blocks=meta.get("blocks"),
                                capture_mode=meta.get("capture_mode", "auto"))
