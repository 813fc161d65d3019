r"""The share of full-resolution images in a mixed multi-formation set, chosen by held-out error.

A mixed set (`pretraining_gain.py --multi_formation F:N:K`) stores N images: K
real images at full resolution and N - K images of F x F downsampled tiles
(F^2 real images each). K = N is the plain random subset (`random`), K = 0 the
all-tiles set (`random_mf{F}`). Which K to use is a hyper-parameter of the set,
so it is chosen by the regression's own label-free objective: the held-out
error of the student (1 - R^2 of the teacher's representation of source images
no set holds), never by the probes, which are shown for information only.

This script gathers the students of one seed, one N and one length from
`pretraining_gain.py` reports (one student per K; each report may hold
several), and writes a table and a figure of held-out error and read-outs
against K, marking the K the held-out error chooses:

    python experiments/formation_share.py --factor 2 --n 1000 --steps 3000 \
        --files experiments/results/multi_formation_mixed_n1000_seed1.jsonl \
                experiments/results/multi_formation_share_k250_n1000_seed1.jsonl \
                experiments/results/multi_formation_share_k750_n1000_seed1.jsonl \
        --out experiments/results/multi_formation_share_n1000_seed1

The reports must be of one seed and one target: their `none` references (the
student at initialisation, read out with the same label draws) must agree,
which two seeds' do not (`paired_gain.read_seed`). Each K's student is the run whose length is nearest
`--steps` (runs of different K round to whole epochs: 3,000 and 3,006 steps).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paired_gain import read_seed, target_of  # noqa: E402  (a sibling script)
from pretraining_gain import formation_of, set_of  # noqa: E402

from distill import files  # noqa: E402


def full_resolution_share(name: str, n: int, factor: int) -> int | None:
  """K, the full-resolution images of a stored set of `n` (None: not a mix of `factor`).

  `random` is all full resolution (K = n), `random_mf{F}` all tiles (K = 0) and
  `random_mf{F}_full{K}` the mix.
  """
  if name == "random":
    return n
  formation = formation_of(name)
  return formation[1] if formation is not None and formation[0] == factor else None


def gather(points: list[dict], factor: int, n: int, steps: int) -> tuple[dict[int, dict], dict]:
  """One student per K (the run nearest `steps`) and the references.

  Args:
    points: the recorded points of one seed's reports (`paired_gain.read_seed`).
    factor, n: the sets' downsampling factor F and stored images N.
    steps: the length to compare at.

  Returns:
    ({K: student point}, {"none" / "teacher": read-outs}).
  """
  students = {}
  refs = {p["kind"]: p["readouts"] for p in points if p["kind"] in ("none", "teacher")}
  for p in points:
    if p["kind"] != "student" or p.get("n") != n:
      continue
    k = full_resolution_share(set_of(p), n, factor)
    if k is None:
      continue
    if k not in students or abs(p["steps"] - steps) < abs(students[k]["steps"] - steps):
      students[k] = p
  return dict(sorted(students.items())), refs


def report(students: dict[int, dict], refs: dict, readouts: list[str], factor: int, n: int,
           target: str) -> tuple[str, int]:
  """A markdown table, one line per K, and the K of least held-out error."""
  chosen = min(students, key=lambda k: students[k]["held_out_rel_error"])
  lines = [f"Stored images N = {n}, tiles {factor} x {factor}; target "
           f"{target or 'the config main target (not recorded)'}; read-outs "
           f"{' / '.join(readouts)} (%, information only). The held-out error chooses "
           f"K = {chosen}.\n",
           "| K (full resolution) | set | training images | steps | held-out error | "
           f"held-out at 1/{factor} resolution | train error | " + " | ".join(readouts) + " |",
           "|---|---|---|---|---|---|---|" + "---|" * len(readouts)]
  for kind, values in refs.items():
    lines.append(f"| {kind} | | | | | | | "
                 + " | ".join(f"{100 * values[r]:.2f}" for r in readouts) + " |")
  for k, p in students.items():
    mark = " (chosen)" if k == chosen else ""
    # Older points lack the error at the set's resolution.
    formed = p.get("held_out_rel_error_formed", {}).get(str(factor))
    lines.append(f"| {k}{mark} | {set_of(p)} | {p.get('training_images', p['n'])} | "
                 f"{p['steps']} | {p['held_out_rel_error']:.3f} | "
                 + ("-" if formed is None else f"{formed:.3f}")
                 + f" | {p['train_rel_error']:.3f} | "
                 + " | ".join(f"{100 * p['readouts'][r]:.2f}" for r in readouts) + " |")
  return "\n".join(lines) + "\n", chosen


def plot(students: dict[int, dict], refs: dict, readouts: list[str], chosen: int, path: str
         ) -> None:
  """Held-out error and each read-out against K, the chosen K marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ks = list(students)
  fig, axes = plt.subplots(1, 1 + len(readouts), figsize=(5 * (1 + len(readouts)), 4))
  axes[0].plot(ks, [students[k]["held_out_rel_error"] for k in ks], "o-")
  axes[0].set(xlabel="full-resolution images K", ylabel="held-out rel. error",
              title="regression of the teacher (chooses K)")
  for ax, r in zip(axes[1:], readouts):
    ax.plot(ks, [100 * students[k]["readouts"][r] for k in ks], "o-", label="student")
    for kind, color in (("none", "k"), ("teacher", "g")):
      if kind in refs:
        ax.axhline(100 * refs[kind][r], color=color, ls="--", label=kind)
    ax.set(xlabel="full-resolution images K", ylabel="top-1 (%)", title=r)
  for ax in axes:
    ax.axvline(chosen, color="r", ls=":", label=f"chosen K = {chosen}")
  axes[-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--files", nargs="+", required=True,
                      help="pretraining_gain.py reports (.jsonl) of one seed")
  parser.add_argument("--factor", type=int, default=2, help="the tiles' downsampling F")
  parser.add_argument("--n", type=int, default=1000, help="stored images N")
  parser.add_argument("--steps", type=int, required=True, help="the length compared at")
  parser.add_argument("--readouts", nargs="+", default=["linear_probe_5pct", "linear_probe"])
  parser.add_argument("--out", default=None, help="prefix of a .md and .png (else stdout only)")
  args = parser.parse_args(argv)

  points = read_seed(args.files)
  target = target_of(points)  # refuses reports read on different targets
  students, refs = gather(points, args.factor, args.n, args.steps)
  if len(students) < 2:
    raise SystemExit(f"--files: {len(students)} share(s) of N = {args.n}, F = {args.factor} "
                     f"recorded; a choice needs at least 2")
  absent = [(k, r) for k, p in students.items() for r in args.readouts if r not in p["readouts"]]
  if absent:
    raise SystemExit(f"read-outs not recorded (K, read-out): {absent}")
  if target and any(p["kind"] == "student" and not p.get("target") for p in students.values()):
    target += " (not recorded by some older points)"
  table, chosen = report(students, refs, args.readouts, args.factor, args.n, target)
  print(table, end="")
  if args.out:
    command = " ".join(sys.argv[1:] if argv is None else argv)
    files.write_atomic(args.out + ".md", "# The share of full-resolution images in a mixed "
                       "set\n\nCommand:\n\n    python experiments/formation_share.py "
                       + command + "\n\n" + table)
    plot(students, refs, args.readouts, chosen, args.out + ".png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
