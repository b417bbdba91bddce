"""Running the benchmark: :func:`run` measures, model by model, the full model, dit-opt and its
baseline schedules at every budget (all solved from one sensitivity profile per model, calibrated
on other seeds than the evaluation) and every peer over its sweep, with rich progress bars, and
returns the rows in report order.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

from dit_opt.benchmark.cachedit_peers import cache_dit_module
from dit_opt.benchmark.config import (
    _CACHE_DIT_PEERS,
    _CALIBRATION_SEED,
    _EVAL_SEED,
    _PEER_TITLES,
    _SWEEP_PARAM,
    _SWEEPS,
    BenchConfig,
    Row,
)
from dit_opt.benchmark.diffusers_peers import _mag_ratios, peer_module
from dit_opt.benchmark.measure import _counted, _fmt, _generate, _log, _quality, _time, _why, time_peer


def _bench_model(name: str, cfg: BenchConfig, progress: Any) -> list[Row]:
    import dit_opt
    from dit_opt import zoo
    from dit_opt.errors import DitOptError

    sampler = zoo.load(name)
    model = sampler.transformer
    steps = cfg.steps or sampler.num_inference_steps
    labels = sampler.labels(cfg.samples)
    timing_labels = labels[: cfg.timing_samples]
    real, _ = sampler.reference_images("test")
    peers = {p: _SWEEPS[p][::2] if cfg.quick else _SWEEPS[p] for p in cfg.peers}
    n_rows = 1 + len(cfg.solvers) * len(cfg.budgets) + sum(len(v) for v in peers.values())
    task = progress.add_task(f"{name}: profile", total=n_rows)
    rows: list[Row] = []

    images_full, flops_full = _counted(sampler, model, labels, cfg.steps)
    q = _quality(images_full, images_full, labels, real)
    rows.append(Row(name, "full model", f"{steps} steps", 1.0, 1.0, **q, speedup=1.0 if cfg.timing else None))
    _log(progress, rows[-1])
    progress.advance(task)

    def calibration(module: nn.Module) -> Any:
        cal_labels = sampler.labels(cfg.calibration_samples)
        return _generate(sampler, module, cal_labels, _CALIBRATION_SEED, cfg.steps)

    if cfg.solvers:  # the profile dit-opt's rows share (peers-only runs need none)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prof = dit_opt.profile(model, calibration, probes=0, progress=False)
    example = sampler.example_inputs(batch_size=2 * len(labels))
    compiled_full = torch.compile(model) if cfg.timing else None

    for solver in cfg.solvers:
        for budget in cfg.budgets:
            progress.update(task, description=f"{name}: dit-opt {solver} @ {budget}")
            method = "dit-opt (cpsat)" if solver == "cpsat" else f"dit-opt baseline {solver}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # dit-opt's candidate plans are compared on the calibration generation (seed 1000),
                    # never on the evaluation's noise
                    opt = dit_opt.optimize(model, budget, calibration=prof, solver=solver, compile=False,
                                           example_inputs=example, progress=False, select=calibration,
                                           granularity="auto")
                    images, flops = _counted(sampler, opt, labels, cfg.steps)
            except DitOptError as e:
                rows.append(Row(name, method, f"budget {budget}", budget, float("nan"), float("nan"), float("nan"),
                                float("nan"), float("nan"), note=str(e).splitlines()[0][:160]))
                _log(progress, rows[-1])
                progress.advance(task)
                continue
            row = Row(name, method, f"budget {budget}", budget, flops / flops_full,
                      **_quality(images, images_full, labels, real),
                      extra={"plan": {k.value: n for k, n in opt.plan.counts().items()}},
                      note=f"kept the {opt.plan.solver} plan of {len(opt.selection)} measured" if opt.selection else "")
            if cfg.timing and (cfg.timing_scope == "all" or solver == "cpsat"):
                from dit_opt.runtime import OptimizedTransformer

                # The plan is replayed compiled (no second solve); the reference is torch.compile(model).
                compiled = OptimizedTransformer(model, opt.plan, profile=prof, compile=True, solver=solver)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row.speedup = _time(sampler, compiled_full, compiled, timing_labels, cfg.steps, cfg.timing_repeats)
                row.timing = "compiled"
            rows.append(row)
            _log(progress, rows[-1])
            progress.advance(task)

    first_t = float(sampler.timesteps(steps)[0])
    time_peers = cfg.timing and cfg.timing_scope == "all" and bool(peers)
    if time_peers:  # compiled now, with PyTorch's defaults (a cache-dit peer is timed under other settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _generate(sampler, compiled_full, timing_labels, _EVAL_SEED, cfg.steps)
    for peer, values in peers.items():
        mag_ratios = None
        if peer == "magcache":
            progress.update(task, description=f"{name}: MagCache calibration")
            mag_ratios = _mag_ratios(model, lambda m: calibration(m), steps)
        for value in values:
            progress.update(task, description=f"{name}: {peer} {_SWEEP_PARAM[peer]}={_fmt(value)}")
            setting = f"{_SWEEP_PARAM[peer]}={_fmt(value)}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if peer in _CACHE_DIT_PEERS:
                        build = functools.partial(cache_dit_module, model, peer, value, steps)
                    else:
                        build = functools.partial(peer_module, model, peer, value, steps, mag_ratios, first_t,
                                                  uncond_first=sampler.uncond_first)
                    module = build(False)
                    images, flops = _counted(sampler, module, labels, cfg.steps)
            except Exception as e:  # a peer that does not support this model is reported, not fatal
                unsupported = isinstance(e, ImportError | NotImplementedError)
                rows.append(Row(name, _PEER_TITLES[peer], "-" if unsupported else setting, None, float("nan"),
                                float("nan"), float("nan"), float("nan"), float("nan"),
                                note=_why(e, 160)))
                _log(progress, rows[-1])
                progress.advance(task, advance=len(values) if unsupported else 1)
                if unsupported:  # the same for every setting: one row says it
                    break
                continue
            row = Row(name, _PEER_TITLES[peer], setting, None, flops / flops_full,
                      **_quality(images, images_full, labels, real))
            if time_peers:
                # Compiled against the same torch.compile(model) as dit-opt; FLOPs above were counted eager.
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        row.speedup, row.timing, row.note = time_peer(
                            sampler, model, compiled_full, build, peer, timing_labels, cfg.steps,
                            cfg.timing_repeats, eager=module)
                except Exception as e:  # even the eager timing failed: the row keeps its quality figures
                    row.note = f"not timed: {_why(e)}"
            rows.append(row)
            _log(progress, rows[-1])
            progress.advance(task)
    progress.update(task, description=f"{name}: done")
    return rows


def run(cfg: BenchConfig) -> list[Row]:
    """Measure every row of ``cfg`` on every model.

    Returns:
        The rows, grouped by model, in report order.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows: list[Row] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not cfg.progress) as progress:
        for name in cfg.models:
            rows += _bench_model(name, cfg, progress)
    return rows
