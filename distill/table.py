"""The results table: how much of SSL pretraining does a small set keep?

For every row (distill/sets.py), pretraining architecture, target dataset,
read-out and seed: pretrain a fresh network on the row's set (MSE to its
targets), then linear-probe and/or fine-tune on the target; record top-1
test accuracy and the wall-clock of each stage. The main table is at
n = `distill.num_synthetic`; `eval.sizes` adds a size sweep of
`eval.sweep_rows` (linear probe on the first target, first architecture).

Every measurement is appended to `<workdir>/table.json` as soon as it exists,
so a killed run resumes where it stopped (pretraining and fine-tuning also
checkpoint). Outputs: `table.json`, `table.csv`, `table.md`, and
`size_sweep.png` when there is a sweep; copies at `eval.results_path`.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from distill import data, files, pipeline, plots, sets, teacher as teacher_lib, transfer
from distill.errors import DistillError
from distill.loop import log
from distill.models import ARCHS, extract_features

READOUTS = (*transfer.PROBE_FRACTIONS, "finetune")


class Job(NamedTuple):
  """One block of the table: set size, rows, architectures, targets, read-outs."""
  n: int
  rows: tuple
  archs: tuple       # of (label, arch dict)
  targets: tuple     # of (label, spec)
  readouts: tuple


def parse_arch(spec: str, base: ml_collections.ConfigDict) -> tuple[str, dict]:
  """"resnet10:32" -> ("resnet10-w32", arch dict); depth/norm from `base` for a ConvNet."""
  name, _, width = spec.partition(":")
  # A ConvNet without an explicit width keeps the base's per-block widths.
  keep_widths = name == "convnet" == base.name and not width
  if name not in ARCHS:
    raise DistillError(f"eval.archs entry {spec!r}: unknown architecture {name!r}; "
                       f"expected one of {ARCHS}")
  try:
    width = int(width) if width else int(base.width)
  except ValueError:
    raise DistillError(f"eval.archs entry {spec!r}: width {width!r} is not an integer") from None
  same = name == base.name
  arch = dict(name=name, width=width, depth=base.depth if name == "convnet" else 0,
              norm=base.norm if same else "default",
              widths=tuple(base.get("widths", ())) if keep_widths else ())
  return arch_label(arch), arch


def arch_label(arch) -> str:
  widths = tuple(arch.get("widths", ()) or ())
  return f"{arch['name']}-w{'-'.join(map(str, widths)) if widths else arch['width']}"


def target_label(dataset: str) -> str:
  base = os.path.basename(dataset.rstrip("/")) or dataset
  for ext in (".tar.gz", ".tgz", ".npz"):
    base = base[:-len(ext)] if base.endswith(ext) else base
  return base


def plan(config) -> list[Job]:
  """The blocks of the table, validated before any work starts."""
  ev = config.eval
  unknown = set(ev.rows) - set(sets.ROWS)
  if unknown:
    raise DistillError(f"unknown eval.rows {sorted(unknown)}; expected some of {sets.ROWS}")
  bad = set(ev.readouts) - set(READOUTS)
  if bad or not ev.readouts:
    raise DistillError(f"eval.readouts must be drawn from {READOUTS}, got {tuple(ev.readouts)}")
  if not ev.seeds:
    raise DistillError("eval.seeds is empty")
  base = config.pretrain.arch
  archs = [(arch_label(base), dict(base))] + [parse_arch(s, base) for s in ev.archs]
  specs = [pipeline.main_target(config)] + list(ev.extra_targets)
  targets = [(target_label(pipeline.parse_target(s)[0]), s) for s in specs]
  labels = [t[0] for t in targets]
  if len(set(labels)) != len(labels):
    raise DistillError(f"two targets share the name {labels}; rename a file")
  n = config.distill.num_synthetic
  jobs = [Job(n, tuple(ev.rows), tuple(archs), tuple(targets), tuple(ev.readouts))]
  for size in ev.sizes:
    if size != n:
      jobs.append(Job(int(size), tuple(r for r in ev.sweep_rows if r not in ("none", "full",
                                                                             "teacher")),
                      tuple(archs[:1]), tuple(targets[:1]), ("linear_probe",)))
  return jobs


def _backbone(row, n, arch, seed, config, workdir, source, teacher, cache: dict, teacher_fn):
  """(model, variables, set seconds, pretraining seconds) of a row.

  The backbone is pretrained on the row's set with its recipe (sets.RECIPES;
  `teacher_fn` recomputes real images' targets per view when pretraining
  augments), fresh (`none`) or the teacher.
  Set seconds come from the set's artefact (the time it took to build);
  pretraining seconds time this call's pretraining only. `cache` keeps the
  full source's images and teacher targets across seeds and architectures.
  """
  if row == "none":
    return (*transfer.fresh_backbone(ml_collections.ConfigDict({"arch": arch}),
                                     source.images.shape[1:], seed), 0.0, 0.0)
  if row == "teacher":
    return teacher.model, teacher.variables, teacher.info.get("train_seconds", 0.0), 0.0
  pre = config.pretrain.copy_and_resolve_references()
  with pre.unlocked():
    pre.arch = ml_collections.ConfigDict(arch)
  if row == "full":
    if "full" not in cache:
      t0 = time.perf_counter()
      images = data.normalize(source.images, teacher.mean, teacher.std)
      targets = sets.source_features(source, teacher)
      cache["full"] = images, targets, time.perf_counter() - t0  # teacher targets of all
    images, targets, set_seconds = cache["full"]
    with pre.unlocked():
      pre.epochs = config.eval.full_epochs
  else:
    if row == "random":
      s = sets.random_set(config, workdir, n, seed, source, teacher)
    elif row == "kmeans":
      s = sets.kmeans_set(config, workdir, n, source, teacher)
    else:
      s = sets.learned_set(row, config, workdir, n, source, teacher)
    # A parameter-matching set also pays for training its expert buffer.
    set_seconds = float(s.extra.get("seconds", 0.0)) + float(s.extra.get("expert_seconds", 0.0))
    images, targets = s.images, s.targets
  name = f"pretrain_{row}_n{n}_{arch_label(arch)}_seed{seed}"
  kind, loss = sets.RECIPES[row]
  t0 = time.perf_counter()
  model, variables = transfer.pretrain(pre, images, targets, seed,
                                       os.path.join(workdir, "table"), name, kind=kind,
                                       loss=loss, teacher_fn=teacher_fn, quiet=True)
  return model, variables, set_seconds, time.perf_counter() - t0


def run_table(config, workdir: str) -> dict:
  """Fills `<workdir>/table.json` and writes the table files."""
  jobs = plan(config)
  teacher = teacher_lib.workdir_teacher(config, workdir)
  source = pipeline.load_source(config)
  image_shape = source.images.shape[1:]
  path = os.path.join(workdir, "table.json")
  results = files.read_json(path, {"runs": []})
  done = {_key(r) for r in results["runs"]}
  targets, cache = {}, {}
  teacher_fn = jax.jit(lambda x: teacher.represent(teacher.variables, x))
  for job in jobs:
    for seed in config.eval.seeds:
      for arch_lbl, arch in job.archs:
        for row in job.rows:
          if row == "teacher" and arch_lbl != arch_label(arch_of(teacher.model)):
            continue  # the teacher is one network: it appears under its own architecture
          todo = [(t, ro) for t in job.targets for ro in job.readouts
                  if (row, arch_lbl, t[0], ro, job.n, seed) not in done]
          if not todo:
            continue
          model, variables, set_s, pretrain_s = _backbone(row, job.n, arch, seed, config,
                                                          workdir, source, teacher, cache,
                                                          teacher_fn)
          features = {}  # frozen features per target, shared by the probe read-outs
          for (t_lbl, spec), readout in todo:
            if t_lbl not in targets:
              targets[t_lbl] = pipeline.load_target(config, image_shape, teacher.mean,
                                                      teacher.std, spec)
            t1 = time.perf_counter()
            out = _readout(readout, config, model, variables, targets[t_lbl], seed,
                           workdir, f"{row}_n{job.n}_{arch_lbl}_{t_lbl}_seed{seed}",
                           features.setdefault(t_lbl, {}))
            acc = out.pop("accuracy")
            run = dict(row=row, arch=arch_lbl, target=t_lbl, readout=readout, n=job.n,
                       seed=seed, accuracy=acc, set_seconds=set_s, pretrain_seconds=pretrain_s,
                       readout_seconds=time.perf_counter() - t1, detail=out)
            log(f"[table] n={job.n} {row:8s} {arch_lbl:12s} {t_lbl:18s} {readout:12s} "
                f"seed {seed}: {100 * acc:.2f}%")
            results = add_runs(path, [run])
            done |= {_key(r) for r in results["runs"]}
  results["teacher"] = {"probe": teacher.info.get("probe", {}).get("accuracy"),
                        "train_seconds": teacher.info.get("train_seconds")}
  return write_outputs(results, config, workdir)


def add_runs(path: str, runs: list[dict], info: dict | None = None) -> dict:
  """Adds measured entries (and `info` keys) to the table file at `path`.

  The file is re-read under an exclusive lock and rewritten atomically, so
  several `distill table` processes may fill one workdir at once (e.g. one per
  architecture) without losing entries; an entry whose key is already there
  is not added twice, which also makes this the way to merge tables measured
  in other workdirs. The file's `summary` is recomputed on every write.

  Returns:
    The file's new content.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    results = files.read_json(path, {"runs": []})
    have = {_key(r) for r in results["runs"]}
    for run in runs:
      if _key(run) not in have:
        results["runs"].append(run)
        have.add(_key(run))
    results.update(info or {})
    results["summary"] = summarize(results["runs"])
    files.write_json(path, results)
  return results


def _readout(readout, config, model, variables, target, seed, workdir, name,
             features: dict) -> dict:
  """One read-out of a backbone on a target.

  Args:
    features: a dict kept across the read-outs of one backbone and target:
      the frozen train/test features, extracted at the first probe.

  Returns:
    {"accuracy": top-1, ...what the read-out reports besides (chosen reg,
    spread over label draws, fine-tuning steps)}.
  """
  x_train, y_train, x_test, y_test = target
  if readout in transfer.PROBE_FRACTIONS:
    if not features:
      features.update(train=extract_features(model, variables, x_train),
                      test=extract_features(model, variables, x_test))
    p = config.probe
    return transfer.probe_readout(readout, features["train"], y_train, features["test"], y_test,
                                  regs=tuple(p.regs), folds=p.folds, label_draws=p.label_draws,
                                  seed=seed)
  cfg = config.finetune
  if cfg.num_train:
    keep = np.random.default_rng(seed).permutation(len(x_train))[:cfg.num_train]
    x_train, y_train = x_train[keep], y_train[keep]
  return transfer.finetune(cfg, arch_of(model), variables, x_train, y_train, x_test, y_test,
                           seed, os.path.join(workdir, "table"), f"finetune_{name}")


def arch_of(model) -> dict:
  """The arch dict that rebuilds a backbone (the teacher's may differ from the column's)."""
  if hasattr(model, "depth"):
    name = "convnet"
  else:
    name = "resnet10" if tuple(model.stage_sizes) == (1, 1, 1, 1) else "resnet18"
  return dict(name=name, width=model.width, depth=getattr(model, "depth", 0), norm=model.norm,
              widths=tuple(getattr(model, "widths", ())))


def _key(r: dict) -> tuple:
  return (r["row"], r["arch"], r["target"], r["readout"], r["n"], r["seed"])


def summarize(runs: list[dict]) -> list[dict]:
  """Mean, std (ddof=1) and median wall-clock per (n, row, arch, target, readout)."""
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    groups.setdefault((r["n"], r["row"], r["arch"], r["target"], r["readout"]), []).append(r)
  out = []
  for (n, row, arch, target, readout), rs in groups.items():
    acc = np.array([r["accuracy"] for r in rs])
    out.append(dict(n=n, row=row, arch=arch, target=target, readout=readout,
                    mean=float(acc.mean()), std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    seeds=len(acc),
                    # Medians: one seed slowed by another job should not set the cost.
                    set_seconds=float(np.median([r["set_seconds"] for r in rs])),
                    pretrain_seconds=float(np.median([r["pretrain_seconds"] for r in rs])),
                    readout_seconds=float(np.median([r["readout_seconds"] for r in rs]))))
  return out


def mean_std_text(values) -> str:
  """"mean ± std" of `values` (sample std, ddof=1; 0 for a single value), 2 decimals."""
  values = np.asarray(values, np.float64)
  return f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"


def format_markdown(results: dict, config) -> str:
  """One accuracy table per (target, read-out) at the main n, then costs and the sweep."""
  summary = summarize(results["runs"])
  n_main = config.distill.num_synthetic
  order = {r: i for i, r in enumerate(sets.ROWS)}
  main = [s for s in summary if s["n"] == n_main]
  archs = list(dict.fromkeys(s["arch"] for s in main))
  lines = [f"Source {config.data.source} (n = {n_main}); mean ± std top-1 (%) over seeds "
           f"(their count), [difference to `none`].", ""]
  for target, readout in dict.fromkeys((s["target"], s["readout"]) for s in main):
    block = [s for s in main if s["target"] == target and s["readout"] == readout]
    lines += [f"### {target}, {readout.replace('_', ' ')}", "",
              "| row | " + " | ".join(archs) + " |", "|---" * (len(archs) + 1) + "|"]
    floor = {s["arch"]: s["mean"] for s in block if s["row"] == "none"}
    for row in sorted(dict.fromkeys(s["row"] for s in block), key=order.get):
      cells = []
      for arch in archs:
        hit = [s for s in block if s["row"] == row and s["arch"] == arch]
        # Each row against `none`, every pretrained network's starting point.
        versus = (f" [{100 * (hit[0]['mean'] - floor[arch]):+.2f}]"
                  if hit and row != "none" and arch in floor else "")
        cells.append(f"{100 * hit[0]['mean']:.2f} ± {100 * hit[0]['std']:.2f} "
                     f"({hit[0]['seeds']}){versus}" if hit else "-")
      lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["### Cost (seconds, median over seeds)", "",
            "| row | arch | building the set | pretraining | set + pretraining |",
            "|---|---|---|---|---|"]
  seen = set()
  for s in sorted(main, key=lambda s: (order[s["row"]], s["arch"])):
    if (s["row"], s["arch"]) in seen or s["row"] == "none":
      continue
    seen.add((s["row"], s["arch"]))
    lines.append(f"| {s['row']} | {s['arch']} | {s['set_seconds']:.0f} | "
                 f"{s['pretrain_seconds']:.0f} | {s['set_seconds'] + s['pretrain_seconds']:.0f} |")
  lines.append("")
  first = (archs[0], main[0]["target"]) if main else None
  sweep = sorted((s for s in summary if s["readout"] == "linear_probe"
                  and s["row"] in config.eval.sweep_rows and (s["arch"], s["target"]) == first),
                 key=lambda s: (s["row"], s["n"]))
  if config.eval.sizes and sweep:
    lines += ["### Size sweep (linear probe, first target and architecture)", "",
              "| row | n | top-1 (%) |", "|---|---|---|"]
    lines += [f"| {s['row']} | {s['n']} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} |"
              for s in sweep]
    lines.append("")
  t = results.get("teacher", {})
  if t.get("probe") is not None:
    lines.append(f"Teacher: linear probe {100 * t['probe']:.2f}% on {config.data.target}, "
                 f"trained in {t.get('train_seconds') or 0:.0f} s.")
  return "\n".join(lines) + "\n"


def format_csv(results: dict) -> str:
  buf = io.StringIO()
  fields = ["row", "arch", "target", "readout", "n", "seed", "accuracy", "set_seconds",
            "pretrain_seconds", "readout_seconds"]
  writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(results["runs"])
  return buf.getvalue()


def read_csv(text: str) -> list[dict]:
  """Inverse of `format_csv` (numbers parsed back)."""
  out = []
  for r in csv.DictReader(io.StringIO(text)):
    out.append({**r, "n": int(r["n"]), "seed": int(r["seed"]),
                **{k: float(r[k]) for k in ("accuracy", "set_seconds", "pretrain_seconds",
                                            "readout_seconds")}})
  return out


def write_outputs(results: dict, config, workdir: str) -> dict:
  """Merges `results` into `<workdir>/table.json` and writes every output of it.

  Returns:
    The merged results (entries other processes added are kept).
  """
  results = add_runs(os.path.join(workdir, "table.json"), results["runs"],
                     {k: v for k, v in results.items() if k not in ("runs", "summary")})
  files.write_atomic(os.path.join(workdir, "table.csv"), format_csv(results))
  markdown = format_markdown(results, config)
  files.write_atomic(os.path.join(workdir, "table.md"), markdown)
  series = {}
  for s in results["summary"]:
    if (s["readout"] == "linear_probe" and s["row"] in config.eval.sweep_rows
        and s["arch"] == arch_label(config.pretrain.arch)):
      series.setdefault(s["row"], []).append((s["n"], s["mean"], s["std"]))
  png = None
  if config.eval.sizes and series:
    png = plots.save_size_sweep(os.path.join(workdir, "size_sweep.png"), series,
                                "linear-probe top-1 vs set size")
  dots = save_table_figure(os.path.join(workdir, "table.png"), results["summary"],
                           config.distill.num_synthetic)
  log(markdown)
  if config.eval.results_path:
    prefix = config.eval.results_path
    published = {suffix: os.path.join(workdir, "table" + suffix)
                 for suffix in (".json", ".csv", ".md")}
    published.update({"_size_sweep.png": png, ".png": dots})
    for suffix, written in published.items():
      if written:
        with open(written, "rb") as f:
          files.write_atomic(prefix + suffix, f.read())
  return results


def save_table_figure(path: str, summary: list[dict], n: int) -> str | None:
  """The size-n accuracy tables of `summarize` as a dot plot (see plots.save_accuracy_dots).

  Returns:
    The PNG's path, or None when there is no entry of size n.
  """
  panels: dict = {}
  for s in summary:
    if s["n"] == n:
      title = f"{s['target']}, {s['readout'].replace('_', ' ')}"
      panels.setdefault(title, {}).setdefault(s["arch"], {})[s["row"]] = (s["mean"], s["std"])
  if not panels:
    return None
  present = {s["row"] for s in summary if s["n"] == n}
  return plots.save_accuracy_dots(path, panels, [r for r in sets.ROWS if r in present])
