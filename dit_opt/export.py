"""Export the lowered step variants with ``torch.export`` (``.pt2``) for serving.

``export(opt, dir)`` writes one ``.pt2`` per distinct step variant and ``index.json``, which
maps each step to its variant, names the flat inputs in order and lists the cache entries
each variant reads (extra trailing inputs) and writes (extra trailing outputs).
:class:`ExportedPlan` replays them: no capture, no profile, no solver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dit_opt.errors import ArtifactError, DitOptError

__all__ = ["export", "ExportedPlan"]

INDEX_VERSION = 1


def export(opt: Any, path: str | Path) -> Path:
    """Write the step variants of ``opt`` (at its captured input shapes) as ``.pt2`` files.

    Args:
        opt: an :class:`~dit_opt.runtime.OptimizedTransformer`; one that has not captured its
            inputs yet (a loaded one before its first call) captures synthetic ones for its class.
        path: the output directory (``index.json`` and ``variant_<k>.pt2``).

    Returns:
        ``path``.
    """
    try:
        runner = opt.captured()
    except DitOptError as e:
        raise ArtifactError(f"nothing to export yet: {e}") from e
    graph = runner.graph
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = graph.flat_inputs(**graph.example_inputs)
    names = [str(n.target) for n in graph.gm.graph.nodes if n.op == "placeholder"]
    files: dict[int, str] = {}
    steps = []
    for step, v in enumerate(runner.variants):
        key = id(v.gm)
        if key not in files:
            files[key] = f"variant_{len(files)}.pt2"
            caches = opt.example_caches(runner, step)
            with torch.no_grad():
                ep = torch.export.export(v.gm, tuple(flat) + tuple(caches), strict=False)
            torch.export.save(ep, str(path / files[key]))
        steps.append({"step": step, "file": files[key], "reads": list(v.reads), "writes": list(v.writes),
                      "num_outputs": v.gm.num_model_outputs, "actions": [str(a) for a in v.actions]})
    index = {"version": INDEX_VERSION, "model": type(opt.model).__name__, "inputs": names, "steps": steps,
             "timesteps": list(opt.plan.timesteps or [])}
    (path / "index.json").write_text(json.dumps(index, indent=1))
    return path


class ExportedPlan:
    """Replay exported variants step by step, keeping the cache between steps.

    Example:
        >>> served = ExportedPlan("export/")
        >>> for step, t in enumerate(timesteps):
        ...     (noise_pred,) = served(step, *flat_inputs_at(t))
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        try:
            self.index = json.loads((path / "index.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: no readable index.json ({e}); write one with dit_opt.export.export") from e
        if self.index.get("version") != INDEX_VERSION:
            raise ArtifactError(f"{path}: export format {self.index.get('version')!r}, expected {INDEX_VERSION}")
        self.modules = {s["file"]: torch.export.load(str(path / s["file"])).module() for s in self.index["steps"]}
        self.cache: dict[str, torch.Tensor] = {}

    @property
    def num_steps(self) -> int:
        return len(self.index["steps"])

    def __call__(self, step: int, *flat_inputs: torch.Tensor) -> tuple:
        """Run ``step`` on the flat inputs (in ``index["inputs"]`` order); return the model's flat outputs."""
        entry = self.index["steps"][step]
        if step == 0:
            self.cache.clear()
        out = self.modules[entry["file"]](*flat_inputs, *[self.cache[k] for k in entry["reads"]])
        n = entry["num_outputs"]
        for k, v in zip(entry["writes"], out[n:], strict=True):
            self.cache[k] = v
        return tuple(out[:n])
