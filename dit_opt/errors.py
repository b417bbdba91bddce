"""Exceptions raised by dit-opt.

Every error says what was being done, what was found, and what to do about it.
All of them derive from :class:`DitOptError` so callers can catch the library's
failures without catching unrelated ones.
"""

from __future__ import annotations

__all__ = [
    "DitOptError",
    "CaptureError",
    "NoBlocksFoundError",
    "InputMismatchError",
    "InfeasibleBudgetError",
    "ArtifactError",
    "ConfigError",
    "DistributedError",
    "RankFailedError",
]


class DitOptError(Exception):
    """Base class of every error raised by dit-opt."""


class CaptureError(DitOptError):
    """The model could not be captured as an FX graph."""


class NoBlocksFoundError(CaptureError):
    """No repeated transformer block list was found (or the named one does not exist)."""


class InputMismatchError(CaptureError):
    """Example inputs do not fit the model's forward signature."""


class InfeasibleBudgetError(DitOptError):
    """No plan meets the FLOP budget; the message states the smallest feasible budget."""


class ArtifactError(DitOptError):
    """A saved profile, plan or optimised model is corrupt or does not match the model."""


class ConfigError(DitOptError, ValueError):
    """A configuration value is invalid (also a ``ValueError``)."""


class DistributedError(DitOptError):
    """The ranks of a distributed run disagree (the model, the settings or the calibration's
    shapes differ between them); raised the same on every rank."""


class RankFailedError(DistributedError):
    """Another rank raised while this one waited for it; the message names the rank and its error."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the caller's code: the first frame outside dit-opt's
    packages and torch (a pipeline's or the user's call of the transformer), not the library
    line that noticed, nor torch's ``Module.__call__`` between them."""
    import sys
    import warnings

    inside = ("dit_opt", "passes", "solvers", "torch")
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in inside:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
