"""Elastic routers (E-DiT): a tiny network per block that decides, per sample and step, whether
the block runs and at which MLP width.

A :class:`Router` reads its block's token input (the first stream, ``(batch, tokens, dim)``) and
the step's timestep:

* its own adaLN modulation by a sinusoidal embedding of the timestep (SiLU, ``Linear(256, 3 dim)``:
  shift, scale and a gate on the normalised input), LayerNorm without affine parameters;
* mean-pooled over the tokens, ``Linear(dim, hidden)``, ReLU;
* a gate head ``Linear(hidden, 1)``: the block runs where ``sigmoid(gate) >= 0.5`` (after the
  set's calibrated offset, :attr:`RouterSet.offset`), else it returns its inputs;
* a width head ``Linear(hidden, len(widths))``: the block's MLPs run on the prefix of their hidden
  channels (most important first, :func:`passes.annotate_sensitivity.measure_channel_order`) of
  the width of the largest logit.

E-DiT pools after the ReLU, i.e. runs ``Linear(dim, 128)`` on every token; here the tokens are
pooled before it, which costs ``2 dim hidden`` FLOPs per sample rather than per token: on the
reference models (hidden 128 to 256, 64 to 256 tokens) E-DiT's form would cost 4 to 8 % of a
block per router, paid whether the block runs or not.

A new router is at full capacity: every head's weights are zero and the biases say "run, at full
width", so an untrained :class:`RouterSet` reproduces the model exactly.

Routers are trained with :func:`dit_opt.router_training.train_routers` and run by
:class:`dit_opt.routed.RoutedTransformer`; saved as safetensors with a JSON header
(:meth:`RouterSet.save`, :meth:`RouterSet.load`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_opt.errors import ArtifactError, ConfigError
from dit_opt.plan import (
    FORECAST_FORMS,
    MAX_FORECAST_ORDER,
    Action,
    ActionKind,
    Plan,
    full_steps,
    step_forecasts,
)

__all__ = ["ROUTER_FORMAT", "DEFAULT_WIDTHS", "Router", "RouterConfig", "RouterSet", "plan_served", "plan_steps",
           "router_flops", "timestep_embedding"]

#: the artifact format this version writes and reads
ROUTER_FORMAT = "dit-opt-routers/1"
#: MLP widths a router chooses among (prefixes of the hidden channels), as in E-DiT
DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)
#: logit of a new router's gate and of its full width: sigmoid(4) = 0.982, so the block runs
FULL_CAPACITY_LOGIT = 4.0
TEMB_DIM = 256


def timestep_embedding(t: torch.Tensor, dim: int = TEMB_DIM, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding of the timesteps ``t`` (shape ``(batch,)``) times ``scale``,
    ``(batch, dim)``: cosines then sines at frequencies ``10000^(-i / (dim / 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Router(nn.Module):
    """One block's router (see the module docstring). ``forward(x, temb)`` returns the gate logit
    ``(batch,)`` and the width logits ``(batch, len(widths))``."""

    def __init__(self, dim: int, hidden: int = 128, num_widths: int = len(DEFAULT_WIDTHS)):
        super().__init__()
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(TEMB_DIM, 3 * dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, hidden)
        self.gate = nn.Linear(hidden, 1)
        self.width = nn.Linear(hidden, num_widths)
        self.reset_to_full()

    @torch.no_grad()
    def reset_to_full(self) -> None:
        """Full capacity: no modulation, the gate open and the widest width chosen, for any input."""
        for lin in (self.ada[1], self.gate, self.width):
            lin.weight.zero_()
            lin.bias.zero_()
        self.gate.bias.fill_(FULL_CAPACITY_LOGIT)
        self.width.bias[-1] = FULL_CAPACITY_LOGIT

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.ada(temb.to(x.dtype)).chunk(3, dim=-1)
        h = (self.norm(x) * (1 + scale[:, None]) + shift[:, None]) * (1 + gate[:, None])
        z = torch.relu(self.fc(h.mean(dim=1)))
        return self.gate(z).squeeze(-1), self.width(z)

    def flops(self, tokens: int) -> float:
        """FLOPs of one sample's call on ``tokens`` tokens (multiply-adds counted twice, as the cost
        model does)."""
        return router_flops(self.fc.in_features, tokens, self.fc.out_features, self.width.out_features)


def router_flops(dim: int, tokens: int, hidden: int = 128, widths: int = 1) -> float:
    """FLOPs of one sample's call of a :class:`Router` of a block of width ``dim`` on ``tokens``
    tokens, with ``widths`` width logits (multiply-adds counted twice, as the cost model does)."""
    return 2 * TEMB_DIM * 3 * dim + 8 * tokens * dim + 2 * dim * hidden + 2 * hidden * (1 + widths)


@dataclass(frozen=True)
class RouterConfig:
    """What a :class:`RouterSet` was made for and how it decides.

    Attributes:
        blocks: the routed blocks' qualified names, in model order.
        dims: each block's token width (its first stream's last dimension).
        tokens: each block's token count at the shapes it was made for.
        widths: the MLP widths the width head chooses among (the last is 1.0).
        hidden: the routers' hidden size.
        timestep_scale: the timestep is multiplied by it before the embedding (1000 for models
            called with timesteps in [0, 1]).
        decide: ``"block"``: each router reads its own block's input (E-DiT); ``"step"``: every
            router reads the first routed block's input, so a step's decisions are taken at once.
        offset: subtracted from every gate logit (calibrated so the FLOPs meet the budget).
        closed: what a closed gate does: ``"forecast"`` (default): the block's input plus the
            residual extrapolated to first order from the row's last two computes of the block, at
            their spacing (TaylorSeer's first-order step; a plain reuse after one compute);
            ``"reuse"``: plus the residual the row's last compute left; ``"skip"``: E-DiT's skip,
            the block returns its input. (With the backbone frozen, a block left out entirely costs
            far more than one served from its cache: ``docs/routers.md``.) Under the first two, a
            row with no cached residual yet, or that was served ``max_reuse`` times in a row,
            computes.
        margin: under ``closed="skip"``, E-DiT's block caching: a block whose gate probability is
            under ``0.5 + margin`` reuses its cached residual (0: no caching).
        max_reuse: at most this many reuses in a row per block and sample.
        reuse_from: under ``closed="skip"``, caching starts at this fraction of the loop's steps.
        served: under a static plan (:func:`dit_opt.optimize` with ``dynamic``), per step of the
            plan's loop, ``(block, order)`` for each block (an index into ``blocks``) the plan
            serves from its cache at that step, with the polynomial order it forecasts at (0: a
            reuse): those gates are closed whatever the router says (and the router is not run),
            the others are the routers' to gate. Empty: no plan, every gate is the router's.
        step_orders: under a plan, per step, the order of its whole-step forecast there (``-1``:
            none): the model is not called, its output is extrapolated from its outputs at the
            plan's last full steps (``full_steps``). Empty: no whole-step forecasts.
        full_steps: under a plan, per step, whether the plan computes every unit there.
        forecast_form: how the plan's forecasts extrapolate (:data:`dit_opt.plan.FORECAST_FORMS`);
            a first-order forecast is the same in both.
        budget: the FLOP fraction the routers were trained for.
        fingerprint: the model's (:func:`dit_opt.fingerprint.model_fingerprint`) digest.
        report: training figures (steps, seconds, losses, the calibrated FLOP fractions).
    """

    blocks: tuple[str, ...]
    dims: tuple[int, ...]
    tokens: tuple[int, ...]
    widths: tuple[float, ...] = DEFAULT_WIDTHS
    hidden: int = 128
    timestep_scale: float = 1.0
    decide: str = "block"
    offset: float = 0.0
    closed: str = "forecast"
    margin: float = 0.0
    max_reuse: int = 3
    reuse_from: float = 0.5
    served: tuple[tuple[tuple[int, int], ...], ...] = ()
    step_orders: tuple[int, ...] = ()
    full_steps: tuple[bool, ...] = ()
    forecast_form: str = "lagrange"
    budget: float = 1.0
    fingerprint: str = ""
    report: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.decide not in ("block", "step"):
            raise ConfigError(f"decide={self.decide!r}: use 'block' (each router reads its block's input) "
                              f"or 'step' (all routers read the first block's input)")
        if not self.widths or self.widths[-1] != 1.0 or any(not 0 < w <= 1 for w in self.widths) \
                or list(self.widths) != sorted(self.widths):
            raise ConfigError(f"widths={self.widths}: give increasing fractions in (0, 1] ending with 1.0")
        if self.closed not in ("forecast", "reuse", "skip"):
            raise ConfigError(f"closed={self.closed!r}: a closed gate forecasts the block's residual ('forecast'), "
                              f"reuses its cached one ('reuse') or skips the block ('skip')")
        if not 0.0 <= self.margin < 0.5:
            raise ConfigError(f"margin={self.margin}: the caching margin is a probability in [0, 0.5)")
        if self.max_reuse < 1 or not 0.0 <= self.reuse_from <= 1.0:
            raise ConfigError(f"max_reuse={self.max_reuse}, reuse_from={self.reuse_from}: "
                              f"max_reuse must be >= 1 and reuse_from in [0, 1]")
        if len(self.dims) != len(self.blocks) or len(self.tokens) != len(self.blocks):
            raise ConfigError("RouterConfig: blocks, dims and tokens must have one entry per block")
        if self.served and (self.closed == "skip" or any(
                not 0 <= i < len(self.blocks) or not 0 <= k <= MAX_FORECAST_ORDER for row in self.served
                for i, k in row)):
            raise ConfigError(f"RouterConfig.served: per step, (block index, forecast order 0..{MAX_FORECAST_ORDER}) "
                              f"pairs, and the routers must serve closed gates from their caches (closed "
                              f"'forecast' or 'reuse')")
        if any(not -1 <= k <= MAX_FORECAST_ORDER for k in self.step_orders) \
                or (self.step_orders and len(self.full_steps) != len(self.step_orders)):
            raise ConfigError(f"RouterConfig.step_orders: per step -1 or a whole-step forecast order 0.."
                              f"{MAX_FORECAST_ORDER}, with full_steps of the same length")
        if self.forecast_form not in FORECAST_FORMS:
            raise ConfigError(f"forecast_form={self.forecast_form!r}: one of {', '.join(FORECAST_FORMS)}")


def plan_served(plan: Plan, blocks: Sequence[str]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per step of ``plan``, ``(index into blocks, order)`` of each block it serves from its cache
    (every unit of the block reuses or forecasts, or the step is a whole-step forecast; the order
    the lowest of its units', 0 for a reuse): :attr:`RouterConfig.served`.

    Raises:
        ConfigError: the plan prunes, narrows, skips or derives a guidance half somewhere (routers
            gate whole computes: solve the plan with ``actions=("reuse", "forecast")``), or serves a
            block the routers do not gate.
    """
    serving = (ActionKind.REUSE, ActionKind.FORECAST, ActionKind.STEP)
    index = {name: i for i, name in enumerate(blocks)}
    out = []
    for t, row in enumerate(plan.actions):
        by_block: dict[str, list[Action]] = {}
        for unit, action in zip(plan.units, row, strict=True):
            if action.kind not in (ActionKind.COMPUTE, *serving):
                raise ConfigError(f"the plan's step {t} has {action} at {unit}: routers gate whole computes of a "
                                  f"plan that computes, reuses or forecasts; solve it with "
                                  f"actions=('reuse', 'forecast')")
            by_block.setdefault(f"{unit.list_name}.{unit.index}", []).append(action)
        served = {name: min(a.order or 0 for a in acts) for name, acts in by_block.items()
                  if all(a.kind in serving for a in acts)}
        missing = [name for name in served if name not in index]
        if missing:
            raise ConfigError(f"the plan serves {missing[:3]} at step {t}, which the routers do not gate")
        out.append(tuple(sorted((index[name], k) for name, k in served.items())))
    return tuple(out)


def plan_steps(plan: Plan) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Per step of ``plan``: the order of its whole-step forecast (``-1``: none), and whether it
    computes every unit (:attr:`RouterConfig.step_orders`, :attr:`RouterConfig.full_steps`);
    ``((), ())`` for a plan without whole-step forecasts."""
    orders = tuple(-1 if a is None else int(a.order) for _, a, _ in step_forecasts(plan.actions))
    if all(k < 0 for k in orders):
        return (), ()
    return orders, tuple(full_steps(plan.actions))


def _key(block: str) -> str:
    return block.replace(".", "__")


class RouterSet(nn.Module):
    """The routers of a model's blocks (one :class:`Router` per entry of ``config.blocks``)."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        self.routers = nn.ModuleDict({_key(b): Router(d, config.hidden, len(config.widths))
                                      for b, d in zip(config.blocks, config.dims, strict=True)})

    def __getitem__(self, block: str) -> Router:
        return self.routers[_key(block)]

    def with_config(self, **changes: Any) -> RouterSet:
        """The same routers (shared parameters) under a config with ``changes`` (e.g. ``margin``)."""
        out = RouterSet.__new__(RouterSet)
        nn.Module.__init__(out)
        out.config = replace(self.config, **changes)
        out.routers = self.routers
        return out

    # ------------------------------------------------------------------ artifacts
    def save(self, path: str | Path, runtime: dict[str, Any] | None = None,
             tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the routers to ``path`` (safetensors; the config, and ``runtime``, a JSON-able
        dict, in its header; ``tensors`` stored beside the routers' under ``extra.<name>``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = {f"routers.{k}": v.detach().cpu().contiguous() for k, v in self.routers.state_dict().items()}
        out.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})
        meta = {"format": ROUTER_FORMAT, "config": json.dumps(asdict(self.config)),
                "runtime": json.dumps(runtime or {})}
        save_file(out, str(path), metadata=meta)
        return path

    @classmethod
    def read(cls, path: str | Path) -> tuple[RouterSet, dict[str, Any], dict[str, torch.Tensor]]:
        """Read what :meth:`save` wrote: the routers, the ``runtime`` dict and the extra tensors.

        Raises:
            ArtifactError: the file is missing, not a router file, corrupt or of another format.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such router file (save one with RoutedTransformer.save or "
                                f"`dit-opt train-routers --out`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise ArtifactError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                                f"train the routers again") from e
        if meta.get("format") != ROUTER_FORMAT:
            raise ArtifactError(f"{path}: not a dit-opt router file (format {meta.get('format')!r}, "
                                f"expected {ROUTER_FORMAT!r})")
        try:
            raw = json.loads(meta["config"])
            config = RouterConfig(**{**raw, **{k: tuple(raw[k]) for k in ("blocks", "dims", "tokens", "widths")},
                                     "served": tuple(tuple((int(i), int(k)) for i, k in row)
                                                     for row in raw.get("served", ())),
                                     "step_orders": tuple(int(k) for k in raw.get("step_orders", ())),
                                     "full_steps": tuple(bool(f) for f in raw.get("full_steps", ()))})
            runtime = json.loads(meta.get("runtime", "{}"))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: its router config is corrupt ({e}); train the routers again") from e
        routers = cls(config)
        try:
            routers.routers.load_state_dict({k.removeprefix("routers."): v for k, v in tensors.items()
                                             if k.startswith("routers.")})
        except RuntimeError as e:
            raise ArtifactError(f"{path}: its tensors do not match its config ({str(e).splitlines()[0]}); "
                                f"train the routers again") from e
        extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return routers, runtime, extra

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> RouterSet:
        """The routers :meth:`save` wrote to ``path``; where ``model`` is given, checked to be
        made for it (:meth:`check_model`).

        Raises:
            ArtifactError: as :meth:`read`, or the routers were made for another model.
        """
        routers, _, _ = cls.read(path)
        if model is not None:
            routers.check_model(model, str(path))
        return routers

    def check_model(self, model: nn.Module, what: str = "routers") -> None:
        """Raise :class:`ArtifactError` unless ``model`` is the model the routers were trained on."""
        from dit_opt.fingerprint import weights_digest

        missing = [b for b in self.config.blocks if not _has(model, b)]
        if missing:
            raise ArtifactError(f"{what}: made for a model with blocks {missing[:3]}, which "
                                f"{type(model).__name__} lacks; train routers for this model")
        if self.config.fingerprint and weights_digest(model) != self.config.fingerprint:
            raise ArtifactError(f"{what}: made for other weights of {type(model).__name__} (the weights' "
                                f"digest differs); train routers for these weights")


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
