"""Label-free influence: exact-Hessian reference, leave-one-out, planted outliers/duplicates."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.cli import main
from distill.config import base_config
from distill.methods import barlow_twins
from distill.selection import influence

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMOKE = os.path.join(ROOT, "experiments", "configs", "fashion_mnist_quickstart.py") + ":smoke"


def _toy(n=60, v=2, p=3, k=2, seed=0):
  """Fit views, clean targets and fresh evaluation views of a linear toy."""
  r = np.random.default_rng(seed)
  clean = r.normal(size=(n, p)).astype(np.float32)
  mix = r.normal(size=(p, k))
  views = clean[:, None] + 0.5 * r.normal(size=(2, n, v, p))
  return views[0].astype(np.float32), (clean @ mix).astype(np.float32), views[1].astype(np.float32)


def _explicit(views, clean, eval_views, reg):
  """Flattened-parameter reference: jax.hessian of J and per-sample jax.grad."""
  n, v, p = views.shape
  k = clean.shape[1]
  a = np.concatenate([views, np.ones((n, v, 1), np.float32)], -1)
  lam = reg * np.sum(a ** 2) / (n * v)               # trace_over_n on all N V rows
  loss = lambda theta, x, y: jnp.mean(jnp.sum((x @ theta.reshape(p + 1, k) - y) ** 2, -1))
  per_sample = jax.vmap(loss, in_axes=(None, 0, 0))
  objective = lambda theta: jnp.sum(per_sample(theta, a, clean)) + lam / v * jnp.sum(theta ** 2)
  phi = a.reshape(n * v, p + 1).astype(np.float64)
  w = np.linalg.solve(phi.T @ phi + lam * np.eye(p + 1), phi.T @ np.repeat(clean, v, 0))
  theta = jnp.asarray(w.reshape(-1), jnp.float32)
  hessian = np.asarray(jax.jit(jax.hessian(objective))(theta), np.float64)
  grads = np.asarray(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(theta, a, clean), np.float64)
  e = np.concatenate([eval_views, np.ones((n, v, 1), np.float32)], -1)
  total = np.asarray(jax.grad(lambda t: jnp.sum(per_sample(t, e, clean)))(theta), np.float64)
  infl = -grads @ np.linalg.solve(hessian, total)
  self_infl = np.einsum("ij,ij->i", grads, np.linalg.solve(hessian, grads.T).T)
  return a.astype(np.float64), e.astype(np.float64), lam, infl, self_infl


def test_scores_match_exact_hessian_and_leave_one_out():
  views, clean, eval_views = _toy()
  n, v, p = views.shape
  reg = 0.05
  scores = influence.influence_scores(jnp.asarray(views), jnp.asarray(clean),
                                      jnp.asarray(eval_views), reg)
  a, e, lam, infl, self_infl = _explicit(views, clean, eval_views, reg)
  assert float(scores["lam"]) == pytest.approx(lam, rel=1e-5)
  np.testing.assert_allclose(scores["influence"], infl, rtol=2e-3, atol=2e-3 * np.abs(infl).max())
  np.testing.assert_allclose(scores["self_influence"], self_infl, rtol=2e-3)
  # Leave-one-out retraining (float64, closed form, same lambda).
  y = clean.astype(np.float64)
  loss = lambda w, i, x=a: np.mean(np.sum((x[i] @ w - y[i]) ** 2, -1))
  fit = lambda rows: np.linalg.solve(a[rows].reshape(-1, p + 1).T @ a[rows].reshape(-1, p + 1)
                                     + lam * np.eye(p + 1),
                                     a[rows].reshape(-1, p + 1).T @ np.repeat(y[rows], v, 0))
  w = fit(np.arange(n))
  total = lambda w: sum(loss(w, i, e) for i in range(n))   # L on the fresh views
  d_total, d_self = [], []
  for i in range(n):
    w_i = fit(np.delete(np.arange(n), i))
    d_total.append(total(w_i) - total(w))
    d_self.append(loss(w_i, i) - loss(w, i))
  np.testing.assert_allclose(scores["loss"], [loss(w, i) for i in range(n)], rtol=1e-3)
  # Removing i changes L by about -I(i) and its own fit loss by about S(i).
  assert np.corrcoef(-np.asarray(scores["influence"]), d_total)[0, 1] > 0.99
  assert np.corrcoef(np.asarray(scores["self_influence"]), d_self)[0, 1] > 0.99
  np.testing.assert_allclose(scores["self_influence"], d_self, rtol=0.25)


def test_planted_outliers_and_duplicates_rank_first():
  r = np.random.default_rng(1)
  n, p = 80, 8
  clean = r.normal(size=(n, p)).astype(np.float32)
  twins = {10: 40, 11: 41, 12: 42}
  for a, b in twins.items():
    clean[b] = clean[a]
  views = clean[:, None] + 0.1 * r.normal(size=(n, 2, p)).astype(np.float32)
  outliers = [3, 25, 60, 77]                       # views inconsistent with the image
  views[outliers] = clean[outliers, None] + 3.0 * r.normal(size=(4, 2, p))
  fresh = clean[:, None] + 0.1 * r.normal(size=(n, 2, p)).astype(np.float32)
  scores = influence.influence_scores(jnp.asarray(views), jnp.asarray(clean),
                                      jnp.asarray(fresh), 1e-2)
  assert set(np.argsort(-np.asarray(scores["self_influence"]))[:4]) == set(outliers)
  dup, nearest = influence.duplicate_scores(clean, chunk=16)
  planted = set(twins) | set(twins.values())
  assert set(np.argsort(-dup)[:6]) == planted
  assert np.all(dup[list(planted)] > 0.9999) and np.all(dup <= 1.0 + 1e-5)
  assert all(nearest[a] == b and nearest[b] == a for a, b in twins.items())
  # Matches brute force everywhere (chunking and the self-exclusion are right).
  unit = clean / np.linalg.norm(clean, axis=1, keepdims=True)
  sims = unit @ unit.T
  np.fill_diagonal(sims, -np.inf)
  np.testing.assert_allclose(dup, sims.max(1), atol=1e-5)


def test_cli_writes_scores_for_the_source(tmp_path):
  from tests.conftest import make_blobs
  images, labels = make_blobs(40, size=16, seed=3)
  images[30:33] = images[0:3]                       # three exact duplicates
  np.savez(tmp_path / "source.npz", images=images, labels=labels)
  c = base_config()
  with c.unlocked():
    c.teacher.arch.update(dict(name="convnet", width=4, depth=2))
  model = barlow_twins.build_barlow_twins(c.teacher)
  # A random teacher is enough here, and filling shapes skips compiling `init`.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  r = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: r.normal(0, 0.5, s.shape).astype(s.dtype), shapes)
  barlow_twins.save_teacher(str(tmp_path / "teacher"), c.teacher.arch.to_dict(), variables,
                           [0.3] * 3, [0.25] * 3, (16, 16, 3), {})
  args = ["influence", "--config", SMOKE, "--workdir", str(tmp_path),
          "--set", f"data.source={tmp_path / 'source.npz'}",
          "--set", "selection.influence.batch_size=40"]
  assert main(args) == 0
  with np.load(tmp_path / "influence.npz") as f:
    out = {k: f[k] for k in f.files}
  for key in ("loss", "influence", "self_influence", "duplicate"):
    assert out[key].shape == (40,) and np.all(np.isfinite(out[key])), key
  assert json.loads(str(out["meta"]))["num_views"] == 2
  assert set(np.argsort(-out["duplicate"])[:6]) == {0, 1, 2, 30, 31, 32}
  assert [int(out["nearest"][i]) for i in (0, 1, 2)] == [30, 31, 32]
