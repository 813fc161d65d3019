"""The pipeline stages as importable `run_*(config, workdir)` functions.

    teacher  -> <workdir>/teacher/            (Barlow Twins backbone)
    krr-st   -> <workdir>/synthetic.npz       (+ _grid.png, loss curve)
    transfer -> <workdir>/transfer.{json,md}  (linear probe per row and seed)

Each stage reads the previous stage's artefact from disk, skips work whose
artefact already exists, and resumes from checkpoints after a kill. The
config a workdir was made with is kept in `<workdir>/config.json`; running
a different config on the same workdir is refused rather than mixing
artefacts of two settings.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from distill import data, export, plots, teacher as teacher_lib, transfer
from distill.config import to_dict
from distill.errors import DistillError
from distill.krr_st import KRRST
from distill.loop import Checkpointer, batch_indices, log, run_loop
from distill.models import extract_features

SYNTHETIC = "synthetic.npz"
ROWS = ("none", "random", "krr_st")


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates the workdir and checks it was not made with another config."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  current = json.loads(json.dumps(to_dict(config)))
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != current:
      diff = sorted(_diff_keys(previous, current))
      raise DistillError(f"workdir {workdir} was made with a different config (differs at: "
                         f"{', '.join(diff[:8])}); use a new --workdir")
    return
  with open(path + ".tmp", "w") as f:
    json.dump(current, f, indent=1)
  os.replace(path + ".tmp", path)


def _diff_keys(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield prefix.rstrip(".")


def load_source(config) -> data.ArrayDataset:
  cfg = config.data
  ds = data.load_dataset(cfg.source, cfg.source_split, cache_dir=cfg.cache_dir or None,
                         data_dir=cfg.data_dir or None)
  return data.subsample(ds, cfg.num_source, config.seed)


def load_target(config, image_shape, mean, std, seed: int = 0):
  """Labelled target splits, brought to the source's size/channels and normalisation.

  Returns:
    (train images (N,H,W,C) float32, train labels (N,), test images, test labels).
  """
  cfg = config.data
  out = []
  for split, num in ((cfg.target_train_split, cfg.num_target_train),
                     (cfg.target_test_split, cfg.num_target_test)):
    ds = data.load_dataset(cfg.target, split, cache_dir=cfg.cache_dir or None,
                           data_dir=cfg.data_dir or None)
    if ds.labels is None:
      raise DistillError(f"transfer target {cfg.target!r} split {split!r} has no labels")
    ds = data.subsample(ds, num, seed)
    images = data.match_format(ds.images, image_shape[0], image_shape[2])
    out += [data.normalize(images, mean, std), ds.labels]
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


def build_backbone_only(bt_variables: dict) -> dict:
  return {k: v["backbone"] for k, v in bt_variables.items() if "backbone" in v}


def probe_backbone(config, model, variables, image_shape, mean, std, seed: int = 0) -> dict:
  """Linear-probe accuracy of a backbone's frozen features on the target."""
  x_train, y_train, x_test, y_test = load_target(config, image_shape, mean, std, seed)
  features = lambda x: extract_features(model, variables, x)
  return transfer.linear_probe(features(x_train), y_train, features(x_test), y_test,
                               regs=tuple(config.probe.regs),
                               val_fraction=config.probe.val_fraction, seed=seed)


def run_krr_st(config, workdir: str) -> export.SyntheticSet:
  """Distils the source into `<workdir>/synthetic.npz` with KRR-ST."""
  out_path = os.path.join(workdir, SYNTHETIC)
  if os.path.exists(out_path):
    return export.load_synthetic(out_path)
  cfg = config.distill
  teacher = teacher_lib.load_teacher(os.path.join(workdir, "teacher"))
  source = load_source(config)
  n, num_source = cfg.num_synthetic, len(source.images)
  if n > num_source:
    raise DistillError(f"distill.num_synthetic={n} is larger than the source "
                       f"({num_source} images)")
  if cfg.init != "random":
    raise DistillError(f"unknown distill.init {cfg.init!r}; expected 'random'")
  t0 = time.perf_counter()
  init_idx = np.sort(np.random.default_rng(config.seed).choice(num_source, n, replace=False))
  x0 = data.normalize(source.images[init_idx], teacher.mean, teacher.std)
  y0 = teacher.features(x0)
  image_shape = source.images.shape[1:]
  method = KRRST(cfg, image_shape, teacher.dim, teacher.model, teacher.mean, teacher.std)
  resuming = Checkpointer(os.path.join(workdir, "krr_st", "ckpt")).latest_step() is not None
  # On resume the pool's warm-up training is wasted work: the checkpoint replaces it.
  state = method.init(jax.random.key(config.seed), x0, y0, warm_up=not resuming)
  log(f"[krr_st] n={n} synthetic images from {num_source} source images, target dim "
      f"{teacher.dim}, pool {cfg.pool.size}x{cfg.pool.arch.name}, {cfg.steps} steps")
  images = source.images
  batch_size = min(cfg.batch_size, num_source)

  def check(step, record):
    if record["solve_ok"] < 1:
      raise DistillError(f"[krr_st] ridge solve failed at step {step} even with jitter "
                         f"{record['jitter']:.3g}: raise distill.reg (now {cfg.reg})")

  state, history = run_loop(
      name="krr_st", workdir=workdir, state=state,
      step_fn=lambda s, b, r: method.step(s, b, r, teacher.variables),
      batch_fn=lambda i: images[batch_indices(config.seed, i, num_source, batch_size)],
      num_steps=cfg.steps, rng=jax.random.key(config.seed + 2),
      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, check_fn=check)
  synthetic = export.SyntheticSet(
      images=np.asarray(state["synthetic"]["images"]),
      targets=np.asarray(state["synthetic"]["targets"]),
      labels=None, method="krr_st", source=source.name,
      teacher=f"barlow_twins/{teacher.model.__class__.__name__.lower()}",
      image_mean=teacher.mean, image_std=teacher.std, config=to_dict(config), step=cfg.steps,
      extra=dict(seconds=time.perf_counter() - t0,
                 final_loss=history[-1]["loss"] if history else None,
                 init_indices=init_idx.tolist()))
  export.save_synthetic(out_path, synthetic)
  export.save_image_grid(os.path.join(workdir, "synthetic_grid.png"), synthetic.images,
                         synthetic.image_mean, synthetic.image_std)
  plots.save_curve(os.path.join(workdir, "krr_st", "loss.png"), history, "loss",
                   "KRR-ST outer loss")
  log(f"[krr_st] wrote {out_path}")
  return synthetic


def run_transfer(config, workdir: str) -> dict:
  """Pretrains on each row's set and linear-probes on the target, per seed."""
  teacher = teacher_lib.load_teacher(os.path.join(workdir, "teacher"))
  rows = tuple(config.eval.rows)
  unknown = set(rows) - set(ROWS)
  if unknown:
    raise DistillError(f"unknown eval.rows {sorted(unknown)}; expected some of {ROWS}")
  results_path = os.path.join(workdir, "transfer.json")
  results = _read_json(results_path, default={"runs": []})
  done = {(r["row"], r["seed"]) for r in results["runs"]}
  synthetic = export.load_synthetic(os.path.join(workdir, SYNTHETIC))
  source = load_source(config)
  n = len(synthetic.images)
  image_shape = source.images.shape[1:]
  target = load_target(config, image_shape, teacher.mean, teacher.std)
  for seed in config.eval.seeds:
    for row in rows:
      if (row, seed) in done:
        continue
      t0 = time.perf_counter()
      name = f"pretrain_{row}_seed{seed}"
      if row == "none":
        model, variables = transfer.fresh_backbone(config.pretrain, image_shape, seed)
      else:
        if row == "random":
          idx = np.random.default_rng(1000 + seed).choice(len(source.images), n, replace=False)
          images = data.normalize(source.images[idx], teacher.mean, teacher.std)
          targets = teacher.features(images)
        else:
          images, targets = synthetic.images, synthetic.targets
        model, variables = transfer.pretrain(config.pretrain, images, targets, seed,
                                             os.path.join(workdir, "transfer"), name, quiet=True)
      pretrain_s = time.perf_counter() - t0
      features = lambda x: extract_features(model, variables, x)
      probe = transfer.linear_probe(features(target[0]), target[1], features(target[2]),
                                    target[3], regs=tuple(config.probe.regs),
                                    val_fraction=config.probe.val_fraction, seed=seed)
      run = dict(row=row, seed=seed, accuracy=probe["accuracy"], reg=probe["reg"],
                 pretrain_seconds=pretrain_s,
                 probe_seconds=time.perf_counter() - t0 - pretrain_s)
      log(f"[transfer] {row:8s} seed {seed}: linear-probe accuracy {probe['accuracy']:.4f} "
          f"(pretrain {pretrain_s:.0f}s)")
      results["runs"].append(run)
      _write_json(results_path, results)
  results["teacher_probe"] = teacher.info.get("probe", {}).get("accuracy")
  results["summary"] = summarize(results["runs"], rows)
  _write_json(results_path, results)
  table = format_table(results, config, n)
  with open(os.path.join(workdir, "transfer.md"), "w") as f:
    f.write(table)
  log(table)
  return results


def summarize(runs: list[dict], rows) -> dict:
  out = {}
  for row in rows:
    acc = np.array([r["accuracy"] for r in runs if r["row"] == row])
    secs = np.array([r["pretrain_seconds"] for r in runs if r["row"] == row])
    if len(acc):
      out[row] = dict(mean=float(acc.mean()), std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                      seeds=len(acc), pretrain_seconds=float(secs.mean()))
  return out


def format_table(results: dict, config, n: int) -> str:
  lines = [f"Linear probe on {config.data.target} after pretraining "
           f"({config.pretrain.arch.name}, n={n}); source {config.data.source}",
           "", "| pretraining set | top-1 accuracy (mean ± std) | seeds | pretrain s |",
           "|---|---|---|---|"]
  for row, s in results["summary"].items():
    lines.append(f"| {row} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} | {s['seeds']} "
                 f"| {s['pretrain_seconds']:.0f} |")
  if results.get("teacher_probe") is not None:
    lines.append(f"| (teacher itself) | {100 * results['teacher_probe']:.2f} | - | - |")
  return "\n".join(lines) + "\n"


def run(config, workdir: str) -> dict:
  """All stages: teacher -> KRR-ST -> export -> pretrain -> linear probe."""
  prepare_workdir(config, workdir)
  timings = _read_json(os.path.join(workdir, "timings.json"), default={})
  for stage, fn in (("teacher", run_teacher), ("krr_st", run_krr_st),
                    ("transfer", run_transfer)):
    t0 = time.perf_counter()
    out = fn(config, workdir)
    timings.setdefault(stage, time.perf_counter() - t0)
    _write_json(os.path.join(workdir, "timings.json"), timings)
  return out


def _read_json(path: str, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)
