"""What dit-opt does on every diffusers transformer class with a tiny test config: writes docs/coverage.md.

The configs (``examples/coverage_configs.json``: ``{class: {"config": {...}, "inputs": {...},
"note": "..."}}``) are the tiny ones of diffusers' own test suite (``tests/models/transformers/``),
for the classes the installed diffusers has; the weights are random (perturbed where
zero-initialised, as ``dit_opt.testing.tiny_model`` does). Each class runs in its own process,
with nothing but the model:

* **inputs**: :func:`dit_opt.synthetic.example_inputs` derives one forward's inputs (``derived``);
  for a class whose inputs it cannot derive (a rotary table, token indices, a second modality),
  the entry's ``"inputs"`` recipe gives those of the class's diffusers test (``get_dummy_inputs``;
  ``diffusers tests``), built by :func:`build_inputs`, and they are passed as ``example_inputs=``;
* **capture**: ``dit_opt.capture`` of that call (``whole`` model, or block by block) and its
  largest difference from the model's output;
* **flops**: the cost model's FLOPs against ``FlopCounterMode`` over what the captured graph
  computes, and what the model's own forward computes beyond that (``dead``: outputs the model
  throws away, which ``torch.export`` removes; a plan never runs them, so budgets, fractions of
  the graph's FLOPs, are then met with that much to spare against the model's own count);
* **budget 0.5**: ``optimize(model, 0.5)`` on a 10-step synthetic calibration (around the
  recipe's inputs where there is one), the FLOPs counted over that loop, as a fraction of the
  full model's;
* **budget 1.0**: the loop's largest difference from the full model's;
* **deterministic**: two ``optimize`` calls at 0.5 give the same plan and the same outputs.

A failure names its stage; an entry's ``"note"`` (why the class is expected to fail: not a DiT
over a latent, a missing optional dependency) follows it.

    python examples/coverage.py                  # all classes, writes docs/coverage.md
    python examples/coverage.py --classes FluxTransformer2DModel --out -
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "coverage_configs.json"


def build_inputs(recipe: dict, seed: int = 0) -> dict:
    """One forward's keyword inputs from a JSON recipe, drawn in the recipe's order from one seed.

    A value is a tensor spec or passed as it is (numbers, strings, ``null``, ``{}``); lists are
    built element by element. Tensor specs: ``{"shape": [...]}`` standard normal (``"dtype"``:
    ``"float32"`` unless said; an integer dtype draws from ``[0, "high")``, ``bool`` is all true);
    ``{"shape": [...], "fill": v}`` a constant; ``{"value": [...]}`` a literal tensor;
    ``{"arange": [start, stop]}`` ``torch.arange``.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def build(spec):
        if isinstance(spec, list):
            return [build(s) for s in spec]
        if not isinstance(spec, dict):
            return spec
        dtype = getattr(torch, spec.get("dtype", "float32"))
        if "value" in spec:
            return torch.tensor(spec["value"], dtype=dtype)
        if "arange" in spec:
            return torch.arange(*spec["arange"], dtype=getattr(torch, spec.get("dtype", "int64")))
        if "shape" not in spec:
            return {k: build(v) for k, v in spec.items()}
        shape = tuple(spec["shape"])
        if "fill" in spec:
            return torch.full(shape, spec["fill"], dtype=dtype)
        if dtype == torch.bool:
            return torch.ones(shape, dtype=dtype)
        if not dtype.is_floating_point:
            return torch.randint(0, spec["high"], shape, generator=gen, dtype=dtype)
        return torch.randn(shape, generator=gen).to(dtype)

    return {name: build(spec) for name, spec in recipe.items()}


def _check(name: str, entry: dict, steps: int) -> dict:
    import warnings

    import torch

    import dit_opt
    from dit_opt.calibration import synthetic_calibration
    from dit_opt.capture import _max_abs_diff
    from dit_opt.flops import count_flops
    from dit_opt.synthetic import example_inputs
    from dit_opt.testing import build_model, counted_flops

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    row: dict = {"class": name}
    stage = "build"
    try:
        model = build_model(name, entry["config"])
        stage = "inputs"
        recipe = entry.get("inputs")
        row["source"] = "diffusers tests" if recipe else "derived"
        inputs = build_inputs(recipe) if recipe else example_inputs(model)
        given = inputs if recipe else None  # derived ones: optimize takes the calibration's first call
        stage = "capture"
        graph = dit_opt.capture(model, inputs)
        row["capture"] = getattr(graph, "capture_mode", "whole")
        stage = "flops"
        from passes.annotate_flops import annotate_flops

        annotate_flops(graph)
        stage = "capture"
        with torch.no_grad():
            row["capture_diff"] = _max_abs_diff(model(**inputs), graph(**inputs))
        stage = "flops"
        ref = count_flops(model, **inputs)
        with torch.no_grad():
            ran = count_flops(graph, **inputs)
        row["flops_off"] = abs(graph.flops - ran) / ran
        row["dead"] = (ref - ran) / ref
        row["blocks"] = len(graph.blocks)
        stage = "optimize"
        cal = synthetic_calibration(model, num_inference_steps=steps, warn=False, example_inputs=given)

        def counted(module):
            with counted_flops(module) as flops, torch.no_grad():
                out = cal(module)
            return flops[0], out

        full, ref_out = counted(model)
        opt = dit_opt.optimize(model, budget=0.5, calibration=cal, example_inputs=given, compile=False, progress=False)
        got, out = counted(opt)
        row["fraction"] = got / full
        stage = "deterministic"
        again = dit_opt.optimize(model, budget=0.5, calibration=cal, example_inputs=given, compile=False,
                                 progress=False)
        with torch.no_grad():
            same = torch.equal(_flat(cal(again)), _flat(out))
        row["deterministic"] = same and again.plan.actions == opt.plan.actions
        stage = "budget 1.0"
        exact = dit_opt.optimize(model, budget=1.0, calibration=cal, example_inputs=given, compile=False,
                                 progress=False)
        with torch.no_grad():
            row["exact_diff"] = float((_flat(cal(exact)) - _flat(ref_out)).abs().max())
    except Exception as e:  # the row says where and why, the table goes on
        last = traceback.extract_tb(e.__traceback__)[-1]
        text = str(e).strip().splitlines()
        row["failed"] = f"{stage}: {type(e).__name__}: {text[0][:220] if text else ''}"
        row["where"] = f"{Path(last.filename).name}:{last.lineno}"
        if "note" in entry:  # why the class is expected to fail, where that is known
            row["where"] += f"; {entry['note']}"
    return row


def _flat(result):
    """A calibration's result as one tensor: a list of one latent per sample (Z-Image) concatenated, flattened."""
    import torch

    return torch.cat([x.reshape(-1) for x in result]) if isinstance(result, list | tuple) else result


def _row(row: dict) -> str:
    def num(key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    ok = ("failed" not in row and row.get("capture_diff", 1) <= 1e-4 and row.get("flops_off", 1) <= 0.02
          and row.get("fraction", 1) <= 0.51 and row.get("exact_diff", 1) <= 1e-4 and row.get("deterministic"))
    det = {True: "yes", False: "**no**"}.get(row.get("deterministic"), "-")
    failed = row.get("failed", "").replace("|", "/")
    if failed:
        failed += f" ({row['where']})"
    return (f"| `{row['class']}` | {'yes' if ok else '**no**'} | {row.get('source', '-')} | "
            f"{row.get('capture', '-')} | {row.get('blocks', '-')} | "
            f"{num('capture_diff', '.1e')} | {num('flops_off', '.2%')} | {num('dead', '.2%')} | "
            f"{num('fraction', '.3f')} | "
            f"{num('exact_diff', '.1e')} | {det} | {failed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per class")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "coverage.md"), help="'-' prints the table")
    args = parser.parse_args()
    configs = json.loads(CONFIGS.read_text())
    names = args.classes or sorted(configs)
    rows = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for name in names:
            job = pool.apply_async(_check, (name, configs[name], args.steps))
            try:
                row = job.get(timeout=args.timeout)
            except mp.TimeoutError:
                row = {"class": name, "failed": f"over {args.timeout:.0f} s", "where": "-"}
            rows.append(row)
            print(_row(row), flush=True)
    import diffusers
    import torch

    passed = sum(_row(r).split("|")[2].strip() == "yes" for r in rows)
    head = [
        "# Coverage: every diffusers transformer class with a tiny test config",
        "",
        f"`python examples/coverage.py` on {platform.machine()} CPU, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, {datetime.date.today().isoformat()}: **{passed} of {len(rows)}** "
        f"classes pass every check. Each class gets nothing but the model (the tiny config of diffusers' "
        f"own tests, random weights) and, where `dit_opt.synthetic` cannot derive its inputs, the dummy inputs "
        f"of that test (column inputs: `derived` or `diffusers tests`, passed as `example_inputs=`); capture by "
        f"`torch.export` (column capture: `whole` model or block by block), a {args.steps}-step synthetic "
        f"calibration around those inputs. Columns: capture's largest difference "
        f"from the model (<= 1e-4), the cost model's FLOPs against `FlopCounterMode` over what the captured "
        f"graph computes (<= 2 %), the share of the model's own FLOPs the graph does not compute (dead: outputs "
        f"the model throws away, removed by `torch.export`, never run by a plan; budgets are fractions of the "
        f"graph's FLOPs, so counted against the model's they are met with that much to spare), the counted "
        f"FLOPs at budget 0.5 against the model's (<= 0.51), budget 1.0's largest difference from the full "
        f"model (<= 1e-4), "
        f"two optimisations alike. Classes that are not DiTs over a latent (audio, priors, multimodal "
        f"token streams) are listed as well.",
        "",
        "| class | passes | inputs | capture | blocks | capture diff | FLOPs off | dead | counted at 0.5 "
        "| diff at 1.0 | deterministic | failure |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + [_row(r) for r in rows]) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
