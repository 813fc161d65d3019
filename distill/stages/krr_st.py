"""Stage 2: KRR-ST distillation -> `<workdir>/synthetic.npz` (+ grid, loss curve).

The same machinery with label targets is the FRePo row (`supervised=True`,
`<workdir>/sets/frepo_n<n>.npz`); other set sizes of the size sweep go to
`<workdir>/sets/krr_st_n<n>.npz`.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from distill.config import to_dict
from distill.data import augment, datasets, synthetic_set
from distill.errors import DistillError
from distill.methods import teacher_views
from distill.methods.krr_st import held_out_loss, KRRST, split_along_n
from distill.nn import parallel
from distill.nn.loop import batch_indices, Checkpointer, log, run_loop
from distill.selection import coresets, source_pruning
from distill.stages.artefacts import (found, load_source, save_set, set_path,
                                      source_features, workdir_teacher)
from distill.stages.teacher_views import workdir_views


def run_krr_st(config, workdir: str, n: int | None = None,
               supervised: bool = False) -> synthetic_set.SyntheticSet:
  """Distils the source with KRR-ST into `<workdir>/synthetic.npz`.

  Args:
    config: the full config (`krr_st` section for the method).
    workdir: the job directory (holds the teacher).
    n: set size; None = `krr_st.num_synthetic` (other sizes go to
      `<workdir>/sets/krr_st_n<n>.npz`, for the size sweep).
    supervised: the FRePo-style baseline instead: same pool machinery, but
      the targets are learned labels fitted to one-hot labels of real
      images (needs a labelled source); written to `sets/frepo_n<n>.npz`.
  """
  cfg = config.krr_st
  n = n or cfg.num_synthetic
  row = "frepo" if supervised else "krr_st"
  out_path = set_path(workdir, row, n, config)
  if os.path.exists(out_path):
    found(row, out_path)
    return synthetic_set.load_synthetic(out_path)
  teacher = workdir_teacher(config, workdir)
  source = load_source(config)
  num_source = len(source.images)
  if n > num_source:
    raise DistillError(f"krr_st.num_synthetic={n} is larger than the source "
                       f"({num_source} images)")
  if cfg.init not in INITS:
    raise DistillError(f"unknown krr_st.init {cfg.init!r}; expected one of {INITS}")
  if supervised and source.labels is None:
    raise DistillError(f"the frepo row needs a labelled source; {source.name} has no labels")
  t0 = time.perf_counter()
  name = row if n == cfg.num_synthetic else f"{row}_n{n}"
  init_idx = initial_indices(cfg.init, config.seed, workdir, source, teacher, n, supervised)
  x0 = datasets.normalize(source.images[init_idx], teacher.mean, teacher.std)
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
  # The frozen teacher's views, computed once (teacher.views > 0); FRePo has no teacher.
  cache = None if supervised else workdir_views(config, workdir, source, teacher)
  if 0 < config.parallel.shard_synthetic_from <= n:
    # A large set lives split along n; the step's partitioner gathers its features.
    state = split_along_n(state)

  def batch_fn(i):
    idx = batch_indices(config.seed, i, num_source, batch_size)
    if cache is not None:
      return cache.batch(idx, teacher_views.draw_views(config.seed, i, len(idx),
                                                       cache.num_views, cfg.augment_real))
    return (images[idx], labels[idx]) if supervised else images[idx]

  state, history = run_loop(
      name=name, workdir=workdir, state=state,
      step_fn=lambda s, b, r: method.step(s, b, r, teacher.variables),
      batch_fn=batch_fn, num_steps=cfg.steps, rng=jax.random.key(config.seed + 2),
      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
      hint=f"raise krr_st.reg (now {cfg.reg}) or lower the outer learning rates")
  learned = parallel.to_host(state["synthetic"])
  held_out = None
  if cfg.held_out_models and not supervised:
    held_out = held_out_report(config, method, source, teacher, learned,
                               {"images": x0, "targets": y0})
  synthetic = synthetic_set.SyntheticSet(
      images=np.asarray(learned["images"]),
      targets=np.asarray(learned["targets"]),
      labels=source.labels[init_idx].astype(np.int32) if supervised else None,
      method=row, source=source.name,
      teacher="labels" if supervised else
      f"barlow_twins/{teacher.model.__class__.__name__.lower()}",
      image_mean=teacher.mean, image_std=teacher.std, config=to_dict(config), step=cfg.steps,
      extra=dict(seconds=time.perf_counter() - t0,
                 final_loss=history[-1]["loss"] if history else None,
                 held_out=held_out, init_indices=init_idx.tolist(),
                 image_shift=synthetic_set.image_shift(learned["images"], x0)))
  save_set(out_path, synthetic, workdir, name, history)
  return synthetic


def held_out_report(config, method: KRRST, source, teacher, learned: dict,
                    initial: dict) -> dict:
  """The outer loss of the learned set and of its initial subset on a fresh pool.

  `krr_st.held_out_models` fresh models (a key the distillation never
  uses) and `krr_st.held_out_images` seeded source images, with the
  teacher's targets (`krr_st.held_out_loss`), twice: on the images as they
  are ("learned", "initial") and on one fresh random crop + flip of each
  ("learned_views", "initial_views"), the distribution the outer loss is
  trained on when `augment_real` is set.
  """
  cfg = config.krr_st
  num = min(cfg.held_out_images, len(source.images))
  idx = coresets.random_subset(len(source.images), num, config.seed + 17)
  plain = datasets.normalize(source.images[idx], teacher.mean, teacher.std)
  views = np.asarray(augment.random_crop_flip(jax.random.key(config.seed + 20_000),
                                              jnp.asarray(plain)))
  key = jax.random.key(config.seed + 10_000)
  reals = {"": (plain, teacher.features(plain)), "_views": (views, teacher.features(views))}
  report = dict(models=cfg.held_out_models, images=num)
  for name, s in (("learned", learned), ("initial", initial)):
    losses = held_out_loss(method, s, reals, key, cfg.held_out_models)
    report.update({name + suffix: loss for suffix, loss in losses.items()})
  log(f"[krr_st] held-out outer loss on {cfg.held_out_models} fresh pool models, {num} "
      f"source images: learned set {report['learned']:.4g} (fresh views "
      f"{report['learned_views']:.4g}), its initial subset {report['initial']:.4g} "
      f"({report['initial_views']:.4g})")
  return report


def evaluate_held_out(config, workdir: str) -> dict:
  """`held_out_report` of the workdir's KRR-ST set, recomputed from its artefact."""
  path = set_path(workdir, "krr_st", config.krr_st.num_synthetic, config)
  synthetic = synthetic_set.load_synthetic(path)
  teacher = workdir_teacher(config, workdir)
  source = load_source(config)
  init_idx = np.asarray(synthetic.extra["init_indices"])
  x0 = datasets.normalize(source.images[init_idx], teacher.mean, teacher.std)
  method = KRRST(config.krr_st, source.images.shape[1:], teacher.dim, teacher.model,
                 teacher.mean, teacher.std, representation=teacher.representation)
  return held_out_report(config, method, source, teacher,
                         {"images": synthetic.images, "targets": synthetic.targets},
                         {"images": x0, "targets": teacher.features(x0)})


INITS = ("random", "kmeans", "pruned")


def initial_indices(init: str, seed: int, workdir: str, source, teacher, n: int,
                    supervised: bool = False) -> np.ndarray:
  """Which n source images a learned set starts from (`krr_st.init`).

  "random": uniformly at random (class-balanced for the supervised variant);
  "kmeans": the image nearest to each of n k-means centroids of the teacher's
  features; "pruned": at random among the source indices kept by `distill
  prune-source` (`<workdir>/source_pruning.npz`, same source settings).

  Returns:
    (n,) sorted int indices into `source.images`.
  """
  if init == "kmeans":
    return coresets.kmeans_coreset(source_features(source, teacher), n, seed)
  if init == "pruned":
    path = os.path.join(workdir, "source_pruning.npz")
    if not os.path.exists(path):
      raise DistillError(f"krr_st.init='pruned' needs {path}; run `distill prune-source` first")
    kept = np.asarray(source_pruning.load_pruning(path).indices)
    if kept.size and kept.max() >= len(source.images):
      raise DistillError(f"{path} indexes images beyond the source ({len(source.images)}); "
                         f"it was made with other data settings")
    if n > kept.size:
      raise DistillError(f"krr_st.init='pruned': {n} images requested but the pruned source "
                         f"keeps {kept.size}")
    return np.sort(kept[coresets.random_subset(kept.size, n, seed)])
  if supervised:
    return coresets.class_balanced_subset(source.labels, n, seed)
  return coresets.random_subset(len(source.images), n, seed)


