"""Measuring one row: a whole generation with a module in the sampler's place (:func:`_generate`),
its images and counted FLOPs (:func:`_counted`), its quality against the full output (PSNR, SSIM,
class accuracy, Frechet distance), the wall-clock ratio of two modules, and that of a peer
compiled or, failing that, eager (:func:`time_peer`); with the short error reasons and the
one-line log of a measured row that the rows carry and print.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dit_opt.bench import time_alternating, with_transformer
from dit_opt.benchmark.cachedit_peers import compile_configs
from dit_opt.benchmark.config import _EVAL_SEED, Row


def _generate(sampler: Any, module: nn.Module, labels: list[int], seed: int, steps: int | None) -> torch.Tensor:
    if hasattr(module, "reset"):
        module.reset()
    return with_transformer(sampler, module, class_labels=labels, seed=seed, num_inference_steps=steps)


def _counted(sampler: Any, module: nn.Module, labels: list[int], steps: int | None) -> tuple[torch.Tensor, int]:
    """Images and FLOPs (``FlopCounterMode``, eager, attention included) of one whole generation."""
    from dit_opt.flops import flop_counter

    with torch.no_grad(), flop_counter() as fc:
        images = _generate(sampler, module, labels, _EVAL_SEED, steps)
    return images, int(fc.get_total_flops())


def _quality(images: torch.Tensor, full: torch.Tensor, labels: list[int], real: torch.Tensor) -> dict[str, float]:
    from dit_opt import metrics

    return {
        "psnr": metrics.psnr(images, full),
        "ssim": metrics.ssim(images, full),
        "accuracy": metrics.class_accuracy(images, labels),
        "frechet": metrics.frechet_distance(images, real),
    }


def _time(sampler: Any, base: nn.Module, other: nn.Module, labels: list[int], steps: int | None,
          repeats: int) -> float:
    """Wall-clock ratio base/other of whole generations, alternating, median (dit_opt.bench)."""
    result = time_alternating(lambda: _generate(sampler, base, labels, _EVAL_SEED, steps),
                              lambda: _generate(sampler, other, labels, _EVAL_SEED, steps),
                              repeats=repeats, warmup=1)
    return result["speedup"]


def _why(e: BaseException, limit: int = 120) -> str:
    """``Type: first line of the message`` of an exception, cut to ``limit`` characters."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def time_peer(sampler: Any, model: nn.Module, compiled_full: nn.Module, build: Callable[[bool], nn.Module],
              peer: str, labels: list[int], steps: int | None, repeats: int,
              eager: nn.Module | None = None) -> tuple[float, str, str]:
    """Wall-clock ratio of a peer, compiled against ``compiled_full`` (``torch.compile(model)``).

    ``build(True)`` makes a fresh compiled module (regional compile around the diffusers hooks,
    or cache-dit's whole-transformer compile), timed under :func:`compile_configs`. If compiling
    or running it fails, the peer is timed eager (``eager``, or ``build(False)``) against the eager
    ``model``, and the label and note say so.

    Returns:
        ``(speedup, timing label, note)``: ``"compiled"`` and ``""``, or ``"eager (compile failed)"``
        and the reason.

    Raises:
        Exception: whatever the eager timing raises (the compiled one's failure is reported).
    """
    try:
        with compile_configs(peer):
            return _time(sampler, compiled_full, build(True), labels, steps, repeats), "compiled", ""
    except Exception as e:  # a peer Dynamo/Inductor cannot compile: timed eager, and the row says so
        reason = _why(e, 100)
    speedup = _time(sampler, model, eager if eager is not None else build(False), labels, steps, repeats)
    return speedup, "eager (compile failed)", f"compile failed ({reason}); timed eager against the eager model"


def _log(progress: Any, row: Row) -> None:
    """One line per measured row, above the progress bar (or alone, with --no-progress)."""
    progress.console.print(f"{row.model} | {row.method} | {row.setting} | FLOPs {row.flop_fraction:.3f} | "
                           f"PSNR {row.psnr:.2f} | speedup {row.speedup} {row.note}", highlight=False, markup=False)


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_fmt(v) for v in value)
    return f"{value:g}" if isinstance(value, int | float) else str(value)
