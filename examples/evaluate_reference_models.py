"""Measure the sample quality of the reference models at their default samplers.

    python examples/evaluate_reference_models.py --threads 2

For each model: class accuracy of 200 samples (20 per digit) by the shipped digit classifier, and
the Frechet distance of the classifier features of those samples to the held-out real digits.
For scale, the Frechet distance of the held-out real digits to the training digits is printed
too. The table is also written into docs/reference_models.md, between the results markers.
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

START, END = "<!-- results:start -->", "<!-- results:end -->"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc", default="docs/reference_models.md", help="markdown file to update ('' to skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    real_test, _ = metrics.real_digits("test")
    real_train, _ = metrics.real_digits("train")
    baseline = metrics.frechet_distance(real_test, real_train)
    labels = [c for c in range(10) for _ in range(args.per_class)]

    rows = []
    for name in zoo.available():
        sampler = zoo.load(name)
        start = time.time()
        images = sampler(labels, seed=args.seed)
        wall = time.time() - start
        acc = metrics.class_accuracy(images, labels)
        fd = metrics.frechet_distance(images, real_test)
        rows.append((name, sampler.num_inference_steps, sampler.guidance_scale, acc, fd, wall))
        print(f"{name:14s} steps {sampler.num_inference_steps:3d}  cfg {sampler.guidance_scale:.1f}  "
              f"accuracy {acc:.3f}  FD {fd:8.3f}  ({len(labels)} samples in {wall:.0f} s)", flush=True)
    real_acc = metrics.class_accuracy(*metrics.real_digits("test"))
    print(f"{'real (test)':14s} {'':22s} accuracy {real_acc:.3f}  "
          f"FD {baseline:8.3f}  (held-out real digits vs training digits)")

    if not args.doc:
        return
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = [
        START,
        f"Measured {date} on {cpu_name()} ({args.threads} threads), torch {torch.__version__}, "
        f"seed {args.seed}, {len(labels)} samples ({args.per_class} per digit), with",
        "`python examples/evaluate_reference_models.py`:",
        "",
        "| model | sampler | guidance | class accuracy | Frechet distance to held-out digits | sampling time |",
        "|---|---|---|---|---|---|",
    ]
    for name, steps, scale, acc, fd, wall in rows:
        kind = "DDIM" if "mmdit" not in name else "flow-match Euler"
        table.append(f"| `{name}` | {kind}, {steps} steps | {scale:.1f} | {acc:.1%} | {fd:.2f} | {wall:.0f} s |")
    table.append(f"| real held-out digits (450) | - | - | {real_acc:.1%} | {baseline:.2f} (to training digits) | - |")
    table.append(END)
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else ""
    block = "\n".join(table)
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text + "\n" + block + "\n"
    doc.write_text(text)
    print(f"updated {doc}")


if __name__ == "__main__":
    main()
