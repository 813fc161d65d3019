"""Parameter matching: the expert buffer -> `<workdir>/experts_<objective>/`, then
IADD / MTT -> `<workdir>/synthetic_<name>.npz` (+ grid, weights plot, curve).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np

from distill.config import to_dict
from distill.data import datasets, synthetic_set
from distill.errors import DistillError
from distill.methods import experts, param_match
from distill.nn.loop import log, run_loop
from distill.selection import coresets
from distill.stages.artefacts import found, load_source, save_set, workdir_teacher
from distill.stages.teacher_views import workdir_views


def run_experts(config, workdir: str) -> experts.ExpertBuffer:
  """Trains the experts of `config.experts` into `experts.buffer_dir`; resumable."""
  cfg = config.experts
  directory = experts.buffer_dir(workdir, cfg.objective)
  if cfg.dtype not in experts.DTYPES:
    raise DistillError(f"unknown experts.dtype {cfg.dtype!r}; expected one of {experts.DTYPES}")
  source = load_source(config)
  teacher = None
  if cfg.objective == "ce":
    if source.labels is None:
      raise DistillError(f"experts.objective='ce' needs labels, but the source "
                         f"{source.name!r} has none; use experts.objective='mse'")
    num_outputs = len(source.class_names or ()) or int(source.labels.max()) + 1
    mean, std = datasets.channel_stats(source.images)
  else:
    teacher = workdir_teacher(config, workdir)
    num_outputs, mean, std = teacher.dim, teacher.mean, teacher.std
  # Knowledge-distillation experts read the teacher's cached views (teacher.views > 0).
  views = None if teacher is None else workdir_views(config, workdir, source, teacher)
  standardize = teacher is not None and cfg.get("standardize_targets", False)
  target_map = None   # fitted on first need: a rerun with every expert written reads nothing
  log(f"[experts] {cfg.num_experts} x {cfg.arch.name} ({cfg.objective}) on {source.name}: "
      f"{len(source.images)} images, {cfg.epochs} epochs each -> {directory}")
  for e in range(cfg.num_experts):
    path = os.path.join(directory, f"expert_{e:02d}.npz")
    if os.path.exists(path):
      found("experts", path)
      continue
    if standardize and target_map is None:
      target_map = datasets.target_stats(source_representations(source, teacher, views))
    experts.train_expert(cfg, source.images, source.labels if cfg.objective == "ce" else None, mean,
                         std, num_outputs, directory, e, config.seed, teacher=teacher,
                         meta=dict(source=source.name), views=views, target_map=target_map)
    log(f"[experts] wrote {path}")
  buffer = experts.load_buffer(directory)
  if cfg.objective == "mse" and ("target_scale" in buffer.meta) != standardize:
    raise DistillError(f"the experts in {directory} regressed "
                       f"{'standardised' if 'target_scale' in buffer.meta else 'raw'} teacher "
                       f"representations, the config asks for experts.standardize_targets="
                       f"{standardize}; use another workdir or move the buffer")
  return buffer


def source_representations(source, teacher, views) -> np.ndarray:
  """(N, k) the teacher's representations of the source images themselves.

  View 0 of the teacher-view cache (the image, uncropped), else the teacher run once.
  """
  if views is not None:
    return views.targets[:, 0]
  return teacher.features(datasets.normalize(source.images, teacher.mean, teacher.std))


def high_loss_subset(config, workdir: str, source, teacher, buffer: experts.ExpertBuffer,
                     n: int) -> tuple[np.ndarray, dict]:
  """MKDT's start images: the n source images a trained "mse" expert fits worst.

  The score of an image is the squared error of the buffer's first expert,
  after its last epoch, against the teacher's representation of the image
  itself (view 0 of the teacher-view cache, or the teacher run once). Images
  a network still gets wrong after training are the ones whose trajectory
  segments carry the most signal to match.

  Returns:
    (the n indices, sorted; {"source_mean", "chosen_mean", "chosen_min"} of the scores).
  """
  meta = buffer.meta
  targets = experts.to_expert_space(meta, np.asarray(source_representations(
      source, teacher, workdir_views(config, workdir, source, teacher)), np.float32))
  images = datasets.normalize(source.images, np.asarray(meta["mean"], np.float32),
                              np.asarray(meta["std"], np.float32))
  scores = experts.per_sample_losses(meta, buffer.checkpoint(0, buffer.epochs), images, targets)
  idx = np.sort(np.argsort(-scores, kind="stable")[:n])
  summary = dict(source_mean=float(scores.mean()), chosen_mean=float(scores[idx].mean()),
                 chosen_min=float(scores[idx].min()))
  log(f"[param_match] high-loss start: expert 0 after {buffer.epochs} epochs, mean loss "
      f"{summary['chosen_mean']:.4g} on the {n} chosen images, {summary['source_mean']:.4g} "
      f"on the source")
  return idx, summary


def set_path(config, workdir: str) -> str:
  """Where `run_param_match` writes, and finds, the set of `config`."""
  name = param_match.set_name(config.param_match.method, config.experts.objective)
  return os.path.join(workdir, f"synthetic_{name}.npz")


def run_param_match(config, workdir: str) -> synthetic_set.SyntheticSet:
  """Distils the source by parameter matching into `<workdir>/synthetic_<name>.npz`.

  Matches the buffer of `config.experts.objective`; `name` is `param_match.set_name(method,
  objective)`.
  """
  cfg = config.param_match
  param_match.check_config(cfg)
  name = param_match.set_name(cfg.method, config.experts.objective)
  out_path = set_path(config, workdir)
  if os.path.exists(out_path):
    found("param_match", out_path)
    return synthetic_set.load_synthetic(out_path)
  buffer = experts.load_buffer(experts.buffer_dir(workdir, config.experts.objective))
  param_match.check_config(cfg, buffer.epochs)
  meta = buffer.meta
  objective, num_outputs = meta["objective"], int(meta["num_outputs"])
  if objective != config.experts.objective:
    raise DistillError(f"the buffer in {experts.buffer_dir(workdir, objective)} holds "
                       f"{objective!r} experts, the config asks for {config.experts.objective!r}")
  if objective == "ce" and cfg.teacher_targets:
    raise DistillError("param_match.teacher_targets=True regresses the teacher's "
                       "representations; the buffer holds 'ce' experts")
  if objective == "ce" and cfg.init != "random":
    raise DistillError(f"param_match.init={cfg.init!r} ranks images by their loss against "
                       f"the teacher's representations; 'ce' experts start from a "
                       f"class-balanced subset (param_match.init='random')")
  if not cfg.alpha_init:
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.alpha_init = float(meta["lr"])
  source = load_source(config)
  n, num_source = cfg.num_synthetic, len(source.images)
  if tuple(source.images.shape[1:]) != tuple(meta["image_shape"]):
    raise DistillError(f"source images {source.images.shape[1:]} differ from the experts' "
                       f"{tuple(meta['image_shape'])}")
  if n > num_source:
    raise DistillError(f"param_match.num_synthetic={n} is larger than the source "
                       f"({num_source} images)")
  t0 = time.perf_counter()
  mean, std = np.asarray(meta["mean"], np.float32), np.asarray(meta["std"], np.float32)
  # The last experts are held out: never matched, they measure the set afterwards.
  num_experts = len(buffer.trajectories)
  held = list(range(num_experts - min(max(cfg.held_out_experts, 0), num_experts - 1),
                    num_experts))
  matched = buffer._replace(trajectories=buffer.trajectories[:num_experts - len(held)])
  init_scores, teacher_fn = None, None
  if objective == "ce":
    if source.labels is None:
      raise DistillError(f"the experts were trained with 'ce' but the source {source.name!r} "
                         f"has no labels")
    init_idx = coresets.class_balanced_subset(source.labels, n, config.seed)
    labels = source.labels[init_idx].astype(np.int32)
    x0 = datasets.normalize(source.images[init_idx], mean, std)
    y0, teacher_name = param_match.initial_soft_labels(labels, num_outputs), "source_labels"
  else:
    labels, teacher = None, workdir_teacher(config, workdir)
    if teacher.dim != num_outputs:
      raise DistillError(f"teacher width {teacher.dim} differs from the experts' outputs "
                         f"{num_outputs}")
    if cfg.init == "high_loss":
      init_idx, init_scores = high_loss_subset(config, workdir, source, teacher, matched, n)
    else:
      init_idx = coresets.random_subset(num_source, n, config.seed)
    x0 = datasets.normalize(source.images[init_idx], mean, std)
    # The student regresses what the experts regressed (standardised or raw).
    y0 = experts.to_expert_space(meta, teacher.features(x0))
    teacher_name = f"barlow_twins/{teacher.model.__class__.__name__.lower()}"
    if cfg.teacher_targets:
      # The teacher reads the synthetic images as they are: they must be
      # normalised as the teacher's inputs were.
      if not (np.allclose(mean, teacher.mean) and np.allclose(std, teacher.std)):
        raise DistillError(f"param_match.teacher_targets=True: the experts' input "
                           f"normalisation (mean {mean.tolist()}, std {std.tolist()}) is "
                           f"not the teacher's ({teacher.mean.tolist()}, "
                           f"{teacher.std.tolist()})")
      represent = functools.partial(teacher.represent, teacher.variables)
      teacher_fn = lambda x: experts.to_expert_space(meta, represent(x))
  method = param_match.ParamMatch(cfg, experts.expert_model(meta["arch"], num_outputs), objective,
                                  teacher_fn)
  state = method.init(jax.random.key(config.seed), x0, y0)
  initial = jax.device_get(state["learned"])
  log(f"[param_match] {name}: n={n} synthetic images, {len(matched.trajectories)} experts "
      f"matched + {len(held)} held out ({objective}, {buffer.epochs} epochs), "
      f"N={cfg.syn_steps} M={cfg.expert_epochs} max_start={cfg.max_start}, W per "
      f"{cfg.granularity}, {cfg.steps} steps")
  job = f"param_match_{name}"
  state, history = run_loop(
      name=job, workdir=workdir, state=state, step_fn=method.step,
      batch_fn=lambda i: experts.sample_checkpoints(
          matched, config.seed, i, cfg.max_start, cfg.expert_epochs)[2:],
      num_steps=cfg.steps, rng=jax.random.key(config.seed + 4),
      log_every=min(cfg.log_every, cfg.steps), checkpoint_every=cfg.checkpoint_every)
  learned = jax.device_get(state["learned"])
  template = buffer.checkpoint(0, 0)
  weights = jax.device_get(method.weights(learned, template))
  mask = (param_match.prune_mask(weights, template, cfg.prune_fraction)
          if cfg.prune_fraction else None)
  held_out = None
  if held:
    held_out = {which: method.held_out_loss(value, buffer, held, config.seed)
                for which, value in (("learned", learned), ("initial", initial))}
    held_out["experts"] = held
    log(f"[param_match] held-out matching loss on {len(held)} unseen expert(s), with W = 1: "
        f"learned {held_out['learned']['loss_plain']:.4f}, initial images "
        f"{held_out['initial']['loss_plain']:.4f}")
  synthetic = synthetic_set.SyntheticSet(
      images=np.asarray(learned["images"]),
      # Exported in the teacher's space, whatever space the experts regressed.
      targets=experts.from_expert_space(meta, np.asarray(method.export_targets(learned),
                                                         np.float32)),
      labels=labels, method=name, source=source.name, teacher=teacher_name,
      image_mean=mean, image_std=std, config=to_dict(config), step=cfg.steps,
      extra=dict(alpha=float(np.exp(learned["log_alpha"])), objective=objective,
                 granularity=cfg.granularity, weights=param_match.weight_summary(weights),
                 kept_fraction=None if mask is None else float(
                     param_match.weight_stats(weights, template, mask)["kept_fraction"]),
                 num_experts=len(buffer.trajectories), buffer_epochs=buffer.epochs,
                 seconds=time.perf_counter() - t0,
                 expert_seconds=float(meta.get("buffer_seconds") or 0.0),
                 final_loss=history[-1]["loss"] if history else None,
                 held_out=held_out, image_shift=synthetic_set.image_shift(learned["images"], x0),
                 init=cfg.init, init_indices=init_idx.tolist(), init_scores=init_scores,
                 targets="teacher" if cfg.teacher_targets else (
                     "learned" if cfg.lr_targets else "fixed")))
  save_set(out_path, synthetic, workdir, job, history, "matching loss")
  param_match.save_weight_plot(os.path.join(workdir, f"param_match_{name}_weights.png"),
                               weights, f"{name}: importance weights per tensor "
                               f"({cfg.granularity})")
  log(f"[param_match] wrote {out_path} (alpha {synthetic.extra['alpha']:.4g})")
  return synthetic_set.load_synthetic(out_path)
