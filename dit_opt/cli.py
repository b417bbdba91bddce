"""The ``dit-opt`` command line.

Commands::

    dit-opt demo                                   # optimise digits-dit at 0.5, save a before/after grid
    dit-opt capture dit                            # capture a model, print its blocks and FLOPs
    dit-opt profile digits-dit --out prof/         # measure the sensitivity profile, save it
    dit-opt optimize digits-dit --budget 0.5 --out opt/ [--profile prof/]
    dit-opt inspect opt/ --step 10 --heatmap plan.png
    dit-opt bench --quick --no-timing              # examples/benchmark.py (BENCHMARKS.md, docs/pareto.png)

Bad arguments (an unknown model, a budget outside (0, 1], a missing directory) exit with code 2 and
a message; a failure inside dit-opt (a :class:`dit_opt.DitOptError`) is printed in red and exits 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = ["app"]

app = typer.Typer(
    name="dit-opt",
    help="Make Diffusion Transformers cheaper to sample from under an explicit FLOP budget.",
    no_args_is_help=True,
    add_completion=False,
)
_console = Console()
_err = Console(stderr=True)
#: Seed of the calibration generations: other noise than the evaluation's (seed 0), so that the
#: plan is not judged on the trajectories it was fitted to.
_CALIBRATION_SEED = 1000
#: Key under which ``optimize --out`` records the reference model's zoo name in ``dit_opt.json``.
_ZOO_KEY = "zoo_model"
_DEMO_SAMPLES = {"crops-pixart": 4}
_ZOO_HELP = "Shipped reference model: digits-dit, digits-mmdit or crops-pixart."


@app.callback()
def _root() -> None:
    """Make Diffusion Transformers cheaper to sample from under an explicit FLOP budget."""


# ---- helpers ---------------------------------------------------------------------------------------
def _load_model(name: str) -> tuple[Any, dict[str, Any]]:
    """A built-in model by name: a tiny test config or a shipped reference model."""
    from dit_opt.testing import tiny_model, tiny_names

    if name in tiny_names():
        return tiny_model(name)
    try:
        from dit_opt import zoo
    except ImportError:  # the zoo ships with the package; this only guards partial installs
        zoo = None
    if zoo is not None and name in zoo.available():
        sampler = zoo.load(name)
        return sampler.transformer, sampler.example_inputs()
    known = tiny_names() + (zoo.available() if zoo is not None else [])
    raise typer.BadParameter(f"unknown model {name!r}; choose one of {', '.join(known)}", param_hint="MODEL")


def _load_sampler(name: str) -> Any:
    """A shipped reference model's sampler (only these can generate images and calibrate themselves)."""
    from dit_opt import zoo

    if name not in zoo.available():
        raise typer.BadParameter(f"unknown reference model {name!r}; choose one of {', '.join(zoo.available())} "
                                 f"(tiny configs have no sampler; use `dit-opt capture` for those)",
                                 param_hint="MODEL")
    return zoo.load(name)


def _check_budget(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value} is outside (0, 1]; the budget is a FLOP fraction, e.g. 0.5")
    return value


def _check_positive(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"{value} must be at least 1")
    return value


def _calibration(sampler: Any, samples: int, steps: int | None):
    """Complete denoising loops with the module given, on the calibration seed."""
    from dit_opt.bench import sampling

    return sampling(sampler, samples, _CALIBRATION_SEED, steps)


def _profiled_calibration(profile_dir: Path, model: str) -> dict:
    """The calibration settings ``dit-opt profile`` recorded beside a profile (``{}`` for a profile
    saved by ``Profile.save``, which records none).

    Raises:
        typer.BadParameter: the profile was made for another reference model.
    """
    try:
        recorded = json.loads((profile_dir / "zoo.json").read_text())
    except (OSError, ValueError):
        return {}
    made_for = recorded.get(_ZOO_KEY)
    if made_for is not None and made_for != model:
        raise typer.BadParameter(f"{profile_dir} is a profile of {made_for}, not of {model}; optimise {made_for} "
                                 f"with it, or profile {model} with `dit-opt profile {model} --out DIR`",
                                 param_hint="--profile")
    return recorded


def _fail(error: Exception) -> typer.Exit:
    """Print a dit-opt failure in red; the caller raises the returned ``Exit(1)``."""
    _err.print(f"[bold red]error:[/] {error}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


_STEPS = typer.Option(None, "--steps", callback=_check_positive,
                      help="Denoising steps of calibration and generation (default: the model's own).")
_THREADS = typer.Option(None, "--threads", help="torch threads (default: torch's choice).")


# ---- commands ----------------------------------------------------------------------------------------
@app.command()
def capture(
    model: str = typer.Argument("dit", help="A built-in model: a tiny config (dit, pixart, sd3, flux, sana, "
                                "wan, lumina2, ...: dit_opt.testing.tiny_names()) or a shipped reference model "
                                "(digits-dit, digits-mmdit, crops-pixart)."),
) -> None:
    """Capture a built-in model as an FX graph and print its block table, capture mode and FLOPs."""
    from dit_opt.capture import capture as do_capture
    from passes.annotate_flops import annotate_flops

    module, inputs = _load_model(model)
    with _console.status(f"capturing {type(module).__name__} with torch.export ..."), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = do_capture(module, inputs)
        annotate_flops(graph)
    typer.echo(graph.summary())
    typer.echo(f"captured in {graph.capture_seconds:.1f} s; FLOPs per forward: {graph.flops:,}")


def _check_lowering(value: str) -> str:
    from dit_opt.runtime import COMPILE_MODES

    named = [m for m in COMPILE_MODES if m]
    if value not in named:
        raise typer.BadParameter(f"{value!r} is not a lowering: use " + " or ".join(repr(m) for m in named))
    return value


@app.command()
def demo(
    model: str = typer.Option("digits-dit", "--model", help=_ZOO_HELP),
    budget: float = typer.Option(0.5, "--budget", callback=_check_budget, help="FLOP fraction in (0, 1]."),
    out: Annotated[Path, typer.Option("--out", help="Before/after image grid to write (PNG).")] = Path(
        "dit-opt-demo.png"),
    samples: int | None = typer.Option(None, "--samples", min=1,
                                       help="Images to generate, classes cycling (default 10; 4 for crops-pixart)."),
    steps: int | None = _STEPS,
    compile: bool = typer.Option(True, "--compile/--no-compile",
                                 help="Time compiled (torch.compile both sides) or eager models."),
    lowering: str = typer.Option("blocks", "--lowering", callback=_check_lowering,
                                 help="How the plan is compiled: 'blocks' (each block once, quick) or 'step' "
                                 "(each step whole: faster, a compile per distinct step; docs/speed.md)."),
    repeats: int = typer.Option(3, "--repeats", callback=_check_positive, help="Timed runs per side (median)."),
    threads: int | None = _THREADS,
) -> None:
    """The main job: optimise a reference model at a budget, generate before/after, report the gain.

    Profiles the model on calibration noise (seed 1000, as many samples), solves a plan with CP-SAT, generates the
    same images (seed 0) with the full and the optimised model, saves both rows as one PNG grid,
    and prints the plan, the counted FLOP fraction, PSNR/SSIM against the full output and the
    measured wall-clock speedup (alternating runs, median).
    """
    import torch

    import dit_opt
    from dit_opt import metrics
    from dit_opt.bench import flop_fraction, sampling, time_alternating
    from dit_opt.errors import DitOptError
    from dit_opt.runtime import OptimizedTransformer

    _set_threads(threads)
    sampler = _load_sampler(model)
    # A 256-token, 12-block model costs ~20x a digits model per image: fewer images keep the
    # demo (a profile is ~35 calibration generations) within minutes.
    samples = samples or _DEMO_SAMPLES.get(model, 10)
    base = sampler.transformer
    generate = sampling(sampler, samples, 0, steps, reset=True)

    try:
        with _console.status(f"profiling and solving {model} at budget {budget} ..."), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = dit_opt.optimize(base, budget, calibration=_calibration(sampler, samples, steps), compile=False,
                                   example_inputs=sampler.example_inputs(batch_size=2 * samples), progress=False)
        with _console.status("generating (full and optimised) ..."):
            full, fast = generate(base), generate(opt)
            fraction = flop_fraction(generate, base, opt)
        with _console.status(f"timing ({'compiled' if compile else 'eager'}, {repeats} runs per side) ..."), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, b = base, opt
            if compile:
                # The plan is replayed compiled; the reference is torch.compile of the same model.
                a = torch.compile(base)
                b = OptimizedTransformer(base, opt.plan, profile=opt.profile, compile=lowering)
            timing = time_alternating(lambda: generate(a), lambda: generate(b), repeats=repeats)
    except DitOptError as e:
        raise _fail(e) from e

    _save_grid(full, fast, out, f"{model}: full (top) vs dit-opt at budget {budget} (bottom)")
    typer.echo(opt.plan.summary())
    _echo_selection(opt)
    typer.echo(f"FLOP fraction (counted): {fraction:.3f}   PSNR {metrics.psnr(fast, full):.2f} dB   "
               f"SSIM {metrics.ssim(fast, full):.4f}")
    kind = f"compiled vs compiled, lowering {lowering!r}" if compile else "eager vs eager"
    typer.echo(f"speedup ({kind}, median of {repeats}): {timing['speedup']:.2f}x "
               f"({timing['a_s']:.2f} s -> {timing['b_s']:.2f} s per generation of {samples})")
    typer.echo(f"wrote {out}")


def _echo_selection(opt: Any) -> None:
    """The candidate plans ``optimize`` measured on the calibration, the kept one marked, and the
    cost of ``optimize`` in calibration generations."""
    for cand in opt.selection:
        typer.echo(f"candidate {cand.describe()}{' (kept)' if cand.plan is opt.plan else ''}")
    r = opt.report
    if r:
        # the unit is one timed run: the seconds beside it show how much a busy machine moved it
        plain = r.get("plain_calibration_seconds")
        seconds = f"; {r['seconds']:.0f} s" + (f", one plain generation {plain:.1f} s" if plain else "")
        typer.echo(f"cost of optimize: {r['generations']:.1f} plain calibration generations (profile "
                   f"{r['profile_generations']:.1f}, {r['selection_runs']} selection runs "
                   f"{r['selection_generations']:.1f}, capture, solving and lowering "
                   f"{r.get('other_generations', 0.0):.1f}){seconds}")
    if r and r.get("closed_loop"):
        steps = " -> ".join(f"{c['solver']} {c['error']:.3e}" for c in r["closed_loop"])
        typer.echo(f"closed loop (calibration error per round): {steps}")
    if r and r.get("capture"):
        typer.echo(f"capture: {r['capture']}")
    for where, reason in (r or {}).get("prune_excluded", {}).items():
        typer.echo(f"prune left out on {where}: it cannot run on a token subset ({reason})")


def _save_grid(top: Any, bottom: Any, path: Path, title: str) -> None:
    """Two rows of images (full model above, optimised below) as one PNG; grey or RGB."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = top.shape[0]
    fig = Figure(figsize=(max(4.0, 0.8 * n), 2.2))
    FigureCanvasAgg(fig)
    for row, images in enumerate((top, bottom)):
        for i in range(n):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            image = images[i].float().cpu()
            if image.shape[0] == 1:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(image.permute(1, 2, 0).clamp(0.0, 1.0).numpy())
            ax.axis("off")
    fig.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


@app.command()
def profile(
    model: Annotated[str, typer.Argument(help=_ZOO_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the profile to (profile.json + "
                                      ".safetensors).")],
    samples: int = typer.Option(10, "--samples", callback=_check_positive, help="Calibration images (classes cycle)."),
    steps: int | None = _STEPS,
    probes: int = typer.Option(0, "--probes", min=0,
                               help="Single actions whose real error is checked against the model (1 run each)."),
    threads: int | None = _THREADS,
    generations: int = typer.Option(1, "--generations", callback=_check_positive,
                                    help="Split the calibration into this many generations (seeds 1000, 1001, ...), "
                                         "--samples divided among them."),
    distributed: bool = typer.Option(False, "--distributed", help="Run under torchrun: each process profiles its "
                                     "share of the generations (gloo on CPU, NCCL on GPUs); rank 0 writes."),
) -> None:
    """Measure a reference model's sensitivity profile on calibration noise and save it (reused across budgets).

    On N processes: torchrun --nproc-per-node=N -m dit_opt.cli profile MODEL --out DIR --generations N --distributed
    """
    import torch

    import dit_opt
    from dit_opt import distributed as spread
    from dit_opt.bench import sampling
    from dit_opt.errors import DitOptError

    _set_threads(threads)
    sampler = _load_sampler(model)
    if generations > samples:
        raise _fail(ValueError(f"--generations {generations} > --samples {samples}: every generation needs an image"))
    if generations == 1:
        calibration = _calibration(sampler, samples, steps)
    else:
        sizes = [samples // generations + (i < samples % generations) for i in range(generations)]
        calibration = [sampling(sampler, n, _CALIBRATION_SEED + i, steps) for i, n in enumerate(sizes)]
    started = False
    try:
        if distributed and not torch.distributed.is_initialized() and "WORLD_SIZE" in os.environ:
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            started = True
        rank = torch.distributed.get_rank() if distributed and torch.distributed.is_initialized() else 0
        status = _console.status(f"profiling {model} ...") if rank == 0 else contextlib.nullcontext()
        with status, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prof = dit_opt.profile(sampler.transformer, calibration, probes=probes, progress=False,
                                   distributed=distributed)
        prof.save(out)
        if spread.is_writer():
            (Path(out) / "zoo.json").write_text(json.dumps({_ZOO_KEY: model, "samples": samples, "steps": steps,
                                                            "generations": generations}))
            seconds = prof.report.get("profile_seconds")
            ranks = prof.report.get("ranks", 1)
            typer.echo(f"profiled {model} in {seconds:.1f} s on {ranks} process(es); wrote {out}"
                       if seconds is not None else f"wrote {out}")
    except DitOptError as e:
        raise _fail(e) from e
    finally:
        if started:
            torch.distributed.destroy_process_group()


@app.command()
def optimize(
    model: Annotated[str, typer.Argument(help=_ZOO_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Directory to save the optimised model to (opt.save).")],
    budget: float = typer.Option(0.5, "--budget", callback=_check_budget, help="FLOP fraction in (0, 1]."),
    profile_dir: Annotated[Path | None, typer.Option("--profile", help="A profile saved by `dit-opt profile` "
                                                     "(default: profile now).")] = None,
    solver: str = typer.Option("cpsat", "--solver",
                               help="cpsat, dp, or a baseline schedule: fora, delta_dit, toca, soda."),
    samples: int | None = typer.Option(None, "--samples", callback=_check_positive,
                                       help="Calibration images (classes cycle; default: the profile's, else 10)."),
    steps: int | None = typer.Option(None, "--steps", callback=_check_positive,
                                     help="Denoising steps of the calibration (default: the profile's, else the "
                                     "model's own)."),
    threads: int | None = _THREADS,
    profile_cache: Annotated[Path | None, typer.Option(
        "--profile-cache", help="A directory where profiles are kept: a later run on the same model, "
        "calibration and settings (at any budget) reuses the profile instead of measuring it.")] = None,
    closed_loop: int = typer.Option(0, "--closed-loop", min=0,
                                    help="Re-solve the solver's plan with errors measured on its own trajectory, up "
                                    "to this many times, while its calibration error improves (each: a solve and "
                                    "two calibration runs; see docs/solvers.md)."),
) -> None:
    """Optimise a reference model to a FLOP budget and save the plan, profile and metadata to a directory."""
    import dit_opt
    from dit_opt.errors import DitOptError

    _set_threads(threads)
    sampler = _load_sampler(model)
    if profile_dir is not None and not (profile_dir / "profile.json").is_file():
        raise typer.BadParameter(f"{profile_dir} holds no profile.json; write one with `dit-opt profile MODEL "
                                 f"--out DIR`", param_hint="--profile")
    if profile_dir is not None:
        # Plans are compared on loops like the profiled ones: another step count would make every
        # candidate a re-solved plan for a schedule the profile never saw.
        recorded = _profiled_calibration(profile_dir, model)
        samples = recorded.get("samples") if samples is None else samples
        steps = recorded.get("steps") if steps is None else steps
    samples = 10 if samples is None else samples
    calibration = str(profile_dir) if profile_dir is not None else _calibration(sampler, samples, steps)
    try:
        with _console.status(f"optimising {model} at budget {budget} ({solver}) ..."), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # plans are compared on calibration noise even when the profile was saved earlier
            opt = dit_opt.optimize(sampler.transformer, budget, calibration=calibration, solver=solver,
                                   compile=False, example_inputs=sampler.example_inputs(), progress=False,
                                   select=_calibration(sampler, samples, steps), profile_cache=profile_cache,
                                   closed_loop=closed_loop)
        opt.save(out)
    except DitOptError as e:
        raise _fail(e) from e
    # Record the zoo name next to the artifact's own metadata so that `inspect` can load the model.
    meta_file = Path(out) / "dit_opt.json"
    meta = json.loads(meta_file.read_text())
    meta[_ZOO_KEY] = model
    meta_file.write_text(json.dumps(meta, indent=1))
    typer.echo(opt.plan.summary())
    _echo_selection(opt)
    times = ", ".join(f"{k} {v:.1f} s" for k, v in opt.step_times.items())
    kept = opt.report.get("profile_cached")
    typer.echo(f"steps: {times}" + (f" (profile reused from {kept})" if kept else "") + f"\nwrote {out}")


@app.command("train-routers")
def train_routers(
    model: Annotated[str, typer.Argument(help=_ZOO_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Router file to write (.safetensors).")],
    budget: float = typer.Option(0.5, "--budget", callback=_check_budget, help="Mean FLOP fraction per sample."),
    train_steps: int = typer.Option(150, "--train-steps", min=0, help="Optimiser steps."),
    samples: int = typer.Option(10, "--samples", callback=_check_positive, help="Calibration images."),
    evaluate: int = typer.Option(20, "--evaluate", min=0,
                                 help="Images to generate with the routers and compare with the full model's "
                                 "(evaluation seed; 0: none)."),
    decide: str = typer.Option("block", "--decide", help="block: each router reads its block's input; step: all "
                               "read the first block's, one decision point per step."),
    closed: str = typer.Option("forecast", "--closed", help="forecast: a closed gate serves the block's residual "
                               "extrapolated from its last two computes; reuse: its last one; skip: the block "
                               "returns its input (E-DiT)."),
    plan_headroom: float | None = typer.Option(None, "--plan-headroom", min=0.0, max=1.0,
                                               help="Train the routers on a static plan solved at budget * (1 + "
                                               "HEADROOM): dit_opt.optimize(..., dynamic=HEADROOM)."),
    threads: int | None = _THREADS,
) -> None:
    """Train E-DiT routers (per-sample block gates) for a reference model, its weights frozen, and save them."""
    from dit_opt import metrics
    from dit_opt.bench import sampling
    from dit_opt.errors import DitOptError
    from dit_opt.router_training import train_routers as train

    _set_threads(threads)
    if plan_headroom is not None and (train_steps, decide, closed) != (150, "block", "forecast"):
        raise typer.BadParameter("--plan-headroom trains routers as optimize(..., dynamic=...) does (150 steps, "
                                 "decisions per block, closed gates forecasting): drop --train-steps, --decide "
                                 "and --closed, or --plan-headroom")
    sampler = _load_sampler(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cal = _calibration(sampler, samples, None)
            if plan_headroom is None:
                routed = train(sampler.transformer, cal, budget=budget, steps=train_steps, decide=decide,
                               closed=closed, progress=True)
            else:
                import dit_opt

                routed = dit_opt.optimize(sampler.transformer, budget, calibration=cal, dynamic=plan_headroom,
                                          compile=False, progress=True)
    except DitOptError as e:
        raise _fail(e) from e
    routed.save(out)
    report = routed.routers.config.report
    typer.echo(f"trained in {report['seconds']:.1f} s ({report['steps']} steps on {report['calls']} recorded calls); "
               f"gate offset {routed.routers.config.offset:g}")
    if routed.plan is not None:
        typer.echo(f"on a static plan solved at {report['plan_budget']:.3f} (FLOP fraction "
                   f"{routed.plan.flop_fraction:.3f}; optimize cost {report['plan_generations']:.1f} generations)")
    if evaluate:
        generate = sampling(sampler, evaluate, seed=0)
        full = generate(sampler.transformer)
        routed.clear_stats()
        routed.reset()
        images = generate(routed)
        st = routed.stats()
        per = st["per_sample"]
        typer.echo(f"evaluation ({evaluate} images, seed 0): FLOP fraction {st['flop_fraction']:.3f} per sample "
                   f"(min {per['min']:.3f}, median {per['median']:.3f}, max {per['max']:.3f}), "
                   f"PSNR {metrics.psnr(images, full):.2f} dB against the full model")
    typer.echo(f"wrote {out}")


def _zoo_name_for(directory: Path) -> str:
    """The reference model a saved optimisation was made for: recorded by ``optimize``, else recognised."""
    from dit_opt import zoo

    meta = json.loads((directory / "dit_opt.json").read_text())
    if meta.get(_ZOO_KEY) in zoo.available():
        return meta[_ZOO_KEY]
    # Saved by the Python API: recognise the model by class and config among the shipped ones.
    saved = meta.get("model", {})
    for name in zoo.available():
        cfg = zoo.info(name)["transformer_config"]
        if all(saved.get("config", {}).get(k) == v for k, v in cfg.items()):
            return name
    raise typer.BadParameter(f"{directory} was made for a {saved.get('class', 'unknown model')}, not one of the "
                             f"shipped reference models ({', '.join(zoo.available())}); load it in Python with "
                             f"dit_opt.load(dir, model)", param_hint="DIR")


@app.command()
def inspect(
    directory: Annotated[Path, typer.Argument(help="A directory written by `dit-opt optimize` or opt.save().")],
    step: int = typer.Option(0, "--step", min=0, help="Step whose rewritten graph code is printed."),
    heatmap: Annotated[Path | None, typer.Option("--heatmap", help="Write the plan's steps x units heat map "
                                                 "(PNG).")] = None,
) -> None:
    """Print a saved optimisation's plan table and one step's rewritten graph code; draw the heat map."""
    import dit_opt
    from dit_opt.errors import DitOptError

    if not (directory / "dit_opt.json").is_file():
        raise typer.BadParameter(f"{directory} is not a saved dit-opt model (no dit_opt.json); write one with "
                                 f"`dit-opt optimize MODEL --out DIR`", param_hint="DIR")
    name = _zoo_name_for(directory)
    sampler = _load_sampler(name)
    try:
        opt = dit_opt.load(directory, sampler.transformer, compile=False)
        if step >= opt.plan.num_steps:
            raise typer.BadParameter(f"step {step} is outside the plan's {opt.plan.num_steps} steps "
                                     f"(0..{opt.plan.num_steps - 1})", param_hint="--step")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt(**sampler.example_inputs())  # one call at step 0 captures the graph and builds the variants
        code = opt.graph(step).code
    except DitOptError as e:
        raise _fail(e) from e
    typer.echo(f"{directory}: {name}, solver {opt.solver}")
    typer.echo(opt.plan.summary())
    if heatmap is not None:
        opt.plan.heatmap(heatmap)
        typer.echo(f"wrote {heatmap}")
    typer.echo(f"--- step {step}: rewritten graph ---")
    typer.echo(code)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmark dit-opt against its baselines and diffusers' cache hooks (examples/benchmark.py).

    Every option is passed on: `dit-opt bench --help` lists them (--quick, --no-timing, --models,
    --budgets, --samples, --steps, --peers, --solvers, --out, --figure, ...).
    """
    from dit_opt.benchmark import main as bench_main

    bench_main(list(ctx.args), prog="dit-opt bench")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
