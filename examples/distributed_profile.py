"""Profile a reference model with its calibration generations spread over processes.

Run it in one process, then under ``torchrun`` with the same arguments, and compare the two
profiles (they must agree to float summation order; ``docs/scale.md``):

    python examples/distributed_profile.py --model digits-dit --out /tmp/prof1 --threads 2
    torchrun --nproc-per-node=2 examples/distributed_profile.py --model digits-dit --out /tmp/prof2 --threads 1
    python examples/distributed_profile.py --compare /tmp/prof1 /tmp/prof2

Each generation samples ``--samples`` images on its own seed (``1000 + i``); the ``--generations``
of them are split over the ranks (``generations[rank::world]``). Only rank 0 writes the profile.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch


def compare(a: str, b: str) -> None:
    """Print the largest relative difference of every error table between two saved profiles."""
    from dit_opt import SensitivityProfile

    pa, pb = SensitivityProfile.load(a), SensitivityProfile.load(b)
    ta, tb = pa.tables(), pb.tables()
    if ta.keys() != tb.keys():
        raise SystemExit(f"the profiles hold other tables: {sorted(ta)} and {sorted(tb)}")
    worst = 0.0
    print("| table | max relative difference |\n|---|---|")
    for name in ta:
        x, y = ta[name].astype(np.float64), tb[name].astype(np.float64)
        if x.shape != y.shape or not np.array_equal(np.isnan(x), np.isnan(y)):
            raise SystemExit(f"{name}: shapes {x.shape} and {y.shape} or their unmeasured entries differ")
        ok = np.isfinite(x) & np.isfinite(y)
        rel = np.abs(x[ok] - y[ok]) / np.maximum(np.maximum(np.abs(x[ok]), np.abs(y[ok])), 1e-300)
        d = float(rel.max(initial=0.0))
        worst = max(worst, d)
        if name.startswith("e_"):
            print(f"| {name} | {d:.2e} |")
    same_order = all(torch.equal(pa.channel_order[k], pb.channel_order[k]) for k in pa.channel_order)
    print(f"\nlargest over every table: {worst:.2e}; MLP channel orders identical: {same_order}")
    for p, label in ((pa, a), (pb, b)):
        print(f"{label}: {p.report.get('ranks', 1)} process(es), profile {p.report['profile_seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--samples", type=int, default=5, help="images per generation")
    parser.add_argument("--probes", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", help="directory to save the profile in (rank 0)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved profiles and exit")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import dit_opt
    from dit_opt import zoo
    from dit_opt.bench import sampling

    distributed = "WORLD_SIZE" in os.environ  # started by torchrun
    if distributed:
        torch.distributed.init_process_group("gloo")
    sampler = zoo.load(args.model)
    generations = [sampling(sampler, args.samples, seed=1000 + i) for i in range(args.generations)]
    t0 = time.perf_counter()
    prof = dit_opt.profile(sampler.transformer, generations, probes=args.probes, progress=False,
                           distributed=distributed)
    seconds = time.perf_counter() - t0
    rank = torch.distributed.get_rank() if distributed else 0
    if rank == 0:
        world = torch.distributed.get_world_size() if distributed else 1
        print(f"{args.model}: {args.generations} generations of {args.samples} images, {world} process(es) of "
              f"{args.threads} thread(s): profile() took {seconds:.1f} s")
    if args.out:
        prof.save(args.out)
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
