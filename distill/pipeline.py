"""The pipeline stages as importable `run_*(config, workdir)` functions.

    teacher  -> <workdir>/teacher/            (Barlow Twins backbone)
    krr-st   -> <workdir>/synthetic.npz       (+ _grid.png, loss curve)
    table    -> <workdir>/table.{json,csv,md} (distill/table.py: every row,
                architecture, target, read-out and seed)

Each stage reads the previous stage's artefact from disk, skips work whose
artefact already exists, and resumes from checkpoints after a kill. The
config a workdir was made with is kept in `<workdir>/config.json`; running
a different config on the same workdir is refused rather than mixing
artefacts of two settings.
"""

from __future__ import annotations

import glob
import json
import os
import time

import jax
import ml_collections
import numpy as np

from distill import data, export, files, plots, select, teacher as teacher_lib, transfer
from distill.config import to_dict
from distill.errors import DistillError
from distill.krr_st import KRRST
from distill.loop import Checkpointer, batch_indices, log, run_loop
from distill.models import extract_features

SYNTHETIC = "synthetic.npz"


# Settings that only choose WHICH table entries to measure (each entry is
# keyed by them in table.json), so they may change between runs of a workdir,
# e.g. to add a row or a seed later.
SELECTION_KEYS = frozenset(f"eval.{k}" for k in (
    "rows", "seeds", "readouts", "archs", "extra_targets", "sizes", "sweep_rows",
    "results_path"))


# Sections that only shape artefacts built on demand (the table's parameter-
# matching rows). Their settings may change while none of the artefacts they
# shape exists in the workdir; config.json then takes the new values, so
# later runs are checked against what was actually used.
ON_DEMAND_SECTIONS = {"experts": ("experts_*",),
                      "param_match": ("param_match_*", "synthetic_iadd*", "synthetic_mtt*")}


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates the workdir and checks it was not made with another config.

  Keys in SELECTION_KEYS may differ, settings newer than the stored
  config.json are accepted, and so are changes to an ON_DEMAND_SECTIONS
  section none of whose artefacts exists yet; otherwise the stored file
  keeps the first config.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  current = json.loads(json.dumps(to_dict(config)))
  if not os.path.exists(path):
    files.write_json(path, current)
    return
  previous = files.read_json(path, None)
  diff = sorted(k for k in _diff_keys(previous, current) if k not in SELECTION_KEYS)
  unbuilt = {section for section, patterns in ON_DEMAND_SECTIONS.items()
             if not any(glob.glob(os.path.join(workdir, p)) for p in patterns)}
  fixed = [k for k in diff if k.split(".")[0] not in unbuilt]
  if fixed:
    raise DistillError(f"workdir {workdir} was made with a different config (differs at: "
                       f"{', '.join(fixed[:8])}); use a new --workdir")
  changed = {k.split(".")[0] for k in diff}
  if changed:
    files.write_json(path, {**previous, **{section: current[section] for section in changed}})


def _diff_keys(a, b, prefix=""):
  """Dotted keys whose values differ; keys only in `b` (settings added to the
  code since `a` was stored, defaulting to the old behaviour) do not count."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a):
      yield from _diff_keys(a[k], b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield prefix.rstrip(".")


def load_source(config) -> data.ArrayDataset:
  cfg = config.data
  ds = data.load_dataset(cfg.source, cfg.source_split, cache_dir=cfg.cache_dir or None,
                         data_dir=cfg.data_dir or None)
  return data.subsample(ds, cfg.num_source, config.seed)


def parse_target(spec: str) -> tuple[str, str, str]:
  """"dataset|train_split|test_split" -> its parts (splits default to train, test)."""
  parts = spec.split("|")
  if len(parts) not in (1, 3) or not all(parts):
    raise DistillError(f"target {spec!r}: expected 'dataset' or "
                       f"'dataset|train_split|test_split'")
  return (parts[0], "train", "test") if len(parts) == 1 else tuple(parts)


def main_target(config) -> str:
  cfg = config.data
  return f"{cfg.target}|{cfg.target_train_split}|{cfg.target_test_split}"


def load_target(config, image_shape, mean, std, spec: str | None = None):
  """A labelled target brought to the source's size/channels and normalisation.

  Args:
    config: the full config (`data.num_target_*`, cache settings).
    image_shape: (H, W, C) of the source. mean, std: (C,) normalisation.
    spec: "dataset|train_split|test_split"; None = the config's main target.

  Returns:
    (train images (N,H,W,C) float32, train labels (N,) int32, test images, test labels).
  """
  dataset, train_split, test_split = parse_target(spec or main_target(config))
  cfg = config.data
  out = []
  for split, num in ((train_split, cfg.num_target_train), (test_split, cfg.num_target_test)):
    ds = data.load_dataset(dataset, split, cache_dir=cfg.cache_dir or None,
                           data_dir=cfg.data_dir or None)
    if ds.labels is None:
      raise DistillError(f"transfer target {dataset!r} split {split!r} has no labels")
    # A cap, not a demand: one setting serves targets of different sizes.
    ds = data.subsample(ds, min(num, len(ds.images)), 0)
    images = data.match_format(ds.images, image_shape[0], image_shape[2])
    out += [data.normalize(images, mean, std), ds.labels.astype(np.int32)]
  return tuple(out)


def run_teacher(config, workdir: str) -> teacher_lib.Teacher:
  """Trains the Barlow Twins teacher (or loads it) and probes it on the target."""
  directory = os.path.join(workdir, "teacher")
  if os.path.exists(os.path.join(directory, "teacher.json")):
    return teacher_lib.load_teacher(directory)
  cfg = config.teacher
  t0 = time.perf_counter()
  source = load_source(config)
  images = source.images
  mean, std = data.channel_stats(images)
  image_shape = images.shape[1:]
  if cfg.infobatch.prune_ratio > 0:
    return _run_infobatch_teacher(config, workdir, source)
  n = len(images)
  batch_size = min(cfg.batch_size, n)
  num_steps = cfg.epochs * max(n // batch_size, 1)
  log(f"[teacher] Barlow Twins {cfg.arch.name} on {source.name}: {n} images "
      f"{image_shape}, {num_steps} steps")
  model = teacher_lib.build_barlow_twins(cfg)
  optimizer = teacher_lib.make_optimizer(cfg, num_steps)
  state = teacher_lib.init_state(model, optimizer, jax.random.key(config.seed), image_shape)
  step = teacher_lib.make_train_step(model, optimizer, mean, std, cfg.lambda_offdiag)
  state, history = run_loop(
      name="teacher", workdir=workdir, state=state, step_fn=step,
      batch_fn=lambda i: images[batch_indices(config.seed, i, n, batch_size)],
      num_steps=num_steps, rng=jax.random.key(config.seed + 1),
      log_every=max(min(100, num_steps // 10), 1),
      checkpoint_every=max(num_steps // 10, 1))
  train_s = time.perf_counter() - t0
  backbone = build_backbone_only(state["variables"])
  probe = probe_backbone(config, teacher_lib.build_barlow_twins(cfg).backbone, backbone,
                         image_shape, mean, std)
  log(f"[teacher] linear-probe accuracy on {config.data.target}: {probe['accuracy']:.4f}")
  info = dict(source=source.name, num_images=n, steps=num_steps, train_seconds=train_s,
              final_loss=history[-1]["loss"] if history else None, probe=probe)
  teacher_lib.save_teacher(directory, cfg.arch.to_dict(), state["variables"], mean, std,
                           image_shape, info)
  plots.save_curve(os.path.join(directory, "loss.png"), history, "loss", "Barlow Twins loss")
  return teacher_lib.load_teacher(directory)


def _run_infobatch_teacher(config, workdir: str, source) -> teacher_lib.Teacher:
  """The teacher trained with InfoBatch pruning (distill/infobatch.py), then probed."""
  from distill import infobatch
  teacher, report = infobatch.train_teacher(config, workdir, source.images)
  probe = probe_backbone(config, teacher.model, teacher.variables, teacher.image_shape,
                         teacher.mean, teacher.std)
  log(f"[teacher] InfoBatch skipped {100 * report.get('skipped_fraction', 0):.1f}% of "
      f"sample-steps; linear-probe accuracy on {config.data.target}: {probe['accuracy']:.4f}")
  teacher_lib.save_teacher(os.path.join(workdir, "teacher"), config.teacher.arch.to_dict(),
                           {k: {"backbone": v} for k, v in teacher.variables.items()},
                           teacher.mean, teacher.std, teacher.image_shape,
                           {**teacher.info, "probe": probe, "infobatch": report})
  return teacher_lib.load_teacher(os.path.join(workdir, "teacher"))


def build_backbone_only(bt_variables: dict) -> dict:
  return {k: v["backbone"] for k, v in bt_variables.items() if "backbone" in v}


def probe_backbone(config, model, variables, image_shape, mean, std, seed: int = 0) -> dict:
  """Linear-probe accuracy of a backbone's frozen features on the target."""
  x_train, y_train, x_test, y_test = load_target(config, image_shape, mean, std)
  features = lambda x: extract_features(model, variables, x)
  return transfer.linear_probe(features(x_train), y_train, features(x_test), y_test,
                               regs=tuple(config.probe.regs),
                               folds=config.probe.folds, seed=seed)


def set_path(workdir: str, row: str, n: int, config) -> str:
  """Where the pretraining set of a table row at size n lives."""
  if row == "krr_st" and n == config.distill.num_synthetic:
    return os.path.join(workdir, SYNTHETIC)  # the main artefact of `distill krr-st`
  return os.path.join(workdir, "sets", f"{row}_n{n}.npz")


def run_krr_st(config, workdir: str, n: int | None = None,
               supervised: bool = False) -> export.SyntheticSet:
  """Distils the source with KRR-ST into `<workdir>/synthetic.npz`.

  Args:
    config: the full config (`distill` section for the method).
    workdir: the job directory (holds the teacher).
    n: set size; None = `distill.num_synthetic` (other sizes go to
      `<workdir>/sets/krr_st_n<n>.npz`, for the size sweep).
    supervised: the FRePo-style baseline instead: same pool machinery, but
      the targets are learned labels fitted to one-hot labels of real
      images (needs a labelled source); written to `sets/frepo_n<n>.npz`.
  """
  cfg = config.distill
  n = n or cfg.num_synthetic
  row = "frepo" if supervised else "krr_st"
  out_path = set_path(workdir, row, n, config)
  if os.path.exists(out_path):
    return export.load_synthetic(out_path)
  teacher = teacher_lib.workdir_teacher(config, workdir)
  source = load_source(config)
  num_source = len(source.images)
  if n > num_source:
    raise DistillError(f"distill.num_synthetic={n} is larger than the source "
                       f"({num_source} images)")
  if cfg.init not in INITS:
    raise DistillError(f"unknown distill.init {cfg.init!r}; expected one of {INITS}")
  if supervised and source.labels is None:
    raise DistillError(f"the frepo row needs a labelled source; {source.name} has no labels")
  t0 = time.perf_counter()
  name = row if n == cfg.num_synthetic else f"{row}_n{n}"
  init_idx = initial_indices(cfg.init, config.seed, workdir, source, teacher, n, supervised)
  x0 = data.normalize(source.images[init_idx], teacher.mean, teacher.std)
  if supervised:
    num_classes = int(source.labels.max()) + 1
    y0 = np.eye(num_classes, dtype=np.float32)[source.labels[init_idx]]
    target_dim, target_model = num_classes, None
  else:
    y0 = teacher.features(x0)
    target_dim, target_model = teacher.dim, teacher.model
  image_shape = source.images.shape[1:]
  method = KRRST(cfg, image_shape, target_dim, target_model, teacher.mean, teacher.std,
                 representation=teacher.representation)
  resuming = Checkpointer(os.path.join(workdir, name, "ckpt")).latest_step() is not None
  # On resume the pool's warm-up training is wasted work: the checkpoint replaces it.
  state = method.init(jax.random.key(config.seed), x0, y0, warm_up=not resuming)
  log(f"[{name}] n={n} synthetic images from {num_source} source images, target dim "
      f"{target_dim}, pool {cfg.pool.size}x{cfg.pool.arch.name}, {cfg.steps} steps")
  images, labels = source.images, source.labels
  batch_size = min(cfg.batch_size, num_source)

  def batch_fn(i):
    idx = batch_indices(config.seed, i, num_source, batch_size)
    return (images[idx], labels[idx]) if supervised else images[idx]

  state, history = run_loop(
      name=name, workdir=workdir, state=state,
      step_fn=lambda s, b, r: method.step(s, b, r, teacher.variables),
      batch_fn=batch_fn, num_steps=cfg.steps, rng=jax.random.key(config.seed + 2),
      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
      hint=f"raise distill.reg (now {cfg.reg}) or lower the outer learning rates")
  synthetic = export.SyntheticSet(
      images=np.asarray(state["synthetic"]["images"]),
      targets=np.asarray(state["synthetic"]["targets"]),
      labels=source.labels[init_idx].astype(np.int32) if supervised else None,
      method=row, source=source.name,
      teacher="labels" if supervised else
      f"barlow_twins/{teacher.model.__class__.__name__.lower()}",
      image_mean=teacher.mean, image_std=teacher.std, config=to_dict(config), step=cfg.steps,
      extra=dict(seconds=time.perf_counter() - t0,
                 final_loss=history[-1]["loss"] if history else None,
                 init_indices=init_idx.tolist()))
  save_set(out_path, synthetic, workdir, name, history)
  return synthetic


INITS = ("random", "kmeans", "pruned")


def initial_indices(init: str, seed: int, workdir: str, source, teacher, n: int,
                    supervised: bool = False) -> np.ndarray:
  """Which n source images a learned set starts from (`distill.init`).

  "random": uniformly at random (class-balanced for the supervised variant);
  "kmeans": the image nearest to each of n k-means centroids of the teacher's
  features; "pruned": at random among the source indices kept by `distill
  prune-source` (`<workdir>/source_pruning.npz`, same source settings).

  Returns:
    (n,) sorted int indices into `source.images`.
  """
  if init == "kmeans":
    from distill import sets  # sets builds on this module
    return select.kmeans_coreset(sets.source_features(source, teacher), n, seed)
  if init == "pruned":
    from distill import source_pruning
    path = os.path.join(workdir, "source_pruning.npz")
    if not os.path.exists(path):
      raise DistillError(f"distill.init='pruned' needs {path}; run `distill prune-source` first")
    kept = np.asarray(source_pruning.load_pruning(path).indices)
    if kept.size and kept.max() >= len(source.images):
      raise DistillError(f"{path} indexes images beyond the source ({len(source.images)}); "
                         f"it was made with other data settings")
    if n > kept.size:
      raise DistillError(f"distill.init='pruned': {n} images requested but the pruned source "
                         f"keeps {kept.size}")
    return np.sort(kept[select.random_subset(kept.size, n, seed)])
  if supervised:
    return select.class_balanced_subset(source.labels, n, seed)
  return select.random_subset(len(source.images), n, seed)


def save_set(out_path: str, synthetic: export.SyntheticSet, workdir: str, name: str,
             history: list[dict]) -> None:
  """Exports a learned set with its image grid and loss curve."""
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  export.save_synthetic(out_path, synthetic)
  export.save_image_grid(os.path.splitext(out_path)[0] + "_grid.png", synthetic.images,
                         synthetic.image_mean, synthetic.image_std)
  plots.save_curve(os.path.join(workdir, name, "loss.png"), history, "loss",
                   f"{name} outer loss")
  log(f"[{name}] wrote {out_path}")


def run(config, workdir: str) -> dict:
  """All stages: teacher -> KRR-ST -> export -> the results table."""
  from distill import table  # table builds on this module
  prepare_workdir(config, workdir)
  timings = files.read_json(os.path.join(workdir, "timings.json"), default={})
  for stage, fn in (("teacher", run_teacher), ("krr_st", run_krr_st),
                    ("table", table.run_table)):
    t0 = time.perf_counter()
    out = fn(config, workdir)
    timings.setdefault(stage, time.perf_counter() - t0)
    files.write_json(os.path.join(workdir, "timings.json"), timings)
  return out
