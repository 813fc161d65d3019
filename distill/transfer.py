"""Transfer protocol: pretrain on a (synthetic) set, then read out on a target.

Pretraining regresses a fresh network's head onto the set's target
representations by MSE (SGD with momentum, weight decay, cosine schedule,
crop + flip), then drops the head. Two read-outs on a labelled target:

* `linear_probe`: a ridge classifier on the frozen features of the target's
  training split (the project's one ridge solver, `kernels.ridge.ridge_fit`),
  regularisation picked on a held-out part of it; top-1 on the test split.
* `finetune`: a new linear head on the pretrained backbone, all layers
  trained by cross-entropy (SGD + momentum, weight decay, cosine schedule,
  crop + flip); top-1 on the test split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill import augment, infobatch
from distill.errors import DistillError
from distill.loop import batch_indices, run_loop
from distill.models import apply_model, build_model, gradient_step, init_model
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
  optimizer, step = _train_fns(make_pretrain_step, model, cfg.lr, cfg.momentum,
                               cfg.weight_decay, num_steps, cfg.augment)
  variables = init_model(model, jax.random.key(seed), images.shape[1:])
  state = {"variables": variables, "opt_state": optimizer.init(variables["params"])}
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


def with_new_head(backbone: dict, classifier_init: dict) -> dict:
  """The classifier's variables with every backbone tensor copied in.

  Args:
    backbone: variables of a pretrained backbone (a `head` entry, if the
      pretraining net had one, is dropped).
    classifier_init: freshly initialised variables of the same architecture
      with a `head` of the target's class count.
  """
  out = {}
  for collection, tree in classifier_init.items():
    pretrained = backbone.get(collection, {})
    missing = set(tree) - set(pretrained) - {"head"}
    if missing:
      raise DistillError(f"pretrained backbone lacks {sorted(missing)[:4]} in {collection!r}; "
                         f"architectures differ")
    out[collection] = {k: (v if k == "head" else pretrained[k]) for k, v in tree.items()}
  return out


def make_finetune_step(model, optimizer, augment_images: bool):
  """Jitted `(state, (images, labels), rng) -> (state, metrics)`: cross-entropy."""
  def step(state, batch, rng):
    images, labels = batch
    if augment_images:
      images = augment.random_crop_flip(rng, images)

    def objective(features, logits):
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return gradient_step(model, optimizer, state, images, objective)

  return jax.jit(step, donate_argnums=0)


def make_infobatch_finetune_step(model, optimizer, augment_images: bool, lr_fn):
  """Jitted InfoBatch fine-tuning step: weighted cross-entropy, per-sample scores.

  state: {"variables", "opt_state" (optax.inject_hyperparams), "scores" (N,)}.
  batch: (images (B,H,W,C), labels (B,), indices (B,), weights (B,), progress ()).
  Loss mean_i(w_i * CE_i); each sample's unweighted CE_i becomes its score;
  the learning rate is `lr_fn(progress)`.
  """
  def step(state, batch, rng):
    images, labels, indices, weights, progress = batch
    if augment_images:
      images = augment.random_crop_flip(rng, images)

    def objective(features, logits):
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.mean(weights * losses), losses

    lr = lr_fn(progress)
    inner = {"variables": state["variables"],
             "opt_state": infobatch.with_learning_rate(state["opt_state"], lr)}
    new_state, metrics, losses = gradient_step(model, optimizer, inner, images, objective,
                                               has_aux=True)
    new_state["scores"] = infobatch.update(state["scores"], indices, losses)
    return new_state, {**metrics, "lr": lr}

  return jax.jit(step, donate_argnums=0)


def _sgd(learning_rate, momentum, weight_decay):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None))


@functools.lru_cache(maxsize=64)
def _infobatch_fns(model, lr: float, momentum: float, weight_decay: float, full_steps: int,
                   augment_images: bool):
  """(optimizer, jitted step) of InfoBatch fine-tuning; the cosine schedule of
  `_train_fns`, evaluated on epoch progress so it ends on time whatever is pruned."""
  optimizer = optax.inject_hyperparams(_sgd, static_args=("momentum", "weight_decay"))(
      learning_rate=0.0, momentum=momentum, weight_decay=weight_decay)
  lr_fn = infobatch.progress_schedule(optax.cosine_decay_schedule(lr, max(full_steps, 1)),
                                      full_steps)
  return optimizer, make_infobatch_finetune_step(model, optimizer, augment_images, lr_fn)


def finetune(cfg: ml_collections.ConfigDict, arch, backbone: dict, x_train: np.ndarray,
             y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int,
             workdir: str, name: str, quiet: bool = True) -> dict:
  """Fine-tunes all layers of a pretrained backbone on a labelled target.

  Args:
    cfg: the `finetune` config section. arch: the backbone's arch config.
    backbone: its pretrained variables (or a fresh initialisation).
    x_train: (N, H, W, C) normalised float32 images; y_train: (N,) int labels.
    x_test, y_test: the test split, same format.
    seed: head initialisation and shuffling seed.
    workdir, name: checkpoints go to `workdir/name` (resumable).

  Returns:
    {"accuracy": top-1 on the test split, "steps": optimiser steps}, plus
    "skipped_fraction" (realised share of sample-visits skipped) when
    `cfg.infobatch.prune_ratio` > 0.
  """
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  n = len(x_train)
  batch_size = min(cfg.batch_size, n)
  num_steps = cfg.epochs * max(n // batch_size, 1)
  model = build_model(arch, num_outputs=num_classes)
  variables = with_new_head(backbone, init_model(model, jax.random.key(seed), x_train.shape[1:]))
  # A copy: the train step donates its state, and the caller keeps the backbone.
  variables = jax.tree.map(jnp.array, variables)
  x_j, y_j = jnp.asarray(x_train), jnp.asarray(y_train, jnp.int32)
  ib = cfg.get("infobatch")
  if ib is not None and ib.prune_ratio > 0:
    optimizer, step = _infobatch_fns(model, cfg.lr, cfg.momentum, cfg.weight_decay, num_steps,
                                     cfg.augment)
    state = {"variables": variables, "opt_state": optimizer.init(variables["params"]),
             "scores": infobatch.init_scores(n)}
    state, records, _ = infobatch.run_epochs(
        name=name, workdir=workdir, state=state, step_fn=step,
        make_batch=lambda idx, w, progress, _: (x_j[idx], y_j[idx], jnp.asarray(idx),
                                                jnp.asarray(w), jnp.float32(progress)),
        num_samples=n, batch_size=batch_size, num_epochs=cfg.epochs,
        prune_ratio=ib.prune_ratio, delta=ib.delta, seed=seed + 7, quiet=quiet)
    report = infobatch.pruning_report(records, n, batch_size, cfg.epochs)
    return {"accuracy": accuracy(model, state["variables"], x_test, y_test),
            "steps": report["steps"], "skipped_fraction": report["skipped_fraction"]}
  optimizer, step = _train_fns(make_finetune_step, model, cfg.lr, cfg.momentum,
                               cfg.weight_decay, num_steps, cfg.augment)
  state = {"variables": variables, "opt_state": optimizer.init(variables["params"])}

  def batch_fn(i):
    idx = jnp.asarray(batch_indices(seed + 7, i, n, batch_size))
    return x_j[idx], y_j[idx]

  state, _ = run_loop(name=name, workdir=workdir, state=state,
                      step_fn=step,
                      batch_fn=batch_fn, num_steps=num_steps, rng=jax.random.key(seed + 2000),
                      log_every=max(num_steps // 5, 1), checkpoint_every=max(num_steps // 4, 1),
                      quiet=quiet)
  return {"accuracy": accuracy(model, state["variables"], x_test, y_test), "steps": num_steps}


@functools.lru_cache(maxsize=64)
def _train_fns(make_step, model, lr: float, momentum: float, weight_decay: float,
               num_steps: int, augment_images: bool):
  """(optimizer, jitted step) of SGD + momentum + weight decay with a cosine schedule.

  Cached on its (hashable) settings: a results table runs the same
  architecture and schedule many times, and each new jitted function would
  compile again.
  """
  optimizer = _sgd(optax.cosine_decay_schedule(lr, max(num_steps, 1)), momentum, weight_decay)
  return optimizer, make_step(model, optimizer, augment_images)


@functools.lru_cache(maxsize=None)
def _jitted_predict(model):
  return jax.jit(lambda v, x: jnp.argmax(apply_model(model, v, x, train=False)[0][1], -1))


def accuracy(model, variables: dict, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 500) -> float:
  """Top-1 accuracy of a classifier's `outputs` (inference mode)."""
  predict = _jitted_predict(model)
  correct = sum(int(jnp.sum(predict(variables, jnp.asarray(images[i:i + batch_size]))
                            == jnp.asarray(labels[i:i + batch_size])))
                for i in range(0, len(images), batch_size))
  return correct / len(images)
