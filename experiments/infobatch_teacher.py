r"""InfoBatch on Barlow Twins teacher training: sample-steps saved vs probe accuracy.

Command (from the repository root):
  nice -n 10 .venv/bin/python experiments/infobatch_teacher.py \
      --workdir runs/selection_cifar10/infobatch --seeds 0 1 2

Trains the cifar10_selection.py teacher (width-32 ConvNet, 5k CIFAR-10
images, 10 epochs, batch 256) twice through `distill.stages.teacher.train_infobatch_teacher`:
with prune_ratio 0 (full data, same code path and schedule) and with the
config's InfoBatch setting (r = 0.5, delta = 0.8), once per seed. Each teacher is
linear-probed on CIFAR-10 (5k train / 10k test) and on Imagenette-32
(3k train / 3,925 val). Writes experiments/results/selection_infobatch.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from distill.config import load_config  # noqa: E402
from distill.data import datasets  # noqa: E402
from distill.eval import transfer  # noqa: E402
from distill.eval.table import mean_std_text  # noqa: E402
from distill.selection import infobatch  # noqa: E402
from distill.stages.teacher import train_infobatch_teacher  # noqa: E402

CONFIG = os.path.join(ROOT, "experiments", "configs", "cifar10_selection.py")
RESULTS = os.path.join(ROOT, "experiments", "results", "selection_infobatch.md")


def probe(teacher, source: str, train_split: str, test_split: str, num_train: int, config):
  """Linear-probe accuracy of the teacher's frozen features on a labelled dataset."""
  train = datasets.subsample(datasets.load_dataset(source, train_split), num_train, 0)
  test = datasets.load_dataset(source, test_split)
  shape = teacher.image_shape
  features = lambda ds: teacher.features(datasets.normalize(
      datasets.match_format(ds.images, shape[0], shape[2]), teacher.mean, teacher.std))
  return transfer.linear_probe(features(train), train.labels, features(test), test.labels,
                               regs=tuple(config.probe.regs),
                               folds=config.probe.folds)["accuracy"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "selection_cifar10",
                                                        "infobatch"))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="training seeds (teacher init, augmentations, pruning draws)")
  args = parser.parse_args()
  config = load_config(CONFIG)
  # One fixed source subset and probe split; the seed varies training only.
  source = datasets.subsample(datasets.load_dataset(config.data.source, "train"),
                              config.data.num_source, config.seed)
  runs = []
  for seed in args.seeds:
    for label, ratio in (("full data", 0.0), ("InfoBatch", config.teacher.infobatch.prune_ratio)):
      cfg = config.copy_and_resolve_references()
      with cfg.unlocked():
        cfg.teacher.infobatch.prune_ratio = ratio
        cfg.seed = seed
      workdir = os.path.join(args.workdir, f"seed{seed}", f"r{ratio:g}")
      # A finished teacher is loaded, not retrained; its report keeps the training time.
      teacher, report = train_infobatch_teacher(cfg, workdir, source.images)
      t0 = time.perf_counter()
      cifar = probe(teacher, config.data.source, "train", "test", 5000, config)
      nette = probe(teacher, config.data.target, "train", "val", 3000, config)
      runs.append(dict(label=label, ratio=ratio, seed=seed, report=report, cifar=cifar,
                       nette=nette, probe_seconds=time.perf_counter() - t0))
      print(f"seed {seed} {label}: {report['steps']}/{report['full_data_steps']} steps, skipped "
            f"{report['skipped_fraction']:.3f}, CIFAR-10 probe {cifar:.4f}, Imagenette "
            f"{nette:.4f}", flush=True)
  text = report_markdown(config, runs, args.seeds)
  print(text)
  with open(RESULTS, "w") as f:
    f.write(text)



def report_markdown(config, runs: list[dict], seeds: list[int]) -> str:
  """The results file: per-seed rows, then mean ± std (sample std) per setting."""
  ib = config.teacher.infobatch
  lines = [
      "# InfoBatch on Barlow Twins teacher training (CIFAR-10, reduced scale)", "",
      "Command: `nice -n 10 .venv/bin/python experiments/infobatch_teacher.py "
      f"--seeds {' '.join(map(str, seeds))}`",
      "Machine: 2-core CPU, shared with other jobs (timings are noisy).", "",
      f"Teacher: width-32 ConvNet, projector (512, 512), {config.data.num_source} CIFAR-10 "
      f"training images (one fixed subset), {config.teacher.epochs} epochs, batch "
      f"{config.teacher.batch_size}, AdamW lr {config.teacher.lr} with warm-up + cosine on "
      f"epoch progress. InfoBatch: r = {ib.prune_ratio}, delta = {ib.delta} (full data from "
      f"epoch {infobatch.anneal_start(config.teacher.epochs, ib.delta)}), per-sample score "
      "||z1_i - z2_i||^2 of the standardised projections. The seed sets the teacher's "
      "initialisation, augmentations and pruning draws; the probe splits are fixed.", "",
      "| run | seed | optimiser steps | steps vs full | sample-visits skipped | train s "
      "| probes s | probe CIFAR-10 (5k/10k) | probe Imagenette-32 (3k/3,925) |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    rep = r["report"]
    lines.append(f"| {r['label']} (r={r['ratio']:g}) | {r['seed']} | {rep['steps']} "
                 f"| {rep['step_fraction']:.3f} | {100 * rep['skipped_fraction']:.1f}% "
                 f"| {rep['train_seconds']:.0f} | {r['probe_seconds']:.0f} | {100 * r['cifar']:.2f} "
                 f"| {100 * r['nette']:.2f} |")
  lines += ["", f"Mean ± std over seeds {', '.join(map(str, seeds))}:", "",
            "| run | sample-visits skipped | optimiser steps vs full | train s "
            "| probe CIFAR-10 | probe Imagenette-32 |", "|---|---|---|---|---|---|"]
  for label in ("full data", "InfoBatch"):
    group = [r for r in runs if r["label"] == label]
    lines.append(
        f"| {label} | {mean_std_text([100 * r['report']['skipped_fraction'] for r in group])}% "
        f"| {np.mean([r['report']['step_fraction'] for r in group]):.3f} "
        f"| {mean_std_text([r['report']['train_seconds'] for r in group])} "
        f"| {mean_std_text([100 * r['cifar'] for r in group])} "
        f"| {mean_std_text([100 * r['nette'] for r in group])} |")
  last = [r for r in runs if r["label"] == "InfoBatch"][-1]["report"]
  lines += ["", "Pruned per epoch (InfoBatch, last seed): "
            + ", ".join(str(p) for p in last["pruned_per_epoch"]), ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
