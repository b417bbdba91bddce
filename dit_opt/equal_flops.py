"""Compare at equal FLOPs: dit-opt's PSNR against the peers' envelope at the same FLOP fraction.

A user who weighs dit-opt against a peer picks the peer's setting that costs what dit-opt costs,
so each dit-opt point is compared with what the peers reach at its FLOP fraction:

* each peer's measured points are joined linearly, any two of them (the upper envelope of the
  chords: with several settings per FLOP fraction, e.g. TaylorSeer's interval, warm-up and order,
  the best ones are the neighbours; no extrapolation beyond its cheapest and its dearest point);
* a peer point that is cheaper and better also counts: a user would take it (this makes the
  envelope non-decreasing in FLOPs, even where a peer's own curve is not);
* the envelope is the best of all peers there. Two envelopes are reported: the tools' (diffusers'
  hooks, cache-dit) and, stricter, the tools' together with dit-opt's own implementations of
  published schedules (``dit-opt baseline ...``: FORA, Delta-DiT, ToCa-like).
* rows with an infinite PSNR (the full model's output, e.g. a cache threshold that never
  triggers) join no curve: no line can be drawn to them.

Works on anything with ``method``, ``setting``, ``flop_fraction`` and ``psnr`` attributes
(:class:`dit_opt.benchmark.Row`, or the rows of a ``--json`` file read back).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["EnvelopePoint", "envelope_at", "compare", "comparison_table", "quality_table"]

#: rows that are not peers: the reference and dit-opt's own plans.
NOT_PEERS = ("full model", "dit-opt (cpsat)")
#: method prefix of dit-opt's implementations of published schedules.
BASELINE_PREFIX = "dit-opt baseline"


@dataclass(frozen=True)
class EnvelopePoint:
    """The peers' best PSNR at one FLOP fraction, and where it comes from.

    Attributes:
        psnr: the envelope's PSNR (nan where no peer covers the fraction).
        source: the peer and setting(s) it comes from, e.g. ``"MagCache threshold=0.15..0.6"``.
        accuracy: class accuracy there: the source point's, or along its chord, interpolated
            with the PSNR's weights (nan where the rows have none).
        frechet: Frechet distance there, the same way.
    """

    psnr: float
    source: str
    accuracy: float = float("nan")
    frechet: float = float("nan")


def _finite(r: Any) -> bool:
    return math.isfinite(r.psnr) and math.isfinite(r.flop_fraction)


def envelope_at(rows: Iterable[Any], x: float, baselines: bool = True) -> EnvelopePoint:
    """The best PSNR the peers among ``rows`` reach at FLOP fraction ``x`` (see the module doc).

    ``baselines=False`` leaves out dit-opt's own implementations of published schedules.

    Example:
        >>> from types import SimpleNamespace as R
        >>> rows = [R(method="p", setting="a", flop_fraction=0.2, psnr=20.0),
        ...         R(method="p", setting="b", flop_fraction=0.4, psnr=30.0)]
        >>> envelope_at(rows, 0.3).psnr
        25.0
        >>> math.isnan(envelope_at(rows, 0.1).psnr)   # below the cheapest point: no extrapolation
        True
    """
    by_peer: dict[str, list[Any]] = {}
    for r in rows:
        if r.method not in NOT_PEERS and _finite(r) and (baselines or not r.method.startswith(BASELINE_PREFIX)):
            by_peer.setdefault(r.method, []).append(r)
    cands: list[EnvelopePoint] = []
    for peer, pts in by_peer.items():
        pts = sorted(pts, key=lambda r: (r.flop_fraction, -r.psnr))
        # a cheaper (or equal) point of this peer: the user takes it as it is
        cands += [EnvelopePoint(r.psnr, f"{peer} {r.setting}", *_quality(r))
                  for r in pts if r.flop_fraction <= x + 1e-9]
        below = [r for r in pts if r.flop_fraction < x]
        above = [r for r in pts if r.flop_fraction > x]
        for lo in below:  # every chord across x: their maximum is the upper envelope there
            for hi in above:
                w = (x - lo.flop_fraction) / (hi.flop_fraction - lo.flop_fraction)
                cands.append(EnvelopePoint(lo.psnr + w * (hi.psnr - lo.psnr), f"{peer} {lo.setting}..{hi.setting}",
                                           *_quality(lo, hi, w)))
    # first of the best wins ties, as before: peers in the order of their rows
    return max(cands, key=lambda c: c.psnr, default=EnvelopePoint(float("nan"), ""))


def _quality(lo: Any, hi: Any = None, w: float = 0.0) -> tuple[float, float]:
    """Class accuracy and Frechet distance of row ``lo``, or ``w`` of the way from it to row ``hi``
    (nan where a row has none)."""
    def at(name: str) -> float:
        a = getattr(lo, name, float("nan"))
        return a if hi is None else a + w * (getattr(hi, name, float("nan")) - a)

    return at("accuracy"), at("frechet")


@dataclass(frozen=True)
class Comparison:
    """One dit-opt point against the peers' envelope at its FLOP fraction."""

    budget: float | None
    flop_fraction: float
    psnr: float
    tools: EnvelopePoint
    envelope: EnvelopePoint
    accuracy: float = float("nan")
    frechet: float = float("nan")

    @property
    def margin(self) -> float:
        """dit-opt's PSNR minus the envelope of all peers and baselines, in dB (nan where none covers it)."""
        return self.psnr - self.envelope.psnr

    @property
    def tools_margin(self) -> float:
        """dit-opt's PSNR minus the tools' envelope (diffusers, cache-dit), in dB."""
        return self.psnr - self.tools.psnr


def compare(rows: Sequence[Any], method: str = "dit-opt (cpsat)") -> list[Comparison]:
    """Every ``method`` row among ``rows`` (one model's) against the peers' envelope, by budget."""
    mine = sorted((r for r in rows if r.method == method and _finite(r)), key=lambda r: -(r.target or 0.0))
    return [Comparison(r.target, r.flop_fraction, r.psnr, envelope_at(rows, r.flop_fraction, baselines=False),
                       envelope_at(rows, r.flop_fraction), *_quality(r)) for r in mine]


def comparison_table(rows: Sequence[Any], method: str = "dit-opt (cpsat)") -> list[str]:
    """Markdown lines: per budget, dit-opt's point, both envelopes there, the margins and their sources."""
    def cell(env: EnvelopePoint, psnr: float) -> str:
        if not math.isfinite(env.psnr):
            return "- | - | none at or below this fraction"
        return f"{env.psnr:.2f} | **{psnr - env.psnr:+.2f}** | {env.source}"

    out = ["| budget | FLOP fraction | dit-opt PSNR (dB) | tools' envelope (dB) | margin | from | "
           "with dit-opt's baselines (dB) | margin | from |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in compare(rows, method):
        out.append(f"| {c.budget} | {c.flop_fraction:.3f} | {c.psnr:.2f} | {cell(c.tools, c.psnr)} | "
                   f"{cell(c.envelope, c.psnr)} |")
    return out


def quality_table(rows: Sequence[Any], method: str = "dit-opt (cpsat)") -> list[str]:
    """Markdown lines: per budget, dit-opt's class accuracy and Frechet distance beside the tools'
    envelope's at the same FLOP fraction (the point or chord that gives its PSNR, interpolated
    with the same weights), and whether dit-opt's are no worse."""
    out = ["| budget | FLOP fraction | dit-opt class acc. | envelope's | dit-opt Frechet dist. | envelope's | "
           "no worse |", "|---|---|---|---|---|---|---|"]
    for c in compare(rows, method):
        env = c.tools
        if not math.isfinite(env.psnr):
            out.append(f"| {c.budget} | {c.flop_fraction:.3f} | {c.accuracy:.0%} | - | {c.frechet:.2f} | - | - |")
            continue
        acc_ok = c.accuracy >= env.accuracy - 1e-9 if math.isfinite(env.accuracy) else None
        fd_ok = c.frechet <= env.frechet + 1e-9 if math.isfinite(env.frechet) else None
        verdict = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in (("accuracy", acc_ok),
                            ("Frechet", fd_ok)) if ok is not None) or "-"
        out.append(f"| {c.budget} | {c.flop_fraction:.3f} | {c.accuracy:.0%} | {env.accuracy:.0%} | "
                   f"{c.frechet:.2f} | {env.frechet:.2f} | {verdict} |")
    return out
