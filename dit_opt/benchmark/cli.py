"""dit-opt against its baselines and its peers, on the shipped reference models.

The benchmark's command line (``python examples/benchmark.py``, ``dit-opt bench``): :func:`main`
parses the arguments, runs the benchmark (or, with ``--merge``, reads rows saved by earlier runs),
and writes the markdown report, the figure and optionally the rows as JSON. The first line above
is the ``--help`` description.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from dit_opt.benchmark.config import PEERS, SOLVERS, BenchConfig, Row
from dit_opt.benchmark.report import plot_pareto, table, verdict, write_report
from dit_opt.benchmark.runner import run


def main(argv: list[str] | None = None, prog: str = "benchmark.py") -> list[Row]:
    """Command-line entry point (``python examples/benchmark.py --help``, ``dit-opt bench --help``)."""
    import argparse
    import shlex
    import sys
    import time

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-dit", "digits-mmdit", "crops-pixart"],
                        help="reference models")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.35, 0.25, 0.2],
                        help="target FLOP fractions of the dit-opt and baseline rows")
    parser.add_argument("--samples", type=int, default=None, help="images per row (default 20, --quick 10)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--solvers", nargs="*", default=list(SOLVERS), choices=SOLVERS,
                        help="dit-opt's solver and baseline schedules to run (none: --solvers with no value)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS,
                        help="peer methods to sweep (none: --peers with no value)")
    parser.add_argument("--quick", action="store_true", help="10 samples and every other peer setting")
    parser.add_argument("--no-timing", action="store_true", help="skip the wall-clock measurements")
    parser.add_argument("--timing-scope", choices=["all", "dit-opt"], default="all",
                        help="time every row, or only dit-opt's cpsat rows")
    parser.add_argument("--timing-samples", type=int, default=4, help="images per timed generation")
    parser.add_argument("--timing-repeats", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--calibration-samples", type=int, default=10,
                        help="images of the calibration generation (seed 1000) that profiles and selects plans")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing shared CPUs)")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown report to write")
    parser.add_argument("--figure", default="docs/pareto.png", help="PSNR-vs-FLOP figure to write")
    parser.add_argument("--discussion", default=None, help="markdown file appended to the report (analysis)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (one line per row still)")
    parser.add_argument("--json", default=None, help="also write the measured rows as JSON (for --merge)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="measure nothing: write the report from rows saved by earlier runs' --json "
                             "(e.g. one run per model, in parallel); a later file's row replaces an earlier "
                             "file's row of the same model, method and setting (re-measure some, keep the rest)")
    parser.add_argument("--commands", default=None,
                        help="with --merge: the commands that measured the rows, for the report")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        cfg = BenchConfig(models=tuple(args.models), budgets=tuple(args.budgets),
                          samples=args.samples or (10 if args.quick else 20), steps=args.steps,
                          solvers=tuple(args.solvers), peers=tuple(args.peers), quick=args.quick,
                          timing=not args.no_timing, timing_scope=args.timing_scope, timing_samples=args.timing_samples,
                          timing_repeats=args.timing_repeats, calibration_samples=args.calibration_samples,
                          progress=not args.no_progress)
    except ValueError as e:
        parser.error(str(e))
    start = time.time()
    if args.merge:
        rows, seconds = [], 0.0
        for f in args.merge:
            data = json.loads(Path(f).read_text())
            rows = _merged(rows, [Row(**r) for r in data["rows"]])
            seconds = max(seconds, data["seconds"])
    else:
        rows = run(cfg)
        seconds = time.time() - start
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "rows": [asdict(r) for r in rows]}, indent=1,
                                              default=str))
    figure = plot_pareto(rows, args.figure)
    try:
        rel = os.path.relpath(figure, Path(args.out).resolve().parent)
    except ValueError:
        rel = str(figure)
    command = "python examples/benchmark.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    if args.merge and args.commands:
        command = Path(args.commands).read_text().strip() + "\n" + command
    discussion = Path(args.discussion).read_text() if args.discussion else ""
    write_report(rows, cfg, args.out, command.strip(), seconds, figure=rel, discussion=discussion,
                 merged=bool(args.merge))
    for model in dict.fromkeys(r.model for r in rows):
        print(f"\n{model}")
        print("\n".join(table([r for r in rows if r.model == model])))
    print("\n".join(verdict(rows, 0.5)))
    print(f"wrote {args.out} and {figure}")
    return rows


def _merged(rows: list[Row], new: list[Row]) -> list[Row]:
    """``rows`` with ``new`` in: a row of ``new`` takes the place of the old row of the same model,
    method and setting (a re-run of some budgets or settings replaces those only); the rest of
    ``new`` is appended."""
    def key(r: Row) -> tuple[str, str, str]:
        return r.model, r.method, r.setting

    fresh = {key(n): n for n in new}
    out = [fresh.pop(key(r), r) for r in rows]
    return out + [n for n in new if key(n) in fresh]
