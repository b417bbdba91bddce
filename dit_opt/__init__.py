"""dit-opt: make Diffusion Transformers cheaper to sample from, like a compiler.

Capture a DiT as an FX graph, annotate it with a FLOP cost model, and (in later
stages) choose per step and per block what to compute, reuse, prune or skip under
an explicit FLOP budget.
"""

from dit_opt.capture import capture, find_block_lists
from dit_opt.errors import (
    ArtifactError,
    CaptureError,
    ConfigError,
    DitOptError,
    InfeasibleBudgetError,
    InputMismatchError,
    NoBlocksFoundError,
)
from dit_opt.ir import BlockSpec, DiTGraph

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "capture",
    "find_block_lists",
    "BlockSpec",
    "DiTGraph",
    "ArtifactError",
    "CaptureError",
    "ConfigError",
    "DitOptError",
    "InfeasibleBudgetError",
    "InputMismatchError",
    "NoBlocksFoundError",
]
