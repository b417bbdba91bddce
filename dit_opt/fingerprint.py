"""What identifies a model: its class, config and a hash of every weight.

Saved profiles and optimised-model directories carry :func:`model_fingerprint`; loading them
checks it (:func:`dit_opt.artifacts.check_model`), and the in-process profile cache keys on it.
The weight hash is a SHA-256 over every tensor of the state dict (name, dtype, shape, bytes),
read one tensor at a time, so that a single changed weight is caught without holding a second
copy of the model.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

__all__ = ["model_fingerprint", "tensor_bytes", "weights_digest", "legacy_weights_sum"]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of ``t``'s values, in order (a CPU copy of one tensor)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of every tensor of ``model.state_dict()``: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(tensor_bytes(t))
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Class, config and weight digest (:func:`weights_digest`): what a saved artifact must match."""
    cfg = getattr(model, "config", None)
    cfg = {k: v for k, v in dict(cfg).items() if not k.startswith("_")} if cfg is not None else {}
    return {"class": type(model).__name__, "config": _jsonable(cfg), "weights_sha256": weights_digest(model)}


def legacy_weights_sum(model: nn.Module) -> float:
    """The weight fingerprint artifacts saved before :func:`weights_digest` (a weighted sum of 64
    sampled values per tensor), to read them: it misses most single-weight changes."""
    gen = torch.Generator().manual_seed(0)
    acc = 0.0
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if p.is_floating_point() and p.numel():
                flat = p.detach().reshape(-1).float().cpu()
                pick = torch.randint(0, flat.numel(), (min(64, flat.numel()),), generator=gen)
                acc += float(flat[pick].double().sum()) * (1 + len(name) % 7)
    return round(acc, 6)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    return str(v)
