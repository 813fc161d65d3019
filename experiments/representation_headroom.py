r"""How far a teacher stands above random-init features, per view of its features.

A table can only show pretraining where the teacher reads the target better
than the random initialisation every student starts from. This script
probes a workdir's teacher and a random-init backbone of the same
architecture (seed --seed) with the table's probes, for each feature view
(`nn.models.FEATURE_KINDS`: the flattened map and the pooled map), so a
config's `teacher.representation` / `probe.representation` can be set where
the headroom is.

Command (from the repository root; the workdir holds a trained teacher):
  python experiments/representation_headroom.py \
      --config experiments/configs/fashion_mnist_quickstart.py --workdir runs/quickstart \
      --out experiments/results/representation_headroom.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax

from distill import files
from distill.eval import transfer
from distill.nn.models import FEATURE_KINDS, extract_features
from distill.stages import artefacts

import probe_script


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  args, config, teacher = probe_script.start(parser, argv,
                                             ["linear_probe", "linear_probe_1pct"])
  x_train, y_train, x_test, y_test = artefacts.load_target(config, teacher.image_shape,
                                                           teacher.mean, teacher.std)
  backbones = {"teacher": (teacher.model, teacher.variables),
               "random_init": transfer.fresh_backbone(config.teacher, teacher.image_shape,
                                                      args.seed)}
  p = config.probe
  out = {"teacher": teacher.info.get("name", "barlow_twins"), "seed": args.seed, "views": {}}
  for kind in FEATURE_KINDS:
    for name, (model, variables) in backbones.items():
      f_train = extract_features(model, variables, x_train, kind=kind)
      f_test = extract_features(model, variables, x_test, kind=kind)
      accs = transfer.probe_accuracies(args.readouts, f_train, y_train, f_test, y_test, p,
                                       args.seed)
      out["views"].setdefault(kind, {})[name] = accs
      print(f"{kind:8s} {name:11s} " + "  ".join(f"{r} {100 * a:.2f}"
                                                 for r, a in accs.items()), flush=True)
  out.update(command=" ".join(["python", "experiments/representation_headroom.py"]
                              + sys.argv[1:]),
             machine=f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}")
  files.write_json(args.out, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
