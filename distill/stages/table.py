"""Stage 3: the results table -> `<workdir>/table.{json,csv,md,png}`.

For every row (distill/stages/sets.py), pretraining architecture, target
dataset, read-out and seed: pretrain a fresh network on the row's set with
its recipe, then linear-probe and/or fine-tune on the target; record top-1
test accuracy and the wall-clock of each stage. The main table is at
n = `krr_st.num_synthetic`; `eval.sizes` adds a size sweep of
`eval.sweep_rows` (linear probe on the first target, first architecture).

Every measurement is appended to `<workdir>/table.json` as soon as it exists,
so a killed run resumes where it stopped (pretraining and fine-tuning also
checkpoint). Outputs: `table.json`, `table.csv`, `table.md`, `table.png`,
and `size_sweep.png` when there is a sweep; copies at `eval.results_path`.
The published markdown starts with `MARKDOWN_MARKER`: text written above that
line (the commands, the setting, a reading of the table) survives a rerun.
"""

from __future__ import annotations

import fcntl
import os
import time

import jax
import ml_collections
import numpy as np

from distill import files, plots
from distill.data import datasets, multi_formation
from distill.errors import DistillError
from distill.eval import table, transfer
from distill.nn.loop import log
from distill.nn.models import FEATURE_KINDS, extract_features
from distill.stages import sets
from distill.stages.artefacts import (load_source, load_target, main_target, parse_target,
                                      source_features, workdir_teacher)
from distill.stages.teacher_views import workdir_views


def plan(config) -> list[table.Job]:
  """The blocks of the table, validated before any work starts."""
  ev = config.eval
  for key in ("rows", "sweep_rows"):
    unknown = set(ev[key]) - set(sets.ROWS)
    if unknown:
      raise DistillError(f"unknown eval.{key} {sorted(unknown)}; expected some of "
                         f"{tuple(sets.ROWS)}")
  bad = set(ev.readouts) - set(table.READOUTS)
  if bad or not ev.readouts:
    raise DistillError(f"eval.readouts must be drawn from {table.READOUTS}, "
                       f"got {tuple(ev.readouts)}")
  if not ev.seeds:
    raise DistillError("eval.seeds is empty")
  if "random_mf" in (*ev.rows, *ev.sweep_rows):
    f = ev.multi_formation
    if not isinstance(f, int) or isinstance(f, bool) or f < 1:
      raise DistillError(f"eval.multi_formation must be an integer >= 1, got {f!r}")
    share = ev.get("multi_formation_full", 0.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
      raise DistillError(f"eval.multi_formation_full must be a share in [0, 1], got {share!r}")
  if config.probe.representation not in FEATURE_KINDS:
    raise DistillError(f"unknown probe.representation {config.probe.representation!r}; "
                       f"expected one of {FEATURE_KINDS}")
  base = config.pretrain.arch
  head_input = base.get("head_input", "features")
  if base.name == "convnet" and head_input != config.probe.representation:
    # Allowed (an ablation), but the student is then trained through one view
    # and read through another (experiments/results/fashion_mnist_pretraining_gain.md).
    log(f"[table] note: students' heads read {head_input!r}, the probe reads "
        f"{config.probe.representation!r}; set pretrain.arch.head_input to match")
  archs = [(table.arch_label(base), dict(base))] + [table.parse_arch(s, base) for s in ev.archs]
  specs = [main_target(config)] + list(ev.extra_targets)
  targets = [(table.target_label(parse_target(s)[0]), s) for s in specs]
  labels = [t[0] for t in targets]
  if len(set(labels)) != len(labels):
    raise DistillError(f"two targets share the name {labels}; rename a file")
  n = config.krr_st.num_synthetic
  jobs = [table.Job(n, tuple(ev.rows), tuple(archs), tuple(targets), tuple(ev.readouts))]
  for size in ev.sizes:
    if size != n:
      # The sweep varies set size, so only rows with a set of their own take part.
      swept = tuple(r for r in ev.sweep_rows if sets.ROWS[r].build)
      jobs.append(table.Job(int(size), swept, tuple(archs[:1]), tuple(targets[:1]),
                            ("linear_probe",)))
  return jobs


def _backbone(row, n, arch, seed, config, workdir, source, teacher, cache: dict, teacher_fn):
  """(model, variables, set seconds, pretraining seconds) of a row.

  The backbone is pretrained on the row's set with its recipe (`sets.ROWS`;
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
    # An imported checkpoint may not know its training time (None): counted as 0.
    return teacher.model, teacher.variables, teacher.info.get("train_seconds") or 0.0, 0.0
  pre = config.pretrain.copy_and_resolve_references()
  with pre.unlocked():
    pre.arch = ml_collections.ConfigDict(arch)
  if row == "full":
    if "full" not in cache:
      t0 = time.perf_counter()
      images = datasets.normalize(source.images, teacher.mean, teacher.std)
      views = workdir_views(config, workdir, source, teacher)
      # View 0 of a teacher-view cache is the image itself: no teacher pass needed.
      targets = (source_features(source, teacher) if views is None
                 else np.asarray(views.targets[:, 0], np.float32))
      cache["full"] = images, targets, time.perf_counter() - t0  # teacher targets of all
    images, targets, set_seconds = cache["full"]
    with pre.unlocked():
      pre.epochs = config.eval.full_epochs
  else:
    s = sets.build_set(row, config, workdir, n, seed, source, teacher)
    # A parameter-matching set also pays for training its expert buffer.
    set_seconds = float(s.extra.get("seconds", 0.0)) + float(s.extra.get("expert_seconds", 0.0))
    images, targets = s.images, s.targets
  name = f"pretrain_{row}_n{n}_{table.arch_label(arch)}_seed{seed}"
  kind, loss = sets.ROWS[row].recipe
  t0 = time.perf_counter()
  model, variables = transfer.pretrain(pre, images, targets, seed,
                                       os.path.join(workdir, "table"), name, kind=kind,
                                       loss=loss, teacher_fn=teacher_fn, quiet=True)
  return model, variables, set_seconds, time.perf_counter() - t0


def run_table(config, workdir: str) -> dict:
  """Fills `<workdir>/table.json` and writes the table files."""
  jobs = plan(config)
  teacher = workdir_teacher(config, workdir)
  source = load_source(config)
  image_shape = source.images.shape[1:]
  if any("random_mf" in job.rows for job in jobs):
    # Refused here, before any row is measured, rather than when its set is built.
    multi_formation.check((1, *image_shape), config.eval.multi_formation,
                          "eval.multi_formation on the source's images")
  path = os.path.join(workdir, "table.json")
  results = files.read_json(path, {"runs": []})
  done = {table.run_key(r) for r in results["runs"]}
  if done:
    log(f"[table] {len(done)} entries measured before are kept in {path}; measuring the rest")
  targets, cache = {}, {}
  teacher_fn = jax.jit(lambda x: teacher.represent(teacher.variables, x))
  for job in jobs:
    for seed in config.eval.seeds:
      for arch_lbl, arch in job.archs:
        for row in job.rows:
          if row == "teacher" and arch_lbl != table.arch_label(table.arch_of(teacher.model)):
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
              targets[t_lbl] = load_target(config, image_shape, teacher.mean,
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
            done |= {table.run_key(r) for r in results["runs"]}
  results["teacher"] = teacher_record(teacher.info)
  return write_outputs(results, config, workdir)


def teacher_record(info: dict) -> dict:
  """The teacher as a table file records it, from its card's `info`.

  Returns:
    {"probe": its linear-probe accuracy, "train_seconds", "imported_from"}: the
    folder it was imported from as a published table names it (`shown_path`), so
    a committed table carries no machine's absolute path.
  """
  origin = info.get("imported_from")
  return {"probe": info.get("probe", {}).get("accuracy"),
          "train_seconds": info.get("train_seconds"),
          "imported_from": table.shown_path(origin) if origin else None}


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
    have = {table.run_key(r) for r in results["runs"]}
    for run in runs:
      if table.run_key(run) not in have:
        results["runs"].append(run)
        have.add(table.run_key(run))
    results.update(info or {})
    results["summary"] = table.summarize(results["runs"])
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
      kind = config.probe.representation
      features.update(train=extract_features(model, variables, x_train, kind=kind),
                      test=extract_features(model, variables, x_test, kind=kind))
    p = config.probe
    return transfer.probe_readout(readout, features["train"], y_train, features["test"], y_test,
                                  regs=tuple(p.regs), folds=p.folds, label_draws=p.label_draws,
                                  seed=seed)
  cfg = config.finetune
  if cfg.num_train:
    keep = np.random.default_rng(seed).permutation(len(x_train))[:cfg.num_train]
    x_train, y_train = x_train[keep], y_train[keep]
  return transfer.finetune(cfg, table.arch_of(model), variables, x_train, y_train, x_test, y_test,
                           seed, os.path.join(workdir, "table"), f"finetune_{name}")


# The first line of the published table.md; a rerun keeps whatever is above it.
MARKDOWN_MARKER = "<!-- Written by `distill table` from this line down; text above it is kept. -->"


def _with_kept_preface(path: str, markdown: str) -> str:
  """`markdown` under the marker, after the text above the marker in `path`.

  A file without the marker (or none at all) contributes nothing: it is
  replaced, as it was written before the marker existed.
  """
  preface = ""
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if MARKDOWN_MARKER in old:
      preface = old[:old.index(MARKDOWN_MARKER)]
  return preface + MARKDOWN_MARKER + "\n\n" + markdown


def write_outputs(results: dict, config, workdir: str) -> dict:
  """Merges `results` into `<workdir>/table.json` and writes every output of it.

  Returns:
    The merged results (entries other processes added are kept).
  """
  results = add_runs(os.path.join(workdir, "table.json"), results["runs"],
                     {k: v for k, v in results.items() if k not in ("runs", "summary")})
  files.write_atomic(os.path.join(workdir, "table.csv"), table.format_csv(results))
  markdown = table.format_markdown(results, config, tuple(sets.ROWS))
  files.write_atomic(os.path.join(workdir, "table.md"), markdown)
  series = {}
  for s in results["summary"]:
    if (s["readout"] == "linear_probe" and s["row"] in config.eval.sweep_rows
        and s["arch"] == table.arch_label(config.pretrain.arch)):
      series.setdefault(s["row"], []).append((s["n"], s["mean"], s["std"]))
  png = None
  if config.eval.sizes and series:
    png = plots.save_size_sweep(os.path.join(workdir, "size_sweep.png"), series,
                                "linear-probe top-1 vs set size")
  dots = table.save_table_figure(os.path.join(workdir, "table.png"), results["summary"],
                                 config.krr_st.num_synthetic, tuple(sets.ROWS))
  log(markdown)
  if config.eval.results_path:
    prefix = config.eval.results_path
    files.write_atomic(prefix + ".md", _with_kept_preface(prefix + ".md", markdown))
    published = {suffix: os.path.join(workdir, "table" + suffix) for suffix in (".json", ".csv")}
    published.update({"_size_sweep.png": png, ".png": dots})
    for suffix, written in published.items():
      if written:
        with open(written, "rb") as f:
          files.write_atomic(prefix + suffix, f.read())
  return results


