"""How well the profile's estimates of errors at older caches match a re-run.

The profile re-runs each block with one module's output served from the cache written one step
earlier (the youngest age; for ``PRUNE``, recomputed on the tokens that drifted most) and
measures the block's output error; at older ages it scales that error by the squared miss of the
module's outputs themselves (the same estimate that module forecasts and CFG use), saving one
block re-run per role, action, age and step. A block's own ``PRUNE`` (role ``block``) is measured
up to ``BLOCK_PRUNE_MEASURED_AGE`` and scaled from there by the squared miss of the block's cached
residual. This measures both on the benchmark's calibration (10 images, crops-pixart 4) and
prints, per role, action and age, the estimate over the re-run's error: in total and the median
and 10th / 90th percentiles per step.

    python examples/module_reuse_estimate.py --models digits-dit digits-mmdit
"""

from __future__ import annotations

import argparse
import collections
import warnings

import numpy as np
import torch

import dit_opt
from dit_opt import zoo
from dit_opt.bench import with_transformer
from passes import annotate_sensitivity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-dit", "digits-mmdit"], choices=zoo.available())
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print("| model | role | action | age | steps | estimate / re-run, in total | median per step | p10 | p90 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        sampler = zoo.load(name)
        labels = sampler.labels(4 if name == "crops-pixart" else 10)

        def calibration(module, sampler=sampler, labels=labels):
            return with_transformer(sampler, module, class_labels=labels, seed=1000)

        rows: list = []
        annotate_sensitivity._Probe.rerun_module_reuse = rows
        try:
            dit_opt.profile(sampler.transformer, calibration, probes=0, progress=False, probe_rows=4)
        finally:
            annotate_sensitivity._Probe.rerun_module_reuse = None
        by = collections.defaultdict(list)
        for role, action, age, measured, estimate in rows:
            by[role, action, age].append((measured, estimate))
        for (role, action, age), pairs in sorted(by.items()):
            a = np.array(pairs)
            ratio = a[:, 1] / np.maximum(a[:, 0], 1e-30)
            print(f"| {name} | {role} | {action} | {age} | {len(a)} | {a[:, 1].sum() / a[:, 0].sum():.3f} | "
                  f"{np.median(ratio):.3f} | {np.percentile(ratio, 10):.3f} | {np.percentile(ratio, 90):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
