"""Shape-derived tables a model computes inside ``forward``, made buffers for the capture.

Some diffusers embeddings keep a positional table for the configured sample size and compute a
new one in ``forward`` for any other size. That computation depends only on the shapes, so for
eager execution it is harmless, but ``torch.export`` traces it on fake tensors and CogVideoX's
writes the table through ``.data``, which leaves a fake tensor among the program's constants:
the export fails at every resolution other than the configured one.

:func:`record_table_sizes` records the sizes one eager run sees and :func:`exported_at` installs,
for the export only, the table the module would compute for them (the same function, so the
same values) as if that size had been configured; the model is restored afterwards, the
captured program keeps the table of its own resolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["exported_at", "record_table_sizes"]


def _sincos_patch_embeds(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with a configured-size positional table recomputed for other sizes in ``forward``
    (CogVideoX's patch embedding): a ``pos_embedding`` buffer, ``_get_positional_embeddings`` and
    the configured ``sample_height`` / ``sample_width`` / ``sample_frames``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "pos_embedding", None), torch.Tensor)
            and callable(getattr(m, "_get_positional_embeddings", None))
            and all(hasattr(m, a) for a in ("sample_height", "sample_width", "sample_frames",
                                            "temporal_compression_ratio"))
            and not getattr(m, "use_learned_positional_embeddings", False)]


def record_table_sizes(model: nn.Module, sizes: dict[str, tuple[int, int, int]]) -> list[Any]:
    """Forward pre-hooks (remove them after the run) that store, per such module, the
    ``(height, width, frames before temporal compression)`` of the image it embeds."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict, name: str) -> None:
        image = kwargs.get("image_embeds", args[1] if len(args) > 1 else None)
        if isinstance(image, torch.Tensor) and image.dim() == 5:  # (batch, frames, channels, height, width)
            frames = (image.shape[1] - 1) * mod.temporal_compression_ratio + 1
            sizes[name] = (int(image.shape[3]), int(image.shape[4]), int(frames))

    return [m.register_forward_pre_hook(lambda mod, a, k, n=n: hook(mod, a, k, n), with_kwargs=True)
            for n, m in _sincos_patch_embeds(model)]


@contextlib.contextmanager
def exported_at(model: nn.Module, sizes: dict[str, tuple[int, int, int]]) -> Iterator[list[str]]:
    """Inside the ``with``, each recorded module of another size than its configured one holds
    the table for the recorded size as its buffer and that size as its configuration (yields
    their names); everything is put back on exit."""
    saved: list[tuple[nn.Module, dict[str, Any]]] = []
    changed: list[str] = []
    try:
        for name, mod in _sincos_patch_embeds(model):
            size = sizes.get(name)
            if size is None or size == (mod.sample_height, mod.sample_width, mod.sample_frames):
                continue
            saved.append((mod, {"sample_height": mod.sample_height, "sample_width": mod.sample_width,
                                "sample_frames": mod.sample_frames, "pos_embedding": mod.pos_embedding}))
            old = mod.pos_embedding
            with torch.no_grad():
                table = mod._get_positional_embeddings(*size, device=old.device).to(old.dtype)
            mod.sample_height, mod.sample_width, mod.sample_frames = size
            mod._buffers["pos_embedding"] = table
            changed.append(name)
        yield changed
    finally:
        for mod, attrs in saved:
            mod._buffers["pos_embedding"] = attrs.pop("pos_embedding")
            for k, v in attrs.items():
                setattr(mod, k, v)
