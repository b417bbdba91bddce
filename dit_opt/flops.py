"""FLOP counting the way the project reports it: ``FlopCounterMode``, attention included.

In torch 2.13, ``FlopCounterMode`` counts 0 FLOPs for ``scaled_dot_product_attention``
on the CPU, because the op it dispatches to there
(``aten._scaled_dot_product_flash_attention_for_cpu``) has no formula. Importing this
module registers the formula of the CUDA flash-attention op for it (same maths), so every
figure the project reports counts attention, whatever the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, flop_registry, register_flop_formula, sdpa_flop_count

__all__ = ["count_flops", "flop_counter", "ensure_attention_formulas"]

_aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash-attention op: the same as CUDA flash attention."""
    if all(isinstance(d, int) for d in (*query_shape, *key_shape, *value_shape)):
        return sdpa_flop_count(query_shape, key_shape, value_shape)
    # a size that depends on the data (FramePack's packed history, the valid tokens of a mask): torch's
    # formula first checks that the key and value lengths agree, a guard such a size cannot answer
    # (GuardOnDataDependentSymNode); the count is the same two products, over the key's length
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return bmm_flop((b * h, s_q, d_q), (b * h, d_q, s_k)) + bmm_flop((b * h, s_q, s_k), (b * h, s_k, d_v))


def ensure_attention_formulas() -> None:
    """Register FLOP formulas for the attention ops that lack one (idempotent)."""
    for op in (_aten._scaled_dot_product_flash_attention_for_cpu,):
        if op not in flop_registry:
            register_flop_formula(op)(_sdpa_cpu_flop)


ensure_attention_formulas()


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` with the attention formulas registered.

    Example:
        >>> with flop_counter() as fc:
        ...     model(**inputs)
        >>> fc.get_total_flops()
    """
    ensure_attention_formulas()
    return FlopCounterMode(display=False)


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``fn(*args, **kwargs)`` under :func:`flop_counter` and return the total FLOPs.

    Two FLOPs per multiply-add, attention included.
    """
    with torch.no_grad(), flop_counter() as fc:
        fn(*args, **kwargs)
    return int(fc.get_total_flops())
