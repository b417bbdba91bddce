"""Calibrations: callables that run complete denoising loops with the module they are given.

Sensitivity needs real trajectories: consecutive steps of a trained model are similar, which
is what makes caching work. A calibration is any ``callable(module)`` that samples with
``module`` as the transformer, e.g. ``lambda m: sample(m, seeds=range(8))``.

* :func:`calibration_from_pipeline` makes one from a diffusers pipeline and its call kwargs.
* :func:`record_trajectories` records the transformer's inputs of every call of a loop, and
  :func:`calibration_from_trajectories` replays recorded inputs (a list of keyword dicts, one
  per call, in call order): profiling only needs the true inputs of each step.
* :func:`synthetic_calibration` makes one for any diffusers transformer with no pipeline at
  hand: random inputs of the right shapes, derived from the model (:mod:`dit_opt.synthetic`)
  or built around one forward's inputs given by hand, and the default schedule of its family
  (:func:`schedule_family`). Random
  latents and conditioning are far from real use; it exists so that
  ``optimize(model, budget)`` always works, and it warns.
* :class:`Generations` is a calibration made of separate generations (a list of callables,
  one loop each): it runs them in turn, and ``profile(..., distributed=True)`` gives each rank
  its share of them (:mod:`dit_opt.distributed`).
* :func:`guarded` marks what a calibration itself raises (:func:`raised_by_calibration`), so
  that ``optimize`` lets the user's exception through as itself instead of as its own failure.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dit_opt.errors import InputMismatchError
from dit_opt.executor import model_sample
from dit_opt.synthetic import example_inputs as derived_inputs

__all__ = [
    "Generations",
    "returned_tensors",
    "calibration_from_pipeline",
    "synthetic_calibration",
    "record_trajectories",
    "calibration_from_trajectories",
    "SCHEDULE_FAMILIES",
    "guarded",
    "raised_by_calibration",
]

_ROOT = Path(__file__).resolve().parent.parent
#: dit-opt's own machinery (hooks, runtime, passes, solvers): an exception raised while one of
#: their frames runs is dit-opt's, not the calibration's. The calibration helpers (this module,
#: the zoo's and the benchmark's samplers) count as calibration.
_MACHINERY = tuple(str(_ROOT / p) for p in ("dit_opt", "passes", "solvers"))
_CALIBRATION_SIDE = tuple(str(_ROOT / "dit_opt" / p) for p in ("calibration.py", "zoo", "bench", "benchmark"))
_MARK = "_dit_opt_raised_by_calibration"


def guarded(calibration: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    """``calibration``, marking any exception that it raises itself, not in dit-opt code it
    called (a hook, the optimised module): :func:`raised_by_calibration` tells them apart."""
    if getattr(calibration, "_dit_opt_guarded", False):
        return calibration

    @functools.wraps(calibration)
    def run(module: nn.Module) -> Any:
        try:
            return calibration(module)
        except Exception as e:
            if not _through_machinery(e.__traceback__.tb_next if e.__traceback__ else None):
                setattr(e, _MARK, True)
            raise

    run._dit_opt_guarded = True  # type: ignore[attr-defined]
    return run


def raised_by_calibration(error: BaseException) -> bool:
    """Whether ``error`` came out of a :func:`guarded` calibration's own code."""
    return bool(getattr(error, _MARK, False))


def _through_machinery(tb: Any) -> bool:
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name.startswith(_MACHINERY) and not name.startswith(_CALIBRATION_SIDE):
            return True
        tb = tb.tb_next
    return False


def returned_tensors(result: Any) -> list[torch.Tensor]:
    """The tensors a calibration returned, as float CPU tensors: a tensor, a tuple or list of
    tensors, an object with an ``images`` tensor (a pipeline's output) or a numpy array; ``[]``
    for anything else (then the transformer's outputs are what is compared)."""
    images = getattr(result, "images", None)
    if images is not None:
        result = images
    if isinstance(result, torch.Tensor):
        return [result.detach().float().cpu()]
    if isinstance(result, tuple | list) and result and all(isinstance(r, torch.Tensor) for r in result):
        return [r.detach().float().cpu() for r in result]
    if isinstance(result, np.ndarray):
        return [torch.from_numpy(np.asarray(result, dtype=np.float32))]
    return []


class Generations:
    """A calibration made of separate generations: ``generations[i](module)`` runs one complete
    denoising loop (its own seeds, prompts or classes) with ``module`` as the transformer.

    Called, it runs them in turn and returns what they returned, their tensors concatenated in
    a list (so the selection compares all of them). :meth:`share` is one rank's part of them
    under ``profile(..., distributed=True)``; the profile of the shares, summed over the ranks,
    is the profile of the whole list in one process. ``optimize`` and ``profile`` accept the
    list itself (``calibration=[gen_a, gen_b, ...]``).

    Example:
        >>> gens = Generations([lambda m, s=s: sample(m, seed=s) for s in range(8)])  # doctest: +SKIP
        >>> prof = dit_opt.profile(model, gens, distributed=True)                     # doctest: +SKIP
    """

    def __init__(self, generations: Sequence[Callable[[nn.Module], Any]]):
        generations = list(generations)
        if not generations or not all(callable(g) for g in generations):
            raise TypeError("Generations needs a non-empty list of callables, each running one denoising loop "
                            "with the module it is given")
        self.generations = generations

    def __len__(self) -> int:
        return len(self.generations)

    def __call__(self, module: nn.Module) -> list[torch.Tensor] | None:
        out: list[torch.Tensor] = []
        returned_all = True
        for generation in self.generations:
            got = returned_tensors(generation(module))
            returned_all &= bool(got)
            out += got
        return out if returned_all else None

    def share(self, rank: int, world: int) -> Generations:
        """Generations ``rank, rank + world, ...``: one rank's part of them.

        Raises:
            ValueError: fewer generations than ranks (a rank would have none).
        """
        if len(self.generations) < world:
            raise ValueError(f"{len(self.generations)} calibration generation(s) for {world} ranks: every rank "
                             f"needs at least one; pass at least {world} (e.g. one per seed or prompt)")
        return Generations(self.generations[rank::world])


#: class name -> the schedule family of the class's pipelines, where the model alone does not tell it
#: (see :func:`schedule_family`): CogVideoX is a DDIM model without learned variance.
SCHEDULE_FAMILIES = {
    "CogVideoXTransformer3DModel": "ddim",
}


def schedule_family(model: nn.Module) -> str:
    """The denoising loop :func:`synthetic_calibration` runs for ``model``: ``"ddim"`` for a model that
    predicts a learned variance as well (``out_channels == 2 * in_channels``, DiT and PixArt),
    ``"flow_unit"`` (flow matching, timesteps in ``[0, 1]``) for one that takes unit timesteps
    (:func:`dit_opt.synthetic.unit_timesteps`: Flux, Chroma, Qwen-Image, AuraFlow), ``"flow"``
    (flow matching on 0-1000) otherwise; :data:`SCHEDULE_FAMILIES` where that rule is wrong."""
    from dit_opt.synthetic import unit_timesteps

    cls = type(model).__name__
    if cls in SCHEDULE_FAMILIES:
        return SCHEDULE_FAMILIES[cls]
    cfg = getattr(model, "config", None)
    c_in, c_out = getattr(cfg, "in_channels", None), getattr(cfg, "out_channels", None)
    if c_in and c_out and c_out == 2 * c_in:
        return "ddim"
    return "flow_unit" if unit_timesteps(model) else "flow"


def calibration_from_pipeline(pipe: Any, **call_kwargs: Any) -> Callable[[nn.Module], Any]:
    """A calibration that runs ``pipe(**call_kwargs)`` with the given module as its transformer.

    The pipeline's own transformer is put back afterwards. A ``generator`` among the arguments
    (one ``torch.Generator`` or a list of them, the diffusers habit) is put back to its state of
    now before every run, so that every run draws the same noise: ``optimize`` compares each
    candidate plan with the full model on the same noise.

    Example:
        >>> cal = calibration_from_pipeline(pipe, prompt=["a cat"] * 4, num_inference_steps=28,
        ...                                 generator=torch.Generator().manual_seed(0))
        >>> opt = dit_opt.optimize(pipe.transformer, budget=0.5, calibration=cal)
    """
    generators = call_kwargs.get("generator")
    generators = [g for g in (generators if isinstance(generators, list | tuple) else [generators])
                  if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in generators]

    def run(module: nn.Module) -> Any:
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)
        original = pipe.transformer
        pipe.transformer = module
        try:
            return pipe(**call_kwargs)
        finally:
            pipe.transformer = original

    return run


def synthetic_calibration(
    model: nn.Module, *, num_inference_steps: int | None = None, batch_size: int = 2, seed: int = 0,
    warn: bool = True, example_inputs: dict[str, Any] | None = None,
) -> Callable[[nn.Module], Any]:
    """A calibration on synthetic inputs for any diffusers transformer: the loop of
    :func:`schedule_family` around the inputs of :func:`dit_opt.synthetic.example_inputs`, or
    around ``example_inputs`` where given.

    Given inputs are one forward call's keyword arguments: every run starts its latent argument
    (:func:`dit_opt.synthetic.latent_argument`) from seeded noise of the given latent's shape,
    sets the timestep argument at each step (in the given timestep's shape) and passes
    everything else as given. That is the way to self-calibrate a model whose inputs cannot be
    derived (a rotary table or token indices that its pipeline builds).

    Args:
        model: the transformer (its config gives the shapes).
        num_inference_steps: loop length; default 50 (DDIM family) or 28 (flow matching).
        batch_size: batch of each call (derived inputs only: given ones keep their batch).
        seed: seed of the synthetic latents and conditioning.
        warn: emit a ``UserWarning`` saying that a real calibration is better.
        example_inputs: the keyword inputs of one forward call to build the loop around;
            ``None`` derives them from the model.

    Raises:
        dit_opt.InputMismatchError: no synthetic inputs can be derived for the model (pass a
            calibration, or example inputs), or the given ones have no latent tensor.

    Example:
        >>> cal = synthetic_calibration(model, example_inputs={"hidden_states": x, "timestep": t,
        ...                                                    "image_rotary_emb": freqs})  # doctest: +SKIP
        >>> opt = dit_opt.optimize(model, budget=0.5, calibration=cal)                       # doctest: +SKIP
    """
    from dit_opt.steps import call_fingerprint
    from dit_opt.synthetic import call_names

    cls = type(model).__name__
    family = schedule_family(model)
    names = call_names(model)
    latent_name, timestep_name = names.latent, names.timestep
    steps = num_inference_steps or (50 if family == "ddim" else 28)
    if example_inputs is None:
        base = derived_inputs(model, batch_size=batch_size, seed=seed)  # raises where it cannot derive them
        identity: tuple = ("synthetic", steps, batch_size, seed)
    else:
        base = _noised(model, example_inputs, latent_name, seed)
        # given inputs are part of what the loops are: the same ones (by shape, dtype and sums) share a profile
        identity = ("synthetic", steps, seed, repr(call_fingerprint(example_inputs, names)[0]))
    if warn:
        made = "random latents and conditioning" if example_inputs is None else "random latents, the given conditioning"
        warnings.warn(
            f"{cls}: no calibration given, so dit-opt calibrates on synthetic inputs ({made}, default {family} "
            f"schedule). Plans are better with real trajectories: pass "
            f"calibration=dit_opt.calibration_from_pipeline(pipe, ...) or a callable that samples.",
            UserWarning,
            stacklevel=3,
        )
    given_t = base.get(timestep_name) if example_inputs is not None and timestep_name is not None else None
    listed = isinstance(base[latent_name], list)  # one latent per sample (Z-Image): each stepped on its own

    def run(module: nn.Module) -> torch.Tensor | list[torch.Tensor]:
        latents = [x.clone() for x in (base[latent_name] if listed else [base[latent_name]])]
        scheds = [_scheduler(family, steps) for _ in latents]  # a flow scheduler counts its own steps
        inputs = dict(base)
        for t in scheds[0].timesteps:
            tt = float(t / 1000.0 if family == "flow_unit" else t)
            inputs[latent_name] = latents if listed else latents[0]
            if timestep_name is not None:
                batch = len(latents) if listed else latents[0].shape[0]
                inputs[timestep_name] = _timestep_like(given_t, tt, batch, latents[0].device, family)
            preds = model_sample(module(**inputs))
            latents = [_step(sched, pred, t, x)
                       for sched, pred, x in zip(scheds, preds if listed else [preds], latents, strict=True)]
        return latents if listed else latents[0]

    # the same loops for the same model and arguments: a kept profile of one serves the other
    run._dit_opt_identity = identity  # type: ignore[attr-defined]
    return run


def _scheduler(family: str, steps: int) -> Any:
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if family == "ddim":
        sched = DDIMScheduler(num_train_timesteps=1000)
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    return sched


def _step(sched: Any, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """``latents`` one scheduler step on from the prediction ``pred`` at ``t``."""
    pred, dim = _as_latent(pred, latents)
    if dim is None:
        return sched.step(pred, t, latents).prev_sample
    # conditioning channels after the noisy ones (image-to-video): held as they are
    n = pred.shape[dim]
    noisy = sched.step(pred, t, latents.narrow(dim, 0, n)).prev_sample
    return torch.cat([noisy, latents.narrow(dim, n, latents.shape[dim] - n)], dim)


def _noised(model: nn.Module, inputs: dict[str, Any], latent_name: str, seed: int) -> dict[str, Any]:
    """``inputs`` with the latent (a tensor, or a list of them, one per sample) replaced by seeded
    noise of the same shapes, dtype and device."""
    latent = inputs.get(latent_name)
    parts = latent if isinstance(latent, list) and latent else [latent]
    if not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in parts):
        raise InputMismatchError(
            f"{type(model).__name__}: the example inputs have no floating-point tensor {latent_name!r}, the "
            f"argument the noisy latent goes by, so the synthetic denoising loop has nothing to denoise: pass "
            f"example_inputs={{{latent_name!r}: latent, ...}} (one forward call's keyword arguments)")
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype) for x in parts]
    return {**inputs, latent_name: noise if isinstance(latent, list) else noise[0]}


def _timestep_like(given: Any, value: float, batch: int, device: torch.device, family: str) -> Any:
    """The timestep ``value`` as the model takes it: in the shape of the ``given`` timestep (a
    tensor, per sample or per frame; a number), or one per sample when none was given."""
    if isinstance(given, torch.Tensor):
        # an integer timestep stays integer in the DDIM family (whole timesteps), becomes float in flow matching's
        dtype = given.dtype if given.is_floating_point() or family == "ddim" else torch.float32
        return torch.full(given.shape, value, dtype=dtype, device=given.device)
    if isinstance(given, int | float):
        return value
    return torch.full((batch,), value, device=device)


def _as_latent(pred: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """The part of a prediction that steps the latent, and the dimension along which only a prefix
    of the latent is stepped (``None``: all of it). A learned variance (the extra channels of a
    ``2 * in_channels`` output) is dropped; a prediction narrower than the latent along one
    dimension (channels of an image or mask concatenated to the noisy ones, as image-to-video
    models take them) steps the latent's first channels and leaves the rest."""
    if pred.shape == latents.shape:
        return pred, None
    if pred.dim() == latents.dim():
        differ = [d for d in range(pred.dim()) if pred.shape[d] != latents.shape[d]]
        if len(differ) == 1 and pred.shape[differ[0]] > latents.shape[differ[0]]:
            return pred.narrow(differ[0], 0, latents.shape[differ[0]]), None
        if len(differ) == 1 and differ[0] > 0:
            return pred, differ[0]
    raise InputMismatchError(
        f"the model's prediction {tuple(pred.shape)} does not fit its latent {tuple(latents.shape)}, so the "
        f"synthetic denoising loop cannot step it: pass a calibration that runs the model's pipeline")


def record_trajectories(model: nn.Module, calibration: Callable[[nn.Module], Any]) -> list[dict[str, Any]]:
    """Run ``calibration(model)`` and return the keyword inputs of every model call, in order."""
    import inspect

    calls: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
        calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in bound.items()})

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            calibration(model)
    finally:
        handle.remove()
    return calls


def calibration_from_trajectories(calls: list[dict[str, Any]]) -> Callable[[nn.Module], Any]:
    """A calibration that replays recorded transformer inputs (see :func:`record_trajectories`).

    Raises:
        ValueError: ``calls`` is empty or not a list of keyword dicts.
    """
    if not calls or not all(isinstance(c, dict) for c in calls):
        raise ValueError("recorded trajectories must be a non-empty list of keyword-argument dicts, one per call")

    def run(module: nn.Module) -> None:
        for kwargs in calls:
            module(**kwargs)

    return run
