"""Measure the sample quality of the reference models at their default samplers.

    python examples/evaluate_reference_models.py --threads 2

For each model: class accuracy of 20 samples per class by the shipped classifier of its data
(digits: 200 samples; crops-pixart: 160), and the Frechet distance of the classifier features of
those samples to the held-out real images (450 digits; 640 crops). For scale, the accuracy on the
held-out real images and their Frechet distance to training images are printed too. The table
is also written into docs/reference_models.md, one table per data set (digits, crops) between
its results markers; the tables of data sets not evaluated in this run are left as they are.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_opt import metrics, zoo  # noqa: E402
from dit_opt.bench import cpu_name  # noqa: E402
from dit_opt.images import save_grid  # noqa: E402


def _markers(data: str) -> tuple[str, str]:
    """The markers around one data set's table in the doc (``digits`` or ``crops``)."""
    return f"<!-- results:{data}:start -->", f"<!-- results:{data}:end -->"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=zoo.available(), choices=zoo.available())
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--grid-dir", default="", help="also draw the samples, one row per class, into "
                        "<dir>/samples_<model>.png (e.g. docs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc", default="docs/reference_models.md", help="markdown file to update ('' to skip)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: each model's)")
    parser.add_argument("--x0-clip", choices=["default", "on", "off"], default="default",
                        help="clip the predicted x0 to [-1, 1] or not, where the scheduler can (DDIM, "
                             "DPM-Solver++; default: the model's setting)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows, real_rows = [], {}
    for name in args.models:
        sampler = zoo.load(name)
        if args.guidance is not None:
            sampler.guidance_scale = args.guidance
        if args.x0_clip != "default" and "thresholding" in sampler.scheduler.config:
            sampler.scheduler = type(sampler.scheduler).from_config(
                sampler.scheduler.config, thresholding=args.x0_clip == "on", sample_max_value=1.0)
        real_test, real_labels = sampler.reference_images("test")
        judge = metrics.classifier_for(real_test)
        if judge not in real_rows:
            real_train, _ = sampler.reference_images("train")
            real_rows[judge] = (len(real_test), metrics.class_accuracy(real_test, real_labels),
                                metrics.frechet_distance(real_test, real_train))
        labels = [c for c in range(sampler.num_classes) for _ in range(args.per_class)]
        start = time.time()
        images = sampler(labels, seed=args.seed)
        wall = time.time() - start
        acc = metrics.class_accuracy(images, labels)
        fd = metrics.frechet_distance(images, real_test)
        kind = {"DDIMScheduler": "DDIM", "FlowMatchEulerDiscreteScheduler": "flow-match Euler",
                "DPMSolverMultistepScheduler": "DPM-Solver++"}[type(sampler.scheduler).__name__]
        rows.append((name, kind, sampler.num_inference_steps, sampler.guidance_scale, len(labels), acc, fd, wall,
                     judge))
        print(f"{name:14s} {kind} {sampler.num_inference_steps:3d} steps  cfg {sampler.guidance_scale:.1f}  "
              f"accuracy {acc:.3f}  FD {fd:8.3f}  ({len(labels)} samples in {wall:.0f} s)", flush=True)
        if args.grid_dir:
            path = save_grid(images, sampler.num_classes, Path(args.grid_dir) / f"samples_{name}.png",
                             invert=sampler.channels == 1)
            print(f"{name:14s} wrote {path} (one row per class, seed {args.seed})")
    for judge, (n, real_acc, baseline) in real_rows.items():
        print(f"{'real (test)':14s} {judge}: accuracy {real_acc:.3f}  FD {baseline:8.3f}  "
              f"({n} held-out real images vs training images)")

    if not args.doc:
        return
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python examples/evaluate_reference_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else ""
    for judge, (n_real, real_acc, baseline) in real_rows.items():
        data = "digits" if judge.startswith("digits") else "crops"
        start, end = _markers(data)
        table = [
            start,
            f"Measured {date} on {cpu_name()} ({args.threads} threads), torch {torch.__version__}, "
            f"seed {args.seed}, {args.per_class} samples per class, with `{command.strip()}`:",
            "",
            f"| model | sampler | guidance | samples | class accuracy | Frechet distance to held-out {data} | "
            "sampling time |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, kind, steps, scale, n, acc, fd, wall, j in rows:
            if j == judge:
                table.append(f"| `{name}` | {kind}, {steps} steps | {scale:.1f} | {n} | {acc:.1%} | {fd:.2f} | "
                             f"{wall:.0f} s |")
        table.append(f"| real held-out {data} ({n_real}) | - | - | - | {real_acc:.1%} | {baseline:.2f} "
                     f"(to training {data}) | - |")
        table.append(end)
        block = "\n".join(table)
        if start in text and end in text:
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, b=block: b, text, flags=re.S)
        else:
            text = text + "\n" + block + "\n"
    doc.write_text(text)
    print(f"updated {doc}")


if __name__ == "__main__":
    main()
