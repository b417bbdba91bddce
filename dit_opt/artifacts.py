"""The saved optimised-model directory: :func:`save` writes it, :func:`read` checks and reads it.

A directory holds ``plan.json``, the profile (``profile.json`` and ``profile.safetensors``) when
there is one, and ``dit_opt.json``: the format version, the model's fingerprint (class, config,
SHA-256 of every weight: :mod:`dit_opt.fingerprint`) and a SHA-256 of every other file. No
pickle. :func:`dit_opt.load` builds the module.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from dit_opt import distributed
from dit_opt.capture import CAPTURE_MODES
from dit_opt.errors import ArtifactError
from dit_opt.fingerprint import legacy_weights_sum, model_fingerprint
from dit_opt.plan import Plan
from dit_opt.sensitivity import SensitivityProfile

__all__ = ["ARTIFACT_VERSION", "check_model", "read", "save"]

#: Version of the saved optimised-model directory format.
ARTIFACT_VERSION = 1


def check_model(saved: dict[str, Any], model: nn.Module, what: str, now: dict[str, Any] | None = None) -> None:
    """Raise :class:`ArtifactError` unless ``model`` has the class, config and weights ``saved``
    describes (``now``: ``model``'s :func:`~dit_opt.fingerprint.model_fingerprint`, if at hand)."""
    now = now or model_fingerprint(model)
    if saved.get("class") != now["class"]:
        raise ArtifactError(f"{what} was made for a {saved.get('class')}, not this {now['class']}; "
                            f"optimise this model instead")
    if saved.get("config") != now["config"]:
        diff = sorted(k for k in set(saved.get("config", {})) | set(now["config"])
                      if saved.get("config", {}).get(k) != now["config"].get(k))
        raise ArtifactError(f"{what} was made for a {now['class']} with another config (differs in {diff[:5]}); "
                            f"optimise this model instead")
    if "weights_sha256" in saved:
        if saved["weights_sha256"] != now["weights_sha256"]:
            raise ArtifactError(f"{what} was made for other weights of {now['class']} (SHA-256 of the weights "
                                f"{saved['weights_sha256'][:12]}... != {now['weights_sha256'][:12]}...); "
                                f"optimise these weights instead")
        return
    # saved before the full digest: only the sampled sum to compare (it misses most single changes)
    legacy = legacy_weights_sum(model)
    if abs(float(saved.get("weights", 0.0)) - legacy) > 1e-4 * max(1.0, abs(legacy)):
        raise ArtifactError(f"{what} was made for other weights of {now['class']} (weight fingerprint "
                            f"{saved.get('weights')} != {legacy}); optimise these weights instead")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(opt: Any, path: str | Path) -> Path:
    """Write ``opt``'s plan, profile, permutations and metadata to directory ``path`` (no pickle).

    ``opt`` is an :class:`dit_opt.runtime.OptimizedTransformer` (not imported here: the runtime
    calls this module, so the import would go upwards).
    """
    from dit_opt import __version__

    path = Path(path)
    if not distributed.is_writer():  # every rank holds the same optimisation: rank 0 writes it
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "plan.json").write_text(opt.plan.to_json(indent=1))
    files = ["plan.json"]
    if opt.profile is not None:
        opt.profile.save(path)
        files += ["profile.json", "profile.safetensors"]
    meta = {
        "format": "dit-opt",
        "version": ARTIFACT_VERSION,
        "library_version": __version__,
        "model": model_fingerprint(opt.model),
        "solver": opt.solver,
        "solver_options": opt.solver_options,
        "blocks": opt.blocks_arg,
        "capture_mode": opt.capture_mode,
        "files": {f: _sha(path / f) for f in files},
    }
    (path / "dit_opt.json").write_text(json.dumps(meta, indent=1))
    return path


def read(path: str | Path, model: nn.Module) -> tuple[Plan, SensitivityProfile | None, dict[str, Any]]:
    """The plan, profile (or None) and metadata saved in ``path``, checked against ``model``.

    Raises:
        ArtifactError: the directory is missing, corrupt (a checksum fails), of another format
            version, or was made for another model.
    """
    path = Path(path)
    meta_file = path / "dit_opt.json"
    if not meta_file.is_file():
        raise ArtifactError(f"{path}: not a saved dit-opt model (no dit_opt.json); write one with opt.save(dir)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_file}: corrupt JSON ({e}); save the optimised model again") from e
    if meta.get("format") != "dit-opt" or meta.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this dit-opt "
                            f"reads dit-opt version {ARTIFACT_VERSION}; optimise and save again")
    for name, digest in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: {name} is missing; the directory is incomplete, save it again")
        if _sha(f) != digest:
            raise ArtifactError(f"{path}: {name} does not match its checksum (corrupt or edited); save it again")
    check_model(meta.get("model", {}), model, f"the optimisation saved in {path}")
    if meta.get("capture_mode", "auto") not in CAPTURE_MODES:  # (saved before capture modes: "auto")
        raise ArtifactError(f"{path}: dit_opt.json names capture mode {meta.get('capture_mode')!r}, not one of "
                            f"{CAPTURE_MODES}; save the optimised model again")
    plan = Plan.from_json((path / "plan.json").read_text())
    prof = SensitivityProfile.load(path) if (path / "profile.json").is_file() else None
    return plan, prof, meta
