"""What a module standing in for a diffusers transformer inside a pipeline must look like.

Pipelines read the transformer's ``config``, ``dtype`` and ``device``, look up other attributes
on it (``config``-backed ones, ``cache_context``), and inspect its ``forward``'s signature to
decide which arguments to pass. :class:`TransformerWrapper` gives a wrapper of ``self.model``
all of these; :class:`~dit_opt.runtime.OptimizedTransformer` and
:class:`~dit_opt.routed.RoutedTransformer` are such wrappers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["TransformerWrapper"]


class TransformerWrapper(nn.Module):
    """An ``nn.Module`` holding ``self.model`` (set by the subclass) that pipelines take for it."""

    def expose_forward(self, model: nn.Module, call: Callable[..., Any]) -> None:
        """Make ``self.forward`` run ``call`` under ``model.forward``'s name and signature (what
        pipelines inspect to decide which arguments to pass)."""
        @functools.wraps(model.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return call(*args, **kwargs)

        forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
        self.forward = forward  # type: ignore[method-assign]

    @property
    def config(self) -> Any:
        """The wrapped model's config."""
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None or name.startswith("_"):
                raise
            return getattr(model, name)
