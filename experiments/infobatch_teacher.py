r"""InfoBatch on Barlow Twins teacher training: sample-steps saved vs probe accuracy.

Command (from the repository root):
  nice -n 10 .venv/bin/python experiments/infobatch_teacher.py \
      --workdir runs/selection_cifar10/infobatch

Trains the cifar10_selection.py teacher (width-32 ConvNet, 5k CIFAR-10
images, 10 epochs, batch 256) twice through `distill.infobatch.train_teacher`:
with prune_ratio 0 (full data, same code path and schedule) and with the
config's InfoBatch setting (r = 0.5, delta = 0.8). Each teacher is
linear-probed on CIFAR-10 (5k train / 10k test) and on Imagenette-32
(3k train / 3,925 val). Writes experiments/results/selection_infobatch.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from distill import data, infobatch, transfer  # noqa: E402
from distill.config import load_config  # noqa: E402

CONFIG = os.path.join(ROOT, "experiments", "configs", "cifar10_selection.py")
RESULTS = os.path.join(ROOT, "experiments", "results", "selection_infobatch.md")


def probe(teacher, source: str, train_split: str, test_split: str, num_train: int, config):
  """Linear-probe accuracy of the teacher's frozen features on a labelled dataset."""
  train = data.subsample(data.load_dataset(source, train_split), num_train, 0)
  test = data.load_dataset(source, test_split)
  shape = teacher.image_shape
  features = lambda ds: teacher.features(data.normalize(
      data.match_format(ds.images, shape[0], shape[2]), teacher.mean, teacher.std))
  return transfer.linear_probe(features(train), train.labels, features(test), test.labels,
                               regs=tuple(config.probe.regs),
                               val_fraction=config.probe.val_fraction)["accuracy"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "selection_cifar10",
                                                        "infobatch"))
  args = parser.parse_args()
  config = load_config(CONFIG)
  source = data.subsample(data.load_dataset(config.data.source, "train"),
                          config.data.num_source, config.seed)
  rows = []
  for label, ratio in (("full data", 0.0), ("InfoBatch", config.teacher.infobatch.prune_ratio)):
    with config.unlocked():
      config.teacher.infobatch.prune_ratio = ratio
    t0 = time.perf_counter()
    workdir = os.path.join(args.workdir, f"r{ratio:g}")
    teacher, report = infobatch.train_teacher(config, workdir, source.images)
    cifar = probe(teacher, config.data.source, "train", "test", 5000, config)
    nette = probe(teacher, config.data.target, "train", "val", 3000, config)
    rows.append((label, ratio, report, cifar, nette, time.perf_counter() - t0))
    print(f"{label}: {report['steps']}/{report['full_data_steps']} steps, skipped "
          f"{report['skipped_fraction']:.3f}, CIFAR-10 probe {cifar:.4f}, Imagenette {nette:.4f}",
          flush=True)
  ib = config.teacher.infobatch
  lines = [
      "# InfoBatch on Barlow Twins teacher training (CIFAR-10, reduced scale)", "",
      "Command: `nice -n 10 .venv/bin/python experiments/infobatch_teacher.py`",
      "Machine: 2-core CPU, shared (timings are noisy).", "",
      f"Teacher: width-32 ConvNet, projector (512, 512), {config.data.num_source} CIFAR-10 "
      f"training images, {config.teacher.epochs} epochs, batch {config.teacher.batch_size}, "
      f"AdamW lr {config.teacher.lr} with warm-up + cosine on epoch progress. InfoBatch: "
      f"r = {ib.prune_ratio}, delta = {ib.delta} (full data from epoch "
      f"{infobatch.anneal_start(config.teacher.epochs, ib.delta)}), per-sample score "
      "||z1_i - z2_i||^2 of the standardised projections. One seed.", "",
      "| run | optimiser steps | steps vs full | sample-visits skipped | train s (incl. probe) "
      "| probe CIFAR-10 (5k/10k) | probe Imagenette-32 (3k/3,925) |",
      "|---|---|---|---|---|---|---|"]
  for label, ratio, report, cifar, nette, seconds in rows:
    lines.append(f"| {label} (r={ratio:g}) | {report['steps']} | {report['step_fraction']:.3f} "
                 f"| {100 * report['skipped_fraction']:.1f}% | {report['train_seconds']:.0f} "
                 f"({seconds:.0f}) | {100 * cifar:.2f} | {100 * nette:.2f} |")
  lines += ["", "Pruned per epoch (InfoBatch run): "
            + ", ".join(str(p) for p in rows[-1][2]["pruned_per_epoch"]), ""]
  text = "\n".join(lines)
  print(text)
  with open(RESULTS, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
