r"""What the number of cached teacher views V does to KRR-ST's held-out objective.

For each V (0 = the teacher runs on a fresh random crop + flip of every real
batch, the uncached reference), KRR-ST distils the same source with the same
teacher and seed. The held-out outer loss (`stages.krr_st.evaluate_held_out`:
fresh pool models never used in distillation, 1,000 seeded source images)
of the learned set is computed from its artefact, next to the loss of its
initial real subset, both on the images as they are and on one fresh random
crop + flip of each (views never cached).
The teacher is trained once, in the first workdir, and copied to the
others (its training does not depend on V).

Usage (the figures in experiments/results/teacher_views_effect.md):
  python experiments/teacher_views_effect.py \
      --config experiments/configs/fashion_mnist_quickstart.py \
      --views 0 1 4 16 --workdir runs/teacher_views_effect \
      --out experiments/results/teacher_views_effect.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--views", type=int, nargs="+", default=[0, 1, 4, 16])
  parser.add_argument("--workdir", required=True, help="one sub-folder per V")
  parser.add_argument("--set", action="append", default=[], help="config overrides")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  from distill.cli import main as distill
  from distill.config import load_config
  from distill.data import synthetic_set
  from distill.stages.krr_st import evaluate_held_out

  rows = []
  first = None
  for v in args.views:
    workdir = os.path.join(args.workdir, f"views_{v}")
    common_sets = [f"teacher.views={v}", *args.set]
    common = ["--config", args.config, "--workdir", workdir,
              *sum((["--set", s] for s in common_sets), [])]
    if first is None:
      if distill(["teacher", *common]) != 0:
        return 1
      first = workdir
    elif not os.path.exists(os.path.join(workdir, "teacher")):
      shutil.copytree(os.path.join(first, "teacher"), os.path.join(workdir, "teacher"))
    t0 = time.perf_counter()
    if distill(["krr-st", *common]) != 0:
      return 1
    seconds = time.perf_counter() - t0
    extra = synthetic_set.load_synthetic(os.path.join(workdir, "synthetic.npz")).extra
    # Recomputed from the artefacts, so sets distilled earlier are measured alike.
    held_out = evaluate_held_out(load_config(args.config, common_sets), os.path.abspath(workdir))
    card_path = os.path.join(workdir, f"teacher_views_v{v}", "card.json")
    card = json.load(open(card_path)) if os.path.exists(card_path) else {}
    rows.append(dict(views=v, held_out=held_out, seconds=extra["seconds"],
                     stage_seconds=seconds, cache_seconds=card.get("seconds"),
                     cache_mib=card.get("bytes", 0) / 2**20))
    print(json.dumps(rows[-1]), flush=True)

  lines = [f"KRR-ST held-out outer loss against the number of cached teacher views V "
           f"({os.path.basename(args.config)}{' ' + ' '.join(args.set) if args.set else ''}; "
           f"{os.cpu_count()} CPU cores, Python {platform.python_version()})", "",
           "Held-out outer loss on fresh pool models; real images as they are, and one "
           "fresh random crop + flip of each (views never cached).", "",
           "| V | learned set | initial subset | learned / initial | learned, fresh views "
           "| initial, fresh views | learned / initial | cache build s | cache MiB "
           "| KRR-ST stage s (incl. cache build) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    h = r["held_out"]
    cache = "-" if r["views"] == 0 else f"{r['cache_seconds']:.0f}"
    mib = "-" if r["views"] == 0 else f"{r['cache_mib']:.1f}"
    lines.append(f"| {r['views'] or '0 (teacher runs)'} | {h['learned']:.4f} "
                 f"| {h['initial']:.4f} | {h['learned'] / h['initial']:.3f} "
                 f"| {h['learned_views']:.4f} | {h['initial_views']:.4f} "
                 f"| {h['learned_views'] / h['initial_views']:.3f} | {cache} | {mib} "
                 f"| {r['seconds']:.0f} |")
  command = "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:]))
  text = "\n".join(lines + ["", f"Command: `{command}`", ""])
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
