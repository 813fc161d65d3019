"""Expert trajectories: the buffer that parameter matching learns from.

An expert is a ConvNet with instance norm (no `batch_stats`, so its variables
are a pure `params` pytree) trained on real source images with plain SGD and
crop + flip augmentation. Its parameters are recorded at initialisation and
after every epoch. Two objectives (config `experts.objective`):

  * "ce": cross-entropy with the source labels (the source must have them);
  * "mse": regression of the teacher's representations g(x) of the same
    augmented views, so the buffer needs no labels at all. With
    `experts.standardize_targets` the expert regresses (g(x) - centre) / scale,
    the map `datasets.target_stats` fits to the teacher's representations of
    the source images (stored in the metadata; `to_expert_space` applies it),
    as the table's students standardise theirs: on raw targets the common
    mean dominates the loss and the experts do not learn the teacher
    (experiments/results/expert_probe_n100.json).

Buffer on disk, one directory per objective and one file per expert,
`<workdir>/experts_<objective>/expert_XX.npz`:

  params/<module>/<name>   (epochs + 1, *leaf shape), float32 or float16
  meta                     0-d JSON string: objective, epochs, arch,
                           num_outputs, image_shape, mean, std, dtype,
                           target_centre and target_scale (standardised
                           "mse" targets), ...

A file is written atomically once its expert has finished, so an existing
file is a finished expert and is skipped on a rerun; an expert killed half
way resumes from its `run_loop` checkpoint (the trajectory so far is part of
the checkpointed state).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import time
from typing import NamedTuple

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill import files
from distill.data import augment
from distill.errors import DistillError
from distill.methods import barlow_twins, teacher_views
from distill.nn.loop import batch_indices, run_loop
from distill.nn.models import build_model
from distill.selection import infobatch

OBJECTIVES = ("ce", "mse")
DTYPES = ("float32", "float16")
_SEP = "/"


def supervised_loss(objective: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """The loss an expert (and a parameter-matching student) minimises.

  Args:
    objective: "ce" or "mse".
    outputs: (B, k) network outputs.
    targets: (B, k) class probabilities ("ce") or teacher representations ("mse").

  Returns:
    Scalar: mean cross-entropy, or the mean over batch and dims of the squared error.
  """
  return jnp.mean(per_sample_loss(objective, outputs, targets))


def per_sample_loss(objective: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """(B,) losses whose mean is `supervised_loss` (InfoBatch's per-sample scores)."""
  if objective == "ce":
    return -jnp.sum(targets * jax.nn.log_softmax(outputs), axis=-1)
  return jnp.mean((outputs - targets) ** 2, axis=-1)


def expert_model(arch, num_outputs: int) -> nn.Module:
  """The expert / student network: a ConvNet whose variables are only `params`."""
  if arch["name"] != "convnet" or arch.get("norm", "default") not in ("default", "instance",
                                                                      "layer", "none"):
    raise DistillError(f"experts need a ConvNet without batch norm, got arch {arch['name']!r} "
                       f"with norm {arch.get('norm')!r} (set experts.arch)")
  return build_model(arch, num_outputs=num_outputs)


@functools.lru_cache(maxsize=None)
def make_expert_step(model: nn.Module, objective: str, lr: float, momentum: float,
                     augment_images: bool, teacher_model: nn.Module | None = None,
                     weighted: bool = False, representation: str = "features"):
  """A jitted `(state, batch, rng, stats, teacher_vars) -> (state, metrics)` SGD step.

  Cached on its (hashable) settings, so every expert of a run, and a resumed
  run, reuses one executable.

  The state is {"params", "opt_state", "trajectory"}, the trajectory holding
  (epochs + 1, *leaf) snapshots. `batch` is (uint8 images (B,H,W,C), int
  labels (B,) or None or, for "mse" from a teacher-view cache, its
  {"views", "targets"} (teacher_views.cached_real_batch), slot): a slot > 0
  records the updated parameters as snapshot `slot` (the step ends epoch
  `slot`); slot 0 records nothing.
  `stats` is (mean (C,), std (C,)) of the input normalisation and, for
  "mse", (centre (k,), scale ()) of the targets' map `(g - centre) / scale`
  (zeros and 1: the raw representation). With
  `weighted` (InfoBatch) the batch also carries (indices (B,), weights (B,)),
  the loss is mean_i(w_i * loss_i) and the state's "scores" (N,) receive
  each sample's unweighted loss.

  Returns:
    (jitted step, the optax optimizer).
  """
  optimizer = optax.sgd(lr, momentum=momentum or None)

  def step(state, batch, rng, stats, teacher_vars):
    images, labels, slot = batch[:3]
    mean, std, centre, scale = stats
    x = augment.normalize_batch(images, mean, std)
    if isinstance(labels, dict):
      # A teacher-view cache batch ("mse"): the stored view and its stored
      # representation; the teacher does not run.
      x = teacher_views.apply_views(x, labels["views"])
      targets = labels["targets"].astype(jnp.float32)
    else:
      if augment_images:
        x = augment.random_crop_flip(rng, x)
      if objective == "ce":
        targets = jax.nn.one_hot(labels, model.num_outputs)
      else:
        # The teacher sees the same (augmented) view as the expert.
        targets = jax.lax.stop_gradient(barlow_twins.represent(teacher_model, teacher_vars, x,
                                                               representation))
    if objective == "mse":
      targets = (targets - centre) / scale

    def loss_fn(params):
      outputs = model.apply({"params": params}, x)[1]
      if not weighted:
        return supervised_loss(objective, outputs, targets), None
      losses = per_sample_loss(objective, outputs, targets)
      return jnp.mean(batch[4] * losses), losses

    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    record = lambda traj, p: jax.lax.dynamic_update_index_in_dim(
        traj, jnp.where(slot > 0, p, traj[slot]), slot, axis=0)
    trajectory = jax.tree.map(record, state["trajectory"], params)
    new_state = {"params": params, "opt_state": opt_state, "trajectory": trajectory}
    if weighted:
      new_state["scores"] = infobatch.update(state["scores"], batch[3], losses)
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  return jax.jit(step, donate_argnums=0), optimizer


# One executable per setting (eager, every op would compile on its own).
@functools.partial(jax.jit, static_argnums=(0, 1, 3, 4))
def init_expert_state(model: nn.Module, optimizer, rng: jax.Array, image_shape: tuple,
                      epochs: int) -> dict:
  """{"params", "opt_state", "trajectory"} with snapshot 0 = the initial params."""
  params = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]
  trajectory = jax.tree.map(
      lambda p: jnp.zeros((epochs + 1, *p.shape), p.dtype).at[0].set(p), params)
  return {"params": params, "opt_state": optimizer.init(params), "trajectory": trajectory}


def train_expert(cfg, images: np.ndarray, labels: np.ndarray | None, mean, std,
                 num_outputs: int, directory: str, index: int, seed: int,
                 teacher=None, quiet: bool = False, meta: dict | None = None,
                 views=None, target_map: tuple | None = None) -> str:
  """Trains expert `index` and writes `directory/expert_XX.npz`; resumable.

  Args:
    cfg: the `experts` config section.
    images: (N, H, W, C) uint8 source images. labels: (N,) int labels ("ce").
    mean, std: (C,) normalisation of the expert's inputs.
    num_outputs: head width (classes for "ce", teacher dim for "mse").
    directory: buffer directory; progress and checkpoints go to
      `directory/expert_XX/`.
    index: expert number. seed: base seed (expert e uses seed and e).
    teacher: a `teacher.Teacher` ("mse").
    meta: extra metadata stored with the trajectory.
    views: a teacher-view cache ("mse"; stages.teacher_views.ViewCache):
      batches carry stored views and representations instead of running
      the teacher; `cfg.augment` False takes view 0 (the image itself).
    target_map: ("mse") (centre (k,), scale) of `datasets.target_stats`: the
      expert regresses (g - centre) / scale; None regresses g itself.

  Returns:
    The path of the written buffer file.
  """
  name = f"expert_{index:02d}"
  path = os.path.join(directory, name + ".npz")
  n = len(images)
  batch_size = min(cfg.batch_size, n)
  steps_per_epoch = max(n // batch_size, 1)
  num_steps = cfg.epochs * steps_per_epoch
  model = expert_model(cfg.arch, num_outputs)
  lr = expert_lr(cfg)
  ib = cfg.get("infobatch")
  pruned = ib is not None and ib.prune_ratio > 0
  step, optimizer = make_expert_step(model, cfg.objective, lr, cfg.momentum, cfg.augment,
                                     None if teacher is None else teacher.model, pruned,
                                     "features" if teacher is None else teacher.representation)
  centre, scale = target_map if target_map is not None else (np.zeros(num_outputs), 1.0)
  stats = (jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32),
           jnp.asarray(centre, jnp.float32), jnp.asarray(scale, jnp.float32))
  teacher_vars = None if teacher is None else teacher.variables
  state = init_expert_state(model, optimizer, jax.random.fold_in(jax.random.key(seed), index),
                            tuple(images.shape[1:]), cfg.epochs)
  batch_seed = 1000 * seed + index

  def targets_of(idx, i):
    """What a batch carries besides the images: labels, None, or cached views."""
    if views is not None:
      cached = views.batch(idx, teacher_views.draw_views(batch_seed, i, len(idx),
                                                         views.num_views, cfg.augment))
      return {"views": cached["views"], "targets": cached["targets"]}  # images come first
    return None if labels is None else labels[idx]

  step_fn = lambda s, b, r: step(s, b, r, stats, teacher_vars)
  t0 = time.perf_counter()
  extra = {}
  if pruned:
    # InfoBatch: the lr is constant (plain SGD), so only the epochs change length.
    state["scores"] = infobatch.init_scores(n)
    state, records, history = infobatch.run_epochs(
        name=name, workdir=directory, state=state, step_fn=step_fn,
        # The epoch progress (epoch + fraction done) names the batch for the view draw.
        make_batch=lambda idx, w, progress, epoch_end: (
            images[idx], targets_of(idx, round(progress * 1e6)), np.int32(epoch_end),
            jnp.asarray(idx), jnp.asarray(w)),
        num_samples=n, batch_size=batch_size, num_epochs=cfg.epochs,
        prune_ratio=ib.prune_ratio, delta=ib.delta, seed=batch_seed, quiet=quiet)
    extra = dict(infobatch=infobatch.pruning_report(records, n, batch_size, cfg.epochs))
  else:
    def batch_fn(i):
      idx = batch_indices(batch_seed, i, n, batch_size)
      done = i + 1
      slot = done // steps_per_epoch if done % steps_per_epoch == 0 else 0
      return images[idx], targets_of(idx, i), np.int32(slot)

    state, history = run_loop(
        name=name, workdir=directory, state=state, step_fn=step_fn,
        batch_fn=batch_fn, num_steps=num_steps,
        rng=jax.random.fold_in(jax.random.key(seed + 1), index),
        log_every=max(min(cfg.log_every, num_steps), 1), checkpoint_every=steps_per_epoch,
        quiet=quiet)
  info = dict(meta or {}, **extra, objective=cfg.objective, epochs=cfg.epochs,
              arch=cfg.arch.to_dict(),
              num_outputs=num_outputs, image_shape=list(images.shape[1:]),
              mean=[float(m) for m in mean], std=[float(s) for s in std], lr=lr,
              momentum=float(cfg.momentum),
              dtype=cfg.dtype, seconds=time.perf_counter() - t0,
              final_loss=history[-1]["loss"] if history else None)
  if target_map is not None:
    info.update(target_centre=[float(c) for c in centre], target_scale=float(scale))
  save_trajectory(path, jax.device_get(state["trajectory"]), info, cfg.dtype)
  # The finished file replaces the checkpoints, which hold the same trajectory.
  shutil.rmtree(os.path.join(directory, name, "ckpt"), ignore_errors=True)
  return path


def save_trajectory(path: str, trajectory: dict, meta: dict, dtype: str = "float32") -> str:
  """Writes a (epochs + 1, ...)-stacked params pytree and its metadata atomically."""
  if dtype not in DTYPES:
    raise DistillError(f"unknown experts.dtype {dtype!r}; expected one of {DTYPES}")
  flat = flax.traverse_util.flatten_dict(trajectory, sep=_SEP)
  arrays = {f"params{_SEP}{k}": np.asarray(v, dtype) for k, v in flat.items()}
  arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
  return files.write_atomic(path, lambda f: np.savez(f, **arrays))


def load_trajectory(path: str) -> tuple[dict, dict]:
  """Reads `save_trajectory`'s file: (nested params of stacked arrays, meta)."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays.pop("meta").item())
  except (OSError, ValueError, KeyError) as e:
    raise DistillError(f"expert file {path} is unreadable: {' '.join(str(e).split())}") from e
  prefix = "params" + _SEP
  flat = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  return flax.traverse_util.unflatten_dict(flat, sep=_SEP), meta


class ExpertBuffer(NamedTuple):
  """All experts of a buffer directory, held in memory in their stored dtype."""
  trajectories: list   # per expert: nested params, leaves (epochs + 1, *shape)
  meta: dict           # the first expert's metadata (shared fields are checked)

  @property
  def epochs(self) -> int:
    return int(self.meta["epochs"])

  def checkpoint(self, expert: int, epoch: int) -> dict:
    """Expert `expert`'s float32 parameters after `epoch` epochs."""
    return jax.tree.map(lambda t: np.asarray(t[epoch], np.float32), self.trajectories[expert])


_SHARED_META = ("objective", "epochs", "arch", "num_outputs", "image_shape", "target_scale")


def load_buffer(directory: str) -> ExpertBuffer:
  """Loads every `expert_XX.npz` of `directory`, checking they belong together."""
  paths = sorted(glob.glob(os.path.join(directory, "expert_[0-9]*.npz")))
  if not paths:
    raise DistillError(f"no expert trajectories in {directory} (run `distill experts` first)")
  trajectories, metas = zip(*(load_trajectory(p) for p in paths))
  for path, meta in zip(paths[1:], metas[1:]):
    for key in _SHARED_META:
      if meta.get(key) != metas[0].get(key):
        raise DistillError(f"expert files disagree on {key}: {paths[0]} has "
                           f"{metas[0].get(key)!r}, {path} has {meta.get(key)!r}")
  # Training time of the whole buffer: part of the cost of the sets matched to it.
  total = sum(float(m.get("seconds") or 0.0) for m in metas)
  return ExpertBuffer(list(trajectories), {**metas[0], "buffer_seconds": total})


def sample_checkpoints(buffer: ExpertBuffer, seed: int, step: int, max_start: int,
                       expert_epochs: int) -> tuple[int, int, dict, dict]:
  """Draws expert e and start epoch t < max_start for a step (deterministic in step).

  Returns:
    (e, t, theta*_t, theta*_{t+M}) with float32 params pytrees.
  """
  if max_start < 1 or max_start + expert_epochs > buffer.epochs + 1:
    raise DistillError(f"param_match.max_start={max_start} with expert_epochs="
                       f"{expert_epochs} needs more than the buffer's {buffer.epochs} epochs")
  r = np.random.default_rng([seed, step])
  e = int(r.integers(len(buffer.trajectories)))
  t = int(r.integers(max_start))
  return e, t, buffer.checkpoint(e, t), buffer.checkpoint(e, t + expert_epochs)


def per_sample_losses(meta: dict, params, images: np.ndarray, targets: np.ndarray,
                      batch_size: int = 1000) -> np.ndarray:
  """Each image's loss under one expert checkpoint, without augmentation.

  Args:
    meta: the buffer's metadata (arch, num_outputs, objective).
    params: one checkpoint's params pytree (`ExpertBuffer.checkpoint`).
    images: (N, H, W, C) float32, normalised with the buffer's mean and std.
    targets: (N, k) what the expert was trained on: teacher representations
      ("mse") or class probabilities ("ce").
    batch_size: images per forward pass.

  Returns:
    (N,) float32 losses, `per_sample_loss` of the buffer's objective.
  """
  fn = _jitted_losses(expert_model(meta["arch"], int(meta["num_outputs"])), meta["objective"])
  return np.concatenate([
      np.asarray(fn(params, jnp.asarray(images[i:i + batch_size]),
                    jnp.asarray(targets[i:i + batch_size], jnp.float32)))
      for i in range(0, len(images), batch_size)]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted_losses(model: nn.Module, objective: str):
  return jax.jit(lambda p, x, y: per_sample_loss(objective, model.apply({"params": p}, x)[1], y))


def to_expert_space(meta: dict, targets):
  """Teacher representations (..., k) -> the targets the buffer's experts regressed."""
  if "target_scale" not in meta:
    return targets
  return (targets - np.asarray(meta["target_centre"], np.float32)) / np.float32(
      meta["target_scale"])


def from_expert_space(meta: dict, targets):
  """The inverse of `to_expert_space`: back to the teacher's representation space."""
  if "target_scale" not in meta:
    return targets
  return targets * np.float32(meta["target_scale"]) + np.asarray(meta["target_centre"],
                                                                np.float32)


def expert_lr(cfg) -> float:
  """The SGD step size of `cfg` (an `experts` section) for its objective."""
  return float(cfg.lr_ce if cfg.objective == "ce" else cfg.lr_mse)


def buffer_dir(workdir: str, objective: str) -> str:
  """Where the experts of one objective live: `<workdir>/experts_<objective>`."""
  if objective not in OBJECTIVES:
    raise DistillError(f"unknown experts.objective {objective!r}; expected one of "
                       f"{OBJECTIVES}")
  return os.path.join(workdir, f"experts_{objective}")
