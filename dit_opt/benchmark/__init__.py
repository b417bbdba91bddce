"""dit-opt against its baselines and its peers, on the shipped reference models.

``python examples/benchmark.py`` (or ``dit-opt bench``) runs, on the shipped reference models
(``digits-dit``, ``digits-mmdit`` and ``crops-pixart``), with the same seeds and class labels for
every row:

* the full model;
* dit-opt (solver ``cpsat``) at each target FLOP budget;
* dit-opt's baseline schedules (``fora``, ``delta_dit``, ``toca``, ``soda``) at the same budgets, solved from
  the same sensitivity profile (one profile per model, calibrated on other seeds than the
  evaluation);
* diffusers' cache hooks (FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeer,
  MagCache), each swept over its threshold or skip parameter so that some settings land near
  each target fraction;
* the optional ``cache-dit`` package (DBCache, DBCache + TaylorSeer, SCM step masks) where it
  applies (Flux, PixArt; not DiT, see :func:`cache_dit_module`), skipped with a note when not installed.

Per row: the FLOP fraction (counted with ``FlopCounterMode`` over the whole generation, eager),
PSNR and SSIM against the full output of the same seeds, class accuracy and Frechet distance of
the classifier features against the model's held-out real images, and optionally a wall-clock ratio:
compiled, alternating, median, every row against the same ``torch.compile(model)``. dit-opt replays
its plan with ``compile=True``; the diffusers hooks run with their blocks compiled around them
(:func:`compile_hooked_blocks`); cache-dit's transformer is compiled whole after
``cache_dit.set_compile_configs()``, as cache-dit documents. A peer that fails to compile is timed
eager against the eager model, and its row says so. It writes a markdown report and a
PSNR-vs-FLOP-fraction figure.

Peers and cache contexts: the diffusers hooks keep their state per *cache context* and raise
"No cache context is set" without one. ``FluxTransformer2DModel`` has ``cache_context``;
``DiTTransformer2DModel`` does not mix in ``CacheMixin`` (no ``enable_cache``), so the hooks are
applied with the ``apply_*`` functions ``enable_cache`` dispatches to, and the context is set
with the same private helper ``cache_context`` uses (``diffusers.hooks.hooks._set_cache_context``).
:class:`PeerModule` does this around every call: the reference samplers batch the conditional and
unconditional halves in one call, as ``DiTPipeline`` does, so every call runs in one context
(``"cond"``) that carries the step index and the timestep.
"""

from dit_opt.benchmark.cachedit_peers import CacheDitModule, cache_dit_module, compile_configs
from dit_opt.benchmark.cli import main
from dit_opt.benchmark.config import PEERS, SOLVERS, BenchConfig, Row
from dit_opt.benchmark.diffusers_peers import PeerModule, compile_hooked_blocks, peer_module
from dit_opt.benchmark.diffusers_peers import _has_hooks as _has_hooks
from dit_opt.benchmark.measure import _generate as _generate
from dit_opt.benchmark.measure import time_peer
from dit_opt.benchmark.report import plot_pareto, table, verdict, write_report
from dit_opt.benchmark.runner import run

__all__ = ["BenchConfig", "Row", "PeerModule", "CacheDitModule", "compile_hooked_blocks", "PEERS", "SOLVERS", "run",
           "write_report", "plot_pareto", "main", "peer_module", "cache_dit_module", "compile_configs", "time_peer",
           "table", "verdict"]
