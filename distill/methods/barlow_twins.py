"""Self-supervised teacher: Barlow Twins in JAX.

The teacher g is a backbone (ConvNet or ResNet) trained with the Barlow
Twins objective on two augmented views of unlabelled source images. Its
backbone features (the penultimate representation, before the projector)
are the target representations that KRR-ST and the pretraining stage
regress onto. The projector is discarded after training.

Artefact (`<workdir>/teacher/`): `variables.msgpack` (backbone variables)
and `teacher.json` (architecture, image statistics, feature width, probe
accuracy).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import NamedTuple, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill import files
from distill.data import augment, datasets
from distill.errors import DistillError
from distill.nn.loop import batch_indices, log, run_loop
from distill.nn import torch_layout
from distill.nn.models import (FEATURE_KINDS, TORCH_RESNETS, TorchResNet, apply_model,
                                  build_model, feature_view, gradient_step, init_model)
from distill.selection import infobatch


class _BatchStandardize(nn.Module):
  """Standardises over the batch with a learnable affine; no running stats.

  The projector is only used in training, so it never needs running
  averages, and keeping it stateless keeps the train step simple.
  """
  @nn.compact
  def __call__(self, x):
    x = (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5)
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return x * scale + bias


class BarlowTwins(nn.Module):
  """Backbone + projector; returns (backbone features, projections)."""
  backbone: nn.Module
  projector: Sequence[int] = (512, 512, 512)

  @nn.compact
  def __call__(self, x, train: bool = False):
    features, _ = self.backbone(x, train=train)
    z = features
    for width in self.projector[:-1]:
      z = nn.relu(_BatchStandardize()(nn.Dense(width, use_bias=False)(z)))
    z = nn.Dense(self.projector[-1])(z)
    return features, z


def barlow_twins_loss(z1: jax.Array, z2: jax.Array, lambda_offdiag: float) -> jax.Array:
  """Barlow Twins loss of two (B, k) projection batches.

  C = z1n^T z2n / B on batch-standardised projections; the loss pushes the
  diagonal of C to 1 (invariance) and the off-diagonal to 0 (redundancy
  reduction): sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.
  """
  b = z1.shape[0]
  standardize = lambda z: (z - z.mean(0)) / (z.std(0) + 1e-5)
  c = standardize(z1).T @ standardize(z2) / b
  diag = jnp.diagonal(c)
  on = jnp.sum((1.0 - diag) ** 2)
  off = jnp.sum(c ** 2) - jnp.sum(diag ** 2)
  return on + lambda_offdiag * off


def make_train_step(model: BarlowTwins, optimizer: optax.GradientTransformation,
                    mean, std, lambda_offdiag: float):
  """A jitted `(state, batch_uint8, rng) -> (state, metrics)` step."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def step(state, batch_uint8, rng):
    x = augment.normalize_batch(batch_uint8, mean, std)
    k1, k2 = jax.random.split(rng)
    views = jnp.concatenate([augment.ssl_augment(k1, x, mean, std),
                             augment.ssl_augment(k2, x, mean, std)])

    def objective(features, z):
      z1, z2 = jnp.split(z, 2)
      return barlow_twins_loss(z1, z2, lambda_offdiag)

    return gradient_step(model, optimizer, state, views, objective)

  return jax.jit(step, donate_argnums=0)


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, min(cfg.warmup_steps, max(num_steps // 10, 1)), max(num_steps, 2))
  return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def init_state(model: BarlowTwins, optimizer, rng, image_shape) -> dict:
  variables = init_model(model, rng, image_shape)
  return {"variables": variables, "opt_state": optimizer.init(variables["params"])}


def weighted_barlow_twins_loss(z1: jax.Array, z2: jax.Array, weights: jax.Array,
                               lambda_offdiag: float):
  """Barlow Twins loss with per-sample weights, and per-sample scores.

  Barlow Twins' loss is a function of the batch cross-correlation C, not a
  sum over samples. Each sample enters C through the outer product of its
  standardised projections a_i, b_i, so a weight rescales that contribution:
  C = sum_i w_i a_i b_i^T / sum_i w_i (with w = 1 this is exactly
  `barlow_twins_loss`). The standardisation stays unweighted.

  The per-sample score is ||a_i - b_i||^2, the sample's share of the
  invariance term: sum_i ||a_i - b_i||^2 / (2B) ~= sum_k (1 - C_kk) since
  every column of a and b has unit variance.

  Args:
    z1, z2: (B, k) projections of the two views. weights: (B,) loss weights.

  Returns:
    (scalar loss, (B,) per-sample scores).
  """
  standardize = lambda z: (z - z.mean(0)) / (z.std(0) + 1e-5)
  a, b = standardize(z1), standardize(z2)
  c = (a * weights[:, None]).T @ b / jnp.sum(weights)
  diag = jnp.diagonal(c)
  on = jnp.sum((1.0 - diag) ** 2)
  off = jnp.sum(c ** 2) - jnp.sum(diag ** 2)
  return on + lambda_offdiag * off, jnp.sum((a - b) ** 2, -1)


def make_infobatch_train_step(model, optimizer, mean, std, lambda_offdiag: float, lr_fn):
  """Jitted `(state, batch, rng) -> (state, metrics)` for weighted Barlow Twins.

  state: {"variables", "opt_state" (optax.inject_hyperparams), "scores" (N,)}.
  batch: (images uint8 (B,H,W,C), indices (B,), weights (B,), progress ()).
  The learning rate is `lr_fn(progress)`; the batch's scores are scattered
  into state["scores"].
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def step(state, batch, rng):
    images, indices, weights, progress = batch
    x = augment.normalize_batch(images, mean, std)
    k1, k2 = jax.random.split(rng)
    views = jnp.concatenate([augment.ssl_augment(k1, x, mean, std),
                             augment.ssl_augment(k2, x, mean, std)])

    def loss_fn(params):
      variables = {**state["variables"], "params": params}
      (_, z), variables = apply_model(model, variables, views, train=True)
      z1, z2 = jnp.split(z, 2)
      loss, scores = weighted_barlow_twins_loss(z1, z2, weights, lambda_offdiag)
      return loss, (variables, scores)

    params = state["variables"]["params"]
    (loss, (variables, scores)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    lr = lr_fn(progress)
    opt_state = infobatch.with_learning_rate(state["opt_state"], lr)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    variables = {**variables, "params": optax.apply_updates(params, updates)}
    new_state = {"variables": variables, "opt_state": opt_state,
                 "scores": infobatch.update(state["scores"], indices, scores)}
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr}

  return jax.jit(step, donate_argnums=0)


def train_steps(cfg: ml_collections.ConfigDict, n: int) -> int:
  """Optimiser steps of `train` on n images (whole batches, the ragged last one dropped)."""
  return cfg.epochs * max(n // min(cfg.batch_size, n), 1)


def train(cfg: ml_collections.ConfigDict, images: np.ndarray, seed: int, workdir: str,
          name: str = "teacher") -> tuple[dict, list[dict], int]:
  """Trains Barlow Twins on unlabelled images; resumable.

  Args:
    cfg: the `teacher` config section.
    images: (N, H, W, C) uint8 source images.
    seed: initialisation, batch order and augmentation draws derive from it.
    workdir, name: checkpoints and metrics go to `<workdir>/<name>/` (`run_loop`).

  Returns:
    (Barlow Twins variables, per-log-point metrics, optimiser steps).
  """
  n, image_shape = len(images), images.shape[1:]
  mean, std = datasets.channel_stats(images)
  batch_size = min(cfg.batch_size, n)
  num_steps = train_steps(cfg, n)
  log(f"[{name}] Barlow Twins {cfg.arch.name}: {n} images {image_shape}, {num_steps} steps")
  model = build_barlow_twins(cfg)
  optimizer = make_optimizer(cfg, num_steps)
  state = init_state(model, optimizer, jax.random.key(seed), image_shape)
  step = make_train_step(model, optimizer, mean, std, cfg.lambda_offdiag)
  state, history = run_loop(
      name=name, workdir=workdir, state=state, step_fn=step,
      batch_fn=lambda i: images[batch_indices(seed, i, n, batch_size)],
      num_steps=num_steps, rng=jax.random.key(seed + 1),
      log_every=max(min(100, num_steps // 10), 1),
      checkpoint_every=max(num_steps // 10, 1))
  return state["variables"], history, num_steps


def train_infobatch(cfg: ml_collections.ConfigDict, images: np.ndarray, seed: int,
                    workdir: str, name: str = "teacher_infobatch") -> tuple[dict, dict]:
  """Trains Barlow Twins with InfoBatch pruning (`cfg.infobatch`); resumable.

  Runs through `infobatch.run_epochs` (a killed run resumes after the last
  finished epoch); prune_ratio 0 is plain training through the same code.
  The learning rate follows `make_optimizer`'s schedule, driven by progress
  instead of step.

  Args:
    cfg: the `teacher` config section. images: (N, H, W, C) uint8.
    seed: as `train`. workdir, name: where `run_epochs` keeps its state.

  Returns:
    (Barlow Twins variables, report with steps and the realised skipped share).
  """
  ib = cfg.infobatch
  t0 = time.perf_counter()
  n, image_shape = len(images), images.shape[1:]
  batch_size = min(cfg.batch_size, n)
  mean, std = datasets.channel_stats(images)
  full_steps = infobatch.full_data_steps(n, batch_size, cfg.epochs)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, min(cfg.warmup_steps, max(full_steps // 10, 1)), max(full_steps, 2))
  lr_fn = infobatch.progress_schedule(schedule, full_steps)
  optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0,
                                                    weight_decay=cfg.weight_decay)
  model = build_barlow_twins(cfg)
  state = init_state(model, optimizer, jax.random.key(seed), image_shape)
  state["scores"] = infobatch.init_scores(n)
  state, records, history = infobatch.run_epochs(
      name=name, workdir=workdir, state=state,
      step_fn=make_infobatch_train_step(model, optimizer, mean, std, cfg.lambda_offdiag, lr_fn),
      make_batch=lambda idx, w, progress, _: (images[idx], jnp.asarray(idx), jnp.asarray(w),
                                              jnp.float32(progress)),
      num_samples=n, batch_size=batch_size, num_epochs=cfg.epochs,
      prune_ratio=ib.prune_ratio, delta=ib.delta, seed=seed)
  report = dict(num_images=n, epochs=cfg.epochs, batch_size=batch_size,
                prune_ratio=ib.prune_ratio, delta=ib.delta,
                **infobatch.pruning_report(records, n, batch_size, cfg.epochs),
                final_loss=history[-1]["loss"] if history else None,
                train_seconds=time.perf_counter() - t0)
  return state["variables"], report


REPRESENTATIONS = FEATURE_KINDS


def represent(model: nn.Module, variables: dict, x: jax.Array, kind: str) -> jax.Array:
  """The teacher's representation of normalised images x (B, H, W, C) -> (B, d).

  `kind` is one of REPRESENTATIONS (`models.feature_view`): "features" the
  backbone features as they are, "gap" the last feature map averaged over space.
  """
  if kind not in REPRESENTATIONS:
    raise DistillError(f"unknown teacher.representation {kind!r}; expected one of "
                       f"{REPRESENTATIONS}")
  return feature_view(model, model.apply(variables, x, train=False)[0], kind)


class Teacher(NamedTuple):
  """A trained teacher: `model` is its backbone, `represent` its targets."""
  model: nn.Module
  variables: dict
  mean: np.ndarray         # (C,)
  std: np.ndarray          # (C,)
  image_shape: tuple
  dim: int                 # width d of the representation
  info: dict
  representation: str = "features"

  def represent(self, variables: dict, x: jax.Array) -> jax.Array:
    """Jittable (B, H, W, C) normalised images -> (B, dim) target representations."""
    return represent(self.model, variables, x, self.representation)

  def features(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """(N, H, W, C) normalised images -> (N, dim) float32 representations."""
    apply = _jitted_represent(self.model, self.representation)
    chunks = [np.asarray(apply(self.variables, jnp.asarray(images[i:i + batch_size])))
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted_represent(model: nn.Module, kind: str):
  return jax.jit(lambda variables, x: represent(model, variables, x, kind))


def backbone_variables(bt_variables: dict) -> dict:
  """The backbone's part of a `BarlowTwins` model's variables (the projector dropped)."""
  return {k: v["backbone"] for k, v in bt_variables.items() if "backbone" in v}


def save_teacher(directory: str, arch: dict, bt_variables: dict, mean, std,
                 image_shape, info: dict) -> None:
  """Writes the backbone variables and metadata atomically."""
  os.makedirs(directory, exist_ok=True)
  backbone = backbone_variables(bt_variables)
  meta = dict(arch=dict(arch), mean=[float(m) for m in mean], std=[float(s) for s in std],
              image_shape=list(image_shape), info=info)
  files.write_atomic(os.path.join(directory, "variables.msgpack"),
                     flax.serialization.msgpack_serialize(jax.device_get(backbone)))
  files.write_atomic(os.path.join(directory, "teacher.json"), json.dumps(meta, indent=1).encode())


def add_to_card(directory: str, **info) -> None:
  """Adds entries to the `info` of a saved teacher's card (teacher.json), atomically."""
  path = os.path.join(directory, "teacher.json")
  meta = files.read_json(path, None)
  meta["info"].update(info)
  files.write_atomic(path, json.dumps(meta, indent=1).encode())


def load_teacher(directory: str, representation: str = "features") -> Teacher:
  """The teacher saved in `directory`, handing on `representation` (REPRESENTATIONS)."""
  meta_path = os.path.join(directory, "teacher.json")
  vars_path = os.path.join(directory, "variables.msgpack")
  if not (os.path.isfile(meta_path) and os.path.isfile(vars_path)):
    raise DistillError(f"no trained teacher in {directory} (expected teacher.json and "
                       f"variables.msgpack; run `distill teacher` first)")
  if representation not in REPRESENTATIONS:
    raise DistillError(f"unknown teacher.representation {representation!r}; expected one of "
                       f"{REPRESENTATIONS}")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    with open(vars_path, "rb") as f:
      variables = flax.serialization.msgpack_restore(f.read())
  except (ValueError, OSError) as e:
    raise DistillError(f"teacher files in {directory} are unreadable: {e}") from e
  model = build_model(meta["arch"])
  image_shape = tuple(meta["image_shape"])
  dim = int(represent(model, variables, jnp.zeros((1, *image_shape)), representation).shape[-1])
  return Teacher(model, variables, np.asarray(meta["mean"], np.float32),
                 np.asarray(meta["std"], np.float32), image_shape, dim, meta["info"],
                 representation)


def import_torch_backbone(path: str, directory: str, image_shape, mean, std,
                          info: dict | None = None) -> Teacher:
  """Saves a torchvision-layout ResNet checkpoint as a teacher in `directory`.

  Args:
    path: the checkpoint (see `torch_layout.read_state_dict`).
    directory: where the teacher goes (`save_teacher`'s layout).
    image_shape: (H, W, C) of the images it will see.
    mean, std: (C,) the input normalisation it was trained with.
    info: more for the card (teacher.json).

  Returns:
    The teacher, loaded back.

  Raises:
    DistillError: unreadable file, unknown architecture, or tensors that do
      not fit it (naming the first offending key and its shapes).
  """
  state, dropped = torch_layout.backbone_state(torch_layout.read_state_dict(path))
  arch = torch_layout.infer_arch(state)
  channels = int(state["conv1.weight"].shape[1])
  if channels != image_shape[-1] or len(mean) != channels or len(std) != channels:
    raise DistillError(f"the checkpoint's conv1 takes {channels} channels; the source has "
                       f"{image_shape[-1]} and the normalisation {len(mean)}/{len(std)}")
  variables = torch_layout.to_variables(state, arch, image_shape)
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  card = dict(imported_from=os.path.abspath(path), sha256=digest, tensors=len(state),
              dropped=len(dropped), dropped_examples=dropped[:8],
              input_normalization=dict(mean=list(map(float, mean)), std=list(map(float, std))),
              **(info or {}))
  save_teacher(directory, arch, {k: {"backbone": v} for k, v in variables.items()}, mean, std,
               image_shape, card)
  return load_teacher(directory)


def export_torch_backbone(teacher: Teacher, path: str) -> str:
  """Writes a torchvision-layout teacher's backbone as `.safetensors` (torch names and
  layouts; loads with `resnet.load_state_dict(..., strict=False)`, fc aside)."""
  if not isinstance(teacher.model, TorchResNet):
    raise DistillError(f"only torchvision-layout teachers ({', '.join(TORCH_RESNETS)}) export "
                       f"to torchvision's layout; this one is "
                       f"{type(teacher.model).__name__} (train with teacher.arch.name="
                       f"'tv_resnet18')")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  torch_layout.save_safetensors(path, torch_layout.from_variables(teacher.variables))
  return path


def build_barlow_twins(cfg: ml_collections.ConfigDict) -> BarlowTwins:
  return BarlowTwins(backbone=build_model(cfg.arch), projector=tuple(cfg.projector))
