"""What ``opt.export`` writes and costs on a reference model: size against the model's own
safetensors, export time, the time to open it (every file checked) and to deserialise all its
programs, and that the export replays the plan.

The model is optimised at ``--budget`` on the benchmark's calibration (10 images, seed 1000,
``compile=False``), exported to a temporary directory, loaded back with
:class:`dit_opt.export.ExportedPlan` and replayed step by step on the captured inputs against
the optimised module. Prints one markdown row per model (the table in the README).

    python examples/export_size.py --models digits-dit --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import dit_opt
from dit_opt import zoo
from dit_opt.bench import sampling
from dit_opt.export import ExportedPlan


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-dit"])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | budget | distinct step variants | model safetensors (MB) | export (MB) | ratio | "
          "export (s) | open (s) | all programs (s) | replay max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        sampler = zoo.load(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = dit_opt.optimize(sampler.transformer, args.budget, calibration=sampling(sampler, 10, 1000),
                                   compile=False, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            state = {k: v.contiguous() for k, v in sampler.transformer.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            model_bytes = (tmp / "model.safetensors").stat().st_size
            t0 = time.perf_counter()
            opt.export(tmp / "export")
            export_s = time.perf_counter() - t0
            export_bytes = _size(tmp / "export")
            t0 = time.perf_counter()
            served = ExportedPlan(tmp / "export")  # every file checked, programs deserialised when used
            open_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            served.load_all()
            load_s = time.perf_counter() - t0
            runner = opt.captured()
            base = runner.graph.example_inputs
            opt.reset()
            worst = 0.0
            with torch.no_grad():
                for step, t in enumerate(opt.plan.timesteps):
                    inputs = dict(base, timestep=torch.full_like(base["timestep"], t))
                    want = opt(**inputs).sample
                    (got,) = served(step, *runner.graph.flat_inputs(**inputs))
                    worst = max(worst, float((want - got).abs().max()))
            variants = len({id(v.gm) for v in runner.variants})
        print(f"| {name} | {args.budget} | {variants} | {model_bytes / 1e6:.1f} | {export_bytes / 1e6:.1f} | "
              f"{export_bytes / model_bytes:.2f} | {export_s:.1f} | {open_s:.1f} | {load_s:.1f} | {worst:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
