"""Train the reference models shipped in ``dit_opt/zoo/weights`` (CPU, minutes each).

    python examples/train_reference_models.py --model all --threads 2

Reproduces, for a given ``--seed`` and ``--steps``, the shipped weights:

* ``classifier`` - the small CNN behind :mod:`dit_opt.metrics` (held-out accuracy recorded);
* ``digits-dit`` - DiTTransformer2DModel, DDPM epsilon objective, labels dropped 10 % of the time
  to the null class 10 for classifier-free guidance;
* ``digits-mmdit`` - FluxTransformer2DModel + ClassPrompt, rectified-flow (flow-matching)
  objective with logit-normal timesteps, prompts dropped 10 % of the time to the null class;
* ``crops-classifier`` - the small CNN that judges ``crops-pixart`` (8 classes of 32x32 RGB crops);
* ``crops-pixart`` - PixArtTransformer2DModel + ClassPrompt (no pooled vector), DDPM epsilon
  objective with Min-SNR-5 weighting, trained on random crops of the training region of :mod:`dit_opt.zoo.crops`, in
  bfloat16 autocast (float32 master weights), prompts dropped 10 % of the time to class 8.

The digits models train on the ``"train"`` split of :func:`dit_opt.metrics.real_digits` only. The
generators keep an exponential moving average (EMA) of their weights; the EMA is what ships, in
float16 to keep the files small. Each JSON records the command, seed, steps, wall time and a
quick check of class accuracy (100 samples, by the shipped classifier).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_opt import metrics  # noqa: E402
from dit_opt.zoo import crops  # noqa: E402
from dit_opt.zoo.models import (  # noqa: E402
    DIT_CONFIG,
    MMDIT_CONFIG,
    NULL_CLASS,
    PIXART_CONFIG,
    PIXART_PROMPT_CONFIG,
    PROMPT_CONFIG,
    ClassPrompt,
    build_transformer,
    image_ids,
    pack_images,
)
from dit_opt.zoo.sampler import ReferenceSampler  # noqa: E402

# Scheduler configs saved with the weights; the DDIM one shares the DDPM training betas (DiT's
# linear schedule). "trailing" spacing starts the loop at t = 999, which keeps short loops sound.
# No x0 clipping (as DiT): at t = 999, x0 = (x - sqrt(1 - a) eps) / sqrt(a) amplifies the guided
# eps ~160 times and clipping it to [-1, 1] saturates the first steps; measured on the trained
# model, 4 samples per digit: clipped 10 % class accuracy at guidance 3.0, unclipped 100 %.
DDIM_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}
FLOW_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0}

# PixArt's own pipeline samples with DPM-Solver++ (2nd order, multistep); same training betas.
DPM_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "timestep_spacing": "trailing",
    # x0 clipped to [-1, 1] (sample_max_value 1 makes dynamic thresholding a plain clip), as
    # pixel-space DDPMs sample: measured on crops-pixart, 32 samples, guidance 2.5: same class
    # accuracy, Frechet distance 887 against 1472 unclipped (docs/reference_models.md).
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}

DEFAULT_STEPS = {"classifier": 3000, "digits-dit": 1500, "digits-mmdit": 1500, "crops-classifier": 2000,
                 "crops-pixart": 1900}
SAMPLER_DEFAULTS = {
    "digits-dit": {"num_inference_steps": 50, "guidance_scale": 3.0, "null_class": NULL_CLASS},
    "digits-mmdit": {"num_inference_steps": 28, "guidance_scale": 3.0, "null_class": NULL_CLASS},
    # Guidance 2.0, not PixArt's 4.5: of the measured 1.5 / 2.0 / 2.5 / 3.5 / 4.5, the lowest
    # Frechet distance at the best class accuracy (docs/reference_models.md).
    "crops-pixart": {"num_inference_steps": 20, "guidance_scale": 2.0, "null_class": len(crops.CLASSES)},
}
DEFAULT_BATCH = {"digits-dit": 64, "digits-mmdit": 64, "crops-pixart": 32}
DEFAULT_LR = {"digits-dit": 1e-3, "digits-mmdit": 1e-3, "crops-pixart": 5e-4}
# Min-SNR-gamma weighting (off for the digits models, which were trained without it).
DEFAULT_MIN_SNR = {"digits-dit": None, "digits-mmdit": None, "crops-pixart": 5.0}
KINDS = {"digits-dit": "dit", "digits-mmdit": "mmdit", "crops-pixart": "pixart"}
IMAGES = {
    "digits-dit": {"channels": 1, "size": 16},
    "digits-mmdit": {"channels": 1, "size": 16},
    "crops-pixart": {"channels": 3, "size": crops.CROP_SIZE},
}


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield images[idx], labels[idx]


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    # Linear warm-up, then cosine decay to 1 % of the peak: short runs end on a low rate.
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def _record(args, name: str, steps: int, wall: float, extra: dict) -> dict:
    return {
        "seed": args.seed,
        "steps": steps,
        "wall_time_s": round(wall, 1),
        # CPU seconds of this process: with other jobs on the machine, wall time overstates cost.
        "process_cpu_time_s": round(time.process_time(), 1),
        "threads": args.threads,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        **extra,
    }


def _digit_batches(gen: torch.Generator):
    """Training digits with random shifts of up to 1 pixel and mild noise, so that generated
    digits that are slightly off-centre or grainy are judged by shape."""
    images, labels = metrics.real_digits("train")
    for x, y in _batches(images, labels, 64, gen):
        pad = F.pad(x, (1, 1, 1, 1))
        dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
        x = pad[:, :, dy:dy + 16, dx:dx + 16]
        yield (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1), y


def _crop_batches(gen: torch.Generator):
    """Random training crops, flipped left-right half of the time, with mild noise and a
    brightness jitter, so that generated crops are judged by texture and colour, not by pixels."""
    while True:
        x, y = crops.random_crops(64, gen, "train")
        flip = torch.rand(64, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = x * (1 + 0.1 * (torch.rand(64, 1, 1, 1, generator=gen) - 0.5))
        yield (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1), y


# --model flag -> (classifier name in dit_opt.metrics.CLASSIFIERS, batches, held-out set, training split)
CLASSIFIERS = {
    "classifier": ("digits-classifier", _digit_batches, lambda: metrics.real_digits("test"),
                   "dit_opt.metrics.real_digits('train')"),
    "crops-classifier": ("crops-classifier", _crop_batches, lambda: crops.real_crops("test"),
                         "dit_opt.zoo.crops.random_crops(split='train')"),
}


def train_classifier(args, flag: str = "classifier") -> None:
    """Train a judge of sample quality (``classifier``: digits, ``crops-classifier``: crops)."""
    name, batches, held_out, split = CLASSIFIERS[flag]
    arch = metrics.CLASSIFIERS[name][1]
    steps = args.steps or DEFAULT_STEPS[flag]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = arch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.time()
    for step, (x, y) in zip(range(steps), batches(gen), strict=False):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, 2e-3, 100)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    wall = time.time() - start
    model.eval()
    test_x, test_y = held_out()
    with torch.no_grad():
        acc = float((model(test_x).argmax(1) == test_y).double().mean())
    out = Path(args.out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    meta = {"name": name, "architecture": f"dit_opt.zoo.classifier.{arch.__name__}",
            "test_accuracy": round(acc, 4), "test_size": len(test_y),
            "training": _record(args, flag, steps, wall, {"batch_size": 64, "lr": 2e-3, "train_split": split,
                                                          "final_loss": round(loss.item(), 4)})}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    metrics.load_classifier.cache_clear()
    print(f"{name}: held-out accuracy {acc:.4f} ({len(test_y)} images), {wall:.0f} s")


def _zero_init_modulation(model: torch.nn.Module) -> None:
    # adaLN-Zero (Peebles & Xie): modulation layers and the output projection start at zero, so
    # every block starts as the identity. diffusers does not do this at construction.
    for mod_name, module in model.named_modules():
        last = mod_name.rsplit(".", 1)[-1]
        is_mod = last == "linear" and any(s in mod_name for s in ("norm1", "norm1_context", "norm", "norm_out"))
        if is_mod or mod_name in ("proj_out_1", "proj_out_2", "proj_out"):
            torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def _data_stream(name: str, batch_size: int, gen: torch.Generator):
    """Endless ``(x0 in [-1, 1], labels)`` training batches of a generator's data set."""
    if KINDS[name] == "pixart":
        while True:
            x, y = crops.random_crops(batch_size, gen, "train")
            yield x * 2 - 1, y
    images, labels = metrics.real_digits("train")
    yield from ((x * 2 - 1, y) for x, y in _batches(images, labels, batch_size, gen))


def _loss(kind: str, modules: dict, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
          alphas_cumprod: torch.Tensor | None, min_snr: float | None = None) -> torch.Tensor:
    """The training loss of one batch: DDPM epsilon (dit, pixart) or rectified-flow velocity (mmdit).

    ``min_snr`` (epsilon objectives only): weigh each sample by ``min(SNR, gamma) / SNR``
    (Min-SNR-gamma, Hang et al. 2023), which stops the low-noise steps from dominating.
    """
    b = x0.shape[0]
    transformer = modules["transformer"]
    noise = torch.randn(x0.shape, generator=gen)
    if kind in ("dit", "pixart"):
        t = torch.randint(0, 1000, (b,), generator=gen)
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if kind == "dit":
            pred = transformer(hidden_states=xt, timestep=t, class_labels=y).sample
        else:
            tokens, _ = modules["prompt_encoder"](y)
            pred = transformer(hidden_states=xt, encoder_hidden_states=tokens, timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        if min_snr is None:
            return F.mse_loss(pred.float(), noise)
        snr = a.view(b) / (1 - a.view(b))
        per_sample = ((pred.float() - noise) ** 2).flatten(1).mean(1)
        return (per_sample * snr.clamp(max=min_snr) / snr).mean()
    # Logit-normal sigmas (SD3) weight the middle of the path, where the class is decided.
    sigma = torch.sigmoid(torch.randn(b, generator=gen))
    s = sigma.view(b, 1, 1, 1)
    xt = pack_images((1 - s) * x0 + s * noise)
    target = pack_images(noise - x0)
    tokens, pooled = modules["prompt_encoder"](y)
    pred = transformer(hidden_states=xt, encoder_hidden_states=tokens, pooled_projections=pooled,
                       timestep=sigma, img_ids=image_ids(), txt_ids=torch.zeros(tokens.shape[1], 3)).sample
    return F.mse_loss(pred.float(), target)


def _save_generator(out: Path, name: str, ema: dict, config: dict, n_params: int, record: dict) -> None:
    """Write ``<name>.safetensors`` (the EMA weights in float16) and ``<name>.json``."""
    kind = KINDS[name]
    state = {}
    for k, m in ema.items():
        for pk, v in m.state_dict().items():
            state[f"{k}.{pk}"] = v.detach().to(torch.float16).contiguous()
    save_file(state, str(out / f"{name}.safetensors"))
    scheduler = {"dit": ("DDIMScheduler", DDIM_CONFIG), "mmdit": ("FlowMatchEulerDiscreteScheduler", FLOW_CONFIG),
                 "pixart": ("DPMSolverMultistepScheduler", DPM_CONFIG)}[kind]
    meta = {
        "name": name,
        "kind": kind,
        "format_version": 1,
        "transformer_class": type(ema["transformer"]).__name__,
        "transformer_config": config,
        "scheduler_class": scheduler[0],
        "scheduler_config": scheduler[1],
        "sampler_defaults": SAMPLER_DEFAULTS[name],
        "image": {**IMAGES[name], "model_range": [-1, 1], "output_range": [0, 1]},
        "weights_dtype": "float16",
        "num_parameters": n_params,
        "training": record,
    }
    if kind == "mmdit":
        meta["prompt_config"] = PROMPT_CONFIG
    if kind == "pixart":
        meta["prompt_config"] = PIXART_PROMPT_CONFIG
        meta["classes"] = list(crops.CLASSES)
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


def train_generator(args, name: str) -> None:
    """Train ``digits-dit``, ``digits-mmdit`` or ``crops-pixart`` and write its safetensors and JSON."""
    kind = KINDS[name]
    steps = args.steps or DEFAULT_STEPS[name]
    batch_size = args.batch_size or DEFAULT_BATCH[name]
    lr = args.lr or DEFAULT_LR[name]
    min_snr = args.min_snr if args.min_snr is not None else DEFAULT_MIN_SNR[name]
    if min_snr is not None and min_snr <= 0:
        min_snr = None  # --min-snr 0 turns the weighting off
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = {"dit": DIT_CONFIG, "mmdit": MMDIT_CONFIG, "pixart": PIXART_CONFIG}[kind]
    transformer = build_transformer(kind, config)
    _zero_init_modulation(transformer)
    modules = {"transformer": transformer}
    alphas_cumprod = None
    if kind == "dit":
        # diffusers' LabelEmbedding drops labels by itself in train mode, independently in every
        # block; the loop below drops them once per sample instead, consistently for all blocks.
        for m in transformer.modules():
            if type(m).__name__ == "LabelEmbedding":
                m.dropout_prob = 0.0
    if kind in ("dit", "pixart"):
        alphas_cumprod = diffusers.DDPMScheduler.from_config(DDIM_CONFIG).alphas_cumprod
    if kind == "mmdit":
        modules["prompt_encoder"] = ClassPrompt(**PROMPT_CONFIG)
    if kind == "pixart":
        modules["prompt_encoder"] = ClassPrompt(**PIXART_PROMPT_CONFIG)
        # Cross-attention starts closed (its output projection at zero), as PixArt initialises it.
        for block in transformer.transformer_blocks:
            torch.nn.init.zeros_(block.attn2.to_out[0].weight)
            torch.nn.init.zeros_(block.attn2.to_out[0].bias)
    null_class = SAMPLER_DEFAULTS[name]["null_class"]
    # bfloat16 autocast is about 1.5x faster on CPUs with AMX; the digits models were trained
    # without it and keep that default so that their shipped weights stay reproducible.
    autocast = args.autocast if args.autocast != "auto" else ("bf16" if kind == "pixart" else "none")
    params = [p for m in modules.values() for p in m.parameters()]
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in params)
    print(f"{name}: {n_params / 1e6:.2f} M parameters, {steps} steps, batch {batch_size}, autocast {autocast}")
    out = Path(args.out)

    def record(done: int) -> dict:
        return _record(args, name, done, time.time() - start, {
            "objective": "rectified-flow-velocity" if kind == "mmdit" else "ddpm-epsilon",
            "train_split": "dit_opt.zoo.crops.random_crops(split='train')" if kind == "pixart"
            else "dit_opt.metrics.real_digits('train')",
            "batch_size": batch_size, "lr": lr, "ema_decay": args.ema, "autocast": autocast,
            "min_snr_gamma": min_snr,
            "label_dropout": 0.1, "final_loss_ema": round(running, 4)})

    start, running = time.time(), None
    for step, (x0, y) in zip(range(steps), _data_stream(name, batch_size, gen), strict=False):
        drop = torch.rand(x0.shape[0], generator=gen) < 0.1
        y = torch.where(drop, torch.full_like(y, null_class), y)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, 200)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16"):
            loss = _loss(kind, modules, x0, y, gen, alphas_cumprod, min_snr)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, m in modules.items():
                for pe, p in zip(ema[k].parameters(), m.parameters(), strict=True):
                    pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {running:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - start:6.0f} s", flush=True)
        if args.checkpoint_every and step and step % args.checkpoint_every == 0:
            # A usable model mid-run (same files as the final one, overwritten at the end).
            _save_generator(out, name, ema, config, n_params, record(step))
    wall = time.time() - start
    _save_generator(out, name, ema, config, n_params, record(steps))
    if kind == "pixart":
        print(f"{name}: trained in {wall:.0f} s; evaluate with examples/evaluate_reference_models.py")
        return

    # Quick check with the weights as shipped (float16 -> float32).
    from dit_opt import zoo

    meta = json.loads((out / f"{name}.json").read_text())
    sampler: ReferenceSampler = zoo.load_path(out / f"{name}.safetensors")
    want = [c for c in range(10) for _ in range(10)]
    samples = sampler(want, seed=args.seed)
    acc = metrics.class_accuracy(samples, want)
    meta["training"]["check_accuracy_100"] = round(acc, 4)
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: trained in {wall:.0f} s, class accuracy of 100 samples {acc:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["digits-dit", "digits-mmdit", "classifier", "crops-classifier",
                                            "crops-pixart", "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default {DEFAULT_BATCH} (the classifiers: 64)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak learning rate of the generators (default {DEFAULT_LR})")
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--autocast", choices=["auto", "none", "bf16"], default="auto",
                        help="training precision (auto: bf16 for crops-pixart, none for the digits models)")
    parser.add_argument("--min-snr", type=float, default=None, metavar="GAMMA",
                        help=f"Min-SNR-gamma loss weighting of the epsilon objectives; 0 turns it off "
                             f"(default {DEFAULT_MIN_SNR}, as the shipped weights were trained)")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="write the EMA weights every N steps")
    parser.add_argument("--out", default="dit_opt/zoo/weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    names = list(CLASSIFIERS) + list(KINDS) if args.model == "all" else [args.model]
    for name in names:
        if name in CLASSIFIERS:
            train_classifier(args, name)
        else:
            train_generator(args, name)


if __name__ == "__main__":
    main()
