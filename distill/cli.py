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
import textwrap


# Each command: (one-line help, what it needs and writes).
COMMANDS = {
    "run": ("all stages: teacher, KRR-ST, export, transfer",
            "Runs teacher -> krr-st -> table in one workdir; finished stages are skipped."),
    "teacher": ("train the Barlow Twins teacher",
                "Needs only the source (data.source). Writes WORKDIR/teacher/."),
    "import-teacher": ("use a saved teacher or a torchvision-layout ResNet checkpoint",
                       "Give it with --set teacher.checkpoint=PATH: a folder saved by "
                       "`distill teacher` (teacher.json + variables.msgpack), or a checkpoint "
                       "(.safetensors, .npz; .pt/.pth with torch installed) with its input "
                       "normalisation (teacher.checkpoint_mean/std, ImageNet's by default). "
                       "Writes WORKDIR/teacher/; later stages use it as they would a trained "
                       "one."),
    "export-teacher": ("write the teacher as torchvision-layout .safetensors",
                       "Needs a torchvision-layout teacher (tv_resnet18/34/50, trained or "
                       "imported). Writes WORKDIR/teacher/backbone_torchvision.safetensors."),
    "krr-st": ("distil the source with KRR-ST",
               "Needs a trained teacher in WORKDIR/teacher/ (run `distill teacher` first, same "
               "--config and --workdir). Writes WORKDIR/synthetic.npz and its image grid."),
    "experts": ("train the expert trajectories for parameter matching",
                "experts.objective='mse' needs the teacher in WORKDIR/teacher/; 'ce' needs a "
                "labelled source. Writes WORKDIR/experts_<objective>/."),
    "param-match": ("distil by (importance-weighted) parameter matching",
                    "Needs the experts (`distill experts`). Writes WORKDIR/synthetic_<name>.npz."),
    "table": ("the results table: sets, pretraining, read-outs",
              "Needs the teacher; builds every row's set it lacks. Writes WORKDIR/table.{md,json,"
              "csv,png}."),
    "transfer": ("the same as `table`", "The same as `distill table`."),
    "prune-source": ("keep the source groups the target votes for",
                     "Needs the teacher only for k-means groups. Writes "
                     "WORKDIR/source_pruning.npz."),
    "influence": ("label-free influence and duplicate scores of the source",
                  "Needs the teacher. Writes WORKDIR/influence.npz."),
}

EXAMPLES = """examples:
  distill run --config experiments/configs/fashion_mnist_quickstart.py --workdir runs/quickstart
  distill teacher --config experiments/configs/cifar10_krr_st.py --workdir runs/c10
  distill krr-st  --config experiments/configs/cifar10_krr_st.py --workdir runs/c10 \\
      --set krr_st.steps=500
  distill inspect runs/c10/synthetic.npz
"""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="distill", description=__doc__.split("\n\n")[0],
                                   epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (help_text, details) in COMMANDS.items():
    example = (f"example:\n  distill {name} --config experiments/configs/"
               f"fashion_mnist_quickstart.py --workdir runs/quickstart")
    p = sub.add_parser(name, help=help_text,
                       description=textwrap.fill(f"{help_text}. {details}", 79),
                       epilog=example, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiments/configs/FILE.py[:variant]")
    p.add_argument("--workdir", required=True, help="where artefacts and checkpoints go")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set krr_st.steps=500")
  p = sub.add_parser("inspect", help="validate a synthetic .npz, summarise it, save a grid PNG",
                     epilog="example:\n  distill inspect runs/quickstart/synthetic.npz",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    from distill.nn import parallel
    # Before anything touches a device: a multi-process run joins its peers here.
    try:
      parallel.initialize(config.parallel.coordinator_address, config.parallel.num_processes,
                          config.parallel.process_id)
    except ValueError as e:
      raise DistillError(str(e)) from None
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
