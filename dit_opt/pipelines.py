"""Putting an optimised transformer into a diffusers pipeline, and taking it out again.

:func:`attach` puts ``opt`` in ``pipe.transformer`` and makes the pipeline's scheduler declare
every schedule it sets: after each ``pipe.scheduler.set_timesteps(...)`` (which pipelines call at
the start of every generation) ``opt.set_schedule(pipe.scheduler.timesteps)``, so each generation
runs a plan made for its own loop, at any step count and schedule shape (re-solved from the
stored profile, once per schedule). :func:`restore` undoes both. ``dit_opt.optimize(pipe, ...)``
calibrates with the pipeline itself (:func:`pipeline_calibration`) and attaches.

Example:
    >>> opt = dit_opt.optimize(pipe, budget=0.5, calibration=dict(prompt=["a cat"] * 2, num_inference_steps=10))
    >>> image = pipe("a dog", num_inference_steps=28).images[0]   # a plan re-solved for 28 steps
    >>> dit_opt.restore(pipe)                                     # the original transformer back
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from dit_opt.calibration import calibration_from_pipeline
from dit_opt.errors import ConfigError

__all__ = ["attach", "is_pipeline", "pipeline_calibration", "restore"]

#: The attribute of an attached pipeline that keeps what :func:`restore` puts back.
ATTACHED = "_dit_opt_attached"


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` looks like a diffusers pipeline with a transformer: callable, with a
    ``transformer`` module and a ``scheduler`` that sets timesteps."""
    return (callable(obj) and not isinstance(obj, nn.Module)
            and isinstance(getattr(obj, "transformer", None), nn.Module)
            and callable(getattr(getattr(obj, "scheduler", None), "set_timesteps", None)))


def _check_pipeline(pipe: Any, what: str) -> None:
    if not is_pipeline(pipe):
        raise ConfigError(f"{what} needs a diffusers pipeline with a transformer and a scheduler (pipe.transformer, "
                          f"pipe.scheduler.set_timesteps); got {type(pipe).__name__}")


def pipeline_calibration(pipe: Any, calibration: Any) -> Any:
    """What ``dit_opt.optimize(pipe, calibration=...)`` calibrates with: a dict of the
    pipeline's call arguments becomes runs of the pipeline itself
    (:func:`~dit_opt.calibration.calibration_from_pipeline`); anything else
    ``optimize`` takes for a transformer is passed on as it is.

    Raises:
        ConfigError: no calibration was given (a pipeline's calls need its arguments: prompts,
            class labels).
    """
    if calibration is None:
        raise ConfigError(
            f"optimising a {type(pipe).__name__} needs the arguments of the pipeline calls to calibrate on, e.g. "
            f"calibration=dict(prompt=['a photo of a cat', 'a city at night'], num_inference_steps=10) "
            f"(class_labels=[...] for a DiTPipeline); a generator=torch.Generator().manual_seed(0) among them makes "
            f"the runs repeatable")
    if isinstance(calibration, dict):
        return calibration_from_pipeline(pipe, **calibration)
    return calibration


def attach(pipe: Any, opt: nn.Module) -> nn.Module:
    """Put ``opt`` in ``pipe.transformer`` and have the pipeline's scheduler declare each schedule
    it sets to it (``opt.set_schedule``), so that every generation runs a plan made for its loop.

    A pipeline attached before is restored first. Replacing ``pipe.scheduler`` afterwards drops the
    declaration (attach again); the original transformer is kept for :func:`restore`.

    Returns:
        ``opt``.

    Raises:
        ConfigError: ``pipe`` is not a pipeline with a transformer and a scheduler, or ``opt`` is
            not an optimised module of that transformer.
    """
    _check_pipeline(pipe, "dit_opt.attach")
    if getattr(pipe, ATTACHED, None) is not None:
        restore(pipe)
    if not callable(getattr(opt, "set_schedule", None)) or getattr(opt, "model", None) is not pipe.transformer:
        raise ConfigError(f"dit_opt.attach needs an optimised module of this pipeline's transformer "
                          f"(dit_opt.optimize(pipe.transformer, ...)); got a {type(opt).__name__} "
                          f"made from another model")
    scheduler = pipe.scheduler
    set_timesteps = scheduler.set_timesteps

    @functools.wraps(set_timesteps)  # keeps the signature pipelines inspect (retrieve_timesteps)
    def declaring(*args: Any, **kwargs: Any) -> Any:
        result = set_timesteps(*args, **kwargs)
        opt.set_schedule(scheduler.timesteps)
        return result

    scheduler.set_timesteps = declaring
    object.__setattr__(pipe, ATTACHED, (pipe.transformer, scheduler))
    pipe.transformer = opt
    return opt


def restore(pipe: Any) -> nn.Module:
    """Undo :func:`attach`: the original transformer back in ``pipe.transformer`` and the
    scheduler as it was.

    Returns:
        The original transformer.

    Raises:
        ConfigError: nothing is attached to ``pipe``.
    """
    state = getattr(pipe, ATTACHED, None)
    if state is None:
        raise ConfigError(f"nothing to restore: no optimised transformer was attached to this {type(pipe).__name__} "
                          f"(dit_opt.attach or dit_opt.optimize(pipe, ...) attach one)")
    original, scheduler = state
    scheduler.__dict__.pop("set_timesteps", None)
    object.__delattr__(pipe, ATTACHED)
    pipe.transformer = original
    return original
