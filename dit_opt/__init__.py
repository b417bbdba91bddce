"""dit-opt: make Diffusion Transformers cheaper to sample from, like a compiler.

Capture a DiT as an FX graph, annotate it with a FLOP cost model, and (in later
stages) choose per step and per block what to compute, reuse, prune or skip under
an explicit FLOP budget.
"""

from dit_opt.api import load, optimize, profile
from dit_opt.calibration import calibration_from_pipeline, synthetic_calibration
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
from dit_opt.pipelines import attach, restore
from dit_opt.plan import Action, ActionKind, Plan, Unit
from dit_opt.routed import RoutedTransformer
from dit_opt.router_training import train_routers
from dit_opt.routers import RouterConfig, RouterSet
from dit_opt.runtime import OptimizedTransformer
from dit_opt.sensitivity import SensitivityProfile

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "optimize",
    "profile",
    "load",
    "attach",
    "restore",
    "capture",
    "calibration_from_pipeline",
    "synthetic_calibration",
    "Plan",
    "Action",
    "ActionKind",
    "Unit",
    "OptimizedTransformer",
    "train_routers",
    "RoutedTransformer",
    "RouterSet",
    "RouterConfig",
    "SensitivityProfile",
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
