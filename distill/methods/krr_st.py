"""KRR-ST: kernel ridge regression on self-supervised targets.

Learns synthetic images X_s (n, H, W, C) and target representations Y_s
(n, d) such that, for feature extractors f drawn from a model pool, the
closed-form ridge head fitted on (f(X_s), Y_s) predicts the teacher's
representation g(x) of real images x well:

    loss = mean_{x in B, dims} (g(aug(x)) - K_ts (K_ss + lambda I)^-1 Y_s)^2

with K on [f(.), 1]. The gradient flows into X_s (through K_ss and K_ts) and
into Y_s; real-image features carry none. f is the pool model in eval mode
(BatchNorm with its running statistics, see distill/methods/pool.py) for both the
real and the synthetic images; only the inner step uses batch statistics.

The method is a small object with `init` and a jitted pure `step`:
    state = method.init(rng, images, targets)
    state, metrics = method.step(state, real_uint8_batch, rng, teacher_vars)

Supervised variant (FRePo-style, a baseline): with no teacher the real
targets are the one-hot labels of the batch, `step` takes `(images,
labels)` batches, and Y_s are learned labels; the pool machinery is the same.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from distill.data import augment
from distill.methods import barlow_twins, pool as pool_lib, teacher_views
from distill.nn import parallel
from distill.nn.models import build_model
from distill.nn.optim import outer_optimizer
from kernels.ridge import krr_predict, with_bias


def krr_outer_loss(features_fn, params, synthetic: dict, phi_real: jax.Array,
                   target_real: jax.Array, reg: float, scaling: str, form: str = "auto"):
  """The KRR-ST outer loss for one feature extractor.

  Args:
    features_fn: (params, x) -> (B, p) features.
    params: the extractor's variables, any pytree `features_fn` takes (a
      pool member is (params, batch_stats)).
    synthetic: {"images": (n, H, W, C), "targets": (n, d)}.
    phi_real: (B, p + 1) real features with bias column (no gradient).
    target_real: (B, d) teacher representations of the same real images.
    reg, scaling, form: ridge settings (kernels/ridge.py).

  Returns:
    (scalar loss, SolveInfo).
  """
  phi_syn = with_bias(features_fn(params, synthetic["images"]))
  pred, info = krr_predict(phi_syn, synthetic["targets"], phi_real, reg, scaling=scaling,
                           form=form)
  return jnp.mean((target_real - pred) ** 2), info


class KRRST:
  """KRR-ST distillation with a pool of ConvNet feature extractors."""

  def __init__(self, cfg: ml_collections.ConfigDict, image_shape, target_dim: int,
               teacher_model: nn.Module, mean, std, representation: str = "features"):
    """Binds the settings.

    Args:
      cfg: the `krr_st` section of the config.
      image_shape: (H, W, C) of the source images.
      target_dim: d, the teacher's representation width.
      teacher_model: the teacher network (its variables come with each step),
        or None for the supervised variant (one-hot label targets, d = classes).
      mean, std: (C,) normalisation of the source images.
      representation: which teacher representation the targets are
        (teacher.REPRESENTATIONS); the synthetic targets must be the same one.
    """
    self.cfg = cfg
    self.mean = jnp.asarray(mean, jnp.float32)
    self.std = jnp.asarray(std, jnp.float32)
    pool_model = build_model(cfg.pool.arch, num_outputs=target_dim)
    self.pool_fns = pool_lib.make_pool_fns(pool_model, image_shape, cfg.pool.lr,
                                           cfg.pool.momentum,
                                           cfg.pool.get("weight_decay", 0.0),
                                           cfg.get("compute_dtype", "float32"))
    self.teacher_model = teacher_model
    self.representation = representation
    self.optimizer = outer_optimizer(cfg)
    # The state is donated: its buffers are reused for the next state.
    self.step = jax.jit(self._step, donate_argnums=0)

  def member_features(self, member, x: jax.Array) -> jax.Array:
    """Eval-mode features (B, p) of x (B, H, W, C) under member (params, batch_stats)."""
    return self.pool_fns.features(*member, x)

  def init(self, rng: jax.Array, images: jax.Array, targets: jax.Array,
           warm_up: bool = True) -> dict:
    """Initial state from real images (n, H, W, C) and their teacher targets (n, d).

    `warm_up=False` skips training the pool to its initial ages (for a state
    that only serves as the template of a checkpoint restore).
    """
    synthetic = {"images": jnp.asarray(images, jnp.float32),
                 "targets": jnp.asarray(targets, jnp.float32)}
    pool = pool_lib.init_pool(self.pool_fns, rng, self.cfg.pool.size, self.cfg.pool.max_age,
                              synthetic["images"], synthetic["targets"],
                              self.cfg.pool.init_age, warm_up=warm_up)
    return {"synthetic": synthetic, "opt_state": self.optimizer.init(synthetic), "pool": pool}

  def real_views(self, rng, batch_uint8):
    """(B, H, W, C) uint8 -> normalised, optionally augmented float images."""
    x = augment.normalize_batch(batch_uint8, self.mean, self.std)
    return augment.random_crop_flip(rng, x) if self.cfg.augment_real else x

  def real_batch(self, batch, rng, teacher_vars, num_classes: int):
    """The step's real views (B, H, W, C) and their targets (B, d).

    `batch` is one of: uint8 images (the teacher runs on a fresh random
    view of each); `(images, labels)` (supervised variant, one-hot
    targets); or a teacher-view cache batch {"images", "views", "targets"}
    (teacher_views.cached_real_batch: the stored view is applied, the
    stored representation is the target, the teacher does not run).
    """
    if isinstance(batch, dict):
      x = augment.normalize_batch(batch["images"], self.mean, self.std)
      return (teacher_views.apply_views(x, batch["views"]),
              batch["targets"].astype(jnp.float32))
    if self.teacher_model is None:
      images, labels = batch
      return self.real_views(rng, images), jax.nn.one_hot(labels, num_classes)
    x = self.real_views(rng, batch)
    return x, barlow_twins.represent(self.teacher_model, teacher_vars, x, self.representation)

  def _step(self, state: dict, batch, rng: jax.Array, teacher_vars):
    cfg = self.cfg
    k_pick, k_aug, k_reset = jax.random.split(rng, 3)
    index = jax.random.randint(k_pick, (), 0, cfg.pool.size)
    member = pool_lib.pool_member(state["pool"], index)   # (params, batch_stats)
    x_real, target_real = self.real_batch(batch, k_aug, teacher_vars,
                                          state["synthetic"]["targets"].shape[-1])
    phi_real = with_bias(self.member_features(member, x_real))
    loss_fn = functools.partial(krr_outer_loss, self.member_features, member,
                                phi_real=jax.lax.stop_gradient(phi_real),
                                target_real=jax.lax.stop_gradient(target_real),
                                reg=cfg.reg, scaling=cfg.reg_scaling, form=cfg.ridge_form)
    (loss, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["synthetic"])
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["synthetic"])
    synthetic = optax.apply_updates(state["synthetic"], updates)
    pool, inner_loss = pool_lib.advance(self.pool_fns, state["pool"], index,
                                        synthetic["images"], synthetic["targets"],
                                        cfg.pool.max_age, k_reset)
    metrics = {
        "loss": loss,
        "grad_norm_images": optax.global_norm(grads["images"]),
        "grad_norm_targets": optax.global_norm(grads["targets"]),
        "inner_loss": inner_loss,
        "solve_ok": info.ok.astype(jnp.float32),
        "jitter": info.jitter,
        "mean_age": jnp.mean(pool["ages"].astype(jnp.float32)),
    }
    return {"synthetic": synthetic, "opt_state": opt_state, "pool": pool}, metrics


def split_along_n(state: dict) -> dict:
  """A KRR-ST state with its synthetic set and Adam moments split along n over
  the devices (no-op on one device); the pool stays as it is."""
  return {**state, "synthetic": parallel.shard_leading(state["synthetic"]),
          "opt_state": parallel.shard_leading(state["opt_state"])}


def held_out_loss(method: KRRST, synthetic: dict, reals: dict, rng: jax.Array,
                  num_models: int = 4, chunk: int = 500) -> dict:
  """KRR-ST's own held-out objective: the outer loss on a fresh pool.

  A pool of `num_models` models never used in distillation (initialised
  from `rng`, each trained on the set to a staggered age as the real pool
  is at the start) fits the closed-form head on the set; the loss is the
  outer loss on fixed real images, averaged over models. Comparing a
  learned set with its initial real subset says whether the optimiser
  improved the objective beyond the models it was tuned on.

  Args:
    method: the `KRRST` whose pool settings and ridge are used.
    synthetic: {"images": (n, H, W, C), "targets": (n, d)}.
    reals: {name: (real_x (N, H, W, C) normalised, real_targets (N, d))}:
      each is scored on the same fresh pool.
    rng: key of the fresh pool (use one the distillation never used).
    num_models: fresh models. chunk: real images per kernel evaluation.

  Returns:
    {name: loss averaged over models and images}.
  """
  cfg = method.cfg
  images = jnp.asarray(synthetic["images"], jnp.float32)
  targets = jnp.asarray(synthetic["targets"], jnp.float32)
  pool = pool_lib.init_pool(method.pool_fns, rng, num_models, cfg.pool.max_age, images,
                            targets, cfg.pool.init_age)

  @jax.jit
  def chunk_loss(member, x, y):
    phi = with_bias(method.member_features(member, x))
    loss, _ = krr_outer_loss(method.member_features, member, {"images": images,
                                                              "targets": targets},
                             phi, y, cfg.reg, cfg.reg_scaling, cfg.ridge_form)
    return loss * x.shape[0]

  out = {}
  for name, (real_x, real_y) in reals.items():
    total = 0.0
    for m in range(num_models):
      member = pool_lib.pool_member(pool, m)
      total += sum(float(chunk_loss(member, real_x[i:i + chunk], real_y[i:i + chunk]))
                   for i in range(0, len(real_x), chunk))
    out[name] = total / (num_models * len(real_x))
  return out
