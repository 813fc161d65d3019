r"""How to make `full` (regress the teacher on the whole source) reproduce it.

The upper reference of the results table pretrains a fresh network on every
source image with the teacher's representations as targets. This script
trains that network under several recipes and reports, for each, the
method's own held-out objective — the relative squared error of the head's
prediction of the teacher's representation on source images it never saw
(1 - R^2, in the space of the training targets) — and, for information only,
the linear-probe accuracy on the target (the recipe is chosen by the
held-out error, never by the probe).

Command (from the repository root; the teacher of the table's workdir):
  python experiments/full_regression.py --config experiments/configs/cifar10_table.py \
      --workdir runs/c10t30 --recipes noaug --epochs 30 --out runs/full_regression.jsonl

When the source is a whole split, hold some of it out (e.g. the effect
table's all-50k source with --set data.num_source=48000):
  python experiments/full_regression.py --config experiments/configs/cifar10_effect.py \
      --workdir runs/full_effect --recipes noaug --epochs 10 20 \
      --readouts linear_probe_5pct linear_probe --set data.num_source=48000 \
      --out runs/full_effect/full_regression.jsonl

Recipes (each a set of `pretrain` overrides; see RECIPES below). Each line's
`probe` is {read-out: top-1}, the backbone read through `probe.representation`.
Recorded results: experiments/results/full_regression.md, full_regression_effect.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from distill.config import apply_overrides, load_config
from distill.data import datasets
from distill.eval import transfer
from distill.nn.models import build_model, extract_features
from distill.stages import artefacts

RECIPES = {
    # No augmentation, raw targets.
    "noaug_raw": ("pretrain.augment=False", "pretrain.standardize_targets=False"),
    # No augmentation, standardised targets (the default).
    "noaug": ("pretrain.augment=False", "pretrain.standardize_targets=True"),
    # Crop + flip with the teacher's targets recomputed on each view.
    "aug_views": ("pretrain.augment=True", "pretrain.standardize_targets=True"),
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True, help="holds teacher/")
  parser.add_argument("--recipes", nargs="+", default=["noaug", "aug_views"],
                      choices=sorted(RECIPES))
  parser.add_argument("--epochs", type=int, nargs="+", default=[10])
  parser.add_argument("--held_out", type=int, default=2000,
                      help="source-split images outside the source subset, for the error")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--readouts", nargs="+", default=["linear_probe"],
                      help="probe read-outs (information only), e.g. linear_probe_5pct")
  parser.add_argument("--out", default="", help="append result lines (JSON) to this file")
  args = parser.parse_args(argv)

  config = load_config(args.config, args.set)
  teacher = artefacts.workdir_teacher(config, args.workdir)
  source = artefacts.load_source(config)
  everything = datasets.load_dataset(config.data.source, config.data.source_split,
                                     cache_dir=config.data.cache_dir or None)
  # The source subset is a seeded subsample of the split: held-out images are
  # those of the split that are not in it (compared by content).
  in_source = {x.tobytes() for x in source.images}
  outside = [i for i in range(len(everything.images))
             if everything.images[i].tobytes() not in in_source][:args.held_out]
  if not outside:
    raise SystemExit(f"the source holds all {len(everything.images)} images of "
                     f"{config.data.source}:{config.data.source_split}, so none are held out "
                     f"for the error; lower data.num_source (e.g. --set data.num_source="
                     f"{len(everything.images) - args.held_out})")
  x_held = datasets.normalize(everything.images[outside], teacher.mean, teacher.std)
  y_held = teacher.features(x_held)
  x_src = datasets.normalize(source.images, teacher.mean, teacher.std)
  y_src = artefacts.source_features(source, teacher)
  target = artefacts.load_target(config, source.images.shape[1:], teacher.mean, teacher.std)
  teacher_fn = jax.jit(lambda x: teacher.represent(teacher.variables, x))

  def probe(model, variables) -> dict:
    # {read-out: top-1}, through the view the probe config names, as the table reads.
    kind = config.probe.representation
    f = lambda x: extract_features(model, variables, x, kind=kind)
    return transfer.probe_accuracies(args.readouts, f(target[0]), target[1], f(target[2]),
                                     target[3], config.probe, args.seed)

  none_model, none_vars = transfer.fresh_backbone(config.pretrain, source.images.shape[1:],
                                                  args.seed)
  lines = [dict(recipe="none", probe=probe(none_model, none_vars)),
           dict(recipe="teacher", probe=probe(teacher.model, teacher.variables))]
  print(json.dumps(lines[0]), json.dumps(lines[1]), sep="\n", flush=True)
  for recipe in args.recipes:
    for epochs in args.epochs:
      cfg = config.copy_and_resolve_references()
      apply_overrides(cfg, (*RECIPES[recipe], f"pretrain.epochs={epochs}"))
      pre = cfg.pretrain
      t0 = time.perf_counter()
      name = f"full_regression_{recipe}_e{epochs}_seed{args.seed}"
      model, variables = transfer.pretrain(pre, x_src, y_src, args.seed,
                                           os.path.join(args.workdir, "full_regression"), name,
                                           kind="teacher", teacher_fn=teacher_fn)
      seconds = time.perf_counter() - t0
      outputs = transfer.head_predictions(build_model(pre.arch, num_outputs=y_src.shape[1]),
                                          variables, x_held)
      # The head predicts the training targets' space: map the held-out ones the same way.
      truth = transfer.target_standardizer(y_src)(y_held) if pre.standardize_targets else y_held
      error = transfer.relative_error(outputs, truth)
      line = dict(recipe=recipe, epochs=epochs, seed=args.seed, held_out_rel_error=error,
                  seconds=seconds, probe=probe(model, variables))
      lines.append(line)
      print(json.dumps(line), flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps(line) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
