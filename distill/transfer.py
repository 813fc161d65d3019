"""Transfer read-out: pretrain on a (synthetic) set, then probe on a target.

Pretraining regresses a fresh network's head onto the set's target
representations by MSE (SGD with momentum, weight decay, cosine schedule,
crop + flip), then drops the head. The linear probe fits a ridge classifier
on the frozen features of the labelled target's training split (the
project's one ridge solver, `kernels.ridge.ridge_fit`) with the
regularisation picked on a held-out part of it, and reports top-1 accuracy
on the target's test split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill import augment
from distill.errors import DistillError
from distill.loop import batch_indices, run_loop
from distill.models import build_model, gradient_step, init_model
from kernels.ridge import ridge_fit, with_bias


def pretrain_steps(cfg: ml_collections.ConfigDict, n: int) -> int:
  return cfg.epochs * max(n // min(cfg.batch_size, n), 1)


def make_pretrain_step(model, optimizer, augment_images: bool):
  """Jitted `(state, (images, targets), rng) -> (state, metrics)`: MSE to targets."""
  def step(state, batch, rng):
    images, targets = batch
    if augment_images:
      images = augment.random_crop_flip(rng, images)

    return gradient_step(model, optimizer, state, images,
                         lambda features, outputs: jnp.mean((outputs - targets) ** 2))

  return jax.jit(step, donate_argnums=0)


def pretrain(cfg: ml_collections.ConfigDict, images: np.ndarray, targets: np.ndarray,
             seed: int, workdir: str, name: str, quiet: bool = False):
  """Pretrains a fresh `cfg.arch` network on (images, targets).

  Args:
    cfg: the `pretrain` config section.
    images: (n, H, W, C) float32 normalised images.
    targets: (n, d) float32 target representations.
    seed: initialisation and shuffling seed.
    workdir, name: checkpoints go to `workdir/name` (resumable).

  Returns:
    (backbone model without head, its variables).
  """
  n, d = targets.shape
  if len(images) != n:
    raise DistillError(f"pretraining set has {len(images)} images but {n} targets")
  model = build_model(cfg.arch, num_outputs=d)
  num_steps = pretrain_steps(cfg, n)
  schedule = optax.cosine_decay_schedule(cfg.lr, num_steps)
  optimizer = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                          optax.sgd(schedule, momentum=cfg.momentum))
  variables = init_model(model, jax.random.key(seed), images.shape[1:])
  state = {"variables": variables, "opt_state": optimizer.init(variables["params"])}
  step = make_pretrain_step(model, optimizer, cfg.augment)
  batch_size = min(cfg.batch_size, n)
  images_j, targets_j = jnp.asarray(images), jnp.asarray(targets)

  def batch_fn(i):
    idx = jnp.asarray(batch_indices(seed, i, n, batch_size))
    return images_j[idx], targets_j[idx]

  state, _ = run_loop(name=name, workdir=workdir, state=state, step_fn=step,
                      batch_fn=batch_fn, num_steps=num_steps,
                      rng=jax.random.key(seed + 1000),
                      log_every=max(num_steps // 5, 1), checkpoint_every=max(num_steps // 4, 1),
                      quiet=quiet)
  return build_model(cfg.arch), state["variables"]


def fresh_backbone(cfg: ml_collections.ConfigDict, image_shape, seed: int):
  """The no-pretraining baseline: a randomly initialised backbone."""
  model = build_model(cfg.arch)
  return model, init_model(model, jax.random.key(seed), image_shape)


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray,
                 regs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), val_fraction: float = 0.1,
                 seed: int = 0) -> dict:
  """Ridge-classifier probe: top-1 accuracy on the test split.

  Features are standardised with training statistics; labels become
  one-hot targets; `reg` (trace_over_n convention) is chosen by accuracy on
  a held-out `val_fraction` of the training split, then refitted on all of it.

  Args:
    train_features: (N, p). train_labels: (N,) int.
    test_features: (M, p). test_labels: (M,) int.

  Returns:
    {"accuracy": float, "reg": chosen reg, "val_accuracy": float}.
  """
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  mu = train_features.mean(0)
  sigma = train_features.std(0) + 1e-6
  prep = lambda f: with_bias(jnp.asarray((f - mu) / sigma))
  one_hot = lambda y: jax.nn.one_hot(y, num_classes)
  perm = np.random.default_rng(seed).permutation(len(train_labels))
  n_val = max(int(len(perm) * val_fraction), 1)
  val, fit = perm[:n_val], perm[n_val:]
  x_fit, x_val = prep(train_features[fit]), prep(train_features[val])

  def accuracy(weights, x, y):
    return float(jnp.mean(jnp.argmax(x @ weights, -1) == jnp.asarray(y)))

  scores = []
  for reg in regs:
    weights, info = ridge_fit(x_fit, one_hot(train_labels[fit]), reg)
    scores.append(accuracy(weights, x_val, train_labels[val]) if bool(info.ok) else -1.0)
  best = int(np.argmax(scores))
  weights, info = ridge_fit(prep(train_features), one_hot(train_labels), regs[best])
  if not bool(info.ok):
    raise DistillError("linear probe: ridge solve failed even with jitter; features degenerate")
  return {"accuracy": accuracy(weights, prep(test_features), test_labels),
          "reg": float(regs[best]), "val_accuracy": scores[best]}
