"""The equal-FLOPs comparison of the benchmark (dit_opt.equal_flops): pure arithmetic, no model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from dit_opt.equal_flops import compare, comparison_table, envelope_at, quality_table


def row(method, flops, psnr, setting="s", target=None):
    return SimpleNamespace(method=method, setting=setting, flop_fraction=flops, psnr=psnr, target=target)


def test_linear_between_neighbours_and_no_extrapolation_below():
    rows = [row("diffusers P", 0.2, 20.0, "a"), row("diffusers P", 0.6, 28.0, "b")]
    assert envelope_at(rows, 0.3).psnr == 22.0
    assert envelope_at(rows, 0.3).source == "diffusers P a..b"
    assert math.isnan(envelope_at(rows, 0.19).psnr)
    # above the dearest point, the dearest point itself (a user takes the cheaper setting)
    assert envelope_at(rows, 0.9).psnr == 28.0


def test_several_settings_per_fraction_join_at_their_best():
    """TaylorSeer's knobs give many settings at one FLOP fraction: the envelope joins the best
    ones, skipping a fraction where every setting is poor (the upper envelope of all chords)."""
    rows = [row("diffusers T", 0.3, 40.0, "a"), row("diffusers T", 0.3, 30.0, "b"),
            row("diffusers T", 0.4, 35.0, "c"), row("diffusers T", 0.5, 50.0, "d")]
    assert envelope_at(rows, 0.45).psnr == 47.5  # a..d (45.0 on the chord a..d), not c..d (42.5)
    assert envelope_at(rows, 0.45).source == "diffusers T a..d"
    assert envelope_at(rows, 0.35).psnr == 42.5  # a..d again, above a..c (37.5) and the point a


def test_a_cheaper_better_point_counts_and_the_best_peer_wins():
    rows = [row("diffusers P", 0.2, 30.0), row("diffusers P", 0.6, 25.0),  # not monotone
            row("cache-dit Q", 0.3, 26.0), row("cache-dit Q", 0.5, 34.0)]
    assert envelope_at(rows, 0.4).psnr == 30.0  # Q's line gives 30.0, P's cheaper point too
    assert envelope_at(rows, 0.45).psnr == 32.0
    assert envelope_at(rows, 0.45).source.startswith("cache-dit Q")


def test_full_model_dit_opt_and_infinite_rows_are_not_peers():
    rows = [row("full model", 1.0, math.inf), row("dit-opt (cpsat)", 0.5, 40.0, target=0.5),
            row("diffusers P", 0.3, 20.0), row("diffusers P", 1.0, math.inf)]
    # the inf point cannot be joined: P is only known at 0.3
    assert envelope_at(rows, 0.5).psnr == 20.0
    (c,) = compare(rows)
    assert (c.budget, c.psnr, c.margin) == (0.5, 40.0, 20.0)


def test_baselines_count_in_the_strict_envelope_only():
    rows = [row("dit-opt (cpsat)", 0.5, 30.0, target=0.5), row("diffusers P", 0.5, 25.0),
            row("dit-opt baseline fora", 0.5, 29.0)]
    (c,) = compare(rows)
    assert c.tools_margin == 5.0 and c.margin == 1.0
    table = comparison_table(rows)
    assert "**+5.00**" in table[2] and "**+1.00**" in table[2]


def test_uncovered_fraction_is_reported_not_invented():
    rows = [row("dit-opt (cpsat)", 0.2, 30.0, target=0.2), row("diffusers P", 0.3, 25.0)]
    assert "none at or below this fraction" in comparison_table(rows)[2]


points = st.lists(st.tuples(st.floats(0.05, 1.0), st.floats(5.0, 60.0)), min_size=1, max_size=8)


@settings(deadline=None)  # pure arithmetic; a loaded CPU must not fail it
@given(points, points)
def test_envelope_is_non_decreasing_and_above_every_point(a, b):
    rows = [row("diffusers A", x, p) for x, p in a] + [row("cache-dit B", x, p) for x, p in b]
    xs = sorted({x for x, _ in a + b} | {0.05, 0.5, 1.0})
    values = [envelope_at(rows, x).psnr for x in xs]
    finite = [v for v in values if math.isfinite(v)]
    assert all(v2 >= v1 - 1e-9 for v1, v2 in zip(finite, finite[1:], strict=False))
    for x, p in a + b:
        assert envelope_at(rows, x).psnr >= p - 1e-9


def test_benchmark_report_carries_the_equal_flops_table(tmp_path):
    from dit_opt import benchmark  # heavy (diffusers, cache-dit): only this test needs it

    keys = dict(ssim=1.0, accuracy=1.0, frechet=1.0)
    rows = [dict(model="m", method="full model", setting="20 steps", target=None, flop_fraction=1.0,
                 psnr=math.inf, **keys),
            dict(model="m", method="dit-opt (cpsat)", setting="budget 0.5", target=0.5, flop_fraction=0.5,
                 psnr=30.0, **keys),
            dict(model="m", method="diffusers P", setting="x=1", target=None, flop_fraction=0.4, psnr=20.0, **keys),
            dict(model="m", method="diffusers P", setting="x=2", target=None, flop_fraction=0.6, psnr=24.0, **keys)]
    saved = tmp_path / "rows.json"
    saved.write_text(json.dumps({"seconds": 1.0, "rows": rows}))
    out = tmp_path / "report.md"
    benchmark.main(["--merge", str(saved), "--out", str(out), "--figure", str(tmp_path / "f.png")])
    text = out.read_text()
    assert "At equal FLOPs on `m`" in text
    assert "| 0.5 | 0.500 | 30.00 | 22.00 | **+8.00** | diffusers P x=1..x=2 |" in text
    # a later file re-measures one method: its rows take the old ones' place, the rest stays
    again = tmp_path / "again.json"
    again.write_text(json.dumps({"seconds": 2.0, "rows": [dict(rows[1], psnr=33.0)]}))
    merged = benchmark.main(["--merge", str(saved), str(again), "--out", str(out),
                             "--figure", str(tmp_path / "f.png")])
    assert [(r.method, r.psnr) for r in merged][:2] == [("full model", math.inf), ("dit-opt (cpsat)", 33.0)]
    assert len(merged) == 4 and "| 0.5 | 0.500 | 33.00 | 22.00 | **+11.00**" in out.read_text()
    # a re-run of one setting replaces that row only; a new setting is added
    third = tmp_path / "third.json"
    third.write_text(json.dumps({"seconds": 1.0, "rows": [dict(rows[3], psnr=25.0), dict(rows[3], setting="x=3")]}))
    merged = benchmark.main(["--merge", str(saved), str(third), "--out", str(out), "--figure", str(tmp_path / "f.png")])
    assert [(r.setting, r.psnr) for r in merged] == [("20 steps", math.inf), ("budget 0.5", 30.0), ("x=1", 20.0),
                                                     ("x=2", 25.0), ("x=3", 24.0)]


def test_the_envelopes_class_accuracy_and_frechet_follow_its_psnr():
    """At a FLOP fraction the envelope's quality figures are those of the point or chord that
    gives its PSNR, interpolated with the same weights; dit-opt's are set beside them."""
    def q(method, flops, psnr, acc, fd, setting="s", target=None):
        return SimpleNamespace(method=method, setting=setting, flop_fraction=flops, psnr=psnr, target=target,
                               accuracy=acc, frechet=fd)

    rows = [q("diffusers P", 0.2, 20.0, 0.8, 200.0, "a"), q("diffusers P", 0.6, 28.0, 1.0, 100.0, "b"),
            q("dit-opt (cpsat)", 0.3, 30.0, 0.95, 130.0, target=0.3)]
    env = envelope_at(rows, 0.3)
    assert env.source == "diffusers P a..b"
    assert env.accuracy == 0.85 and env.frechet == 175.0
    assert envelope_at(rows, 0.9).frechet == 100.0  # the dearest point as it is
    (line,) = quality_table(rows)[2:]
    assert "| 0.3 | 0.300 | 95% | 85% | 130.00 | 175.00 | accuracy yes, Frechet yes |" == line
    rows[2] = q("dit-opt (cpsat)", 0.3, 30.0, 0.8, 180.0, target=0.3)
    assert quality_table(rows)[2].endswith("| accuracy no, Frechet no |")
    # rows without the figures (older files): nothing invented
    assert math.isnan(envelope_at([row("diffusers P", 0.2, 20.0)], 0.3).accuracy)
