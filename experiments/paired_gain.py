r"""Paired differences between two sets over seeds, from `pretraining_gain.py` reports.

`pretraining_gain.py` writes one report per seed (`<out>.jsonl`); a claim such
as "the mixed set leads `random` by 0.87 ± 0.14 at 5% labels over 3 seeds"
pairs two of its students on each seed (same teacher, same held-out images,
same read-out draws) and summarises the per-seed differences. This script does
that from the recorded points, so the figure is a command away rather than a
hand calculation:

    python experiments/paired_gain.py --row random_mf2_full500:1000 --against random:1000 \
        --files 1=experiments/results/multi_formation_mixed_n1000_seed1.jsonl \
                2=experiments/results/multi_formation_mixed_n1000_seed2.jsonl

Each row is `SET:N` (the `set` and `n` of the recorded points); by default a
row's longest recorded run is taken on each seed (`--row_steps` /
`--against_steps` name one length instead). The summary is the mean and the
sample standard deviation (ddof = 1) of the per-seed differences, over the
seeds whose reports hold both rows; a seed missing either is listed, not
guessed. A seed whose students ran apart names its reports comma-separated
(`1=a.jsonl,b.jsonl`); their `none` and `teacher` read-outs must agree, as one
seed's do. All files must be read-outs on one target (a report that predates
the recorded target is taken as that target, and the output names the seeds
whose paired points do not record it).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretraining_gain import read_points, set_of  # noqa: E402  (a sibling script)


def parse_row(spec: str) -> tuple[str, int]:
  """`SET:N` -> (set, n), refusing anything else."""
  name, sep, n = spec.rpartition(":")
  if not sep or not name or not n.isdigit():
    raise SystemExit(f"row {spec!r}: expected SET:N, e.g. random:1000")
  return name, int(n)


def pick(points: list[dict], row: tuple[str, int], steps: int | None) -> dict | None:
  """The student point of `row` (its longest run, or the run of `steps`), or None."""
  found = [p for p in points if p["kind"] == "student" and (set_of(p), p.get("n")) == row
           and (steps is None or p.get("steps") == steps)]
  return max(found, key=lambda p: p["steps"]) if found else None


def target_of(points: list[dict]) -> str:
  """The one target a report's points were read on ('' where none records it).

  Points that predate the field sit beside later ones of the same report (a run
  that resumed an older report: pretraining_gain.py refuses to add another target's).
  """
  names = {p.get("target", "") for p in points} - {""}
  if len(names) > 1:
    raise SystemExit(f"a report holds read-outs on several targets: {sorted(names)}")
  return names.pop() if names else ""


def same_references(a: dict, b: dict) -> bool:
  """Whether two read-outs of a reference agree on every read-out both hold (to 1e-4).

  The `none` student of one seed is the same network read with the same label
  draws, so its read-outs repeat across that seed's reports; another seed's
  initialisation and draws move them by far more.
  """
  shared = set(a) & set(b)
  return bool(shared) and all(abs(a[r] - b[r]) <= 1e-4 for r in shared)


def read_seed(paths: list[str]) -> list[dict]:
  """The points of one seed's reports (several where its students ran apart).

  Refuses a path that does not exist, and reports whose `none` or `teacher`
  read-outs disagree: those are not of one seed and target.
  """
  points, refs = [], {}
  for path in paths:
    if not os.path.exists(path):
      raise SystemExit(f"--files: {path} does not exist")
    for p in read_points(path):
      if p["kind"] in ("none", "teacher"):
        first = refs.setdefault(p["kind"], (path, p["readouts"]))
        if not same_references(first[1], p["readouts"]):
          raise SystemExit(f"{path}: its `{p['kind']}` read-outs differ from those in "
                           f"{first[0]}: the reports are not of one seed and target")
      points.append(p)
  return points


def paired(files: dict[str, list[dict]], row, against, readouts, row_steps=None,
           against_steps=None) -> tuple[list[dict], list[str]]:
  """Per-seed pairs and the seeds that lack one of the rows.

  Returns:
    ([{seed, row, against, diff: {readout: points}}], [seeds missing a row]); read-outs
    in percentage points.
  """
  pairs, missing = [], []
  for seed, points in files.items():
    a, b = pick(points, row, row_steps), pick(points, against, against_steps)
    if a is None or b is None:
      missing.append(seed)
      continue
    absent = [r for r in readouts if r not in a["readouts"] or r not in b["readouts"]]
    if absent:
      raise SystemExit(f"seed {seed}: read-outs {absent} are not recorded for both rows")
    pairs.append(dict(seed=seed, row=a, against=b,
                      diff={r: 100 * (a["readouts"][r] - b["readouts"][r]) for r in readouts}))
  return pairs, missing


def summary(pairs: list[dict], readout: str) -> tuple[float, float]:
  """Mean and sample std (ddof = 1; nan for one seed) of the per-seed differences."""
  d = np.array([p["diff"][readout] for p in pairs])
  return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else float("nan")


def report(pairs, missing, row, against, readouts, target: str) -> str:
  """A markdown table: one line per seed, then mean ± std of the differences."""
  fmt = lambda p: " / ".join(f"{100 * p['readouts'][r]:.2f}" for r in readouts)
  err = lambda p: f"{p['held_out_rel_error']:.3f}" if "held_out_rel_error" in p else "-"
  lines = [f"Target: {target or 'the config main target (not recorded)'}; read-outs "
           f"{' / '.join(readouts)} (%); {row[0]} (n = {row[1]}) against {against[0]} "
           f"(n = {against[1]}).\n",
           f"| seed | {row[0]} | {against[0]} | difference | steps | held-out error |",
           "|---|---|---|---|---|---|"]
  for p in pairs:
    lines.append(f"| {p['seed']} | {fmt(p['row'])} | {fmt(p['against'])} | "
                 + " / ".join(f"{p['diff'][r]:+.2f}" for r in readouts)
                 + f" | {p['row']['steps']} / {p['against']['steps']}"
                 + f" | {err(p['row'])} / {err(p['against'])} |")
  stats = [summary(pairs, r) for r in readouts]
  one = len(pairs) == 1  # one seed has no spread to show
  label = "one seed, no spread" if one else f"mean ± std ({len(pairs)} seeds)"
  lines.append(f"| {label} | | | "
               + " / ".join(f"{m:+.2f}" + ("" if one else f" ± {s:.2f}") for m, s in stats)
               + " | | |")
  if missing:
    lines.append(f"\nSeeds without both rows (left out): {', '.join(missing)}.")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--row", required=True, help="SET:N of the row (minuend)")
  parser.add_argument("--against", required=True, help="SET:N it is paired against")
  parser.add_argument("--files", nargs="+", required=True, metavar="SEED=PATH[,PATH...]",
                      help="each seed's pretraining_gain.py report(s) (.jsonl), comma-separated")
  parser.add_argument("--readouts", nargs="+", default=["linear_probe_5pct", "linear_probe"])
  parser.add_argument("--row_steps", type=int, default=None)
  parser.add_argument("--against_steps", type=int, default=None)
  args = parser.parse_args(argv)

  row, against = parse_row(args.row), parse_row(args.against)
  files, targets = {}, {}
  for spec in args.files:
    seed, sep, paths = spec.partition("=")
    if not sep or not seed or not paths:
      raise SystemExit(f"--files {spec!r}: expected SEED=PATH[,PATH...]")
    if seed in files:
      raise SystemExit(f"--files: seed {seed} is given twice")
    files[seed] = read_seed(paths.split(","))
    targets[seed] = target_of(files[seed])
  # Reports written before points recorded their target name none: they pair with
  # any one named target, and the report says which seeds those are.
  named = set(targets.values()) - {""}
  if len(named) > 1:
    raise SystemExit(f"--files: the reports were read on different targets: {targets}")
  pairs, missing = paired(files, row, against, args.readouts, args.row_steps,
                          args.against_steps)
  if not pairs:
    raise SystemExit(f"no seed holds both {args.row} and {args.against}")
  target = named.pop() if named else ""
  # Judged on the two points paired, not the seed's reports: a seed may merge an old
  # report (no target field) with a newer one, and the pair may come from the old.
  unrecorded = [p["seed"] for p in pairs
                if not (p["row"].get("target") and p["against"].get("target"))]
  if target and unrecorded:
    target += (f" (not recorded in the report of seed{'s' if len(unrecorded) > 1 else ''} "
               f"{', '.join(unrecorded)})")
  print(report(pairs, missing, row, against, args.readouts, target), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
