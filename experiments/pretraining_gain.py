r"""Where a teacher's gain is lost on its way to a student pretrained on a set.

A strong teacher is worth nothing to the table if a fresh network regressing
its representations on a small set does not inherit it. This script follows
the `random` row (n random real source images, the teacher's representations
as targets) at several n, and any saved set (`--sets`, e.g. a KRR-ST or
parameter-matching `synthetic*.npz` with its stored targets), pretraining
fresh students with the protocol's recipe (`pretrain` section: MSE, no
augmentation, constant learning rate), and records at several lengths of the
same run (a constant learning rate makes a longer run the continuation of a
shorter one, so each (set, n, lr) is one resumed run):

* the regression's own label-free objective: the relative squared error of
  the head's prediction of the teacher's representation on source images
  outside the subset (1 - R^2 in the training targets' space), and the same
  on the subset itself (how far it is memorised);
* with `--multi_formation`, the held-out error again on the held-out images
  at the set's resolution (each f x f block averaged, upsampled back, with
  the teacher's view of them as targets): a student that predicts the
  teacher there but not on the full images lost to the resolution, not to
  unseen images;
* for information only, probe read-outs on the target (the length and lr
  are chosen by the held-out error, never by these).

References: `none` (the student at initialisation) and the teacher, read out
the same way.

Lengths matter to the comparison of sets: trajectory matching (MTT, MKDT)
learns a set for a short student run at a learned step size (MKDT reads its
sets out after 20 epochs at that step size), where the table pretrains for
`pretrain.epochs`. `--set_lr` adds, for each parameter-matching set, a run at
its learned step size (`extra.alpha`), so both protocols are read from one
run per set.

`--starts` adds, for each learned set, the real source images it started
from (`extra.init_indices`) with the teacher's representations as targets:
the control that separates what the optimiser did from where it started
(same students, same seed, same held-out images).

`--multi_formation F:N` adds N stored images of IDC's multi-formation
(distill/data/multi_formation.py): N * F^2 random real images, each
downsampled F times, stored F x F to an image and trained on upsampled back,
with the teacher's targets; `n` is then the N stored images, and the
students' epochs run over the N * F^2 images they train on. `F:N:K` keeps K
of the N stored images at full resolution, one real image each (a mixed set
of K + (N - K) * F^2 images, the row `random_mf{F}_full{K}`).

Command (from the repository root; the teacher is the workdir's, or the
config's `teacher.checkpoint`):
  python experiments/pretraining_gain.py --config experiments/configs/cifar10_effect.py \
      --workdir runs/gain --sizes 100 1000 10000 --steps 0 100 300 1000 3000 \
      --out experiments/results/pretraining_gain
  python experiments/pretraining_gain.py --config experiments/configs/cifar10_effect.py \
      --workdir runs/gain_n100 --sizes 100 --sets iadd=runs/effect_n100_iadd/synthetic_iadd.npz \
      --set_lr --steps 0 10 20 50 100 300 1000 --out experiments/results/set_length_n100
  python experiments/pretraining_gain.py --config experiments/configs/cifar10_effect.py \
      --workdir runs/gain_start --sizes --sets iadd=runs/effect_n100_iadd_rand/synthetic_iadd.npz \
      --starts --seed 0 --steps 0 300 1000 --out experiments/results/start_control_n100_seed0

  python experiments/pretraining_gain.py --config experiments/configs/cifar10_effect.py \
      --workdir runs/mf/w --sizes 100 175 400 --multi_formation 2:100 --seed 0 --steps 1000 \
      --out experiments/results/multi_formation_gain_seed0

The read-outs are on the config's target; another target (the issue's
Imagenette-32, say) is a `--set` away and needs its own --out:
  python experiments/pretraining_gain.py --config experiments/configs/cifar10_effect.py \
      --workdir runs/mf/w --sizes 1000 --multi_formation 2:1000:500 --seed 1 --steps 3000 \
      --set data.target=../shared/data/imagenette32-png.tar.gz \
      --set data.target_train_split=train --set data.target_test_split=val \
      --out experiments/results/multi_formation_mixed_n1000_seed1_imagenette32

Writes <out>.jsonl (one line per point, appended as measured: a killed run
keeps its points and resumes its students), <out>.md and <out>.png. Each
point is also printed to stdout as it is measured; each student's training
progress (loss, steps/s, ETA) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import sys
import time

import jax
import numpy as np

from distill import files
from distill.config import apply_overrides, load_config
from distill.errors import DistillError
from distill.data import datasets, multi_formation, synthetic_set
from distill.eval import table, transfer
from distill.nn.models import build_model, extract_features, init_model
from distill.selection import coresets
from distill.stages import artefacts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True, help="holds (or imports) the teacher")
  parser.add_argument("--sizes", type=int, nargs="*", default=[100, 1000],
                      help="sizes of random real subsets to follow (none: only --sets)")
  parser.add_argument("--sets", nargs="*", default=[], metavar="NAME=PATH",
                      help="saved sets to follow, with their stored targets")
  parser.add_argument("--set_lr", action="store_true",
                      help="also run each parameter-matching set at its learned step size")
  parser.add_argument("--steps", type=int, nargs="+", default=[0, 100, 300, 1000],
                      help="pretraining lengths to read out (rounded up to whole epochs)")
  parser.add_argument("--starts", action="store_true",
                      help="also follow the real images each learned set started from")
  parser.add_argument("--multi_formation", nargs="*", default=[], metavar="F:N[:K]",
                      help="also follow N stored images of IDC's multi-formation: N*F^2 random "
                           "real images downsampled F times and upsampled back, teacher "
                           "targets; K of the N kept at full resolution, one image each")
  parser.add_argument("--lrs", type=float, nargs="+", default=[],
                      help="pretraining learning rates (default: the config's)")
  parser.add_argument("--readouts", nargs="+", default=["linear_probe_5pct", "linear_probe"])
  parser.add_argument("--held_out", type=int, default=2000,
                      help="source images outside every subset, for the held-out error")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--out", required=True, help="prefix of the .jsonl/.md/.png outputs")
  args = parser.parse_args(argv)

  config = load_config(args.config, args.set)
  lines = read_points(args.out + ".jsonl")
  # Points read on another target cannot share a report: refuse before any
  # work (points written before the target was recorded carry none). The
  # dataset is named as the table names it, so a relative and an absolute
  # path to one folder agree.
  dataset, train_split, test_split = artefacts.parse_target(artefacts.main_target(config))
  target_name = "|".join((table.target_label(dataset), train_split, test_split))
  other = {l["target"] for l in lines if "target" in l} - {target_name}
  if other:
    raise SystemExit(f"{args.out}.jsonl holds read-outs on {sorted(other)}, this run's "
                     f"target is {target_name!r}: choose another --out")
  teacher = artefacts.workdir_teacher(config, args.workdir)
  source = artefacts.load_source(config)
  total = len(source.images)
  # Held-out images: a seeded draw the subsets never touch (the subsets are
  # drawn from the rest).
  order = np.random.default_rng([args.seed, 7]).permutation(total)
  held, pool = np.sort(order[:args.held_out]), np.sort(order[args.held_out:])
  saved = [load_set(spec, teacher.dim, args.starts) for spec in args.sets]
  for name, s in saved:
    # A learned set started from source images: those are not held out.
    held = held[~np.isin(held, np.asarray(s.extra.get("init_indices", []), np.int64))]
  if args.sizes and max(args.sizes) > len(pool):
    raise SystemExit(f"--sizes: at most {len(pool)} (the source has {total} images, "
                     f"{args.held_out} held out)")
  formations = [parse_formation(spec, len(pool), source.images.shape[1:3])
                for spec in args.multi_formation]
  x_all = datasets.normalize(source.images, teacher.mean, teacher.std)
  y_held = teacher.features(x_all[held])
  # The held-out images as a multi-formation set shows them (each f x f block
  # averaged, upsampled back), with the teacher's view of those: the error
  # there separates a student's fit to unseen images from its fit to their
  # full resolution.
  formed_held = {}
  for factor in sorted({f for f, _, _ in formations}):
    x_formed = multi_formation.upsample(multi_formation.downsample(x_all[held], factor), factor)
    formed_held[factor] = (x_formed, teacher.features(x_formed))
  target = artefacts.load_target(config, source.images.shape[1:], teacher.mean, teacher.std)
  p = config.probe

  def read_out(model, variables) -> dict:
    # The probe reads the view the config names, as the table does.
    f_train = extract_features(model, variables, target[0], kind=p.representation)
    f_test = extract_features(model, variables, target[2], kind=p.representation)
    return transfer.probe_accuracies(args.readouts, f_train, target[1], f_test, target[3], p,
                                     args.seed)

  done = {(l["kind"], set_of(l), l.get("n"), l.get("lr"), l.get("steps"))
          for l in lines}

  def record(line: dict) -> None:
    line = dict(line, target=target_name)
    lines.append(line)
    with open(args.out + ".jsonl", "a") as f:
      f.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)

  if ("none", "random", None, None, None) not in done:
    record(dict(kind="none", readouts=read_out(*transfer.fresh_backbone(
        config.pretrain, source.images.shape[1:], args.seed))))
  if ("teacher", "random", None, None, None) not in done:
    record(dict(kind="teacher", readouts=read_out(teacher.model, teacher.variables)))
  runs = []  # (set name, n, images, targets, target kind, learning rates)
  for n in args.sizes:
    subset = pool[coresets.random_subset(len(pool), n, 1000 + args.seed)]
    runs.append(("random", n, x_all[subset], teacher.features(x_all[subset]), "teacher", []))
  for factor, n, full in formations:
    # Stored images each holding factor^2 real ones (distill/data/multi_formation.py),
    # the first `full` one each; the subset is drawn apart from `random`'s.
    count = multi_formation.image_count(n, factor, full)
    subset = pool[coresets.random_subset(len(pool), count, 5000 + args.seed)]
    x_mf = multi_formation.decode(multi_formation.encode(x_all[subset], factor, full),
                                  factor, full)
    runs.append((formation_set_name(factor, full), n, x_mf, teacher.features(x_mf),
                 "teacher", []))
  for name, s in saved:
    own = [float(s.extra["alpha"])] if args.set_lr and "alpha" in s.extra else []
    runs.append((name, len(s.images), s.images, s.targets, "learned", own))
    if args.starts:
      start = np.asarray(s.extra["init_indices"], np.int64)
      runs.append((f"{name}_start", len(start), x_all[start], teacher.features(x_all[start]),
                   "teacher", []))
  for name, n, x_set, y_set, target_kind, own_lrs in runs:
    to_targets = (transfer.target_standardizer(y_set) if config.pretrain.standardize_targets
                  else lambda y: y)
    # Epochs are over the images trained on (n * F^2 for a multi-formation set).
    per_epoch = max(len(x_set) // min(config.pretrain.batch_size, len(x_set)), 1)
    for lr in (args.lrs or [config.pretrain.lr]) + own_lrs:
      for steps in sorted(set(args.steps)):
        epochs = math.ceil(steps / per_epoch)
        if ("student", name, n, lr, epochs * per_epoch) in done:
          continue
        cfg = config.copy_and_resolve_references()
        apply_overrides(cfg, (f"pretrain.epochs={epochs}", f"pretrain.lr={lr}"))
        t0 = time.perf_counter()
        if epochs == 0:  # the student before its first step: initialisation with a head
          model = build_model(cfg.pretrain.arch, num_outputs=y_set.shape[1])
          variables = init_model(model, jax.random.key(args.seed), x_set.shape[1:])
          model = build_model(cfg.pretrain.arch)
        else:
          # One job name per (set, n, lr): the longer run resumes the shorter one.
          # Progress (steps/s, loss, ETA) goes to stderr: stdout carries the records.
          with contextlib.redirect_stdout(sys.stderr):
            model, variables = transfer.pretrain(
                cfg.pretrain, x_set, y_set, args.seed, args.workdir,
                f"gain_{'' if name == 'random' else name + '_'}n{n}_lr{lr:g}_seed{args.seed}",
                kind=target_kind)
        seconds = time.perf_counter() - t0
        with_head = build_model(cfg.pretrain.arch, num_outputs=y_set.shape[1])
        predicted = lambda x: transfer.head_predictions(with_head, variables, x)
        record(dict(kind="student", set=name, n=n, training_images=len(x_set), lr=lr,
                    steps=epochs * per_epoch,
                    epochs=epochs,
                    held_out_rel_error=transfer.relative_error(predicted(x_all[held]),
                                                               to_targets(y_held)),
                    train_rel_error=transfer.relative_error(predicted(x_set), to_targets(y_set)),
                    held_out_rel_error_formed={
                        str(f): transfer.relative_error(predicted(x_f), to_targets(y_f))
                        for f, (x_f, y_f) in formed_held.items()},
                    pretrain_seconds=seconds, readouts=read_out(model, variables)))
  write_report(lines, args, config, teacher)
  return 0


def load_set(spec: str, teacher_dim: int, starts: bool = False
             ) -> tuple[str, synthetic_set.SyntheticSet]:
  """`NAME=PATH` of `--sets` -> (name, set), refusing a reserved name, an unreadable
  file, targets of another teacher or (with `starts`) a set that records no start
  images, before any work starts."""
  name, sep, path = spec.partition("=")
  if not sep or not name or not path:
    raise SystemExit(f"--sets {spec!r}: expected NAME=PATH")
  if name == "random" or name.endswith("_start"):
    raise SystemExit(f"--sets {name}: 'random' and names ending in '_start' are the script's "
                     f"own; choose another name")
  try:
    s = synthetic_set.load_synthetic(path)
  except DistillError as e:   # missing, corrupt, non-finite, wrong version
    raise SystemExit(f"--sets {name}: {e}") from None
  if s.targets.shape[1] != teacher_dim:
    raise SystemExit(f"--sets {name}: targets of {s.targets.shape[1]} dims, the teacher's "
                     f"representation has {teacher_dim}: not this teacher's set")
  return name, s


def parse_formation(spec: str, pool: int, image_size: tuple[int, int]
                    ) -> tuple[int, int, int]:
  """`F:N[:K]` of `--multi_formation` -> (F, N, K), refused before any work starts if F
  does not divide the image size, K is not in [0, N] or the set's images are more than
  the subsets' pool."""
  parts = spec.split(":")
  try:
    factor, n, full = (int(v) for v in (parts + ["0"])[:3])
  except ValueError:
    factor = n = 0
    full = -1
  if len(parts) not in (2, 3) or factor < 1 or n < 1 or not 0 <= full <= n:
    raise SystemExit(f"--multi_formation {spec!r}: expected F:N or F:N:K with integers "
                     f"F, N >= 1 and 0 <= K <= N")
  if image_size[0] % factor or image_size[1] % factor:
    raise SystemExit(f"--multi_formation {spec}: F = {factor} does not divide the "
                     f"{image_size[0]}x{image_size[1]} images")
  count = multi_formation.image_count(n, factor, full)
  if count > pool:
    raise SystemExit(f"--multi_formation {spec}: {count} images, the pool "
                     f"outside the held-out ones has {pool}")
  return factor, n, full


def formation_set_name(factor: int, full: int) -> str:
  """The recorded `set` of a multi-formation row: `random_mf{F}`, or `random_mf{F}_full{K}`."""
  return f"random_mf{factor}" + (f"_full{full}" if full else "")


def formation_of(name: str) -> tuple[int, int] | None:
  """(F, K) of a name `formation_set_name` wrote; None for any other set."""
  match = re.fullmatch(r"random_mf(\d+)(?:_full(\d+))?", name)
  return None if match is None else (int(match.group(1)), int(match.group(2) or 0))


def read_points(path: str) -> list[dict]:
  """The points an earlier run recorded (none if `path` does not exist), refusing a line
  that is not JSON (a file cut short, or not this script's) with its number."""
  if not os.path.exists(path):
    return []
  points = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          points.append(json.loads(line))
        except json.JSONDecodeError:
          raise SystemExit(f"{path}: line {number} is not a recorded point (not JSON); "
                           f"mend or move the file") from None
  return points


def set_of(line: dict) -> str:
  """The set a recorded point belongs to (points written before `--sets` existed: random)."""
  return line.get("set", "random")


def write_report(lines: list[dict], args, config, teacher) -> None:
  """<out>.md (a table per n) and <out>.png (error and read-outs against steps)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  refs = {l["kind"]: l["readouts"] for l in lines if l["kind"] in ("none", "teacher")}
  students = sorted((l for l in lines if l["kind"] == "student"),
                    key=lambda l: (set_of(l), l["lr"], l["n"], l["steps"]))
  readouts = args.readouts
  named = sorted({set_of(l) for l in students} - {"random"})
  out = ["# Where the teacher's gain is lost: students of random real subsets"
         + "".join(f", {name}" for name in named) + "\n",
         "Command:\n", "    python experiments/pretraining_gain.py " + " ".join(sys.argv[1:]) + "\n",
         f"Teacher: {teacher.info.get('source')} {config.teacher.arch.name}-w"
         f"{config.teacher.arch.width}, representation `{config.teacher.representation}` "
         f"({teacher.dim} dims)" + (f", snapshot at step {teacher.info['snapshot_step']}/"
                                    f"{teacher.info['num_steps']}"
                                    if "snapshot_step" in teacher.info else "") + ".",
         f"Student: {config.pretrain.arch.name}-w{config.pretrain.arch.width}, MSE to the "
         f"{'standardised ' if config.pretrain.standardize_targets else ''}targets, SGD "
         f"(constant lr, momentum {config.pretrain.momentum}, wd "
         f"{config.pretrain.weight_decay}), batch {config.pretrain.batch_size}, no augmentation. "
         f"Held-out error on {args.held_out} source images outside every subset (less any a "
         f"learned set started from); at 1/f resolution: the same images with each f x f "
         f"block averaged and upsampled back, as a multi-formation set shows its images, "
         f"against the teacher's view of those. Read-outs "
         f"(information only) on {table.shown_path(config.data.target)}: ridge probes, reg by "
         f"{config.probe.folds}-fold CV, low-label ones averaged over {config.probe.label_draws} "
         f"draws. `seconds`: the wall time of the segment since the previous length (a "
         f"longer run resumes the shorter one).\n",
         f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}; "
         f"timings are upper bounds when other jobs share it.\n",
         "| | " + " | ".join(readouts) + " |", "|---|" + "---|" * len(readouts)]
  for kind, values in refs.items():
    out.append(f"| {kind} | " + " | ".join(f"{100 * values[r]:.2f}" for r in readouts) + " |")
  # Factors whose formed held-out error some student records (older points lack it).
  formed = sorted({f for l in students for f in l.get("held_out_rel_error_formed", {})},
                  key=int)
  out += ["", "| set | n | lr | steps | held-out rel. error | "
          + "".join(f"held-out at 1/{f} resolution | " for f in formed) + "train rel. error | "
          + " | ".join(readouts) + " | seconds |", "|---|---|---|---|---|---|"
          + "---|" * (len(formed) + len(readouts)) + "---|"]
  for l in students:
    # A multi-formation set stores n images and trains on more.
    images = l.get("training_images", l["n"])
    shown_n = f"{l['n']}" + (f" ({images} images)" if images != l["n"] else "")
    out.append(f"| {set_of(l)} | {shown_n} | {l['lr']:.4g} | {l['steps']} | "
               f"{l['held_out_rel_error']:.3f} | "
               + "".join(f"{l['held_out_rel_error_formed'][f]:.3f} | "
                         if f in l.get("held_out_rel_error_formed", {}) else "- | "
                         for f in formed)
               + f"{l['train_rel_error']:.3f} | "
               + " | ".join(f"{100 * l['readouts'][r]:.2f}" for r in readouts)
               + f" | {l['pretrain_seconds']:.0f} |")
  files.write_atomic(args.out + ".md", "\n".join(out) + "\n")

  fig, axes = plt.subplots(1, 1 + len(readouts), figsize=(5 * (1 + len(readouts)), 4))
  run_of = lambda l: (set_of(l), l["n"], l["lr"])
  for key in sorted({run_of(l) for l in students}):
    run = [l for l in students if run_of(l) == key]
    x = [max(l["steps"], 1) for l in run]
    label = f"{key[0]} n={key[1]}, lr={key[2]:.3g}"
    line, = axes[0].plot(x, [l["held_out_rel_error"] for l in run], "o-", label=label)
    for f in formed:
      points = [(xi, l["held_out_rel_error_formed"][f])
                for xi, l in zip(x, run) if f in l.get("held_out_rel_error_formed", {})]
      if points:
        axes[0].plot(*zip(*points), "x--", color=line.get_color(),
                     label=f"{label}, at 1/{f} resolution")
    for ax, r in zip(axes[1:], readouts):
      ax.plot(x, [100 * l["readouts"][r] for l in run], "o-", label=label)
  axes[0].set(xscale="log", xlabel="pretraining steps (0 plotted at 1)",
              ylabel="held-out rel. error", title="regression of the teacher")
  for ax, r in zip(axes[1:], readouts):
    for kind, style in (("none", "k--"), ("teacher", "g--")):
      if kind in refs:
        ax.axhline(100 * refs[kind][r], color=style[0], ls="--", label=kind)
    ax.set(xscale="log", xlabel="pretraining steps", ylabel="top-1 (%)", title=r)
  xs = [max(l["steps"], 1) for l in students]   # as plotted
  if xs and max(xs) < 2 * min(xs):
    # Lengths within a factor of 2 (3,000 and 3,006 steps when the epochs
    # differ) span no decade: a log axis would label them with overlapping
    # minor ticks or not at all.
    for ax in axes:
      ax.set_xscale("linear")
      ax.ticklabel_format(axis="x", style="plain", useOffset=False)
  axes[-1].legend(fontsize=7)
  if formed:  # the dashed curves are named only here
    axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=100)


if __name__ == "__main__":
  sys.exit(main())
