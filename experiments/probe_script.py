"""The shared start of the probe scripts (krr_st_targets.py, representation_headroom.py).

They are run as `python experiments/<name>.py`, so this folder is on sys.path.
"""

from __future__ import annotations

import argparse
import os

from distill.config import load_config
from distill.stages import artefacts


def start(parser: argparse.ArgumentParser, argv, readouts: list[str]):
  """Adds --config/--workdir/--readouts/--seed/--set/--out, parses, loads.

  Refuses an --out that exists, so a finished record is never overwritten.

  Returns:
    (args, config, the workdir's teacher (imported on first use)).
  """
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True, help="holds (or imports) the teacher")
  parser.add_argument("--readouts", nargs="+", default=readouts)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--out", required=True, help="the .json to write")
  args = parser.parse_args(argv)
  if os.path.exists(args.out):
    raise SystemExit(f"--out {args.out} exists; remove it or choose another path")
  config = load_config(args.config, args.set)
  return args, config, artefacts.workdir_teacher(config, args.workdir)
