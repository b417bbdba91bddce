"""Pass infrastructure: the result type every pass returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx

__all__ = ["PassResult"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns, as in ``torch.fx.passes.infra.pass_base``.

    Attributes:
        graph_module: the (possibly rewritten) module; for the rewrite passes, the
            ``passes.step_graph.StepGraph`` they edited.
        modified: whether the pass changed the graph or its annotations.
    """

    graph_module: torch.fx.GraphModule | Any
    modified: bool
