r"""Source pruning for transfer: LM / FM voting vs random pruning of CIFAR-10 classes.

Command (from the repository root):
  nice -n 10 .venv/bin/python experiments/source_pruning.py \
      --workdir runs/selection_cifar10/prune

Source: 5k labelled CIFAR-10 training images (groups = its 10 classes);
target: Imagenette-32. One surrogate (width-32 ConvNet, 4 epochs) gives both
LM and FM votes from 3k Imagenette training images
(`distill.stages.selection.run_prune_source`). For each kept set (all classes;
LM / FM / random at 50% and 20% of the classes kept, i.e. 50% / 80% pruned),
a fresh width-32 ConvNet is trained with cross-entropy on the kept images for
the same number of epochs (so pruning also saves steps), and its frozen
features are linear-probed on Imagenette-32 (3k train / 3,925 val).
Writes experiments/results/selection_source_pruning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from distill.config import load_config  # noqa: E402
from distill.data import datasets  # noqa: E402
from distill.eval import transfer  # noqa: E402
from distill.nn.models import extract_features  # noqa: E402
from distill.selection import source_pruning as sp  # noqa: E402
from distill.stages.selection import run_prune_source  # noqa: E402

CONFIG = os.path.join(ROOT, "experiments", "configs", "cifar10_selection.py")
RESULTS = os.path.join(ROOT, "experiments", "results", "selection_source_pruning.md")
EVAL_EPOCHS = 6
RANDOM_SEEDS = (0, 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "selection_cifar10",
                                                        "prune"))
  args = parser.parse_args()
  t_start = time.perf_counter()
  config = load_config(CONFIG)
  os.makedirs(args.workdir, exist_ok=True)
  voted = run_prune_source(config, args.workdir)
  with np.load(os.path.join(args.workdir, sp.ARTEFACT)) as f:
    votes = json.loads(str(f["meta"]))["votes"]
  vote_seconds = time.perf_counter() - t_start

  full = datasets.load_dataset(config.data.source, "train")
  source = datasets.subsample(full, config.data.num_source, config.seed)
  names = source.class_names or tuple(str(i) for i in range(10))
  mean, std = datasets.channel_stats(source.images)
  x_source = datasets.normalize(source.images, mean, std)
  groups = voted.groups
  target = datasets.load_dataset(config.data.target, "train")
  target = datasets.subsample(target, config.data.num_target_train, config.seed)
  test = datasets.load_dataset(config.data.target, "val")
  x_train, x_test = (datasets.normalize(datasets.match_format(d.images, 32, 3), mean, std)
                     for d in (target, test))

  arms = [("full source", np.arange(10))]
  for keep in (0.5, 0.2):
    for method in ("lm", "fm"):
      arms.append((f"{method.upper()} keep {keep:.0%}", sp.top_groups(votes[method], keep)))
    for seed in RANDOM_SEEDS:
      arms.append((f"random keep {keep:.0%} (seed {seed})",
                   sp.random_group_pruning(groups, 10, keep, seed).kept_groups))
  cfg = config.selection.prune
  surrogate_epochs = cfg.epochs
  with cfg.unlocked():
    cfg.epochs = EVAL_EPOCHS
  rows, done = [], {}
  for label, kept in arms:
    key = tuple(sorted(kept.tolist()))
    if key in done:  # LM and FM often agree: train each kept set once
      rows.append((label, kept, *done[key][1:]))
      continue
    t0 = time.perf_counter()
    idx = sp.kept_indices(groups, kept)
    labels = np.searchsorted(np.asarray(key), groups[idx]).astype(np.int32)
    name = "eval_" + "_".join(map(str, key))
    model, variables = sp.train_surrogate(cfg, x_source[idx], labels, len(key), config.seed,
                                          os.path.join(args.workdir, name), quiet=True)
    features = lambda x: extract_features(model, variables, x)
    acc = transfer.linear_probe(features(x_train), target.labels, features(x_test), test.labels,
                                regs=tuple(config.probe.regs),
                                folds=config.probe.folds)["accuracy"]
    steps = EVAL_EPOCHS * (len(idx) // min(cfg.batch_size, len(idx)))
    done[key] = (label, len(idx), steps, acc, time.perf_counter() - t0)
    rows.append((label, kept, *done[key][1:]))
    print(f"{label}: {[names[g] for g in key]} {len(idx)} images, {steps} steps, "
          f"probe {acc:.4f}", flush=True)
  seconds = time.perf_counter() - t_start
  lines = [
      "# Source pruning for transfer: CIFAR-10 classes voted by Imagenette-32", "",
      "Command: `nice -n 10 .venv/bin/python experiments/source_pruning.py`",
      f"Machine: 2-core CPU, shared. Duration: {seconds:.0f} s in all "
      f"({vote_seconds:.0f} s for the surrogate and votes).", "",
      f"Source: {len(groups)} CIFAR-10 training images, groups = the 10 classes. Votes of "
      f"{len(x_train)} Imagenette-32 training images through a width-32 ConvNet surrogate "
      f"({surrogate_epochs} epochs of cross-entropy).", "",
      "| class | " + " | ".join(names) + " |", "|---" * 11 + "|",
      "| LM votes | " + " | ".join(map(str, votes["lm"])) + " |",
      "| FM votes | " + " | ".join(map(str, votes["fm"])) + " |", "",
      f"Each kept set trains a fresh width-32 ConvNet with cross-entropy for {EVAL_EPOCHS} "
      "epochs (batch 128, Adam 2e-3, cosine); its frozen features are linear-probed on "
      "Imagenette-32 (3,000 train / 3,925 val). One training seed per kept set.", "",
      "| kept set | classes kept | images | train steps | probe accuracy |",
      "|---|---|---|---|---|"]
  for label, kept, n_images, steps, acc, _ in rows:
    lines.append(f"| {label} | {', '.join(names[g] for g in kept)} | {n_images} | {steps} "
                 f"| {100 * acc:.2f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  with open(RESULTS, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
