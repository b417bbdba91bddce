"""The ``dit-opt`` command line: every command once on a tiny workload, and one bad argument per command.

The workloads are cut to seconds (digits-mmdit, 3 denoising steps, 2 samples, no compile, no
timing); what is checked is the wiring: exit codes, messages, and the files each command writes.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from dit_opt.cli import app

runner = CliRunner()
TINY = ["--steps", "3", "--samples", "2", "--threads", "1"]


def _run(*args: str):
    return runner.invoke(app, list(args))


def _text(result) -> str:
    """The output with rich's error-box borders and line wrapping removed."""
    return " ".join(result.output.replace("│", " ").split())


def _ok(result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    return result.output


def test_help_lists_every_command():
    out = _ok(_run("--help"))
    for command in ("capture", "demo", "profile", "optimize", "inspect", "bench"):
        assert command in out, out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A profile and an optimised model saved by the CLI (shared by the inspect tests)."""
    root = tmp_path_factory.mktemp("cli")
    prof, opt = root / "prof", root / "opt"
    out = _ok(_run("profile", "digits-mmdit", "--out", str(prof), *TINY))
    assert "wrote" in out and (prof / "profile.json").is_file()
    out = _ok(_run("optimize", "digits-mmdit", "--budget", "0.5", "--out", str(opt), "--profile", str(prof),
                   "--threads", "1", "--closed-loop", "1"))
    assert "Plan" in out and (opt / "dit_opt.json").is_file()
    # the solver's plan re-solved once from its own trajectory, each round's error printed
    assert re.search(r"closed loop \(calibration error per round\): cpsat [0-9.e+-]+", out), out
    # the candidates are compared on the profile's loops (3 steps): on the model's default step
    # count every candidate was the same re-solved plan, with one error for all
    errors = re.findall(r"measured error ([0-9.e+-]+)", out)
    assert len(errors) > 1 and len(set(errors)) > 1, out
    return root


def test_demo_writes_grid_and_reports(tmp_path):
    png = tmp_path / "demo.png"
    out = _ok(_run("demo", "--model", "digits-mmdit", "--budget", "0.5", "--no-compile", "--repeats", "1",
                   "--out", str(png), *TINY))
    assert png.is_file() and png.stat().st_size > 0
    assert "FLOP fraction (counted)" in out and "speedup (eager vs eager" in out, out
    assert "candidate cpsat" in out and out.count("(kept)") == 1, out  # plans compared on the calibration
    # the cost in plain generations, and in seconds beside its unit (one timed run, which load moves)
    assert re.search(r"cost of optimize: [\d.]+ plain calibration generations .*; \d+ s, one plain generation "
                     r"[\d.]+ s", out), out


def test_demo_rejects_budget_outside_unit_interval():
    result = _run("demo", "--budget", "1.5")
    assert result.exit_code == 2, result.output
    assert "outside (0, 1]" in _text(result)


def test_demo_rejects_an_unknown_lowering():
    result = _run("demo", "--lowering", "fast")
    assert result.exit_code == 2, result.output
    assert "'fast' is not a lowering" in _text(result)


def test_profile_rejects_unknown_model(tmp_path):
    result = _run("profile", "no-such-model", "--out", str(tmp_path / "p"))
    assert result.exit_code == 2, result.output
    assert "unknown reference model" in _text(result) and "digits-dit" in _text(result)


def test_profile_distributed_without_torchrun_says_how_to_start_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = _run("profile", "digits-dit", "--out", str(tmp_path / "p"), *TINY, "--generations", "2", "--distributed")
    assert result.exit_code == 1, result.output
    assert "torchrun --nproc-per-node" in _text(result)
    assert not (tmp_path / "p").exists()
    result = _run("profile", "digits-dit", "--out", str(tmp_path / "p"), *TINY, "--generations", "3")
    assert result.exit_code == 1 and "every generation needs an image" in _text(result)


def test_optimize_records_zoo_model(saved):
    meta = json.loads((saved / "opt" / "dit_opt.json").read_text())
    assert meta["zoo_model"] == "digits-mmdit"


def test_optimize_rejects_bad_budget_and_missing_profile(tmp_path):
    result = _run("optimize", "digits-mmdit", "--budget", "0", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "outside (0, 1]" in _text(result), result.output
    result = _run("optimize", "digits-mmdit", "--out", str(tmp_path / "o"), "--profile", str(tmp_path / "none"))
    assert result.exit_code == 2 and "no profile.json" in _text(result), result.output
    result = _run("optimize", "digits-mmdit", "--out", str(tmp_path / "o"), "--closed-loop", "-1")
    assert result.exit_code == 2 and "--closed-loop" in _text(result), result.output


def test_optimize_rejects_a_profile_of_another_model(saved, tmp_path):
    result = _run("optimize", "digits-dit", "--out", str(tmp_path / "o"), "--profile", str(saved / "prof"))
    assert result.exit_code == 2 and "is a profile of digits-mmdit, not of digits-dit" in _text(result), result.output
    assert not (tmp_path / "o").exists()


def test_inspect_prints_plan_graph_and_heatmap(saved, tmp_path):
    png = tmp_path / "plan.png"
    out = _ok(_run("inspect", str(saved / "opt"), "--step", "1", "--heatmap", str(png)))
    assert "digits-mmdit" in out and "Plan" in out and "step 1: rewritten graph" in out and "def forward" in out
    assert png.is_file()


def test_inspect_rejects_missing_dir_and_step_out_of_range(saved, tmp_path):
    result = _run("inspect", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "no dit_opt.json" in _text(result), result.output
    result = _run("inspect", str(saved / "opt"), "--step", "99")
    assert result.exit_code == 2 and "outside the plan" in _text(result), result.output


def test_capture_rejects_unknown_model():
    result = _run("capture", "no-such-model")
    assert result.exit_code == 2 and "unknown model" in _text(result), result.output


def test_bench_quick_writes_report_and_figure(tmp_path):
    md, png = tmp_path / "B.md", tmp_path / "p.png"
    _ok(_run("bench", "--quick", "--no-timing", "--no-progress", "--models", "digits-mmdit", "--budgets", "0.5",
             "--steps", "3", "--samples", "2", "--calibration-samples", "2", "--solvers", "cpsat", "--peers", "fbc",
             "--out", str(md), "--figure", str(png)))
    text = md.read_text()
    assert "## digits-mmdit" in text and "dit-opt (cpsat)" in text and "FirstBlockCache" in text, text
    row = next(line for line in text.splitlines() if line.startswith("| dit-opt (cpsat)"))
    assert "failed" not in row and float(row.split("|")[3]) <= 0.51, row
    assert "Does dit-opt at budget 0.5 beat" in text
    assert png.is_file()


def test_bench_peers_only_with_no_solvers(tmp_path):
    md, png = tmp_path / "B.md", tmp_path / "p.png"
    _ok(_run("bench", "--quick", "--no-timing", "--no-progress", "--models", "digits-mmdit", "--steps", "3",
             "--samples", "2", "--solvers", "--peers", "fbc", "--out", str(md), "--figure", str(png)))
    text = md.read_text()
    assert "FirstBlockCache" in text and "| full model" in text, text
    assert "dit-opt (cpsat)" not in text and "dit-opt baseline" not in text, text


def test_bench_rejects_budget_outside_unit_interval(tmp_path):
    result = _run("bench", "--no-timing", "--budgets", "2", "--out", str(tmp_path / "B.md"))
    assert result.exit_code == 2, result.output


def test_train_routers_on_a_plan_rejects_options_it_does_not_take(tmp_path):
    result = _run("train-routers", "digits-dit", "--out", str(tmp_path / "r.safetensors"), "--plan-headroom",
                  "0.2", "--closed", "skip")
    assert result.exit_code == 2, result.output
    assert "--plan-headroom trains routers as optimize" in _text(result)
