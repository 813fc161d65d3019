"""The `distill` command: a thin launcher over the stages (distill/stages/).

    distill run      --config CFG[:variant] --workdir DIR [--set key=value ...]
    distill teacher  ...   (stage 1: Barlow Twins teacher)
    distill krr-st   ...   (stage 2: KRR-ST distillation, exports synthetic.npz)
    distill experts  ...   (expert trajectories for parameter matching -> experts/)
    distill param-match ... (IADD / MTT, exports synthetic_<method>.npz)
    distill table    ...   (stage 3: every row's set, pretrain, probe/fine-tune;
                            `transfer` is the same command)
    distill prune-source ... (source groups voted by the target -> source_pruning.npz)
    distill influence ...  (label-free influence, duplicates, outliers -> influence.npz)
    distill inspect  FILE.npz [--png OUT.png]

Bad input ends with a one-line `error: ...` on stderr and exit status 2.
A killed stage resumes from its last checkpoint when the same command is
run again.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="distill", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_text in (("run", "all stages: teacher, KRR-ST, export, transfer"),
                          ("teacher", "train the Barlow Twins teacher"),
                          ("krr-st", "distil the source with KRR-ST"),
                          ("experts", "train the expert trajectories for parameter matching"),
                          ("param-match", "distil by (importance-weighted) parameter matching"),
                          ("table", "the results table: sets, pretraining, read-outs"),
                          ("transfer", "the same as `table`"),
                          ("prune-source", "keep the source groups the target votes for"),
                          ("influence", "label-free influence and duplicate scores of the source")):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", required=True, help="experiments/configs/FILE.py[:variant]")
    p.add_argument("--workdir", required=True, help="where artefacts and checkpoints go")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set krr_st.steps=500")
  p = sub.add_parser("inspect", help="validate a synthetic .npz, summarise it, save a grid PNG")
  p.add_argument("file")
  p.add_argument("--png", default=None, help="grid PNG path (default: next to the file)")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  # Imported late so that `distill --help` is instant and TF/JAX load only when needed.
  from distill.errors import DistillError
  try:
    if args.command == "inspect":
      from distill.data import synthetic_set
      print(synthetic_set.inspect(args.file, args.png))
      return 0
    from distill.config import load_config
    from distill.stages import artefacts, pipeline
    config = load_config(args.config, args.set)
    stage = pipeline.STAGES[args.command]
    if args.command != "run":
      artefacts.prepare_workdir(config, args.workdir)
    stage(config, os.path.abspath(args.workdir))
    return 0
  except DistillError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: run the same command again to resume from the last checkpoint",
          file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
