"""The batch-norm model pool (convnet_128_256_512_bn, scaled down) and ConvNet widths."""

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
WIDTHS = (4, 8)


def _bn_model(out=5):
  return ConvNet(widths=WIDTHS, norm="batch", num_outputs=out)


def _bn_fns(out=5, weight_decay=1e-3):
  return pool_lib.make_pool_fns(_bn_model(out), SHAPE, lr=0.05, momentum=0.9,
                                weight_decay=weight_decay)


def _synthetic(n=6, out=5, seed=0):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.normal(1.0, 2.0, size=(n, *SHAPE)), jnp.float32),
          jnp.asarray(r.normal(size=(n, out)), jnp.float32))


def _equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _advance(fns):
  return jax.jit(functools.partial(pool_lib.advance, fns), static_argnames="max_age")


def test_convnet_widths_sets_block_channels_and_feature_width():
  model = ConvNet(widths=(4, 8, 16), norm="batch")
  shape = (16, 24, 3)
  variables = init_model(model, jax.random.key(0), shape)
  kernels = [variables["params"][f"Conv_{b}"]["kernel"].shape for b in range(3)]
  assert kernels == [(3, 3, 3, 4), (3, 3, 4, 8), (3, 3, 8, 16)]
  assert [variables["params"][f"BatchNorm_{b}"]["scale"].shape for b in range(3)] == \
      [(4,), (8,), (16,)]
  assert [variables["batch_stats"][f"BatchNorm_{b}"]["mean"].shape for b in range(3)] == \
      [(4,), (8,), (16,)]
  features, outputs = model.apply(variables, jnp.zeros((2, *shape)))
  assert features.shape == (2, 16 * (16 // 8) * (24 // 8)) and outputs is None
  # build_model takes widths from the config (tuple or list) and replaces width/depth.
  arch = dict(name="convnet", width=99, depth=5, norm="batch", widths=[4, 8, 16])
  assert build_model(arch) == ConvNet(width=16, depth=3, norm="batch", widths=(4, 8, 16))
  # Without widths: the constant-width net and its parameter names, as before.
  plain = build_model(dict(name="convnet", width=4, depth=2, widths=()))
  assert plain == ConvNet(width=4, depth=2)
  names = set(init_model(plain, jax.random.key(0), SHAPE)["params"])
  assert names == {"Conv_0", "GroupNorm_0", "Conv_1", "GroupNorm_1"}


def test_inner_step_updates_only_the_used_members_batch_stats():
  fns = _bn_fns()
  x, y = _synthetic()
  pool = pool_lib.init_pool(fns, jax.random.key(0), 3, 10, x, y, init_age="zero")
  before = [pool_lib.pool_member(pool, m) for m in range(3)]
  pool, loss = _advance(fns)(pool, 1, x, y, max_age=10, rng=jax.random.key(1))
  assert np.isfinite(float(loss))
  after = [pool_lib.pool_member(pool, m) for m in range(3)]
  assert not _equal(after[1][1], before[1][1])   # running statistics moved
  assert not _equal(after[1][0], before[1][0])   # and the parameters
  for m in (0, 2):
    assert _equal(after[m], before[m])
  # One step of momentum 0.9 from (mean 0, var 1): 0.1 of the batch's statistics.
  stats = after[1][1]["BatchNorm_0"]
  assert float(jnp.max(jnp.abs(stats["mean"]))) > 0
  np.testing.assert_array_equal(np.asarray(pool["ages"]), [0, 1, 0])


def test_kernel_features_use_running_statistics_and_keep_them():
  fns = _bn_fns()
  x, y = _synthetic()
  pool = pool_lib.init_pool(fns, jax.random.key(2), 2, 10, x, y)   # trained to ages 1..10
  params, stats = pool_lib.pool_member(pool, 0)
  saved = jax.tree.map(np.array, (params, stats))
  features = jax.jit(fns.features)
  first, second = features(params, stats, x), features(params, stats, x)
  np.testing.assert_array_equal(first, second)
  assert _equal((params, stats), saved)
  # Eval mode: a sample's features do not depend on the rest of its batch.
  np.testing.assert_allclose(features(params, stats, x[:2]), first[:2], rtol=1e-5, atol=1e-6)
  # Train mode (batch statistics) gives different features.
  (train_features, _), _ = _bn_model().apply({"params": params, "batch_stats": stats}, x,
                                             train=True, mutable=["batch_stats"])
  assert not np.allclose(train_features, first, atol=1e-3)


def test_reset_at_max_age_restores_fresh_batch_stats_and_age():
  fns = _bn_fns()
  x, y = _synthetic()
  max_age, rng = 3, jax.random.key(0)
  pool = pool_lib.init_pool(fns, rng, 2, max_age, x, y, init_age="zero")
  # The key init_pool drew model 1 from: resetting model 0 with it must give
  # model 0 exactly the (never stepped) model 1, saving a compile of `init`.
  key_of_model_1 = jax.random.split(jax.random.split(rng)[0], 2)[1]
  fresh = pool_lib.pool_member(pool, 1)
  advance = _advance(fns)
  for t in range(max_age):
    key = key_of_model_1 if t == max_age - 1 else jax.random.key(100 + t)
    pool, _ = advance(pool, 0, x, y, max_age=max_age, rng=key)
    if t < max_age - 1:
      stats = pool_lib.pool_member(pool, 0)[1]["BatchNorm_1"]
      assert float(jnp.max(jnp.abs(stats["var"] - 1))) > 0   # trained, not fresh
  np.testing.assert_array_equal(np.asarray(pool["ages"]), [0, 0])
  params, stats = pool_lib.pool_member(pool, 0)
  assert _equal((params, stats), fresh)
  for layer in stats.values():
    np.testing.assert_array_equal(layer["mean"], 0)
    np.testing.assert_array_equal(layer["var"], 1)
  # The optimiser state (momentum) restarts too.
  opt = jax.tree.map(lambda a: a[0], pool["opt_state"])
  assert all(float(jnp.max(jnp.abs(a))) == 0 for a in jax.tree.leaves(opt))


def _bn_method(steps):
  cfg = base_config().krr_st
  with cfg.unlocked():
    cfg.update(dict(num_synthetic=6, steps=steps, batch_size=32, lr_images=1e-2,
                    lr_targets=1e-2, reg=1e-3, reg_scaling="trace_over_n", augment_real=False))
    cfg.pool.update(dict(size=2, max_age=20, lr=0.01, weight_decay=1e-3))
    cfg.pool.arch.update(dict(widths=WIDTHS, norm="batch"))
  teacher = build_model(dict(name="convnet", width=4, depth=2))
  teacher_vars = init_model(teacher, jax.random.key(7), SHAPE)
  method = KRRST(cfg, SHAPE, 4 * 2 * 2, teacher, mean=[0.5] * 3, std=[0.25] * 3)
  # Smooth random fields, so that there is something to learn.
  r = np.random.default_rng(0)
  low = r.uniform(0, 255, size=(256, 2, 2, 3))
  source = np.repeat(np.repeat(low, 4, 1), 4, 2).astype(np.uint8)
  x0 = jnp.asarray((source[:6] / 255.0 - 0.5) / 0.25, jnp.float32)
  teacher_apply = jax.jit(teacher.apply)   # eager apply compiles op by op
  state = method.init(jax.random.key(0), x0, teacher_apply(teacher_vars, x0)[0])
  return method, state, teacher_apply, teacher_vars, source


def test_bn_pool_krr_st_lowers_outer_loss_and_compiles_once():
  steps = 30
  method, state, teacher_apply, teacher_vars, source = _bn_method(steps)
  assert state["pool"]["batch_stats"]   # the BN pool carries running statistics
  # Held-out loss on the whole source under the initial pool members, frozen
  # (copied: the state's buffers are donated to the step).
  members = [jax.tree.map(np.array, pool_lib.pool_member(state["pool"], m)) for m in range(2)]
  x = (jnp.asarray(source, jnp.float32) / 255.0 - 0.5) / 0.25
  target = teacher_apply(teacher_vars, x)[0]

  @jax.jit
  def held_out(synthetic, member):
    phi = with_bias(method.member_features(member, x))
    return krr_outer_loss(method.member_features, member, synthetic, phi, target,
                          reg=1e-3, scaling="trace_over_n")[0]

  def loss_of(synthetic):
    return float(np.mean([held_out(synthetic, m) for m in members]))

  before = loss_of(state["synthetic"])
  r = np.random.default_rng(1)
  for t in range(steps):
    batch = jnp.asarray(source[r.choice(len(source), 32, replace=False)])
    state, metrics = method.step(state, batch, jax.random.key(t), teacher_vars)
    assert float(metrics["solve_ok"]) == 1.0 and np.isfinite(float(metrics["loss"]))
    assert np.isfinite(float(metrics["inner_loss"]))
  assert method.step._cache_size() == 1
  after = loss_of(state["synthetic"])
  assert after < 0.8 * before, (before, after)
