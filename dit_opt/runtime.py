"""``OptimizedTransformer``: the drop-in module that runs a plan inside a diffusers pipeline.

It has the wrapped model's forward signature and ``config``, so ``pipe.transformer = opt``
works. Each call is mapped to a (step, branch) by its timestep (``dit_opt.steps``) or by the
pipeline's ``cache_context(name)``; the step's rewritten graph runs with the branch's cache.
Inputs of a new shape (batch size, resolution, another set of keyword arguments) get their
own capture and variants on first use: the plan does not depend on shapes.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from dit_opt import errors, schedules
from dit_opt.capture import context_parallel_config
from dit_opt.errors import ConfigError, DitOptError, InputMismatchError
from dit_opt.executor import half_rows, is_guidance_batch, narrow_block
from dit_opt.ir import BlockSpec, DiTGraph
from dit_opt.plan import Plan
from dit_opt.steps import StepTracker, timestep_value
from dit_opt.synthetic import CallNames, call_names
from dit_opt.wrapping import TransformerWrapper

__all__ = ["COMPILE_MODES", "OptimizedTransformer", "compile_mode", "input_signature", "timestep_as_tensor"]

#: how ``compile=`` lowers a plan: ``False`` eager FX code, ``"blocks"`` (``True``) each distinct
#: block compiled once and shared, ``"step"`` each distinct step variant compiled whole
COMPILE_MODES = (False, "blocks", "step")


def compile_mode(compile: bool | str) -> bool | str:
    """``compile=`` as one of :data:`COMPILE_MODES` (``True`` is ``"blocks"``).

    Raises:
        ConfigError: any other value.
    """
    if compile is True:
        return "blocks"
    if compile is False or (isinstance(compile, str) and compile in COMPILE_MODES):
        return compile
    raise ConfigError(f"compile={compile!r} is not a lowering: use False (eager), True or 'blocks' (each block "
                      f"compiled once, shared by every step), or 'step' (each step variant compiled whole: faster "
                      f"at run time, a compile per distinct step)")


def input_signature(inputs: dict[str, Any], names: CallNames) -> Any:
    """What a capture is specialised to in one call's inputs: every tensor's shape, dtype and
    device (through lists, tuples and dicts), other values by ``repr``, except a timestep
    (``names.timestep``) passed as a Python number, which counts by its type alone: its value
    is the step, not a shape, and must not make every step a new signature (the runtime passes
    it to the graphs as a tensor: :func:`timestep_as_tensor`)."""

    def sig(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), str(v.dtype), str(v.device))
        if isinstance(v, dict):
            return tuple(sorted((k, sig(x)) for k, x in v.items()))
        if isinstance(v, list | tuple):
            return tuple(sig(x) for x in v)
        return repr(v)

    def entry(k: str, v: Any) -> Any:
        return ("number", type(v).__name__) if k == names.timestep and _is_number(v) else sig(v)

    return tuple(sorted((k, entry(k, v)) for k, v in inputs.items() if v is not None))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def timestep_as_tensor(model: nn.Module, inputs: dict[str, Any], names: CallNames) -> dict[str, Any] | None:
    """``inputs`` as a capture should take them: a timestep passed as a Python number becomes a 0-d
    tensor (``int64`` for an int, ``float32`` for a float, on the model's device).

    ``torch.export`` specialises a graph to the value of a number input (another value then fails
    its guard), so a graph captured on a number would serve one step only; on a tensor it serves
    every step. That is only right where the model computes the same on the tensor as on the
    number, which is checked here on this call (two forwards; diffusers' PriorTransformer turns
    a number into a tensor itself, so it does).

    Returns:
        ``inputs`` itself where the timestep is a tensor or not passed; the inputs with the tensor
        where the model computes alike; ``None`` where it does not (each value then needs its own
        capture).
    """
    if not _is_number(names.timestep_of(inputs)):
        return inputs
    tensor_form = _tensor_timestep(model, inputs, names)
    from torch.utils._python_dispatch import _disable_current_modes

    from dit_opt.executor import model_sample

    # one-time analysis: outside any dispatch mode the caller runs under (a FlopCounterMode)
    with torch.no_grad(), _disable_current_modes():
        a, b = model_sample(model(**inputs)), model_sample(model(**tensor_form))
    same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    return tensor_form if same else None


def _tensor_timestep(model: nn.Module, inputs: dict[str, Any], names: CallNames) -> dict[str, Any]:
    """``inputs`` with their Python-number timestep as a 0-d tensor on the model's device."""
    device = next(model.parameters()).device
    return {**inputs, names.timestep: torch.tensor(names.timestep_of(inputs), device=device)}


#: id of a captured graph -> the model captured at half its batch (module-level CFG)
_HALF_CAPTURES: dict[int, DiTGraph] = {}
#: (id of a captured graph, id of the profile) -> its rewritten block graphs (module-level plans)
_BLOCK_GRAPHS: dict[tuple[int, int], dict] = {}


def _kept_with(store: dict, key: Any, owners: tuple, make: Callable[[], Any]) -> Any:
    """``store[key]``, made by ``make()`` on first use and dropped when any of ``owners`` (the
    objects whose ids make the key; ``None`` ones ignored) is garbage collected, so that a new
    object with a reused id never finds it."""
    if key not in store:
        store[key] = make()
        for owner in owners:
            if owner is not None:
                weakref.finalize(owner, store.pop, key, None)
    return store[key]


@dataclass
class _Runner:
    """Everything specialised to one input signature: the capture and its step variants."""

    graph: DiTGraph
    variants: list
    by_plan: dict[tuple, list] = field(default_factory=dict)  # variants of re-solved or unguided plans
    warned_unguided: bool = False
    weights: dict[int, list] = field(default_factory=dict)  # id(plan) -> per step, its forecast weights

    def step_inputs(self, plan: Plan, step: int) -> dict[str, torch.Tensor]:
        """The forecast weights ``plan``'s step ``step`` reads (inputs beside the cache reads)."""
        if id(plan) not in self.weights:
            from passes.rewrite_plan import step_weights

            ref = call_names(self.graph.model).latent_of(self.graph.example_inputs)
            ref = ref[0] if isinstance(ref, list | tuple) and ref else ref  # one latent per sample
            device = ref.device if isinstance(ref, torch.Tensor) else None
            self.weights[id(plan)] = step_weights(plan, device=device)
        per_step = self.weights[id(plan)]
        return per_step[step] if step < len(per_step) else {}


@dataclass(frozen=True)
class _BranchState:
    """One branch's cache in the running generation, and the input signature that wrote it."""

    signature: Any
    cache: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Located:
    """A call's (step, branch), the generation's first timestep, and what records the call."""

    step: int
    branch: Any
    first_t: float | None
    commit: Callable[[], None]


@dataclass
class _Stats:
    steps: list[dict[str, Any]] = field(default_factory=list)
    generations: int = 0
    extra_calls: int = 0


#: Forward arguments with which a pipeline leaves blocks out of a call on purpose (SD3's
#: skip-layer guidance: ``skip_layers``). Such a call runs the model as it is, outside the plan.
SKIPPING_ARGUMENTS = ("skip_layers",)


class OptimizedTransformer(TransformerWrapper):
    """A transformer that runs a :class:`~dit_opt.plan.Plan` (see :func:`dit_opt.optimize`).

    Attributes:
        model: the wrapped model (its weights are shared, not copied).
        plan: the plan for the calibrated schedule.
        profile: the sensitivity profile the plan was solved from (``None`` if replayed without).
        step_times: seconds of each step of :func:`dit_opt.optimize` (empty when built directly).
        report: what :func:`dit_opt.optimize` cost, in plain calibration generations (the unit
            is the wall time of one plain run of the calibration, measured by the profile):
            ``generations`` for all of it, of which ``profile_generations``,
            ``selection_generations`` and ``other_generations`` (capture, solving, lowering);
            ``selection_runs`` calibration runs measured candidates; ``seconds`` the wall time.
            Empty when built directly.
        selection: the candidate plans ``optimize`` compared on the calibration, with their
            measured errors (:class:`dit_opt.selection.Candidate`; empty when none were compared).
    """

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        *,
        profile: Any = None,
        graph: DiTGraph | None = None,
        compile: bool | str = True,
        solver: str = "cpsat",
        solver_options: dict | None = None,
        blocks: Any = None,
        capture_mode: str = "auto",
    ) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.profile = profile
        self.compile = compile_mode(compile)
        self.solver = solver
        self.solver_options = dict(solver_options or {})
        self.blocks_arg = blocks
        self.capture_mode = capture_mode
        self.step_times: dict[str, float] = {}
        self.report: dict[str, Any] = {}
        self.selection: list = []
        self._plans: dict[tuple[float, ...], Plan] = {}  # re-solved for other schedules
        self._warned_guesses: set[tuple[float, ...]] = set()
        self._warned_past = -1  # the generation last warned of running past its plan
        self._active = plan
        self._runners: dict[Any, _Runner] = {}
        self._narrowed: dict[tuple[str, float], nn.Module] = {}
        self._compiled: dict[int, nn.Module] = {}
        self._names = call_names(model)  # what its forward calls the latent and the timestep
        self._tracker = StepTracker(self._names)
        self._states: dict[Any, _BranchState] = {}
        self._context: str | None = None
        self._context_step: int | None = None
        self._context_steps: int | None = None  # num_inference_steps a pipeline's cache_context gave
        self._declared: tuple[float, ...] | None = None  # set_schedule's timesteps
        self._loop_known = False  # whether the running loop's plan was chosen for its schedule
        self._ctx_trackers: dict[str, StepTracker] = {}
        self._stats = _Stats()
        self._first_t: float | None = None
        # per kind of number timestep: whether it is captured as a tensor (timestep_as_tensor)
        self._number_as_tensor: dict[tuple[type, bool], bool] = {}
        if graph is not None:
            self._runners[self._runner_key(graph.example_inputs)] = self._make_runner(graph)
        self.expose_forward(model, self._forward)

    # ---- what pipelines read: TransformerWrapper ---------------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, step_index: int | None = None, **details: Any):
        """Calls inside share the cache state ``name`` (diffusers pipelines use this for CFG branches).

        Args:
            name: the branch (e.g. ``"cond"``, ``"uncond"``); each name tracks its own steps.
            step_index: the denoising step of the calls inside, where the pipeline gives it:
                it decides the step (0 starts a new generation) in place of the timestep.
            details: what else a pipeline passes. ``num_inference_steps``, where given, is the
                loop's step count: a loop of another length than the calibrated one runs a plan
                re-solved for it (its timesteps guessed from the calibrated schedule's shape
                unless declared by :meth:`set_schedule`). The rest (``sigma``, ...) is not used.
        """
        previous = self._context, self._context_step, self._context_steps
        steps = details.get("num_inference_steps")
        self._context, self._context_step = name, None if step_index is None else int(step_index)
        self._context_steps = None if steps is None else int(steps)
        try:
            yield
        finally:
            self._context, self._context_step, self._context_steps = previous

    def set_schedule(self, timesteps: Any) -> None:
        """Declare the schedule of the generations that follow, so that each runs a plan made for
        its loop (re-solved from the stored profile where it differs from the calibrated one).

        :func:`dit_opt.attach` calls this whenever the pipeline's scheduler sets its timesteps;
        call it yourself after ``pipe.scheduler.set_timesteps(...)`` when you put the module
        into a pipeline by hand. Without it, a loop that is not the calibrated one is guessed
        from its first two timesteps (``dit_opt.schedules.guess``), which can miss the step
        count of shifted flow-matching schedules.

        Args:
            timesteps: the scheduler's timesteps (``pipe.scheduler.timesteps``), as the scheduler
                holds them: a loop that starts inside them (image-to-image) and pipelines that
                scale them for the transformer (Flux: ``t / 1000``) are found from each
                generation's first call (``dit_opt.schedules.locate``). ``None`` forgets them.

        Raises:
            ConfigError: ``timesteps`` is not a non-empty sequence of finite numbers.
        """
        if timesteps is None:
            self._declared = None
            return
        try:
            values = np.asarray(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else
                                [float(t) for t in timesteps], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"set_schedule needs the scheduler's timesteps (e.g. pipe.scheduler.timesteps), "
                              f"a sequence of numbers; got {type(timesteps).__name__}") from e
        if values.size == 0 or not np.isfinite(values).all():
            raise ConfigError(f"set_schedule needs a non-empty sequence of finite timesteps, got {values.tolist()[:8]}")
        self._declared = tuple(float(t) for t in values)

    def reset(self) -> None:
        """Forget every cache: the next call starts a new generation."""
        self._tracker.reset()
        self._states.clear()
        self._ctx_trackers.clear()
        self._first_t = None
        self._loop_known = False

    def save(self, path: Any) -> Any:
        """Write the plan, profile, permutations and metadata to directory ``path`` (see :func:`dit_opt.load`)."""
        from dit_opt.artifacts import save

        return save(self, path)

    def export(self, path: Any) -> Any:
        """Export the lowered step variants as ``.pt2`` files (see :mod:`dit_opt.export`)."""
        from dit_opt.export import export

        return export(self, path)

    # ---- inspection --------------------------------------------------------------------------
    def captured(self, example_inputs: dict[str, Any] | None = None) -> _Runner:
        """The first captured input shapes and their step variants; captures now if none are.

        A module made by ``dit_opt.optimize`` has captured its calibration's shapes; a loaded one
        captures on its first call, or here from ``example_inputs`` (default: synthetic inputs
        derived from the model).

        Raises:
            DitOptError: nothing is captured and no example inputs are known for this class.
        """
        runner = next(iter(self._runners.values()), None)
        if runner is not None:
            return runner
        if example_inputs is None:
            from dit_opt.synthetic import example_inputs as synthetic_inputs

            try:
                example_inputs = synthetic_inputs(self.model)
            except InputMismatchError as e:
                raise DitOptError(f"nothing captured yet and no synthetic inputs for {type(self.model).__name__}: "
                                  f"call the module once, or pass example_inputs=... ({e})") from e
        return self._runner_for(self._graph_inputs(example_inputs))

    def graph(self, step: int, example_inputs: dict[str, Any] | None = None) -> torch.fx.GraphModule:
        """The rewritten ``GraphModule`` that ``step`` runs (at the captured input shapes; see
        :meth:`captured` for a module that has not run yet)."""
        runner = self.captured(example_inputs)
        if not 0 <= step < len(runner.variants):
            raise IndexError(f"step {step} is outside the plan's {len(runner.variants)} steps")
        return runner.variants[step].gm

    @property
    def active_plan(self) -> Plan:
        """The plan the running (or last) loop follows: :attr:`plan`, or the one re-solved for a
        loop of another schedule."""
        return self._active

    def stats(self) -> dict[str, Any]:
        """After a generation: per step the actions that ran, modelled FLOPs (the glue's included)
        and cache memory held; ``extra_calls``, the calls that ran the model as it is, outside
        the plan (skip-layer guidance's, :data:`SKIPPING_ARGUMENTS`), not in ``flop_fraction``."""
        steps = self._stats.steps
        plan = self._active
        spent = sum(s["flops"] for s in steps)
        full = float(plan.full_flops) * len(steps) / max(1, plan.num_steps)
        return {
            "generations": self._stats.generations,
            "steps": steps,
            "flop_fraction": spent / full if steps else None,
            "cache_bytes": self.cache_bytes(),
            "extra_calls": self._stats.extra_calls,
        }

    def explain(self, step: int) -> Any:
        """``torch._dynamo.explain`` of the variant that ``step`` runs (eager blocks inlined).

        The variant is traced with zero-filled cache inputs of the right shapes; a variant
        that lowers as one graph reports ``graph_break_count == 0``.
        """
        import torch._dynamo

        runner = self.captured()
        graph = runner.graph
        eager = self._build(graph, self._active)[step]
        caches = self.example_caches(runner, step)
        if graph.blockwise is not None:
            # the glue is the model's Python: each block's rewritten graph is what lowers as one
            from dit_opt.blockwise import block_leaves

            feed = dict(zip(eager.reads, caches, strict=True))
            leaves = block_leaves(graph.model, graph.blockwise, graph.example_inputs)
            with torch.no_grad():
                return {name: torch._dynamo.explain(v.gm)(*leaves[name], *[feed[k] for k in v.reads])
                        for name, v in eager.blocks}
        flat = graph.flat_inputs(**graph.example_inputs)
        with torch.no_grad():
            return torch._dynamo.explain(eager.gm)(*flat, *caches)

    def example_caches_by_step(self, runner: _Runner) -> Iterator[list[torch.Tensor]]:
        """For each step in turn, the cache tensors it reads, made by running the steps before it
        on the captured example inputs (for tracing, explaining and exporting variants); each
        step runs once, after its caches are yielded."""
        graph = runner.graph
        state: dict[str, torch.Tensor] = {}
        ts = self._active.timesteps or [None] * len(runner.variants)
        for t, v in enumerate(runner.variants):
            feed = {**state, **runner.step_inputs(self.plan, t)}  # runner.variants are self.plan's
            yield [feed[k] for k in v.reads]
            inputs = dict(graph.example_inputs)
            name = self._names.timestep
            if ts[t] is not None and isinstance(self._names.timestep_of(inputs), torch.Tensor):
                inputs[name] = torch.full_like(inputs[name], ts[t])
            with torch.no_grad():  # not around the yield: the caller's grad mode is its own
                out = (v.gm if graph.blockwise is None else v)(*graph.flat_inputs(**inputs),
                                                                 *[feed[k] for k in v.reads])
            state.update(zip(v.writes, out[v.num_model_outputs:], strict=True))

    def example_caches(self, runner: _Runner, step: int) -> list[torch.Tensor]:
        """Cache tensors that ``step`` reads (see :meth:`example_caches_by_step`)."""
        return next(itertools.islice(self.example_caches_by_step(runner), step, None))

    def cache_bytes(self) -> int:
        """Bytes of cached tensors held now, over every branch."""
        return sum(t.numel() * t.element_size() for st in self._states.values() for t in st.cache.values())

    # ---- calling -----------------------------------------------------------------------------
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        # A transaction: everything that can reject the call (binding, capture, cache reads, the
        # graph itself) runs before the step tracker, caches and stats change, so a rejected
        # call leaves the module exactly as it was.
        return_dict = kwargs.pop("return_dict", True)
        try:
            named = inspect.signature(self.model.forward).bind(*args, **kwargs).arguments
        except TypeError as e:
            raise InputMismatchError(f"{type(self.model).__name__}: this call does not fit its forward ({e}); "
                                     f"the optimised module is unchanged") from e
        named.pop("return_dict", None)
        inputs = {k: v for k, v in named.items() if v is not None}
        skipped = [k for k in SKIPPING_ARGUMENTS if inputs.get(k) is not None and len(inputs[k]) > 0]
        if skipped:
            # a call with blocks left out on purpose (skip-layer guidance's extra call in a step):
            # the model as it is, with no step counted and no cache read or written
            self._stats.extra_calls += 1
            with torch.no_grad():
                return self.model(*args, return_dict=return_dict, **kwargs)
        t = timestep_value(self._names.timestep_of(inputs, 0.0))
        where = self._locate(t, inputs)
        step, branch = where.step, where.branch
        key = self._signature(inputs)
        try:
            inputs = self._graph_inputs(inputs)
            runner = self._runner_for(inputs)
        except InputMismatchError as e:
            raise InputMismatchError(f"{e} (This call was rejected; the optimised module is unchanged.)") from e
        # only once the inputs fit: re-solving for another schedule can fail on its own
        plan, loop_known = self._plan_for_step(step, t, where.first_t)
        variants = runner.variants if plan is self.plan else self._variants_for(runner, plan)
        if step >= len(variants):
            if self._warned_past != self._stats.generations:  # once per generation
                self._warned_past = self._stats.generations
                errors.warn(f"dit-opt: this loop runs past its plan's {len(variants)} steps: step {step} and the "
                            f"ones after it compute in full, above the FLOP budget. Declare the loop's schedule "
                            f"(dit_opt.attach(pipe, opt) once, or opt.set_schedule(pipe.scheduler.timesteps) "
                            f"before each call) so that it runs a plan made for all its steps")
            step_variant = None
        else:
            step_variant = variants[step]
            if step_variant.derives_guidance and not is_guidance_batch(self._names.latent_of(inputs)):
                # no guidance half to derive (guidance off, another batch, a latent given as a list
                # of one per sample, which is never a guidance batch): those blocks compute
                if not runner.warned_unguided:
                    runner.warned_unguided = True
                    warnings.warn("the plan derives one half of classifier-free-guidance batches from the other "
                                  "(CFG actions), but these calls are not guidance batches (an even batch whose two "
                                  "halves are equal): those blocks compute in full, above the plan's FLOPs; "
                                  "optimize without 'cfg' in actions for calls like these", stacklevel=3)
                step_variant = self._variants_for(runner, plan, guidance=False)[step]
        # the branch's cache as of this generation (none at its first step), written under
        # the same inputs' signature: another signature's tensors would not fit
        held = self._states.get(branch) if step > 0 else None
        state = dict(held.cache) if held is not None and held.signature == key else {}
        graph = runner.graph
        flat = graph.flat_inputs(**inputs)
        with torch.no_grad():
            if step_variant is None:
                out = graph.full(flat)
            else:
                feed = {**state, **runner.step_inputs(plan, step)}
                missing = [k for k in step_variant.reads if k not in feed]
                if missing:
                    why = ("the inputs' shapes changed since the generation's first step" if held is not None
                           and held.signature != key else "no earlier step of this generation wrote them")
                    raise DitOptError(
                        f"step {step} (branch {branch!r}) reuses cache entries {missing[:3]}, but {why}. Start "
                        f"generations from their first step with the same inputs' shapes, or call opt.reset(); "
                        f"loops stepped in lockstep need a cache_context name each. The optimised module is unchanged."
                    )
                out = step_variant(*flat, *[feed[k] for k in step_variant.reads])
                n = step_variant.num_model_outputs
                state.update(zip(step_variant.writes, out[n:], strict=True))
                out = out[:n]
            result = graph.unflatten_output(out)
        # the call ran: commit it
        where.commit()
        self._active, self._loop_known = plan, loop_known
        self._states[branch] = _BranchState(signature=key, cache=state)
        self._record(step, plan, step_variant)
        if not return_dict and hasattr(result, "to_tuple"):
            return result.to_tuple()
        if return_dict and isinstance(result, tuple) and context_parallel_config(self.model) is not None:
            # captured with return_dict=False, as diffusers' context-parallel hooks need
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=result[0])
        return result

    def _locate(self, t: float, inputs: dict[str, Any]) -> _Located:
        """The (step, branch) of a call at ``t``, with what commits it (nothing changes before)."""
        if self._context is not None:
            # The pipeline names the branch; each named branch tracks its own steps (one call
            # per step), and the pipeline's step index, when it gives one, is authoritative.
            name, index = self._context, self._context_step
            tracker = self._ctx_trackers.get(name) or StepTracker(self._names)
            pos = tracker.peek(t, inputs)
            if index is not None and index != pos.step:
                fresh = StepTracker(self._names)
                pos = fresh.peek(t, inputs) if index == 0 else replace(pos, step=index, branch=0, last=t)
            branch: Any = name
            counts_generation = pos.step == 0 and name == next(iter(self._ctx_trackers), name)

            def commit() -> None:
                self._ctx_trackers[name] = tracker
                tracker.commit(pos)
                self._count_generation(counts_generation, t)
        else:
            tracker = self._tracker
            pos = tracker.peek(t, inputs)
            branch = pos.branch
            counts_generation = pos.step == 0 and pos.branch == 0

            def commit() -> None:
                tracker.commit(pos)
                self._count_generation(counts_generation, t)

        first_t = t if pos.step == 0 else self._first_t
        return _Located(step=pos.step, branch=branch, first_t=first_t, commit=commit)

    def _count_generation(self, new: bool, t: float) -> None:
        if new:
            self._stats = _Stats(generations=self._stats.generations + 1)
            self._first_t = t

    def _plan_for_step(self, step: int, t: float, first_t: float | None) -> tuple[Plan, bool]:
        """The plan of the running loop, and whether it was chosen for the loop's own schedule
        (the caller makes both the active ones once the call has run): at the first step, the
        plan for the declared schedule (:meth:`set_schedule`, or the step count a pipeline's
        ``cache_context`` gives) where there is one; at the second, where none was declared
        and the loop is not the calibrated one, the plan for the schedule guessed from its first
        two timesteps. Plans for other schedules are re-solved from the profile."""
        cal = None if self.plan.timesteps is None else np.asarray(self.plan.timesteps, dtype=np.float64)
        if step == 0:
            if self._declared is not None:
                loop = schedules.locate(self._declared, t)
                if loop is not None:
                    return self.plan_for_schedule(loop), True
                errors.warn(f"dit-opt: the generation starts at timestep {t:g}, which is not in the schedule "
                            f"declared by set_schedule ({len(self._declared)} timesteps from "
                            f"{self._declared[0]:g}): its plan is guessed from its first timesteps. Call "
                            f"opt.set_schedule(pipe.scheduler.timesteps) after the scheduler's set_timesteps, "
                            f"or use dit_opt.attach(pipe, opt), which does it")
            steps = self._context_steps
            if steps is not None and cal is not None and steps != len(cal):
                return self.plan_for_schedule(schedules.resample(cal, steps, first=t)), True
            return self.plan, self._context_steps is not None
        if step == 1 and not self._loop_known and cal is not None:
            t0 = first_t if first_t is not None else t
            if not schedules.same_schedule([t0, t], cal[:2]):
                loop = schedules.guess(t0, t, cal)
                if loop not in self._warned_guesses:
                    self._warned_guesses.add(loop)
                    errors.warn(
                        f"dit-opt: this loop is not the calibrated one (its first timesteps {t0:g}, {t:g}; the "
                        f"plan's {cal[0]:g}, {cal[1]:g}) and its schedule was not declared, so it runs a plan "
                        f"re-solved for {len(loop)} steps guessed from those two timesteps. If the loop has "
                        f"another length, its FLOPs miss the budget (shifted flow-matching schedules are not "
                        f"guessed exactly). Declare the schedule: dit_opt.attach(pipe, opt) once, or "
                        f"opt.set_schedule(pipe.scheduler.timesteps) before each call of the pipeline")
                return self.plan_for_schedule(loop), False
        return self._active, self._loop_known

    def plan_for_schedule(self, timesteps: Any) -> Plan:
        """The plan for another schedule, re-solved from the stored profile (no re-profiling).

        Args:
            timesteps: the loop's timestep values as the transformer receives them (the plan's
                own schedule gives the plan itself).

        Raises:
            DitOptError: no profile is stored with this module.
        """
        ts = tuple(round(float(t), 6) for t in timesteps)
        if self.plan.timesteps is not None and schedules.same_schedule(ts, self.plan.timesteps):
            return self.plan
        if ts in self._plans:
            return self._plans[ts]
        if self.profile is None:
            raise DitOptError(
                f"this loop runs {len(ts)} steps but the plan was made for {self.plan.num_steps}, and no "
                f"sensitivity profile is stored to re-solve it; optimise again or save/load with the profile"
            )
        from solvers import solve, solver_defaults
        from solvers.fill import fill

        # the same granularity as the plan: the caches step 0 wrote are the plan's units'
        granularity = "module" if any(u.role is not None for u in self.plan.units) else "block"
        problem = self.profile.to_problem(self.plan.budget, timesteps=ts, granularity=granularity)
        # what the solver leaves of the budget filled where the modelled error falls (as
        # optimize's candidates are): on a longer loop than calibrated CP-SAT can stop well below it
        plan = solve(problem, self.solver, **solver_defaults(self.solver, self.solver_options))
        if self.solver in ("cpsat", "dp"):  # (a baseline's plan is its rule's, as published)
            plan = fill(problem, plan)
        # forecasts extrapolate as the kept plan's did (the form was measured on the calibration)
        plan = replace(plan, forecast_form=self.plan.forecast_form)
        self._plans[ts] = plan
        return plan

    def _variants_for(self, runner: _Runner, plan: Plan, guidance: bool = True) -> list:
        key = (id(plan), guidance)
        if key not in runner.by_plan:
            runner.by_plan[key] = self._lower(self._build(runner.graph, plan, guidance))
        return runner.by_plan[key]

    def _record(self, step: int, plan: Plan, variant: Any) -> None:
        if variant is None:
            counts = {"compute": len(plan.units)}
            flops = float(plan.full_flops) / max(1, plan.num_steps)
        else:
            counts = {}
            for a in variant.actions:
                counts[a.kind.value] = counts.get(a.kind.value, 0) + 1
            flops = float(plan.step_flops[step]) + plan.glue_flops(step)
        entry = {"step": step, "actions": counts, "flops": flops, "cache_bytes": self.cache_bytes()}
        steps = self._stats.steps
        if step < len(steps):
            steps[step] = entry  # another branch of the same step
        else:
            steps.append(entry)

    # ---- building ----------------------------------------------------------------------------
    def _signature(self, inputs: dict[str, Any]) -> Any:
        """The inputs' signature (:func:`input_signature`): what a branch's cache was written under."""
        return input_signature(inputs, self._names)

    def _runner_key(self, inputs: dict[str, Any]) -> Any:
        """Which runner serves ``inputs``: their signature, and the timestep's value where it is a
        Python number the graphs take as it is (torch.export specialises a graph to that value)."""
        value = self._names.timestep_of(inputs)
        key = self._signature(inputs)
        return (key, repr(value)) if _is_number(value) else key

    def _graph_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` as the captured graphs take them: a Python-number timestep as a tensor where
        the model computes alike on it (:func:`timestep_as_tensor`, checked on the first such
        call of each kind), so that one capture serves every step; else as given, one capture per value.

        The kinds are ints, whole floats and fractional floats, each checked on its first value: a
        model that rounds a number itself (PriorTransformer makes it an integer tensor) computes
        alike on a whole float but not on a fractional one."""
        value = self._names.timestep_of(inputs)
        if not _is_number(value):
            return inputs
        kind = (type(value), float(value).is_integer())
        if kind in self._number_as_tensor:  # checked on an earlier call
            return _tensor_timestep(self.model, inputs, self._names) if self._number_as_tensor[kind] else inputs
        converted = timestep_as_tensor(self.model, inputs, self._names)
        self._number_as_tensor[kind] = converted is not None
        if converted is None:
            warnings.warn(f"{type(self.model).__name__} computes otherwise when its timestep {self._names.timestep!r} "
                          f"is a tensor than when it is the Python number passed, so each timestep value gets a "
                          f"capture of its own (slow: one per step); pass the timestep as a tensor (torch.tensor(t)) "
                          f"to capture once", stacklevel=4)
        return inputs if converted is None else converted

    def _runner_for(self, inputs: dict[str, Any]) -> _Runner:
        """The runner of ``inputs`` (as :meth:`_graph_inputs` gives them), captured on first use."""
        key = self._runner_key(inputs)
        if key not in self._runners:
            self._runners[key] = self._make_runner(self._capture(inputs))
        return self._runners[key]

    def _capture(self, inputs: dict[str, Any]) -> DiTGraph:
        from torch.utils._python_dispatch import _disable_current_modes

        from dit_opt.capture import capture

        # Capturing is one-time analysis (it runs the model a few times): keep it out of any
        # dispatch mode the caller runs under, such as a FlopCounterMode measuring a generation.
        with warnings.catch_warnings(), _disable_current_modes():
            warnings.simplefilter("ignore")
            return capture(self.model, inputs, blocks=self.blocks_arg, mode=self.capture_mode)

    def _make_runner(self, graph: DiTGraph) -> _Runner:
        variants = self._lower(self._build(graph, self.plan))
        return _Runner(graph=graph, variants=variants)

    def _build(self, graph: DiTGraph, plan: Plan, guidance: bool = True) -> list:
        from passes.rewrite_plan import build_variants

        # guidance=False: the variants for calls that are not guidance batches (CFG blocks compute)
        return build_variants(graph, plan, self._narrow, self._narrow_mlp, guidance=guidance,
                              half_module=lambda spec, name: self._half_module(graph, spec, name),
                              cache=self._block_graphs(graph))

    def _block_graphs(self, graph: DiTGraph) -> dict:
        """The rewritten block graphs shared by every module built on ``graph`` with this profile
        (optimize's candidates: a block given the same actions is rewritten once), dropped with
        either. The profile is part of the key: a narrowed MLP follows its channel order."""
        return _kept_with(_BLOCK_GRAPHS, (id(graph), id(self.profile)), (graph, self.profile), dict)

    def _half_module(self, graph: DiTGraph, spec: BlockSpec, name: str) -> nn.Module:
        """Sub-module ``name`` of block ``spec`` as captured at half of ``graph``'s batch (one
        extra capture per captured graph, made on first use by a module-level ``CFG``)."""
        # shared by every module built on this graph (optimize's candidates), dropped with it
        half = _kept_with(_HALF_CAPTURES, id(graph), (graph,), lambda: self._capture_half(graph, f"{spec.name}.{name}"))
        return half.module.get_submodule(f"{spec.name}.{name}")

    def _capture_half(self, graph: DiTGraph, what: str) -> DiTGraph:
        """``graph``'s model captured on the first half of every batch-major input.

        An input is taken as batch-major when its first dimension is the batch; where another
        input has that length by coincidence (Flux's ``txt_ids`` with as many text tokens as
        samples), halving it changes the blocks' other inputs, so each such input is tried whole.
        """
        inputs = graph.example_inputs
        latent = self._names.latent
        ref = inputs.get(latent)
        if isinstance(ref, list | tuple):
            raise DitOptError(f"CFG of {what}: {type(self.model).__name__} takes its latent {latent!r} as a list of "
                              f"one per sample, which has no guidance batch to halve (CFG applies only to a latent "
                              f"tensor whose two batch halves are equal); plan this module without 'cfg' in actions")
        if not isinstance(ref, torch.Tensor) or ref.dim() == 0 or ref.shape[0] % 2:
            raise DitOptError(f"CFG of {what} needs an even batch of {latent!r} (the latent) to halve, got "
                              f"{None if not isinstance(ref, torch.Tensor) else tuple(ref.shape)}")
        batch = ref.shape[0]
        candidates = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch]

        def halved(shape: tuple[int, ...]) -> tuple[int, ...]:
            return (shape[0] // 2, *shape[1:]) if shape and shape[0] == batch else tuple(shape)

        expected = {b.name: [(n, halved(t.shape)) for n, t in b.inputs] for b in graph.blocks}
        for whole in [None, *(k for k in candidates if k != latent)]:
            trial = {k: half_rows(v, ref, 0) if k in candidates and k != whole else v for k, v in inputs.items()}
            try:
                half = self._capture(trial)
            except Exception:  # noqa: BLE001 - a wrong guess at the batch-major inputs; try the next
                continue
            got = {b.name: [(n, tuple(t.shape)) for n, t in b.inputs] for b in half.blocks}
            if got == expected:
                return half
        raise DitOptError(f"CFG of {what}: the model could not be captured at half the batch ({batch // 2}) "
                          f"with its blocks' inputs halved; plan this module without CFG "
                          f"(actions without 'cfg', or granularity='block')")

    def _narrow(self, spec: BlockSpec, width: float) -> nn.Module:
        key = (spec.name, width)
        if key not in self._narrowed:
            order = {}
            if self.profile is not None:
                prefix = spec.name + "."
                order = {k[len(prefix):]: v for k, v in self.profile.channel_order.items() if k.startswith(prefix)}
            self._narrowed[key] = narrow_block(self.model.get_submodule(spec.name), spec, width, order)
        return self._narrowed[key]

    def _narrow_mlp(self, spec: BlockSpec, name: str, width: float) -> nn.Module:
        from passes.rewrite_modules import narrow_feedforward

        key = (f"{spec.name}.{name}", width)
        if key not in self._narrowed:
            order = self.profile.channel_order.get(key[0]) if self.profile is not None else None
            self._narrowed[key] = narrow_feedforward(self.model.get_submodule(key[0]), width, order)
        return self._narrowed[key]

    def _lower(self, variants: list) -> list:
        """Lower the variants for ``self.compile`` (see :data:`COMPILE_MODES`).

        ``"blocks"``: each distinct block module is compiled once (regional compilation) and
        shared by every block call of every variant; the rest of a step runs as FX code.
        ``"step"``: each distinct step variant is compiled as one graph (its glue, cache traffic
        and forecasts fused, one guard check per step), its blocks marked as nested compile
        regions so that their code is traced once and stamped out. On a block-by-block capture
        the unit is each block's rewritten graph (the glue between blocks is the model's Python).
        """
        if not self.compile:
            return variants
        if self.compile == "step" and context_parallel_config(self.model) is not None:
            # Dynamo's nested compile regions reject the blocks' aliased outputs under the
            # context-parallel split (torch 2.13); regional compilation lowers them
            raise ConfigError(f"compile='step' does not lower a {type(self.model).__name__} under diffusers' context "
                              f"parallelism; load or optimise it with compile=True (each block compiled once) or "
                              f"compile=False")
        import torch._dynamo

        from passes.rewrite_plan import BlockwiseStep, copy_variant

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # the built variants are shared with the other modules built on this graph (eager
        # ones among them): the compiled blocks go into copies
        copies: dict[int, Any] = {}

        def lowered(v: Any) -> Any:
            if id(v.gm) not in copies:
                c = copy_variant(v)
                for name, mod in list(c.gm.named_children()):
                    if _is_block(mod):
                        if id(mod) not in self._compiled:
                            self._compiled[id(mod)] = torch.compile(mod) if self.compile == "blocks" else _Region(mod)
                        setattr(c.gm, name, self._compiled[id(mod)])
                if self.compile == "step":
                    c = replace(c, call=torch.compile(c.gm))
                copies[id(v.gm)] = c
            return copies[id(v.gm)]

        # a block-by-block capture's step: each block's graph lowered, the glue stays the model's Python
        steps: dict[int, Any] = {}
        return [steps.setdefault(id(v), v.map_blocks(lowered)) if isinstance(v, BlockwiseStep) else lowered(v)
                for v in variants]


class _Region(nn.Module):
    """A block called from a whole-step compiled graph: a nested compile region (traced once,
    its code reused at every call of any block with the same structure and shapes)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    @torch.compiler.nested_compile_region
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.block(*args, **kwargs)


def _is_block(mod: nn.Module) -> bool:
    # Blocks (original or narrowed) are the only diffusers modules a variant calls directly;
    # the pre/post-processing it calls are torch.export InterpreterModules (or containers).
    return not type(mod).__module__.startswith("torch.") and not hasattr(mod, "graph")
