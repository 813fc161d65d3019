"""The model pool of KRR-ST: M feature extractors of staggered ages.

All M models share one architecture, so their parameters, BatchNorm running
statistics and inner optimiser states are stacked along a leading axis of
size M and the pool is a plain pytree:

    pool = {"params": <params with leading M>,
            "batch_stats": <running statistics with leading M, or {}>,
            "opt_state": <same as params>, "ages": (M,) int32}

`batch_stats` is an empty dict for models without BatchNorm (instance,
layer or no norm), so those pools are the same code path.

Each time a model is used by an outer step it takes one full-batch step of
MSE regression of its head onto the current synthetic set (f(X_s) -> Y_s),
in TRAIN mode: BatchNorm normalises with the synthetic batch's statistics
and updates its running averages. The kernel features f(.) of the outer
loss run in EVAL mode (running averages, state unchanged), so the features
of a synthetic image do not depend on the rest of its batch and the real and
synthetic images go through the same function. When a model's age reaches
`max_age` it is re-initialised (parameters, running statistics, optimiser
state) AND its age is reset to 0 (the reference implementation forgot the
reset, so after about M * max_age steps every draw would hit a model
re-initialised at every use).
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
from distill.nn.models import apply_model


COMPUTE_DTYPES = ("float32", "bfloat16")


class PoolFns(NamedTuple):
  """Pure functions of one pool configuration (bind once, jit inside).

  `batch_stats` below is one model's BatchNorm running statistics, `{}`
  for a model without BatchNorm.
  """
  init: callable              # rng -> (params, batch_stats) of one fresh model
  features: callable          # (params, batch_stats, x (B,H,W,C)) -> (B, p), eval mode
  inner_step: callable        # (params, batch_stats, opt_state, x (n,H,W,C), y (n,d))
                              #   -> (params, batch_stats, opt_state, loss)
  optimizer: optax.GradientTransformation


def _variables(params, batch_stats) -> dict:
  # No "batch_stats" collection at all for stateless norms: flax then sees
  # exactly the variables the model declares.
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_pool_fns(model: nn.Module, image_shape, lr: float, momentum: float,
                  weight_decay: float = 0.0, compute_dtype: str = "float32") -> PoolFns:
  """Builds the per-model functions for a head-carrying feature extractor.

  Args:
    model: a models.py network with `num_outputs` = target width d; any
      norm (BatchNorm statistics are threaded explicitly).
    image_shape: (H, W, C).
    lr, momentum: inner SGD settings (momentum 0 = plain SGD).
    weight_decay: coupled L2 decay of the inner SGD (added to the gradient
      before momentum, as torch.optim.SGD does; the paper uses 1e-3).
    compute_dtype: "float32", or "bfloat16" for mixed precision: the
      network runs on bf16 copies of its parameters and inputs (the
      convolutions in bf16), its outputs come back as float32, so the
      kernel, the ridge solve and the stored parameters stay float32.
  """
  if compute_dtype not in COMPUTE_DTYPES:
    raise DistillError(f"unknown compute dtype {compute_dtype!r}; expected one of "
                       f"{COMPUTE_DTYPES}")
  dtype = jnp.dtype(compute_dtype)
  optimizer = optax.chain(optax.add_decayed_weights(weight_decay),
                          optax.sgd(lr, momentum=momentum or None))

  def apply(variables, x, train):
    """apply_model with the compute dtype; float32 outputs and statistics."""
    if dtype != jnp.float32:
      # Only the parameters: batch-norm statistics stay float32.
      variables = {**variables, "params": jax.tree.map(lambda p: p.astype(dtype),
                                                       variables["params"])}
      x = x.astype(dtype)
    outputs, variables = apply_model(model, variables, x, train=train)
    to_f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
    return to_f32(outputs), to_f32(variables.get("batch_stats", {}))

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return variables["params"], dict(variables.get("batch_stats", {}))

  def features(params, batch_stats, x):
    # Eval mode: running averages, nothing mutable, so the state is unchanged.
    return apply(_variables(params, batch_stats), x, train=False)[0][0]

  def inner_step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      (_, out), new_stats = apply(_variables(p, batch_stats), x, train=True)
      return jnp.mean((out - y) ** 2), new_stats
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return PoolFns(init, features, inner_step, optimizer)


def _fresh(fns: PoolFns, rng):
  """(params, batch_stats, opt_state) of one freshly initialised model."""
  params, batch_stats = fns.init(rng)
  return params, batch_stats, fns.optimizer.init(params)


def _take(tree, m):
  return jax.tree.map(lambda x: x[m], tree)


def _put(stacked, m, one):
  return jax.tree.map(lambda s, o: s.at[m].set(o), stacked, one)


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
    The pool pytree {"params", "batch_stats", "opt_state", "ages" (M,) int32}
    (see the module docstring), every leaf with a leading axis M.
  """
  k_init, k_age = jax.random.split(rng)
  # Jitted: op-by-op (eager) initialisation compiles every primitive separately.
  fresh = jax.jit(jax.vmap(lambda k: _fresh(fns, k)))
  params, batch_stats, opt_state = fresh(jax.random.split(k_init, size))
  if init_age == "uniform":
    ages = jax.random.randint(k_age, (size,), 1, max_age + 1)
  elif init_age == "zero":
    ages = jnp.zeros((size,), jnp.int32)
  else:
    raise DistillError(f"unknown pool init_age {init_age!r}; expected 'uniform' or 'zero'")
  ages = ages.astype(jnp.int32)
  pool = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state, "ages": ages}
  if warm_up:
    pool = _train_to_ages(fns, pool, images, targets)
  return pool


def _train_to_ages(fns: PoolFns, pool: dict, images, targets) -> dict:
  """Trains model m of the stacked pool for pool["ages"][m] full-batch steps.

  Each step is the inner step (train mode: running statistics updated).
  One model at a time, a host loop over one jitted step: vmapping the
  models would turn their convolutions into grouped convolutions (slow on
  CPU) and step every model max(ages) times, and a `fori_loop` body runs
  several times slower than the same step called from the host on XLA:CPU.

  Args:
    fns: from `make_pool_fns`.
    pool: the pool pytree (ages set, models fresh).
    images: (n, H, W, C). targets: (n, d).

  Returns:
    The pool with every model trained; ages unchanged.
  """
  step = jax.jit(fns.inner_step)
  keys = ("params", "batch_stats", "opt_state")
  t0 = time.perf_counter()
  ages = np.asarray(pool["ages"]).tolist()
  for m, age in enumerate(ages):
    p, s, o = (_take(pool[k], m) for k in keys)
    for _ in range(age):
      p, s, o, _ = step(p, s, o, images, targets)
    pool = {**pool, **{k: _put(pool[k], m, v) for k, v in zip(keys, (p, s, o))}}
    print(f"[pool] warm-up: model {m + 1}/{len(ages)} trained to age {age} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
  return pool


def pool_member(pool: dict, index: jax.Array):
  """Model `index` of the pool (a traced scalar is fine: no recompilation).

  Returns:
    (params, batch_stats) of that model, without the leading M axis;
    batch_stats is {} for a model without BatchNorm.
  """
  return _take(pool["params"], index), _take(pool["batch_stats"], index)


def advance(fns: PoolFns, pool: dict, index: jax.Array, images, targets, max_age: int,
            rng: jax.Array) -> tuple[dict, jax.Array]:
  """One inner step for model `index`, then the age bump and reset rule.

  Jittable; `index` may be traced. Only model `index` changes: its params,
  running statistics and optimiser state take the step, its age goes up by
  one; if that age reaches `max_age`, all of them are replaced by a fresh
  model from `rng` and the age is set to 0.

  Args:
    fns: from `make_pool_fns`. pool: the pool pytree.
    index: () int, the model to step.
    images: (n, H, W, C) synthetic images. targets: (n, d).
    max_age: T_max (static). rng: key of the re-initialisation.

  Returns:
    (new pool, inner loss of that step (a scalar, before any reset)).
  """
  keys = ("params", "batch_stats", "opt_state")
  params, batch_stats, opt_state = (_take(pool[k], index) for k in keys)
  params, batch_stats, opt_state, loss = fns.inner_step(params, batch_stats, opt_state,
                                                        images, targets)
  age = pool["ages"][index] + 1
  expired = age >= max_age
  # A branch, not a select: the fresh model is only initialised when one expires
  # (drawing one at every step cost a few percent of the outer step at the paper's pool).
  stepped = jax.lax.cond(expired, lambda: _fresh(fns, rng),
                         lambda: (params, batch_stats, opt_state))
  age = jnp.where(expired, 0, age)
  return {**{k: _put(pool[k], index, v) for k, v in zip(keys, stepped)},
          "ages": pool["ages"].at[index].set(age)}, loss
