"""Run an optimised reference model with its sequence sharded over processes (diffusers' Ulysses).

    torchrun --nproc-per-node=2 examples/context_parallel.py --model digits-mmdit --budget 0.5

Rank 0 optimises the model (one process, its calibration) and saves the plan; every rank loads
it, so all of them follow the same plan. Each rank then runs the evaluation generation twice:
with the whole sequence (one process's work, on each rank at once), and after
``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))`` with its shard
of it; both timed (medians, alternating is impossible once the model is sharded, so whole runs
first), and the sharded images compared with the whole ones (``docs/scale.md``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-mmdit")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plan-dir", default=None, help="where rank 0 saves the plan (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.accelerator.device_count() == 0:
        # diffusers' enable_parallelism takes the rank modulo the accelerator count, which is 0 on
        # a CPU-only machine; the CPU is each rank's one device
        torch.accelerator.device_count = lambda: 1
    from diffusers import ContextParallelConfig

    import dit_opt
    from dit_opt import metrics, zoo
    from dit_opt.bench import machine, sampling

    sampler = zoo.load(args.model)
    model = sampler.transformer
    plan_dir = [args.plan_dir or tempfile.mkdtemp(prefix="dit-opt-cp-")]
    dist.broadcast_object_list(plan_dir, src=0)
    if rank == 0:
        opt = dit_opt.optimize(model, args.budget, calibration=sampling(sampler, 4, seed=1000), progress=False)
        opt.save(plan_dir[0])
    dist.barrier()
    evaluation = sampling(sampler, args.samples, seed=0, reset=True)

    def timed(module: torch.nn.Module) -> tuple[torch.Tensor, float]:
        times, images = [], None
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            images = evaluation(module)
            times.append(time.perf_counter() - t0)
        return images, statistics.median(times)

    whole = dit_opt.load(plan_dir[0], model)
    full_images, _ = timed(model)
    whole_images, whole_s = timed(whole)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    sharded = dit_opt.load(plan_dir[0], model)
    sharded_images, sharded_s = timed(sharded)
    diff = float((sharded_images - whole_images).abs().max())
    if rank == 0:
        print(f"{args.model}, budget {args.budget}: plan {whole.plan.solver} at FLOP fraction "
              f"{whole.plan.flop_fraction:.3f}; {args.samples} images; {machine()}")
        print("| run | processes x threads | wall time (median) | PSNR against the full model |")
        print("|---|---|---|---|")
        print(f"| whole sequence | 1 x {args.threads} (on each rank) | {whole_s:.2f} s | "
              f"{metrics.psnr(whole_images, full_images):.2f} dB |")
        print(f"| sharded (Ulysses) | {world} x {args.threads} | {sharded_s:.2f} s ({whole_s / sharded_s:.2f}x) | "
              f"{metrics.psnr(sharded_images, full_images):.2f} dB |")
        print(f"largest difference between the sharded and the whole run's images: {diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
