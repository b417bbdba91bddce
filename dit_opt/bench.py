"""Measuring: FLOP fractions (counted) and wall-clock ratios (alternating, median).

Timings on a shared CPU are noisy, so the two sides are run alternately in one process and
the median of each is compared; FLOPs are counted with ``FlopCounterMode`` (attention
included) over whole generations, in eager mode.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from dit_opt.flops import count_flops

__all__ = ["flop_fraction", "machine", "rhythm_study", "sampling", "time_alternating", "with_transformer"]


def with_transformer(sampler: Any, module: torch.nn.Module, **call: Any) -> Any:
    """Run ``sampler(**call)`` with ``module`` as its transformer, then put the original back."""
    original = sampler.transformer
    sampler.transformer = module
    try:
        with torch.no_grad():
            return sampler(**call)
    finally:
        sampler.transformer = original


def sampling(sampler: Any, samples: int, seed: int, steps: int | None = None, *,
             reset: bool = False) -> Callable[[torch.nn.Module], torch.Tensor]:
    """``module -> images``: one whole generation of ``samples`` images (the sampler's classes in
    turn, ``sampler.labels``) on ``seed`` with ``module`` as the sampler's transformer; a
    calibration for ``dit_opt.optimize``.

    Args:
        reset: call ``module.reset()`` first where it has one (a timed or evaluated generation).
    """
    labels = sampler.labels(samples)

    def run(module: torch.nn.Module) -> torch.Tensor:
        if reset and hasattr(module, "reset"):
            module.reset()
        return with_transformer(sampler, module, class_labels=labels, seed=seed, num_inference_steps=steps)

    return run


def rhythm_study(name: str, budget: float, max_age: int | None = None, calibration_samples: int = 10,
                 samples: int = 20) -> Any:
    """What the examples that measure hand-made schedules on a reference model share: the zoo
    model ``name``, the benchmark's calibration (``calibration_samples`` images, seed 1000) and
    evaluation (``samples`` images, seed 0), a profile on the calibration, the full model's
    evaluation images and calibration outputs, and the module-level problem at ``budget`` under
    TaylorSeer's forecast policy (``"always"``; caches up to ``max_age``, default the budget's).

    Returns:
        A namespace with ``sampler``, ``model``, ``calibration``, ``evaluation``, ``profile``,
        ``full`` (images), ``reference`` (calibration outputs) and ``problem``, and three helpers:
        ``cells(computes)``, the problem's actions (lists, before forecasts) that compute every
        unit at the steps where ``computes[t]`` and reuse elsewhere (compute where reuse is not
        allowed); ``error(plan)``, the plan's calibration error against the full model's; and
        ``measure(plan)``, its ``(calibration error, evaluation PSNR)`` from one eager module.
    """
    import dataclasses
    from types import SimpleNamespace

    import dit_opt
    from dit_opt import metrics, zoo
    from dit_opt.plan import COMPUTE, REUSE
    from dit_opt.selection import measure_outputs, relative_error

    sampler = zoo.load(name)
    model = sampler.transformer
    calibration = sampling(sampler, calibration_samples, seed=1000, reset=True)
    evaluation = sampling(sampler, samples, seed=0, reset=True)
    prof = dit_opt.profile(model, calibration, probes=0, progress=False)
    problem = dataclasses.replace(prof.to_problem(budget, granularity="module", max_age=max_age),
                                  forecast_policy="always")
    full, reference = evaluation(model), measure_outputs(calibration, model)
    reuse = problem.menu_index(REUSE)

    def cells(computes: Any) -> list[list]:
        return [[COMPUTE if computes[t] or not problem.allowed[t, u, reuse] else REUSE
                 for u in range(len(problem.units))] for t in range(problem.num_steps)]

    def module(plan: Any) -> torch.nn.Module:
        return dit_opt.OptimizedTransformer(model, plan, profile=prof, compile=False)

    def error(plan: Any, opt: torch.nn.Module | None = None) -> float:
        return relative_error(measure_outputs(calibration, opt or module(plan)), reference)

    def measure(plan: Any) -> tuple[float, float]:
        opt = module(plan)
        return error(plan, opt), metrics.psnr(evaluation(opt), full)

    return SimpleNamespace(sampler=sampler, model=model, calibration=calibration, evaluation=evaluation,
                           profile=prof, full=full, reference=reference, problem=problem, cells=cells, error=error,
                           measure=measure)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line describing where the numbers were measured."""
    return (f"{cpu_name()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)")


def flop_fraction(generate: Callable[[torch.nn.Module], Any], model: torch.nn.Module, other: torch.nn.Module) -> float:
    """FLOPs of ``generate(other)`` over FLOPs of ``generate(model)``, counted."""
    return count_flops(generate, other) / count_flops(generate, model)


def time_alternating(
    a: Callable[[], Any], b: Callable[[], Any], *, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of ``a()`` and ``b()``, run alternately (``a, b, a, b, ...``).

    Returns:
        ``{"a_s": median seconds of a, "b_s": ..., "speedup": a_s / b_s}``.
    """
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"a_s": ma, "b_s": mb, "speedup": ma / mb}
