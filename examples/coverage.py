"""What dit-opt does on every diffusers transformer class with a tiny test config: writes docs/coverage.md.

The configs (``examples/coverage_configs.json``) are the tiny ones of diffusers' own test suite
(``tests/models/transformers/``), for the classes the installed diffusers has; the weights are
random (perturbed where zero-initialised, as ``dit_opt.testing.tiny_model`` does). Each class runs
in its own process, with nothing but the model:

* **inputs**: :func:`dit_opt.synthetic.example_inputs` derives one forward's inputs;
* **capture**: ``dit_opt.capture`` of that call, its largest difference from the model's output,
  and the cost model's FLOPs against ``FlopCounterMode`` over the model's own forward;
* **budget 0.5**: ``optimize(model, 0.5)`` on a 10-step synthetic calibration, the FLOPs counted
  over that loop, as a fraction of the full model's;
* **budget 1.0**: the loop's largest difference from the full model's;
* **deterministic**: two ``optimize`` calls at 0.5 give the same plan and the same outputs.

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


def _check(name: str, config: dict, steps: int) -> dict:
    import warnings

    import diffusers
    import torch

    import dit_opt
    from dit_opt.calibration import synthetic_calibration
    from dit_opt.capture import _max_abs_diff
    from dit_opt.flops import count_flops
    from dit_opt.synthetic import example_inputs
    from dit_opt.testing import counted_flops

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    row: dict = {"class": name}
    stage = "build"
    try:
        torch.manual_seed(0)
        model = getattr(diffusers, name)(**config).eval()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in model.parameters():
                if p.dim() >= 1 and float(p.abs().max()) == 0.0:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        stage = "inputs"
        inputs = example_inputs(model)
        row["inputs"] = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
        stage = "capture"
        graph = dit_opt.capture(model, inputs)
        from passes.annotate_flops import annotate_flops

        annotate_flops(graph)
        with torch.no_grad():
            row["capture_diff"] = _max_abs_diff(model(**inputs), graph(**inputs))
        ref = count_flops(model, **inputs)
        row["flops_off"] = abs(graph.flops - ref) / ref
        row["blocks"] = len(graph.blocks)
        stage = "optimize"
        cal = synthetic_calibration(model, num_inference_steps=steps, warn=False)

        def counted(module):
            with counted_flops(module) as flops, torch.no_grad():
                out = cal(module)
            return flops[0], out

        full, ref_out = counted(model)
        opt = dit_opt.optimize(model, budget=0.5, calibration=cal, compile=False, progress=False)
        got, out = counted(opt)
        row["fraction"] = got / full
        stage = "deterministic"
        again = dit_opt.optimize(model, budget=0.5, calibration=cal, compile=False, progress=False)
        with torch.no_grad():
            same = torch.equal(cal(again), out)
        row["deterministic"] = same and again.plan.actions == opt.plan.actions
        stage = "budget 1.0"
        exact = dit_opt.optimize(model, budget=1.0, calibration=cal, compile=False, progress=False)
        with torch.no_grad():
            row["exact_diff"] = float((cal(exact) - ref_out).abs().max())
    except Exception as e:  # the row says where and why, the table goes on
        last = traceback.extract_tb(e.__traceback__)[-1]
        text = str(e).strip().splitlines()
        row["failed"] = f"{stage}: {type(e).__name__}: {text[0][:220] if text else ''}"
        row["where"] = f"{Path(last.filename).name}:{last.lineno}"
    return row


def _row(row: dict) -> str:
    def num(key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    ok = ("failed" not in row and row.get("capture_diff", 1) <= 1e-4 and row.get("flops_off", 1) <= 0.02
          and row.get("fraction", 1) <= 0.51 and row.get("exact_diff", 1) <= 1e-4 and row.get("deterministic"))
    det = {True: "yes", False: "**no**"}.get(row.get("deterministic"), "-")
    failed = row.get("failed", "").replace("|", "/")
    if failed:
        failed += f" ({row['where']})"
    return (f"| `{row['class']}` | {'yes' if ok else '**no**'} | {row.get('blocks', '-')} | "
            f"{num('capture_diff', '.1e')} | {num('flops_off', '.2%')} | {num('fraction', '.3f')} | "
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
        f"own tests, random weights): inputs derived by `dit_opt.synthetic`, whole-model capture by "
        f"`torch.export`, a {args.steps}-step synthetic calibration. Columns: capture's largest difference "
        f"from the model (<= 1e-4), the cost model's FLOPs against `FlopCounterMode` (<= 2 %), the counted "
        f"FLOPs at budget 0.5 (<= 0.51), budget 1.0's largest difference from the full model (<= 1e-4), "
        f"two optimisations alike. Classes that are not DiTs over a latent (audio, priors, multimodal "
        f"token streams) are listed as well.",
        "",
        "| class | passes | blocks | capture diff | FLOPs off | counted at 0.5 | diff at 1.0 | deterministic "
        "| failure |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + [_row(r) for r in rows]) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
