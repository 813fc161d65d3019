"""KRR-ST: meta-gradient, model pool, a toy run, compilation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from distill.config import base_config
from distill.methods import pool as pool_lib
from distill.methods.krr_st import krr_outer_loss, KRRST
from distill.nn.models import build_model, ConvNet, init_model
from kernels.ridge import with_bias

SHAPE = (8, 8, 3)


def _tanh_features(params, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ params)


def test_meta_gradient_matches_finite_differences():
  """d loss / d (X_s, Y_s) through the ridge solve, against central differences.

  lambda is scaled by trace(K_ss) but carries no gradient, so the analytic
  gradient must equal the finite differences of the same loss with lambda
  frozen at its value at the base point.
  """
  with jax.enable_x64(True):
    r = np.random.default_rng(0)
    params = jnp.asarray(r.normal(size=(12, 5)) / 3)
    synthetic = {"images": jnp.asarray(r.normal(size=(4, 2, 2, 3))),
                 "targets": jnp.asarray(r.normal(size=(4, 3)))}
    x_real = jnp.asarray(r.normal(size=(9, 12)))
    phi_real = with_bias(jnp.tanh(x_real @ params))
    target_real = jnp.asarray(r.normal(size=(9, 3)))
    phi_syn = with_bias(_tanh_features(params, synthetic["images"]))
    lam0 = 0.05 * jnp.sum(phi_syn ** 2) / 4      # trace_over_n at the base point

    def loss(s, reg, scaling):
      return krr_outer_loss(_tanh_features, params, s, phi_real, target_real,
                            reg=reg, scaling=scaling)[0]

    grads = jax.grad(loss)(synthetic, 0.05, "trace_over_n")
    frozen = functools.partial(loss, reg=lam0, scaling="none")
    np.testing.assert_allclose(loss(synthetic, 0.05, "trace_over_n"), frozen(synthetic),
                               rtol=1e-12)
    eps = 1e-6
    for key in ("images", "targets"):
      for k in range(3):
        direction = jnp.asarray(r.normal(size=synthetic[key].shape))
        plus = {**synthetic, key: synthetic[key] + eps * direction}
        minus = {**synthetic, key: synthetic[key] - eps * direction}
        numeric = (frozen(plus) - frozen(minus)) / (2 * eps)
        analytic = jnp.vdot(grads[key], direction)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def _pool_fns(width=4, out=5):
  model = ConvNet(width=width, depth=2, num_outputs=out)
  return pool_lib.make_pool_fns(model, SHAPE, lr=0.05, momentum=0.9)


def _synthetic(n=6, out=5, seed=0):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.normal(size=(n, *SHAPE)), jnp.float32),
          jnp.asarray(r.normal(size=(n, out)), jnp.float32))


def test_pool_init_trains_each_model_to_its_age():
  fns = _pool_fns()
  x, y = _synthetic()
  pool = pool_lib.init_pool(fns, jax.random.key(3), 3, 4, x, y)
  ages = np.asarray(pool["ages"])
  assert ages.dtype == np.int32 and np.all((ages >= 1) & (ages <= 4))
  # Model m must equal its fresh init trained ages[m] steps by hand.
  keys = jax.random.split(jax.random.split(jax.random.key(3))[0], 3)
  inner_step, init = jax.jit(fns.inner_step), jax.jit(fns.init)
  for m in range(3):
    params, stats = init(keys[m])
    opt = fns.optimizer.init(params)
    for _ in range(ages[m]):
      params, stats, opt, _ = inner_step(params, stats, opt, x, y)
    got = pool_lib.pool_member(pool, m)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves((params, stats))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pool_advance_ages_then_resets_params_and_age():
  fns = _pool_fns()
  x, y = _synthetic()
  max_age = 3
  pool = pool_lib.init_pool(fns, jax.random.key(0), 2, max_age, x, y, init_age="zero")
  advance = jax.jit(functools.partial(pool_lib.advance, fns), static_argnames="max_age")
  init = jax.jit(fns.init)
  seen = []
  for t in range(2 * max_age + 1):
    before = pool_lib.pool_member(pool, 1)
    pool, _ = advance(pool, 1, x, y, max_age=max_age, rng=jax.random.key(100 + t))
    seen.append(int(pool["ages"][1]))
    assert int(pool["ages"][0]) == 0  # untouched model keeps its age
    after = pool_lib.pool_member(pool, 1)
    if seen[-1] == 0:
      # Reset: fresh parameters from this step's key, not a continuation.
      fresh = init(jax.random.key(100 + t))
      for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(a, b)
    else:
      assert any(not np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(after), jax.tree.leaves(before)))
  # Ages cycle 1, 2, reset to 0, and climb again: never stuck at the maximum.
  assert seen == [1, 2, 0, 1, 2, 0, 1]


def test_pool_ages_stay_below_max_over_a_long_run():
  fns = _pool_fns(width=2, out=2)
  x, y = _synthetic(n=3, out=2)
  pool = pool_lib.init_pool(fns, jax.random.key(1), 3, 4, x, y)
  advance = jax.jit(functools.partial(pool_lib.advance, fns), static_argnames="max_age")
  resets = 0
  for t in range(40):
    index = t % 3
    pool, _ = advance(pool, index, x, y, max_age=4, rng=jax.random.key(t))
    ages = np.asarray(pool["ages"])
    assert np.all((ages >= 0) & (ages < 4))
    resets += int(ages[index] == 0)
  # Each model is used 13-14 times, resetting about every 4 uses.
  assert 6 <= resets <= 12


def _toy_method(steps=40, lr=1e-2):
  cfg = base_config().krr_st
  with cfg.unlocked():
    cfg.update(dict(num_synthetic=8, steps=steps, batch_size=32, lr_images=lr, lr_targets=lr,
                    reg=1e-3, reg_scaling="trace_over_n", augment_real=False))
    cfg.pool.update(dict(size=2, max_age=20, lr=0.01))
    # The constant-width instance-norm pool (the config's default is the
    # paper's 128-256-512 batch-norm pool; tests/test_pool_bn.py covers that).
    cfg.pool.arch.update(dict(width=8, depth=2, widths=(), norm="instance"))
  teacher = build_model(dict(name="convnet", width=4, depth=2))
  teacher_vars = init_model(teacher, jax.random.key(7), SHAPE)
  dim = 4 * 2 * 2
  method = KRRST(cfg, SHAPE, dim, teacher, mean=[0.5] * 3, std=[0.25] * 3)
  # A structured source: smooth random fields, so that there is something to learn.
  r = np.random.default_rng(0)
  low = r.uniform(0, 255, size=(256, 2, 2, 3))
  source = np.repeat(np.repeat(low, 4, 1), 4, 2).astype(np.uint8)
  x0 = (source[:8] / 255.0 - 0.5) / 0.25
  y0 = jax.jit(teacher.apply)(teacher_vars, jnp.asarray(x0, jnp.float32))[0]
  state = method.init(jax.random.key(0), x0, y0)
  return method, state, teacher, teacher_vars, source


def _held_out_loss(method, synthetic, teacher, teacher_vars, source):
  """Outer loss on all source images under fresh random extractors (not the pool)."""
  x = (jnp.asarray(source, jnp.float32) / 255.0 - 0.5) / 0.25
  target = jax.jit(teacher.apply)(teacher_vars, x)[0]
  losses = []
  @jax.jit
  def loss(key):
    member = method.pool_fns.init(key)
    phi = with_bias(method.member_features(member, x))
    return krr_outer_loss(method.member_features, member, synthetic, phi, target,
                          reg=1e-3, scaling="trace_over_n")[0]
  losses = [loss(jax.random.key(50 + k)) for k in range(3)]
  return float(np.mean(losses))


def test_toy_run_lowers_outer_loss_and_compiles_once():
  method, state, teacher, teacher_vars, source = _toy_method()
  before = _held_out_loss(method, state["synthetic"], teacher, teacher_vars, source)
  r = np.random.default_rng(1)
  first = None
  for t in range(40):
    batch = jnp.asarray(source[r.choice(len(source), 32, replace=False)])
    state, metrics = method.step(state, batch, jax.random.key(t), teacher_vars)
    first = first or float(metrics["loss"])
    if t == 1:
      # The second outer step reuses the first one's executable.
      assert method.step._cache_size() == 1
    assert float(metrics["solve_ok"]) == 1.0
  after = _held_out_loss(method, state["synthetic"], teacher, teacher_vars, source)
  assert method.step._cache_size() == 1
  assert after < 0.8 * before, (before, after)


def test_bfloat16_pool_keeps_float32_state_and_follows_the_float32_step():
  method, state, teacher, teacher_vars, source = _toy_method(steps=3)
  cfg = method.cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.compute_dtype = "bfloat16"
  mixed = KRRST(cfg, SHAPE, 16, teacher, mean=[0.5] * 3, std=[0.25] * 3)
  state_bf16 = jax.tree.map(jnp.array, state)
  batch = jnp.asarray(source[:32])
  key = jax.random.key(3)
  new32, m32 = method.step(state, batch, key, teacher_vars)
  new16, m16 = mixed.step(state_bf16, batch, key, teacher_vars)
  # The state keeps its dtypes (float32 everywhere), so checkpoints are unchanged.
  assert jax.tree.map(lambda a: a.dtype, new16) == jax.tree.map(lambda a: a.dtype, new32)
  assert float(m16["solve_ok"]) == 1.0
  # bf16 convolutions (8-bit mantissa) give the same loss to about 1%.
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=0.03)
  features = mixed.member_features(pool_lib.pool_member(new16["pool"], 0), jnp.zeros((2, *SHAPE)))
  assert features.dtype == jnp.float32
