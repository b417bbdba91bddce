"""Export the lowered step variants with ``torch.export`` (``.pt2``) for serving.

``export(opt, dir)`` writes ``weights.safetensors`` (every tensor the variants use, once: the
model's weights, and the narrowed MLP slices of ``WIDTH`` actions), one ``.pt2`` per distinct
step variant that takes its weights as leading inputs (so it holds no copy of them; its graph
is stored deflated), and
``index.json``, which maps each step to its variant, names the weights it takes, the flat
inputs in order, the cache entries each variant reads (extra trailing inputs) and writes
(extra trailing outputs), and each step's forecast weights (read like cache entries: steps
that differ only in them share a variant). :class:`ExportedPlan` replays them: no capture, no profile, no solver.
It checks every file when it opens an export (the index's SHA-256 of each program, the archives'
CRCs, the weights) and deserialises a program the first time a step needs it (``lazy=False``:
all of them at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import types
import typing
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dit_opt.errors import ArtifactError, ConfigError, DitOptError
from dit_opt.fingerprint import tensor_bytes

__all__ = ["export", "ExportedPlan"]

INDEX_VERSION = 3
#: index versions :class:`ExportedPlan` reads (1: every variant carried its own weights; 2: its
#: forecast weights were constants of its graph)
READABLE_VERSIONS = (1, 2, 3)


class _Functional(torch.nn.Module):
    """A variant with its tensors as leading inputs (``torch.func.functional_call``), exported
    without them as state."""

    def __init__(self, gm: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.__dict__["variant"] = gm  # not a submodule: its tensors come in as inputs
        self.names = names

    def forward(self, *args: torch.Tensor) -> Any:
        n = len(self.names)
        return torch.func.functional_call(self.variant, dict(zip(self.names, args[:n], strict=True)), args[n:])


def _file_digest(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _memoised_schema_hints() -> Iterator[None]:
    """Within the block, torch's program deserialiser reads each schema class's type hints once.

    ``torch._export.serde.serialize`` calls ``typing.get_type_hints(cls, globalns=...)`` for every
    dataclass *instance* it rebuilds (hundreds of thousands for one step variant: over half of a
    load's time, measured by ``examples/export_size.py``), and the schema's hints never change.
    The deserialiser's module gets a ``typing`` whose ``get_type_hints`` remembers its answers for
    the duration of the block; nothing else changes, and a torch whose deserialiser reads its
    hints otherwise is left alone.
    """
    try:
        from torch._export.serde import serialize
    except ImportError:  # another layout of torch: nothing to speed up
        yield
        return
    if getattr(serialize, "typing", None) is not typing:  # already memoised (nested), or not used
        yield
        return
    memo: dict[tuple, Any] = {}

    def get_type_hints(obj: Any, globalns: Any = None, localns: Any = None, include_extras: bool = False) -> Any:
        key = (obj, id(globalns), id(localns), include_extras)
        if key not in memo:
            memo[key] = (typing.get_type_hints(obj, globalns, localns, include_extras), globalns, localns)
        return memo[key][0]

    shim = types.ModuleType("typing")
    shim.__dict__.update(typing.__dict__)
    shim.get_type_hints = get_type_hints
    serialize.typing = shim
    try:
        yield
    finally:
        serialize.typing = typing


def _value_key(t: torch.Tensor) -> tuple:
    return (str(t.dtype), tuple(t.shape), hashlib.sha256(tensor_bytes(t)).hexdigest())


def _deflate(file: Path) -> None:
    """Rewrite a ``.pt2`` archive with its entries deflated: ``torch.export.save`` stores them
    uncompressed, and a step variant's serialized graph (JSON, about 1 MB for eight blocks)
    shrinks about 25 times; ``torch.export.load`` reads either."""
    tmp = file.with_name(file.name + ".partial")
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    tmp.replace(file)


def _tensors(gm: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``gm`` under every name it has (tied ones included)."""
    return [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]


def export(opt: Any, path: str | Path) -> Path:
    """Write the step variants of ``opt`` (at its captured input shapes) as ``.pt2`` files.

    Args:
        opt: an :class:`~dit_opt.runtime.OptimizedTransformer`; one that has not captured its
            inputs yet (a loaded one before its first call) captures synthetic ones for its class.
        path: the output directory (``index.json``, ``weights.safetensors`` and ``variant_<k>.pt2``).

    Returns:
        ``path``.

    Raises:
        ArtifactError: nothing is captured and no inputs can be derived for the model.
        ConfigError: the model was captured block by block (its glue is no program).
    """
    try:
        runner = opt.captured()
    except DitOptError as e:
        raise ArtifactError(f"nothing to export yet: {e}") from e
    from safetensors.torch import save_file

    graph = runner.graph
    if graph.blockwise is not None:
        raise ConfigError(f"opt.export writes each step as one torch.export program, but "
                          f"{type(opt.model).__name__} was {graph.describe_capture()}, which no program holds. "
                          f"Save the plan instead: opt.save(dir), then dit_opt.load(dir, model) replays it")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = graph.flat_inputs(**graph.example_inputs)
    names = [str(n.target) for n in graph.gm.graph.nodes if n.op == "placeholder"]
    weights: dict[str, torch.Tensor] = {}  # w<k> -> tensor, each value once
    seen: dict[tuple, str] = {}  # storage view -> w<k>
    by_value: dict[tuple, str] = {}  # dtype, shape and bytes' digest -> w<k>
    files: dict[int, tuple[str, list[str]]] = {}
    steps = []
    # one cache list per variant, each step run once (strict would run the last step for nothing)
    for step, (v, caches) in enumerate(zip(runner.variants, opt.example_caches_by_step(runner), strict=False)):
        key = id(v.gm)
        if key not in files:
            tensors = _tensors(v.gm)
            keys = []
            for _, t in tensors:
                view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
                if view not in seen:
                    # equal copies (the glue's, a narrowed block's untouched parts) are stored once too
                    seen[view] = by_value.setdefault(_value_key(t), f"w{len(by_value)}")
                    weights.setdefault(seen[view], t.detach().contiguous())
                keys.append(seen[view])
            files[key] = (f"variant_{len(files)}.pt2", keys)
            with torch.no_grad():
                wrapper = _Functional(v.gm, [n for n, _ in tensors])
                args = tuple(weights[k] for k in keys) + tuple(flat) + tuple(caches)
                ep = torch.export.export(wrapper, args, strict=False)
            ep.example_inputs = None  # saved with the program otherwise: a copy of every weight
            torch.export.save(ep, str(path / files[key][0]))
            _deflate(path / files[key][0])
        file, keys = files[key]
        forecast = {k: w.tolist() for k, w in runner.step_inputs(opt.plan, step).items()}
        steps.append({"step": step, "file": file, "weights": keys, "reads": list(v.reads), "writes": list(v.writes),
                      "forecast_weights": forecast, "num_outputs": v.gm.num_model_outputs,
                      "actions": [str(a) for a in v.actions]})
    save_file({k: t.cpu() for k, t in weights.items()}, str(path / "weights.safetensors"))
    digests = {file: _file_digest(path / file) for file, _ in files.values()}
    index = {"version": INDEX_VERSION, "model": type(opt.model).__name__, "inputs": names, "steps": steps,
             "files": digests,
             "timesteps": list(opt.plan.timesteps or [])}
    (path / "index.json").write_text(json.dumps(index, indent=1))
    return path


class ExportedPlan:
    """Replay exported variants step by step, keeping the cache between steps.

    Opening an export checks every file (each program's SHA-256 against the index, where the
    export recorded it, and its archive's CRCs; the weights) and loads the weights; a program is
    deserialised the first time a step needs it, or all at once with ``lazy=False`` (or
    :meth:`load_all`).

    Raises:
        ArtifactError: the index, the weights or a program is missing, corrupt or of another
            format version (at opening; a program whose archive is sound but does not
            deserialise, at the first step that needs it).

    Example:
        >>> served = ExportedPlan("export/")
        >>> for step, t in enumerate(timesteps):
        ...     (noise_pred,) = served(step, *flat_inputs_at(t))
    """

    def __init__(self, path: str | Path, lazy: bool = True) -> None:
        path = Path(path)
        self.path = path
        try:
            self.index = json.loads((path / "index.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: no readable index.json ({e}); write one with dit_opt.export.export") from e
        if self.index.get("version") not in READABLE_VERSIONS:
            raise ArtifactError(f"{path}: export format {self.index.get('version')!r}, this dit-opt reads "
                                f"{READABLE_VERSIONS}; export again")
        self.weights: dict[str, torch.Tensor] = {}
        if self.index["version"] >= 2:
            from safetensors.torch import load_file

            try:
                self.weights = load_file(str(path / "weights.safetensors"))
            except Exception as e:
                raise ArtifactError(f"{path}: weights.safetensors is missing or corrupt ({type(e).__name__}: {e}); "
                                    f"export again") from e
        digests = self.index.get("files", {})
        for file in dict.fromkeys(s["file"] for s in self.index["steps"]):
            self._check(file, digests.get(file))
        missing = {k for s in self.index["steps"] for k in s.get("weights", ())} - set(self.weights)
        if missing:
            raise ArtifactError(f"{path}: weights.safetensors lacks {sorted(missing)[:3]} that the variants take; "
                                f"export again")
        #: the deserialised programs so far, by file
        self.modules: dict[str, torch.nn.Module] = {}
        self.cache: dict[str, torch.Tensor] = {}
        # version 3: a step's forecast weights are inputs (one variant serves every spacing)
        self._forecast_weights = [{k: torch.tensor(w, dtype=torch.float32) for k, w in
                                   s.get("forecast_weights", {}).items()} for s in self.index["steps"]]
        if not lazy:
            self.load_all()

    def _check(self, file: str, digest: str | None) -> None:
        where = self.path / file
        try:
            if digest is not None and _file_digest(where) != digest:
                raise ValueError("its SHA-256 differs from the one the export recorded")
            with zipfile.ZipFile(where) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"its entry {bad} fails its CRC check")
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ArtifactError(f"{self.path}: step variant {file} is missing or corrupt ({type(e).__name__}: {e}); "
                                f"export again") from e

    def program(self, file: str) -> torch.nn.Module:
        """The step variant stored in ``file``, deserialised on first use."""
        if file not in self.modules:
            try:
                with _memoised_schema_hints():
                    self.modules[file] = torch.export.load(str(self.path / file)).module()
            except Exception as e:
                raise ArtifactError(f"{self.path}: step variant {file} could not be loaded ({type(e).__name__}: {e}); "
                                    f"export again") from e
        return self.modules[file]

    def load_all(self) -> None:
        """Deserialise every program now (serving then never pays for it at a step)."""
        for s in self.index["steps"]:
            self.program(s["file"])

    @property
    def num_steps(self) -> int:
        return len(self.index["steps"])

    def __call__(self, step: int, *flat_inputs: torch.Tensor) -> tuple:
        """Run ``step`` on the flat inputs (in ``index["inputs"]`` order); return the model's flat outputs."""
        entry = self.index["steps"][step]
        if step == 0:
            self.cache.clear()
        weights = [self.weights[k] for k in entry.get("weights", ())]
        feed = {**self.cache, **self._forecast_weights[step]}
        out = self.program(entry["file"])(*weights, *flat_inputs, *[feed[k] for k in entry["reads"]])
        n = entry["num_outputs"]
        for k, v in zip(entry["writes"], out[n:], strict=True):
            self.cache[k] = v
        return tuple(out[:n])
