"""Profiles kept for reuse: ``optimize`` at another budget need not measure the model again.

A sensitivity profile does not depend on the budget, the action families, the granularity or
the solver, only on the model, the calibration and the profile's own settings. So
:func:`dit_opt.optimize` keeps each profile it measures, with the full model's outputs on the
calibration (the selection's reference), and a later call finds it:

* **in the process**, keyed by the model's fingerprint (class, config, SHA-256 of every
  weight: :mod:`dit_opt.fingerprint`), the calibration *object* (the same callable, not an
  equal one; dropped when it is garbage collected) and the settings; the built-in synthetic
  calibration of a class counts as one object;
* **on disk** when asked (``profile_cache=dir``), keyed by the model's fingerprint, the
  settings and the calibration's first call (the inputs it gives the model, fingerprinted, its
  timestep, and the calibration's name). A directory cannot tell two calibrations apart that begin with the
  same call (more prompts, other seeds after the first): give each its own directory, or
  clear it when the calibration changes.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dit_opt import distributed
from dit_opt.errors import ArtifactError
from dit_opt.sensitivity import SensitivityProfile
from dit_opt.steps import call_fingerprint, timestep_value
from dit_opt.synthetic import CallNames

__all__ = ["CachedProfile", "calibration_identity", "clear", "lookup", "store"]


@dataclass(frozen=True)
class CachedProfile:
    """A profile and the full model's outputs on its calibration (``None`` if not recorded)."""

    profile: SensitivityProfile
    reference: Any = None


_MEMORY: dict[tuple, CachedProfile] = {}
#: the synthetic calibrations' identities (a new callable each call, the same loops)
_IDENTITY_ATTR = "_dit_opt_identity"


def clear() -> None:
    """Forget every profile kept in this process."""
    _MEMORY.clear()


def _base(calibration: Any) -> Any:
    """The user's calibration inside dit-opt's guard (:func:`dit_opt.calibration.guarded`)."""
    return calibration.__wrapped__ if getattr(calibration, "_dit_opt_guarded", False) else calibration


def calibration_identity(calibration: Any) -> Any:
    """What makes two calibrations the same for the in-process cache, or ``None`` (not cacheable):
    a declared identity (the built-in synthetic calibration's), else the object itself."""
    base = _base(calibration)
    declared = getattr(base, _IDENTITY_ATTR, None)
    if declared is not None:
        return ("declared", declared)
    try:
        weakref.ref(base)
    except TypeError:
        return None
    return ("object", id(base))


def _memory_key(fingerprint: dict, identity: Any, settings: dict) -> tuple:
    return (json.dumps(fingerprint, sort_keys=True), identity, json.dumps(settings, sort_keys=True, default=str))


def _disk_key(fingerprint: dict, calibration: Any, first_call: dict, settings: dict, names: CallNames) -> str:
    base = _base(calibration)
    name = getattr(base, _IDENTITY_ATTR, None) or getattr(base, "__qualname__", type(base).__qualname__)
    first = [repr(call_fingerprint(first_call, names)[0]), timestep_value(names.timestep_of(first_call, 0.0))]
    text = json.dumps([fingerprint, str(name), first, settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def lookup(fingerprint: dict, calibration: Any, first_call: dict, settings: dict,
           directory: str | Path | None = None, *, names: CallNames) -> tuple[CachedProfile | None, str | None]:
    """The kept profile for these, and where it was found (``"memory"`` or ``"disk"``), or ``(None, None)``.

    ``first_call`` is the calibration's first call's inputs, its latent and timestep named as
    ``names`` says (:func:`dit_opt.synthetic.call_names` of the model).

    A directory entry that cannot be read is an :class:`~dit_opt.errors.ArtifactError` naming it.
    """
    identity = calibration_identity(calibration)
    if identity is not None:
        hit = _MEMORY.get(_memory_key(fingerprint, identity, settings))
        if hit is not None:
            return hit, "memory"
    if directory is not None:
        entry = Path(directory) / _disk_key(fingerprint, calibration, first_call, settings, names)
        if (entry / "profile.json").is_file():
            try:
                prof = SensitivityProfile.load(entry)
            except ArtifactError as e:
                raise ArtifactError(f"{e} (a profile_cache entry: delete {entry} to measure it again)") from e
            return CachedProfile(prof), "disk"
    return None, None


def store(entry: CachedProfile, fingerprint: dict, calibration: Any, first_call: dict, settings: dict,
          directory: str | Path | None = None, *, names: CallNames) -> None:
    """Keep ``entry`` in the process (when the calibration is cacheable) and, given ``directory``, on
    disk (``first_call`` and ``names`` as for :func:`lookup`)."""
    identity = calibration_identity(calibration)
    if identity is not None:
        key = _memory_key(fingerprint, identity, settings)
        _MEMORY[key] = entry
        if identity[0] == "object":
            weakref.finalize(_base(calibration), _MEMORY.pop, key, None)
    if directory is not None and distributed.is_writer():  # under torch.distributed rank 0 keeps it
        path = Path(directory) / _disk_key(fingerprint, calibration, first_call, settings, names)
        tmp = path.with_name(path.name + ".partial")
        entry.profile.save(tmp)  # written whole, then renamed: a stopped save leaves no entry
        if path.exists():
            import shutil

            shutil.rmtree(path)
        tmp.rename(path)
