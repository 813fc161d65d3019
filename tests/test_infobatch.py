"""InfoBatch: unbiased pruning, annealing, skip accounting, schedules, teacher driver."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill.config import base_config
from distill.errors import DistillError
from distill.methods import barlow_twins
from distill.selection import infobatch
from distill.stages.teacher import train_infobatch_teacher


def _regression(n=40, p=3, seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, p)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5]) + r.normal(size=n)).astype(np.float32)
  w = np.zeros(p, np.float32)
  residual = x @ w - y
  losses = 0.5 * residual ** 2                   # (N,) per-sample losses
  grads = residual[:, None] * x                  # (N, p) per-sample gradients
  return losses, grads


def test_rescaled_pruned_epoch_gradient_is_unbiased():
  losses, grads = _regression()
  r, draws = 0.5, 4000
  keys = jax.random.split(jax.random.key(0), draws)
  keep, weights = jax.vmap(infobatch.prune_mask, in_axes=(None, 0, None))(
      jnp.asarray(losses), keys, r)
  keep, weights = np.asarray(keep), np.asarray(weights)
  pruned_grads = (keep * weights) @ grads        # (draws, p) weighted epoch gradients
  full = grads.sum(0)
  mean, sem = pruned_grads.mean(0), pruned_grads.std(0) / np.sqrt(draws)
  assert np.all(np.abs(mean - full) < 4 * sem + 1e-4), (mean, full, sem)
  # It really prunes: r of the below-mean samples per draw, and only those.
  below = losses < losses.mean()
  assert (~keep).sum(1).mean() == pytest.approx(r * below.sum(), rel=0.05)
  assert not np.any(~keep[:, ~below])
  # Without rescaling the same draws are biased by far more than the noise.
  unweighted = keep.astype(np.float32) @ grads
  assert np.max(np.abs(unweighted.mean(0) - full) / (sem + 1e-6)) > 10


def test_annealing_uses_full_data_with_unit_weights():
  losses, _ = _regression()
  scores, key = jnp.asarray(losses), jax.random.key(1)
  kw = dict(num_epochs=8, prune_ratio=0.5, delta=0.75)
  assert infobatch.anneal_start(8, 0.75) == 6
  for epoch in range(8):
    plan = infobatch.plan_epoch(scores, epoch, key, **kw)
    assert len(plan.indices) + plan.num_pruned == 40
    assert len(np.unique(plan.indices)) == len(plan.indices)
    if epoch >= 6:
      assert plan.num_pruned == 0 and np.all(plan.weights == 1.0)
      assert sorted(plan.indices) == list(range(40))
    else:
      assert plan.num_pruned > 0
      below = losses[plan.indices] < losses.mean()
      np.testing.assert_allclose(plan.weights, np.where(below, 2.0, 1.0))
  with pytest.raises(DistillError, match="prune_ratio"):
    infobatch.plan_epoch(scores, 0, key, num_epochs=8, prune_ratio=1.0, delta=0.5)


def test_nothing_pruned_when_scores_are_equal_or_unseen():
  key = jax.random.key(2)
  kw = dict(num_epochs=10, prune_ratio=0.9, delta=1.0)
  for scores in (infobatch.init_scores(33), jnp.full(33, 0.1, jnp.float32),
                 jnp.full(33, 1e-7, jnp.float32)):
    for epoch in range(3):
      plan = infobatch.plan_epoch(scores, epoch, key, **kw)
      assert plan.num_pruned == 0 and np.all(plan.weights == 1.0)
  # Unseen samples (inf) never count as below the mean of the seen ones.
  scores = infobatch.update(infobatch.init_scores(6), jnp.array([0, 1]), jnp.array([1.0, 3.0]))
  keep, weights = infobatch.prune_mask(scores, key, 0.999)
  assert list(np.asarray(keep)) == [False, True, True, True, True, True]
  assert float(weights[0]) == pytest.approx(1000.0, rel=1e-3)


def test_realised_skip_fraction_matches_counted_skips_and_steps():
  n, epochs, batch = 50, 6, 8
  r = np.random.default_rng(3)
  scores, key = infobatch.init_scores(n), jax.random.key(3)
  plans, counted, steps, progress = [], 0, 0, []
  for epoch in range(epochs):
    plan = infobatch.plan_epoch(scores, epoch, key, num_epochs=epochs, prune_ratio=0.5,
                                delta=0.7)
    plans.append(plan)
    counted += n - len(set(plan.indices.tolist()))
    batches = infobatch.epoch_batches(plan, batch)
    assert len(batches) == len(plan.indices) // batch
    for j, (idx, w) in enumerate(batches):
      assert idx.shape == w.shape == (batch,)
      progress.append(infobatch.epoch_progress(epoch, j, len(batches), epochs))
      scores = infobatch.update(scores, jnp.asarray(idx), jnp.asarray(r.uniform(size=batch)))
      steps += 1
  assert counted > 0
  assert infobatch.skipped_fraction(plans, n) == pytest.approx(counted / (epochs * n))
  # Progress rises through [0, 1) and ends inside the last epoch, whatever the epoch lengths.
  assert len(progress) == steps < infobatch.full_data_steps(n, batch, epochs)
  assert progress[0] == 0.0 and np.all(np.diff(progress) > 0)
  assert (epochs - 1) / epochs <= progress[-1] < 1.0
  # Unpruned, progress * full_steps is exactly the global step: the full-data schedule.
  schedule = optax.linear_schedule(1.0, 0.0, 24)
  lr = infobatch.progress_schedule(schedule, 24)
  assert [float(lr(infobatch.epoch_progress(e, j, 4, 6))) for e in range(6) for j in range(4)] \
      == pytest.approx([float(schedule(s)) for s in range(24)])


def test_expected_steps_matches_plans_with_known_below_mean_share():
  n, epochs, batch, share = 400, 10, 10, 0.3
  fixed = np.where(np.arange(n) < share * n, 0.0, 1.0).astype(np.float32)  # 30% below mean
  scores, key = infobatch.init_scores(n), jax.random.key(4)
  total = 0
  for epoch in range(epochs):
    plan = infobatch.plan_epoch(scores, epoch, key, num_epochs=epochs, prune_ratio=0.5,
                                delta=0.8)
    total += len(infobatch.epoch_batches(plan, batch))
    scores = jnp.asarray(fixed)
  expected = infobatch.expected_steps(n, batch, epochs, 0.5, 0.8, below_mean_share=share)
  # 7 pruning epochs of 340 +- 7 kept samples: the step count is within a few steps.
  assert abs(total - expected) <= 4
  assert expected < infobatch.full_data_steps(n, batch, epochs)


def test_weighted_barlow_twins_reduces_to_plain_and_scores_sum_to_invariance():
  r = np.random.default_rng(5)
  z1 = jnp.asarray(r.normal(size=(32, 6)), jnp.float32)
  z2 = z1 + 0.5 * jnp.asarray(r.normal(size=(32, 6)), jnp.float32)
  loss, scores = barlow_twins.weighted_barlow_twins_loss(z1, z2, jnp.ones(32), 5e-3)
  assert float(loss) == pytest.approx(float(barlow_twins.barlow_twins_loss(z1, z2, 5e-3)),
                                      rel=1e-5)
  standardize = lambda z: (z - z.mean(0)) / z.std(0)
  diag = jnp.diagonal(standardize(z1).T @ standardize(z2) / 32)
  assert float(scores.sum() / 64) == pytest.approx(float(jnp.sum(1 - diag)), rel=1e-3)
  # Doubling one half's weights equals duplicating those rows in C.
  w = jnp.where(jnp.arange(32) < 16, 2.0, 1.0)
  a, b = standardize(z1), standardize(z2)
  c = (jnp.concatenate([a, a[:16]]).T @ jnp.concatenate([b, b[:16]])) / 48
  on = jnp.sum((1 - jnp.diagonal(c)) ** 2)
  off = jnp.sum(c ** 2) - jnp.sum(jnp.diagonal(c) ** 2)
  weighted, _ = barlow_twins.weighted_barlow_twins_loss(z1, z2, w, 5e-3)
  assert float(weighted) == pytest.approx(float(on + 5e-3 * off), rel=1e-3)


def test_train_teacher_with_pruning_runs_reports_and_resumes(tmp_path):
  from tests.conftest import make_blobs
  images, _ = make_blobs(48, size=16, seed=0)
  c = base_config()
  with c.unlocked():
    c.teacher.arch.update(dict(name="convnet", width=4, depth=1))
    c.teacher.projector = (8, 8)
    c.teacher.epochs, c.teacher.batch_size, c.teacher.warmup_steps = 3, 8, 2
    c.teacher.infobatch.prune_ratio, c.teacher.infobatch.delta = 0.5, 0.67
  teacher, report = train_infobatch_teacher(c, str(tmp_path), images)
  plans = json.loads((tmp_path / "teacher_infobatch" / "plans.json").read_text())
  # Epoch 0 has no scores yet, epoch 1 prunes, epoch 2 = int(0.67 * 3) anneals.
  assert [p["epoch"] for p in plans] == [0, 1, 2]
  assert report["steps"] == sum(p["steps"] for p in plans) < report["full_data_steps"] == 18
  assert report["skipped_fraction"] == pytest.approx(plans[1]["pruned"] / 144)
  assert plans[0]["pruned"] == 0 and plans[2]["pruned"] == 0 and plans[1]["pruned"] > 0
  metrics = [json.loads(l) for l in (tmp_path / "teacher_infobatch" / "metrics.jsonl").open()]
  assert [m["step"] for m in metrics] == list(np.cumsum([p["steps"] for p in plans]))
  assert teacher.features(np.zeros((2, 16, 16, 3), np.float32)).shape == (2, 8 * 8 * 4)
  # Lost artefacts with finished checkpoints: rebuilt from the last epoch, no retraining.
  (tmp_path / "teacher_infobatch" / "report.json").unlink()
  again, report2 = train_infobatch_teacher(c, str(tmp_path), images)
  assert report2["steps"] == report["steps"]
  np.testing.assert_allclose(jax.tree.leaves(again.variables)[0],
                             jax.tree.leaves(teacher.variables)[0])
