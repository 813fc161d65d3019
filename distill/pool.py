"""The model pool of KRR-ST: M feature extractors of staggered ages.

All M models share one architecture, so their parameters and inner
optimiser states are stacked along a leading axis of size M and the pool is
a plain pytree:

    pool = {"params": <params with leading M>, "opt_state": <same>,
            "ages": (M,) int32}

Each time a model is used by an outer step it takes one full-batch step of
MSE regression of its head onto the current synthetic set (f(X_s) -> Y_s).
When its age reaches `max_age` it is re-initialised AND its age is reset to
0 (the reference implementation forgot the reset, so after about
M * max_age steps every draw would hit a model re-initialised at every use).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill.errors import DistillError


class PoolFns(NamedTuple):
  """Pure functions of one pool configuration (bind once, jit inside)."""
  init_params: callable       # rng -> params of one model
  features: callable          # (params, x (B,H,W,C)) -> (B, p)
  inner_step: callable        # (params, opt_state, x, y) -> (params, opt_state, loss)
  optimizer: optax.GradientTransformation


def make_pool_fns(model: nn.Module, image_shape, lr: float, momentum: float) -> PoolFns:
  """Builds the per-model functions for a head-carrying feature extractor.

  Args:
    model: a models.py network with `num_outputs` = target width, and no
      BatchNorm (pool models must be pure functions of their params).
    image_shape: (H, W, C).
    lr, momentum: inner SGD settings.
  """
  if getattr(model, "norm", None) == "batch":
    raise DistillError("pool models cannot use batch norm (set distill.pool.arch.norm "
                       "to 'instance', 'layer' or 'none')")
  optimizer = optax.sgd(lr, momentum=momentum or None)

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]

  def features(params, x):
    return model.apply({"params": params}, x)[0]

  def inner_step(params, opt_state, x, y):
    def loss_fn(p):
      out = model.apply({"params": p}, x)[1]
      return jnp.mean((out - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return PoolFns(init_params, features, inner_step, optimizer)


def _fresh(fns: PoolFns, rng):
  params = fns.init_params(rng)
  return params, fns.optimizer.init(params)


def init_pool(fns: PoolFns, rng: jax.Array, size: int, max_age: int, images, targets,
              init_age: str = "uniform", warm_up: bool = True) -> dict:
  """A pool of `size` models, each trained to a random age on (images, targets).

  Args:
    fns: from `make_pool_fns`.
    rng: PRNG key.
    size: number of models M.
    max_age: T_max.
    images: (n, H, W, C) synthetic images. targets: (n, d) targets.
    init_age: "uniform" (T ~ U{1..T_max}, the paper's staggered start) or
      "zero" (all fresh).
    warm_up: train each model to its age; False gives a same-shaped
      template (e.g. to restore a checkpoint into).

  Returns:
    The pool pytree.
  """
  k_init, k_age = jax.random.split(rng)
  # Jitted: op-by-op (eager) initialisation compiles every primitive separately.
  fresh = jax.jit(jax.vmap(lambda k: _fresh(fns, k)))
  params, opt_state = fresh(jax.random.split(k_init, size))
  if init_age == "uniform":
    ages = jax.random.randint(k_age, (size,), 1, max_age + 1)
  elif init_age == "zero":
    ages = jnp.zeros((size,), jnp.int32)
  else:
    raise DistillError(f"unknown pool init_age {init_age!r}; expected 'uniform' or 'zero'")
  ages = ages.astype(jnp.int32)
  if warm_up:
    params, opt_state = _train_to_ages(fns, params, opt_state, ages, images, targets)
  return {"params": params, "opt_state": opt_state, "ages": ages}


def _train_to_ages(fns, params, opt_state, ages, images, targets):
  """Trains model m of the stacked pool for ages[m] full-batch steps.

  One model at a time, a host loop over one jitted step: vmapping the
  models would turn their convolutions into grouped convolutions (slow on
  CPU) and step every model max(ages) times, and a `fori_loop` body runs
  several times slower than the same step called from the host on XLA:CPU.
  """
  step = jax.jit(fns.inner_step)
  take = lambda tree, m: jax.tree.map(lambda x: x[m], tree)
  put = lambda tree, m, one: jax.tree.map(lambda x, o: x.at[m].set(o), tree, one)
  t0 = time.perf_counter()
  for m, age in enumerate(np.asarray(ages).tolist()):
    p, o = take(params, m), take(opt_state, m)
    for _ in range(age):
      p, o, _ = step(p, o, images, targets)
    params, opt_state = put(params, m, p), put(opt_state, m, o)
    print(f"[pool] warm-up: model {m + 1}/{len(ages)} trained to age {age} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
  return params, opt_state


def pool_member(pool: dict, index: jax.Array):
  """Parameters of model `index` (a traced scalar is fine: no recompilation)."""
  return jax.tree.map(lambda x: x[index], pool["params"])


def advance(fns: PoolFns, pool: dict, index: jax.Array, images, targets, max_age: int,
            rng: jax.Array) -> tuple[dict, jax.Array]:
  """One inner step for model `index`, then the age bump and reset rule.

  Jittable; `index` may be traced.

  Returns:
    (new pool, inner loss of that step).
  """
  params = pool_member(pool, index)
  opt_state = jax.tree.map(lambda x: x[index], pool["opt_state"])
  params, opt_state, loss = fns.inner_step(params, opt_state, images, targets)
  age = pool["ages"][index] + 1
  expired = age >= max_age
  fresh_params, fresh_opt = _fresh(fns, rng)
  pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(expired, a, b), new, old)
  params, opt_state = pick(fresh_params, params), pick(fresh_opt, opt_state)
  age = jnp.where(expired, 0, age)
  put = lambda stacked, one: jax.tree.map(lambda s, o: s.at[index].set(o), stacked, one)
  return {"params": put(pool["params"], params),
          "opt_state": put(pool["opt_state"], opt_state),
          "ages": pool["ages"].at[index].set(age)}, loss
