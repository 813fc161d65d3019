r"""Are the experts worth matching? Each epoch of an expert trajectory, read out.

Parameter matching (mtt, iadd; MKDT with knowledge-distillation experts)
learns a set whose short student run reproduces a segment of an expert's
trajectory. A perfect set can then teach a student no more than the
expert's own checkpoints hold. This script reads every saved epoch of the
chosen experts of a buffer (`<workdir>/experts_<objective>`) two ways:

* the experts' own label-free objective ("mse" buffers): the relative
  squared error (1 - R^2) of the head's prediction of the teacher's
  representation on the target's test images, which no expert trained on;
* the probe read-outs of the config (`probe.representation`, as the table
  reads its students) on the target; epoch 0 is the expert's random
  initialisation, its own `none`.

Command (from the repository root; the workdir holds the buffer, e.g. the
one `distill table` trained for the mtt / iadd rows):
  python experiments/expert_probe.py --config experiments/configs/cifar10_effect.py \
      --workdir runs/effect_n100_iadd --experts 4 --out experiments/results/expert_probe_n100.json
"""

from __future__ import annotations

import argparse
import json
import sys


from distill import files
from distill.config import load_config
from distill.errors import DistillError
from distill.eval import transfer
from distill.methods import experts
from distill.nn.models import extract_features
from distill.stages import artefacts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True, help="holds the teacher and the buffer")
  parser.add_argument("--experts", type=int, nargs="+", default=[-1],
                      help="expert numbers (default: the last, the held-out one)")
  parser.add_argument("--readouts", nargs="+", default=["linear_probe_5pct", "linear_probe"])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--out", required=True, help="the .json to write")
  args = parser.parse_args(argv)

  config = load_config(args.config, args.set)
  directory = experts.buffer_dir(args.workdir, config.experts.objective)
  try:
    buffer = experts.load_buffer(directory)
  except DistillError as e:   # a missing, unreadable or mixed buffer
    raise SystemExit(str(e)) from None
  count = len(buffer.trajectories)
  chosen = [e % count for e in args.experts if -count <= e < count]
  if len(chosen) != len(args.experts):
    raise SystemExit(f"--experts {args.experts}: the buffer {directory} holds {count} experts")
  teacher = artefacts.workdir_teacher(config, args.workdir)
  source = artefacts.load_source(config)
  x_train, y_train, x_test, y_test = artefacts.load_target(
      config, source.images.shape[1:], teacher.mean, teacher.std)
  meta = buffer.meta
  model = experts.expert_model(meta["arch"], meta["num_outputs"])
  mse = meta["objective"] == "mse"
  # The head predicts what the expert regressed: the raw or the standardised representation.
  truth = experts.to_expert_space(meta, teacher.features(x_test)) if mse else None

  points = []
  for e in chosen:
    for epoch in range(buffer.epochs + 1):
      variables = {"params": buffer.checkpoint(e, epoch)}
      f_train = extract_features(model, variables, x_train, kind=config.probe.representation)
      f_test = extract_features(model, variables, x_test, kind=config.probe.representation)
      point = dict(expert=e, epoch=epoch, readouts=transfer.probe_accuracies(
          args.readouts, f_train, y_train, f_test, y_test, config.probe, args.seed))
      if mse:
        point["teacher_rel_error"] = transfer.relative_error(
            transfer.head_predictions(model, variables, x_test), truth)
      points.append(point)
      print(json.dumps(point), flush=True)
  files.write_atomic(args.out, json.dumps(dict(
      config=args.config, workdir=args.workdir, buffer=directory, objective=meta["objective"],
      arch=meta["arch"], lr=meta.get("lr"), augment=config.experts.augment,
      momentum=meta.get("momentum"), standardized_targets="target_scale" in meta,
      representation=config.probe.representation, points=points), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
