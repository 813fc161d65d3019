"""The ridge solver against float64 numpy, and its failure policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import ridge


def _problem(n=24, p=10, m=7, d=3, seed=0):
  r = np.random.default_rng(seed)
  return (r.normal(size=(n, p)).astype(np.float32), r.normal(size=(n, d)).astype(np.float32),
          r.normal(size=(m, p)).astype(np.float32))


def _numpy_krr(phi_s, y_s, phi_t, lam):
  phi_s, y_s, phi_t = (a.astype(np.float64) for a in (phi_s, y_s, phi_t))
  k_ss = phi_s @ phi_s.T
  return phi_t @ phi_s.T @ np.linalg.solve(k_ss + lam * np.eye(len(k_ss)), y_s)


@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("scaling", ["trace_over_n", "trace", "none"])
def test_matches_numpy_float64(form, scaling):
  phi_s, y_s, phi_t = _problem()
  reg = {"trace_over_n": 0.05, "trace": 0.002, "none": 0.7}[scaling]
  trace = float(np.sum(phi_s.astype(np.float64) ** 2))
  lam = {"trace_over_n": reg * trace / len(phi_s), "trace": reg * trace, "none": reg}[scaling]
  got, info = ridge.krr_predict(phi_s, y_s, phi_t, reg, scaling=scaling, form=form)
  np.testing.assert_allclose(got, _numpy_krr(phi_s, y_s, phi_t, lam), rtol=2e-4, atol=2e-5)
  assert bool(info.ok) and float(info.jitter) == 0.0
  np.testing.assert_allclose(float(info.lam), lam, rtol=1e-5)


@pytest.mark.parametrize("n,p", [(30, 8), (8, 30)])
def test_dual_equals_primal(n, p):
  phi_s, y_s, phi_t = _problem(n=n, p=p)
  dual, _ = ridge.krr_predict(phi_s, y_s, phi_t, 1e-2, form="dual")
  primal, _ = ridge.krr_predict(phi_s, y_s, phi_t, 1e-2, form="primal")
  auto, _ = ridge.krr_predict(phi_s, y_s, phi_t, 1e-2)
  np.testing.assert_allclose(dual, primal, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(auto, dual, rtol=1e-3, atol=1e-4)


def test_ridge_fit_weights_match_normal_equations():
  phi, y, _ = _problem(n=40, p=6)
  weights, info = ridge.ridge_fit(phi, y, 0.1)
  phi64 = phi.astype(np.float64)
  lam = 0.1 * np.sum(phi64 ** 2) / len(phi)
  expected = np.linalg.solve(phi64.T @ phi64 + lam * np.eye(6), phi64.T @ y)
  np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-5)
  assert bool(info.ok)


def test_singular_gram_falls_back_to_jitter_not_nan():
  # Rank-1 features and no ridge: the plain Cholesky fails, a jittered one works.
  phi_s = np.ones((10, 4), np.float32)
  y_s = np.arange(20, dtype=np.float32).reshape(10, 2)
  pred, info = ridge.krr_predict(phi_s, y_s, phi_s, 0.0, scaling="none", form="dual")
  assert bool(info.ok)
  assert float(info.jitter) > 0
  assert np.all(np.isfinite(pred))


def test_hopeless_system_reports_failure_instead_of_silent_values():
  phi_s = np.full((6, 3), np.nan, np.float32)
  pred, info = ridge.krr_predict(phi_s, np.ones((6, 1), np.float32), phi_s, 1e-3)
  assert not bool(info.ok)
  assert not np.all(np.isfinite(pred))


def test_gradient_through_fallback_branch_is_finite():
  phi_s = np.ones((6, 3), np.float32)
  y_s = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
  grad = jax.grad(lambda y: ridge.krr_predict(phi_s, y, phi_s, 0.0, scaling="none")[0].sum())(y_s)
  assert np.all(np.isfinite(grad))


def test_vmap_batches_independent_problems():
  phi_s, y_s, phi_t = _problem()
  stack = lambda a: jnp.stack([a, 2 * a])
  batched, info = jax.vmap(lambda a, b, c: ridge.krr_predict(a, b, c, 1e-2))(
      stack(phi_s), stack(y_s), stack(phi_t))
  single, _ = ridge.krr_predict(2 * phi_s, 2 * y_s, 2 * phi_t, 1e-2)
  np.testing.assert_allclose(batched[1], single, rtol=1e-4, atol=1e-5)
  assert info.ok.shape == (2,)


def test_unknown_scaling_is_an_error():
  phi_s, y_s, phi_t = _problem()
  with pytest.raises(ValueError, match="scaling"):
    ridge.krr_predict(phi_s, y_s, phi_t, 1e-2, scaling="per_sample")


@pytest.mark.parametrize("form", ["dual", "primal"])
def test_lambda_carries_no_gradient(form):
  """d pred / d phi_s equals the gradient with lambda frozen at its value."""
  with jax.enable_x64(True):
    phi_s, y_s, phi_t = (jnp.asarray(a, jnp.float64) for a in _problem(n=6, p=9))
    reg = 0.1
    lam = reg * float(jnp.sum(phi_s ** 2)) / len(phi_s)
    scaled = lambda phi: ridge.krr_predict(phi, y_s, phi_t, reg, form=form)[0].sum()
    frozen = lambda phi: ridge.krr_predict(phi, y_s, phi_t, lam, scaling="none",
                                           form=form)[0].sum()
    np.testing.assert_allclose(jax.grad(scaled)(phi_s), jax.grad(frozen)(phi_s), rtol=1e-9)
    # ... and frozen lambda is a real difference: with lambda following the
    # features the gradient would be another one.
    def live(phi):
      lam_live = reg * jnp.sum(phi ** 2) / len(phi)
      gram = phi @ phi.T + lam_live * jnp.eye(len(phi))
      return (phi_t @ phi.T @ jnp.linalg.solve(gram, y_s)).sum()
    assert not np.allclose(jax.grad(live)(phi_s), jax.grad(frozen)(phi_s), rtol=1e-3)


@pytest.mark.parametrize("scaling", ["trace_over_n", "none"])
def test_ridge_path_matches_ridge_fit_at_every_reg(scaling):
  r = np.random.default_rng(5)
  phi = jnp.asarray(r.normal(size=(40, 12)), jnp.float32)
  y = jnp.asarray(r.normal(size=(40, 3)), jnp.float32)
  regs = (1e-3, 1e-1, 10.0)
  path = ridge.ridge_path(phi, y, jnp.asarray(regs), scaling=scaling)
  assert path.shape == (3, 12, 3)
  for weights, reg in zip(path, regs):
    np.testing.assert_allclose(weights, ridge.ridge_fit(phi, y, reg, scaling=scaling)[0],
                               rtol=2e-3, atol=1e-5)
