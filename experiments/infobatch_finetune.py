r"""InfoBatch on fine-tuning: sample-steps saved vs transfer accuracy.

Command (from the repository root, after experiments/infobatch_teacher.py,
whose seed-0 full-data teacher is the pretrained backbone here):
  nice -n 10 .venv/bin/python experiments/infobatch_finetune.py --seeds 0 1 2

Fine-tunes all layers of that CIFAR-10 Barlow Twins ConvNet (new head) on
3,000 Imagenette-32 training images and tests on its 3,925 validation
images, through `distill.eval.transfer.finetune` with `finetune.infobatch`
prune_ratio 0 (full data) and 0.5 (delta 0.875), once per seed. Writes
experiments/results/selection_infobatch_finetune.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import ml_collections
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from distill.config import load_config  # noqa: E402
from distill.data import datasets  # noqa: E402
from distill.eval import table, transfer  # noqa: E402
from distill.eval.table import mean_std_text  # noqa: E402
from distill.methods import barlow_twins  # noqa: E402

CONFIG = os.path.join(ROOT, "experiments", "configs", "cifar10_selection.py")
RESULTS = os.path.join(ROOT, "experiments", "results", "selection_infobatch_finetune.md")
RUNS = os.path.join(ROOT, "runs", "selection_cifar10")


def finetune_config(prune_ratio: float) -> ml_collections.ConfigDict:
  """The table's fine-tuning protocol on more data and epochs, InfoBatch optional."""
  return ml_collections.ConfigDict(dict(
      epochs=20, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, augment=True,
      num_train=0, infobatch=dict(prune_ratio=prune_ratio, delta=0.875)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--teacher", default=os.path.join(RUNS, "infobatch", "seed0", "r0",
                                                        "teacher"))
  parser.add_argument("--workdir", default=os.path.join(RUNS, "infobatch_finetune"))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--prune-ratio", type=float, default=0.5)
  args = parser.parse_args()
  config = load_config(CONFIG)
  teacher = barlow_twins.load_teacher(args.teacher)
  shape = teacher.image_shape
  prep = lambda ds: datasets.normalize(datasets.match_format(ds.images, shape[0], shape[2]),
                                       teacher.mean, teacher.std)
  train = datasets.subsample(datasets.load_dataset(config.data.target, "train"), 3000, 0)
  test = datasets.load_dataset(config.data.target, "val")
  x_train, x_test = prep(train), prep(test)
  runs = []
  for seed in args.seeds:
    for ratio in (0.0, args.prune_ratio):
      cfg = finetune_config(ratio)
      t0 = time.perf_counter()
      out = transfer.finetune(cfg, table.arch_of(teacher.model), teacher.variables, x_train,
                              train.labels, x_test, test.labels, seed, args.workdir,
                              f"seed{seed}_r{ratio:g}", quiet=False)
      runs.append(dict(ratio=ratio, seed=seed, seconds=time.perf_counter() - t0,
                       skipped=out.get("skipped_fraction", 0.0), **out))
      print(f"seed {seed} r={ratio:g}: {out['steps']} steps, skipped "
            f"{runs[-1]['skipped']:.3f}, accuracy {out['accuracy']:.4f}", flush=True)
  text = report_markdown(args, runs)
  print(text)
  with open(RESULTS, "w") as f:
    f.write(text)



def report_markdown(args, runs: list[dict]) -> str:
  cfg = finetune_config(args.prune_ratio)
  full_steps = cfg.epochs * (3000 // cfg.batch_size)
  lines = [
      "# InfoBatch on fine-tuning (CIFAR-10 Barlow Twins ConvNet → Imagenette-32)", "",
      "Command: `nice -n 10 .venv/bin/python experiments/infobatch_finetune.py --seeds "
      f"{' '.join(map(str, args.seeds))}`",
      "Machine: 2-core CPU, shared with other jobs (timings are noisy).", "",
      "Backbone: the seed-0 full-data teacher of `selection_infobatch.md` (width-32 ConvNet, "
      "5k CIFAR-10 images, 10 epochs). Fine-tuning: all layers, new head, 3,000 Imagenette-32 "
      f"training images, {cfg.epochs} epochs, batch {cfg.batch_size}, SGD lr {cfg.lr} momentum "
      f"{cfg.momentum} wd {cfg.weight_decay}, cosine on epoch progress, crop + flip; test on "
      "the 3,925 validation images. InfoBatch: r = "
      f"{args.prune_ratio}, delta = {cfg.infobatch.delta}, score = the sample's cross-entropy. "
      "The seed sets the head, the batches and the pruning draws.", "",
      "| run | seed | optimiser steps | steps vs full | sample-visits skipped | seconds "
      "| top-1 (%) |", "|---|---|---|---|---|---|---|"]
  for r in runs:
    lines.append(f"| r={r['ratio']:g} | {r['seed']} | {r['steps']} | "
                 f"{r['steps'] / full_steps:.3f} | {100 * r['skipped']:.1f}% | "
                 f"{r['seconds']:.0f} | {100 * r['accuracy']:.2f} |")
  lines += ["", "Mean ± std over seeds:", "",
            "| run | sample-visits skipped | steps vs full | seconds | top-1 (%) |",
            "|---|---|---|---|---|"]
  for ratio in (0.0, args.prune_ratio):
    group = [r for r in runs if r["ratio"] == ratio]
    lines.append(f"| r={ratio:g} | {mean_std_text([100 * r['skipped'] for r in group])}% | "
                 f"{np.mean([r['steps'] for r in group]) / full_steps:.3f} | "
                 f"{mean_std_text([r['seconds'] for r in group])} | "
                 f"{mean_std_text([100 * r['accuracy'] for r in group])} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
