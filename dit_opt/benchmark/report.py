"""Reporting measured rows: the markdown table of one model (:func:`table`), whether dit-opt beats
every other row at a FLOP budget (:func:`verdict`), the PSNR-vs-FLOP-fraction figure
(:func:`plot_pareto`) and the whole markdown report (:func:`write_report`). It measures nothing,
so it serves rows read back from ``--json`` files as well as fresh ones.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from pathlib import Path

from dit_opt.bench import machine
from dit_opt.benchmark.config import _CALIBRATION_SEED, _EVAL_SEED, BenchConfig, Row
from dit_opt.equal_flops import compare, comparison_table, envelope_at, quality_table


def _num(x: float | None, spec: str) -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    return format(x, spec)


def table(rows: Sequence[Row]) -> list[str]:
    """Markdown table lines of one model's rows."""
    out = ["| method | setting | FLOP fraction | PSNR (dB) | SSIM | class acc. | Frechet dist. | speedup | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r.speedup:.2f}x ({r.timing})" if r.speedup is not None and r.timing else (
            "1.00x" if r.speedup is not None else "-")
        psnr = "inf" if r.psnr == float("inf") else _num(r.psnr, ".2f")
        out.append(f"| {r.method} | {r.setting} | {_num(r.flop_fraction, '.3f')} | {psnr} | {_num(r.ssim, '.4f')} | "
                   f"{_num(r.accuracy, '.0%')} | {_num(r.frechet, '.2f')} | {speed} | {r.note} |")
    return out


def verdict(rows: Sequence[Row], budget: float = 0.5) -> list[str]:
    """Does dit-opt at ``budget`` beat, in PSNR, every other row at a FLOP fraction <= ``budget``?"""
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model and r.method == "dit-opt (cpsat)" and r.target == budget]
        if not mine or mine[0].psnr != mine[0].psnr:
            lines.append(f"* `{model}`: no dit-opt row at budget {budget} was measured.")
            continue
        me = mine[0]
        # Peers and baselines only: dit-opt's own rows at smaller budgets are not competitors.
        others = [r for r in rows if r.model == model and r.method not in ("full model", me.method)
                  and r.flop_fraction == r.flop_fraction and r.flop_fraction <= budget + 1e-9]
        better = [r for r in others if r.psnr >= me.psnr]
        head = (f"* `{model}`: dit-opt at budget {budget} reaches FLOP fraction {me.flop_fraction:.3f}, "
                f"PSNR {me.psnr:.2f} dB, against {len(others)} other row(s) at a FLOP fraction <= {budget}. ")
        if not others:
            lines.append(head + "No other method landed at or below that fraction, so there is nothing to beat there.")
        elif not better:
            best = max(others, key=lambda r: r.psnr)
            lines.append(head + f"It beats all of them; the best of the others is {best.method} ({best.setting}) "
                         f"at {best.psnr:.2f} dB, FLOP fraction {best.flop_fraction:.3f}.")
        else:
            names = "; ".join(f"{r.method} ({r.setting}): {r.psnr:.2f} dB at {r.flop_fraction:.3f}" for r in better)
            lines.append(head + f"It does NOT beat: {names}.")
    return lines


def plot_pareto(rows: Sequence[Row], path: str | Path) -> Path:
    """PSNR against FLOP fraction, one line per method, one subplot per model (matplotlib Agg); the
    tools' envelope dashed, and each dit-opt point labelled with its margin over it at equal FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        methods = [m for m in dict.fromkeys(r.method for r in rows if r.model == model) if m != "full model"]
        # tab20 gives every method its own colour (the default cycle repeats after 10 lines)
        colours = plt.cm.tab20.colors
        for i, method in enumerate(methods):
            pts = sorted((r.flop_fraction, r.psnr) for r in rows if r.model == model and r.method == method
                         and r.flop_fraction == r.flop_fraction and r.psnr == r.psnr and r.psnr != float("inf"))
            if not pts:
                continue
            style = dict(lw=2.5, marker="o", color="black") if method == "dit-opt (cpsat)" else dict(
                lw=1.2, marker=".", color=colours[i % len(colours)])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **style)
        mine = [r for r in rows if r.model == model]
        xs = [x / 200 for x in range(1, 201)]
        env = [(x, envelope_at(mine, x, baselines=False).psnr) for x in xs]
        env = [(x, y) for x, y in env if math.isfinite(y)]
        if env:
            ax.plot([x for x, _ in env], [y for _, y in env], ls="--", lw=1.0, color="grey",
                    label="tools' envelope (equal FLOPs)")
        for c in compare(mine):
            if math.isfinite(c.tools_margin):
                ax.annotate(f"{c.tools_margin:+.1f} dB", (c.flop_fraction, c.psnr), textcoords="offset points",
                            xytext=(4, 6), fontsize=7)
        ax.set_title(model)
        ax.set_xlabel("FLOP fraction of the full generation (counted)")
        ax.set_ylabel("PSNR vs full output (dB)")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: Sequence[Row], cfg: BenchConfig, path: str | Path, command: str, seconds: float,
                 figure: str | None = None, discussion: str = "", merged: bool = False) -> Path:
    """Write the markdown report: machine, date, command, one table per model, the verdict.

    ``merged``: the rows come from earlier runs (``--merge``), whose dates are in ``command``; the
    header then gives the date of the merge and the longest run's time, not a measurement date.
    """
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"Rows measured on {machine()} by the commands below, on the dates they give (the longest run "
              f"took {seconds / 60:.1f} min); report merged {date}." if merged else
              f"Measured {date} on {machine()}; the run took {seconds / 60:.1f} min.")
    lines = [
        "# Benchmarks",
        "",
        header,
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Same class labels ({cfg.samples} samples, the model's classes in turn) and seed ({_EVAL_SEED}) for "
        "every row; "
        f"the dit-opt and baseline rows share one sensitivity profile per model, calibrated on seed "
        f"{_CALIBRATION_SEED} ({cfg.calibration_samples} samples, `probes=0`). FLOP fraction: `FlopCounterMode` "
        "over the whole generation, eager, attention included. PSNR and SSIM: against the full model's output "
        "for the same noise. Class accuracy: the shipped classifier of the model's data (digits or crops) against "
        "the conditioning labels. Frechet distance: classifier features against the held-out real images (450 "
        "digits; 640 crops for crops-pixart; with this few samples it "
        "is biased upwards and noisy; compare rows with each other only). Speedup: median wall-clock ratio of "
        f"whole generations ({cfg.timing_samples} samples, {cfg.timing_repeats} alternating runs per side, after "
        "one warm-up generation each), every row `compiled` against the same `torch.compile(model)`: dit-opt "
        "with `compile=True` (its blocks compiled); the diffusers hooks with each transformer block compiled "
        "around them (regional compilation as `compile_repeated_blocks`; where a hook sits on a block or on an "
        "attention or MLP module, the forward it wraps is compiled and the hook itself runs in Python); cache-dit "
        "with `torch.compile` of the whole cached transformer under `cache_dit.set_compile_configs()`, its cache "
        "context refreshed before every generation. A row marked `eager (compile failed)` could not be compiled "
        "and was timed eager against the eager model (its note says why). The CPU is shared with other jobs; "
        "timings are noisy.",
        "",
    ]
    if not cfg.timing:
        lines += ["Timing was skipped in this run (`--no-timing`).", ""]
    elif cfg.timing_scope != "all":
        lines += ["Only the full model and dit-opt's cpsat rows were timed in this run (`--timing-scope dit-opt`).", ""]
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        lines += [f"## {model}", ""] + table(mine) + [""]
        lines += [f"At equal FLOPs on `{model}`: each dit-opt row against the best any peer or baseline reaches "
                  "at the same FLOP fraction (each one's points joined linearly, a cheaper better point counted "
                  "as it is, no extrapolation below its cheapest; `dit_opt.equal_flops`):", ""]
        lines += comparison_table(mine) + [""]
        lines += ["Class accuracy and Frechet distance at the same points: dit-opt's against the tools' envelope's "
                  "(the peer point or chord that gives the envelope's PSNR there, interpolated the same way; "
                  "with this few samples the Frechet distance moves by several units from noise alone):", ""]
        lines += quality_table(mine) + [""]
    if figure:
        lines += [f"![PSNR against FLOP fraction]({figure})", ""]
    lines += ["## Does dit-opt at budget 0.5 beat every method at a FLOP fraction <= 0.5?", ""]
    lines += verdict(rows, 0.5) + [""]
    if discussion:
        lines += [discussion.rstrip(), ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
