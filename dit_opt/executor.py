"""How one block runs under each action: the tensor maths shared by profiling and the runtime.

The functions here are plain, shape-generic tensor code. Rewrite passes put them into step
graphs as ``call_function`` nodes (so ``opt.graph(step).code`` shows the cache reads,
gathers and scatters), and the sensitivity profiler calls them directly on the calibration
trajectories, so the error it measures is the error of the code that runs.

A block's *streams* are the outputs that continue an input's residual stream (see
:class:`dit_opt.ir.StreamSpec`): ``hidden_states`` for a DiT block, ``(encoder_hidden_states,
hidden_states)`` for a Flux block. Caches hold per-stream residuals ``out - in``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from dit_opt.ir import BlockSpec

__all__ = [
    "model_sample",
    "bind_inputs",
    "stream_inputs",
    "pack_outputs",
    "split_outputs",
    "reuse",
    "forecast",
    "combine",
    "half_rows",
    "halves_diff",
    "is_guidance_batch",
    "cfg_merge",
    "token_scores",
    "topk_tokens",
    "gather_tokens",
    "scatter_tokens",
    "prunable",
    "batch_rows",
    "token_layout",
    "mlp_linears",
    "narrow_block",
]


def model_sample(output: Any) -> Any:
    """The prediction in a transformer's return value: ``.sample`` of a diffusers output (its first
    field where it has another name: PriorTransformer's ``predicted_image_embedding``), the first
    element of a tuple or list, or the value itself."""
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, dict) and output:  # a diffusers BaseOutput is an ordered dict of its fields
        return next(iter(output.values()))
    return output[0] if isinstance(output, tuple | list) else output


def bind_inputs(block: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The block's call arguments by forward-signature name."""
    return dict(inspect.signature(block.forward).bind(*args, **kwargs).arguments)


def stream_inputs(spec: BlockSpec, named: dict[str, Any]) -> list[torch.Tensor | None]:
    """For each output of the block, the input tensor whose stream it continues (or ``None``)."""
    return [named.get(o.input_name) if o.input_name else None for o in spec.outputs]


def pack_outputs(is_tuple: bool, *outs: torch.Tensor | None) -> Any:
    """Build a block's return value from its per-output tensors."""
    return tuple(outs) if is_tuple else outs[0]


def split_outputs(out: Any) -> list[torch.Tensor | None]:
    """A block's return value as a list of per-output tensors."""
    return list(out) if isinstance(out, tuple | list) else [out]


def reuse(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``REUSE``: the block's output is its input plus the cached residual."""
    return x + residual


def is_guidance_batch(x: Any) -> bool:
    """Whether ``x`` (a call's latent, :func:`dit_opt.synthetic.call_names`) is a classifier-free-guidance
    batch: an even batch whose two halves are equal (the sampler ran ``cat([x, x])`` with two
    conditionings). A latent given as a list of one tensor per sample (Z-Image) never is: CFG
    is not derived for such models (their blocks compute both branches)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] < 2 or x.shape[0] % 2:
        return False
    half = x.shape[0] // 2
    return bool(torch.equal(x[:half], x[half:]))


def half_rows(value: Any, ref: torch.Tensor, half: int) -> Any:
    """``value`` with every tensor whose first dimension is ``ref``'s batch cut to half ``half``
    (0: the first, 1: the second) of it, through tuples, lists and dicts; the rest unchanged.

    The inputs of a block that runs on one half of a classifier-free-guidance batch (``CFG``).
    """
    if isinstance(value, torch.Tensor):
        n = ref.shape[0]
        if value.dim() and value.shape[0] == n:
            return value[n // 2:] if half else value[: n // 2]
        return value
    if isinstance(value, tuple | list):
        return type(value)(half_rows(v, ref, half) for v in value)
    if isinstance(value, dict):
        return {k: half_rows(v, ref, half) for k, v in value.items()}
    return value


def halves_diff(x: torch.Tensor) -> torch.Tensor:
    """Second half of a guidance batch minus the first: what ``CFG`` caches and the profile measures."""
    h = x.shape[0] // 2
    return x[h:] - x[:h]


def cfg_merge(x: torch.Tensor, y_half: torch.Tensor, residual: torch.Tensor, branch: int) -> torch.Tensor:
    """``CFG``: a block's output on a whole guidance batch from its output on one half.

    The block ran on half ``1 - branch`` of the batch (output ``y_half``); half ``branch`` is its
    input plus the computed half's residual plus the difference of the two halves' residuals in
    the cache (``residual``, written by the block's last ``COMPUTE`` on the whole batch).
    """
    h = x.shape[0] // 2
    diff = halves_diff(residual)
    if branch == 1:
        return torch.cat([y_half, x[h:] + (y_half - x[:h]) + diff])
    return torch.cat([x[:h] + (y_half - x[h:]) - diff, y_half])


def cfg_merge_output(y_half: torch.Tensor, cached: torch.Tensor, branch: int) -> torch.Tensor:
    """Module-level ``CFG``: a sub-module's output on a whole guidance batch from its output on
    half ``1 - branch`` (``y_half``): half ``branch`` is ``y_half`` plus the difference of the two
    halves of ``cached``, the output its last ``COMPUTE`` wrote."""
    diff = halves_diff(cached)
    if branch == 1:
        return torch.cat([y_half, y_half + diff])
    return torch.cat([y_half - diff, y_half])


def forecast(x: torch.Tensor, residuals: tuple[torch.Tensor, ...], weights: torch.Tensor | tuple[float, ...]
             ) -> torch.Tensor:
    """``FORECAST``: the input plus the residual extrapolated from the unit's last computes.

    ``residuals`` are the cached residuals of the unit's last ``k + 1`` ``COMPUTE`` steps, newest
    first, and ``weights`` the Lagrange weights of the degree-``k`` polynomial through them at
    their actual spacing (:func:`dit_opt.plan.forecast_weights`; in a step graph a 1-D tensor
    input, so that one graph serves every spacing).
    Order 1 is TaylorSeer's first-order step ``r0 + (n / d) * (r0 - r1)``.
    """
    return x + combine(residuals, weights)


def combine(values: tuple[torch.Tensor, ...], weights: torch.Tensor | tuple[float, ...]) -> torch.Tensor:
    """``sum_i weights[i] * values[i]``: a polynomial extrapolation of cached values."""
    out = values[0] * weights[0]
    for v, w in zip(values[1:], weights[1:], strict=True):
        out = out + v * w
    return out


def token_scores(x: torch.Tensor, cached_x: torch.Tensor) -> torch.Tensor:
    """How much each token's input moved since the cache was written: ``(B, N)``.

    Tokens that moved most are the ones a stale residual serves worst, so they are the ones
    ``PRUNE`` recomputes. A per-token reduction keeps it compatible with fused attention
    (no attention map is needed).
    """
    return (x - cached_x).float().pow(2).sum(-1)


def topk_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(B, k)`` of the ``k`` highest-scoring tokens, in token order."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for every batch row: ``(B, k, D)``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(base: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``base`` with rows ``idx`` replaced by ``values`` (out of place)."""
    return base.scatter(1, idx.unsqueeze(-1).expand(-1, -1, base.shape[-1]), values)


def batch_rows(shape: tuple[int, ...], batch: int | None) -> bool:
    """Whether dimension 0 of a block tensor of ``shape`` runs over the model call's samples: it
    is the call's ``batch``, or a multiple of it (the batch folded with frames or tokens, as
    temporal blocks take it), and the tensor is not sequence-first (``(tokens, batch, ...)``:
    Ernie-Image's blocks), whose dimension 1 is the batch. ``batch=None`` (not known): taken as so.
    A data-dependent (symbolic) size is a token count: dimension 0 is then taken as over the
    samples unless it is that one and dimension 1 is the batch."""
    if batch is None:
        return len(shape) > 0
    if not shape or batch < 1:
        return False
    first, second = shape[0], shape[1] if len(shape) > 1 else None
    second_is_batch = isinstance(second, int) and second == batch
    if not isinstance(first, int):  # FramePack's packed tokens: a length only known at run time
        return not second_is_batch
    return first % batch == 0 and (first == batch or not second_is_batch)


def token_layout(shape: tuple[int, ...], batch: int | None) -> str | None:
    """Why ``PRUNE`` cannot gather tokens of a tensor of ``shape`` (``None`` where it can): it must be
    ``(batch, tokens, channels)``, the model call's ``batch`` first (:func:`batch_rows`), since the
    gathers and scatters index dimension 1."""
    shape = tuple(shape)
    if len(shape) != 3:
        return f"its token input {shape} is not (batch, tokens, channels)"
    if not batch_rows(shape, batch):  # (a dimension 0 that does not divide by the batch reads as tokens too)
        return (f"its token input {shape} is not (batch, tokens, channels) with the model call's batch ({batch}) "
                f"first (it is sequence-first: tokens, batch, channels), and PRUNE gathers tokens along dimension 1")
    return None


def prunable(spec: BlockSpec, batch: int | None = None) -> bool:
    """Whether ``PRUNE`` can run this block on a subset of its tokens.

    It needs exactly one stream (two-stream blocks such as Flux's would have to prune both in
    step), laid out ``(batch, tokens, channels)`` with the model call's ``batch`` first
    (:func:`token_layout`; ``None``: not checked), and no other input indexed by token (rotary
    embeddings, masks), since those would have to be gathered too.
    """
    streams = [o for o in spec.outputs if o.spec is not None]
    if len(streams) != 1 or streams[0].input_name is None:
        return False
    if token_layout(streams[0].spec.shape, batch) is not None:
        return False
    n = streams[0].spec.shape[1]
    others = [s for name, s in spec.inputs if name != streams[0].input_name]
    return not any(n in s.shape[1:] for s in others)


def mlp_linears(block: nn.Module, spec: BlockSpec) -> list[tuple[str, nn.Linear, nn.Linear, int]]:
    """The (name, first, last, chunks) Linear pairs of the block's MLPs that ``WIDTH`` can narrow.

    ``chunks`` is 2 for gated MLPs (GEGLU/SwiGLU: the first Linear produces two halves).
    Only diffusers ``FeedForward``-style MLPs (``net[0].proj`` ... ``net[-1]``) are supported;
    other MLPs are left out (and ``WIDTH`` is not offered for their block).
    """
    out = []
    for name in spec.role_modules("mlp"):
        mod = block.get_submodule(name)
        net = getattr(mod, "net", None)
        if not isinstance(net, nn.ModuleList) or len(net) < 2:
            continue
        first = getattr(net[0], "proj", None)
        last = next((m for m in reversed(list(net)) if isinstance(m, nn.Linear)), None)
        if not isinstance(first, nn.Linear) or last is None:
            continue
        chunks = first.out_features // last.in_features
        if chunks * last.in_features != first.out_features:
            continue
        out.append((name, first, last, chunks))
    return out


def narrow_block(
    block: nn.Module, spec: BlockSpec, width: float, order: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """A copy of ``block`` whose MLPs keep only a prefix ``width`` of their hidden channels.

    Args:
        block: the original block (left unchanged; the copy owns new, smaller weights).
        spec: its spec.
        width: fraction of hidden channels kept, in (0, 1].
        order: per MLP name, hidden channels from most to least important (calibrated); the
            prefix of this order is kept. Default: the channels in their given order.

    Raises:
        ValueError: the block has no MLP that can be narrowed.
    """
    linears = mlp_linears(block, spec)
    if not linears:
        raise ValueError(f"block {spec.name} has no FeedForward-style MLP, so WIDTH cannot apply")
    clone = copy.deepcopy(block)
    for name, first, last, chunks in linears:
        hidden = last.in_features
        keep = max(1, round(width * hidden))
        idx = (order or {}).get(name)
        idx = torch.arange(hidden) if idx is None else idx.to(torch.long)
        idx = idx[:keep].sort().values.to(first.weight.device)
        rows = torch.cat([idx + c * hidden for c in range(chunks)])
        mod = clone.get_submodule(name)
        new_first = nn.Linear(first.in_features, keep * chunks, bias=first.bias is not None)
        new_last = nn.Linear(keep, last.out_features, bias=last.bias is not None)
        new_first = new_first.to(device=first.weight.device, dtype=first.weight.dtype)
        new_last = new_last.to(device=last.weight.device, dtype=last.weight.dtype)
        with torch.no_grad():
            new_first.weight.copy_(first.weight[rows])
            if first.bias is not None:
                new_first.bias.copy_(first.bias[rows])
            new_last.weight.copy_(last.weight[:, idx])
            if last.bias is not None:
                new_last.bias.copy_(last.bias)
        mod.net[0].proj = new_first
        last_pos = max(i for i, m in enumerate(mod.net) if isinstance(m, nn.Linear))
        mod.net[last_pos] = new_last
    return clone
