"""Wall-clock speedup of optimised models, next to their FLOP ratio.

Both sides are compiled (the original with ``torch.compile``, dit-opt with the lowering asked
for: ``blocks``, each distinct block compiled once; ``step``, each distinct step variant
compiled whole), run alternately in one process after a warm-up; medians are compared. The
first-call column is the first generation of the dit-opt side, compiles included. The
transformer-time column takes out what the loop spends outside the transformer (the
scheduler, the guidance combination: timed with a transformer that answers from a table),
which no transformer optimisation can remove.

Models: a reference model of the zoo, or ``dit-s2``: a DiT-S/2-sized
``DiTTransformer2DModel`` (12 blocks, hidden 384, 6 heads, 256 tokens of a 4x32x32 latent,
random weights, seed 0) sampled like ``DiTPipeline`` (DDIM, class-conditional CFG with the
null class, scale 4) at ``--steps`` (default 20).

    python examples/speed.py --model digits-dit --budgets 1.0 0.5 0.25 --lowering blocks step
    python examples/speed.py --model dit-s2 --samples 2 --budgets 1.0 0.5 0.25 --lowering blocks step

``--per-step`` adds, for each row, where the time goes: each transformer call of a generation
timed alone (the fastest of ``--repeats`` alternating generations), grouped by how many units
of the plan compute at that step, against the compiled original's call; and the time per call
that Dynamo spends choosing the compiled code to run (its guard checks: "TorchDynamo Cache
Lookup" in ``torch.profiler``), for both sides.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import dit_opt
from dit_opt import zoo
from dit_opt.bench import flop_fraction, sampling, time_alternating
from dit_opt.plan import ActionKind
from dit_opt.runtime import OptimizedTransformer

DIT_S2 = dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=12,
              sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def dit_s2() -> torch.nn.Module:
    """A DiT-S/2-sized transformer with random weights (no download)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(**DIT_S2).eval()


def dit_sampling(model: torch.nn.Module, samples: int, seed: int, steps: int,
                 guidance: float = 4.0) -> Callable[[torch.nn.Module], torch.Tensor]:
    """``module -> latents``: DiTPipeline's loop (DDIM, CFG batch ``[cond, null]``) on ``seed``."""
    from diffusers import DDIMScheduler

    cfg = model.config
    size = cfg.sample_size
    null = cfg.num_embeds_ada_norm
    labels = torch.arange(samples) % null

    @torch.no_grad()
    def run(module: torch.nn.Module) -> torch.Tensor:
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(samples, cfg.in_channels, size, size, generator=gen)
        class_labels = torch.cat([labels, torch.full_like(labels, null)])
        for t in sched.timesteps:
            x = torch.cat([latents, latents])
            eps = module(hidden_states=x, timestep=t.expand(2 * samples), class_labels=class_labels).sample
            cond, uncond = eps.chunk(2)
            latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        return latents

    return run


class _Replay(torch.nn.Module):
    """Answers every call with the model's output to the first call of the same shapes: a
    transformer that costs nothing, to time what the loop spends outside it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config, self.outputs = model, model.config, {}

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        key = tuple(hidden_states.shape)
        if key not in self.outputs:
            self.outputs[key] = self.model(hidden_states=hidden_states, **kwargs)
        return self.outputs[key]


def loop_seconds(gen: Callable[[torch.nn.Module], torch.Tensor], model: torch.nn.Module, repeats: int) -> float:
    """Median seconds of a generation whose transformer costs nothing (scheduler, CFG, decoding)."""
    replay = _Replay(model)
    gen(replay)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen(replay)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


#: The actions that run their unit (whole, or on some tokens or MLP channels).
RUNS_THE_UNIT = (ActionKind.COMPUTE, ActionKind.PRUNE, ActionKind.WIDTH)


def call_times(gen: Callable[[torch.nn.Module], torch.Tensor], modules: list[torch.nn.Module], repeats: int
               ) -> list[list[float]]:
    """Per module, the seconds of each transformer call of one generation: the fastest over
    ``repeats`` generations, the modules run alternately."""
    times: list[list[list[float]]] = [[] for _ in modules]
    handles = []
    for i, m in enumerate(modules):
        def pre(mod, args, kwargs, i=i):
            times[i][-1].append(-time.perf_counter())

        def post(mod, args, kwargs, out, i=i):
            times[i][-1][-1] += time.perf_counter()

        handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post, with_kwargs=True)]
    try:
        for _ in range(repeats):
            for i, m in enumerate(modules):
                times[i].append([])
                gen(m)
    finally:
        for h in handles:
            h.remove()
    return [[min(run[k] for run in per) for k in range(len(per[0]))] for per in times]


def lookup_ms(gen: Callable[[torch.nn.Module], torch.Tensor], module: torch.nn.Module, calls: int) -> float:
    """Milliseconds per transformer call that Dynamo spends choosing the compiled code (its guard
    checks), over one profiled generation of ``calls`` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen(module)
    total = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup")
    return total / 1e3 / calls


def per_step_table(gen: Callable[[torch.nn.Module], torch.Tensor], baseline: torch.nn.Module,
                   opt: OptimizedTransformer, repeats: int) -> None:
    """Print where a generation's time goes, by the number of computing units per step."""
    base, ours = call_times(gen, [baseline, opt], repeats)
    plan = opt.plan
    if len(ours) != plan.num_steps:  # one call per step expected (CFG in one batch)
        print(f"(per-step breakdown skipped: {len(ours)} calls for {plan.num_steps} steps)")
        return
    full = statistics.median(base)
    groups: dict[int, list[float]] = {}
    for row, sec in zip(plan.actions, ours, strict=True):
        groups.setdefault(sum(a.kind in RUNS_THE_UNIT for a in row), []).append(sec)
    print(f"\nCompiled original: {full * 1e3:.2f} ms per call (median), {sum(base):.3f} s per generation; "
          f"dit-opt: {sum(ours):.3f} s. Dynamo's guard checks per call: original "
          f"{lookup_ms(gen, baseline, len(base)):.2f} ms, dit-opt {lookup_ms(gen, opt, len(ours)):.2f} ms.")
    print("| units computing | steps | ms per call (median) | of the original's call | seconds in all |")
    print("|---|---|---|---|---|")
    for k in sorted(groups):
        sec = groups[k]
        med = statistics.median(sec)
        print(f"| {k} of {len(plan.units)} | {len(sec)} | {med * 1e3:.2f} | {med / full:.2f} | {sum(sec):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits-dit", choices=[*zoo.available(), "dit-s2"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--lowering", nargs="+", default=["blocks"], choices=["blocks", "step"])
    ap.add_argument("--granularity", default="block", choices=["block", "module", "auto"],
                    help="the plan's units (optimize's granularity=)")
    ap.add_argument("--samples", type=int, default=10, help="samples per generation")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's; dit-s2: 20)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--per-step", action="store_true", help="also print where each row's time goes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.model == "dit-s2":
        model = dit_s2()
        steps = args.steps or 20
        calibration, gen = (dit_sampling(model, args.samples, s, steps) for s in (1, 0))
    else:
        sampler = zoo.load(args.model)
        model = sampler.transformer
        calibration = sampling(sampler, args.samples, seed=1, steps=args.steps)
        gen = sampling(sampler, args.samples, seed=0, steps=args.steps)
    t0 = time.perf_counter()
    prof = dit_opt.profile(model, calibration, probes=0, progress=False)
    profile_s = time.perf_counter() - t0
    baseline = torch.compile(model)
    loop_s = loop_seconds(gen, model, args.repeats)
    print(f"{args.model}, granularity {args.granularity}, {args.samples} samples, "
          f"{platform.machine()} {platform.processor() or 'CPU'}, "
          f"{torch.get_num_threads()} threads, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"profile {profile_s:.0f} s, loop outside the transformer {loop_s:.3f} s")
    print("| budget | lowering | FLOP fraction (counted) | FLOP ratio | wall-clock speedup | speedup / FLOP ratio "
          "| transformer-time speedup / FLOP ratio | first generation (compiles) |")
    print("|---|---|---|---|---|---|---|---|")
    for b in args.budgets:
        eager = dit_opt.optimize(model, b, calibration=prof, compile=False, progress=False, select=False,
                                 granularity=args.granularity)
        frac = flop_fraction(gen, model, eager)
        for lowering in args.lowering:
            opt = OptimizedTransformer(model, eager.plan, profile=prof, compile=lowering)
            t0 = time.perf_counter()
            gen(opt)
            first_s = time.perf_counter() - t0
            t = time_alternating(lambda: gen(baseline), lambda opt=opt: gen(opt), repeats=args.repeats)  # noqa: B023
            ratio = 1.0 / frac
            inner = (t["a_s"] - loop_s) / (t["b_s"] - loop_s)  # the same generation less its loop
            print(f"| {b} | {lowering} | {frac:.4f} | {ratio:.2f}x | {t['speedup']:.2f}x "
                  f"({t['a_s']:.2f} s -> {t['b_s']:.2f} s) | {t['speedup'] / ratio:.2f} | {inner / ratio:.2f} "
                  f"| {first_s:.0f} s |", flush=True)
            if args.per_step:
                per_step_table(gen, baseline, opt, args.repeats)


if __name__ == "__main__":
    main()
