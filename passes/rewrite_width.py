"""rewrite_width: ``WIDTH(w)`` runs the block with its MLP at prefix width ``w``.

The narrowed block is a copy whose MLP keeps the ``w`` most important hidden channels
(ranked once, at optimisation time, from calibration statistics; see
``dit_opt.executor.narrow_block``). One copy per (block, width) is shared by every step.
"""

from __future__ import annotations

from torch import nn

from dit_opt.ir import BlockSpec
from passes.infra import PassResult
from passes.step_graph import StepGraph

__all__ = ["rewrite_width", "width_target"]


def width_target(spec: BlockSpec, width: float) -> str:
    """The ``call_module`` target of ``spec``'s block narrowed to ``width``."""
    return f"{spec.name.replace('.', '_')}_width{round(width * 100)}"


def rewrite_width(sg: StepGraph, spec: BlockSpec, width: float, narrowed: nn.Module) -> PassResult:
    """Point ``spec``'s block call at ``narrowed`` (the block with its MLP at ``width``)."""
    node = sg.node(spec)
    node.target = sg.add_module(width_target(spec, width), narrowed)
    return PassResult(sg, True)
