"""The one ridge-regression solver of the project.

Kernel ridge regression with a linear kernel on features Phi:

    Yhat_t = K_ts (K_ss + lambda I)^-1 Y_s          (dual,   n x n solve)
           = Phi_t (Phi_s^T Phi_s + lambda I)^-1 Phi_s^T Y_s   (primal, p x p solve)

The two forms are equal for the same lambda (push-through identity), so the
solver picks the cheaper one: dual when n <= p, primal otherwise.

Regularisation convention (`scaling`):
  * "trace_over_n" (default): lambda = reg * trace(K_ss) / n, i.e. reg times
    the mean squared feature norm. This makes `reg` independent of both the
    number of support points and the feature scale.
  * "trace": lambda = reg * trace(K_ss), the convention of the reference
    KRR-ST PyTorch code (which uses reg = 1e-6). Equivalent to
    "trace_over_n" with reg multiplied by n.
  * "none": lambda = reg.
trace(K_ss) = trace(Phi_s^T Phi_s) = ||Phi_s||_F^2, so both forms use the
same lambda without building the n x n matrix.

lambda is detached from the graph (no gradient flows through trace(K_ss)).

Failure policy: the system matrix is factorised by Cholesky in float32. If
the factor is not finite (matrix not numerically positive definite), the
solve is retried with extra jitter `jitter * 10**k * trace/n`, k = 0..retries-1,
and the smallest level that factorises is used; the solve stays jittable and
differentiable (see `_cholesky_with_jitter`). If every retry fails the result is NaN and `info["ok"]` is False:
callers must check it (the KRR-ST loop raises a clear error); nothing is
replaced by a silent fallback value.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

SCALINGS = ("trace_over_n", "trace", "none")


class SolveInfo(NamedTuple):
  """Diagnostics of one ridge solve (all scalars, jittable)."""
  ok: jax.Array          # bool: a finite Cholesky factor was found
  lam: jax.Array         # the regularisation actually used (without jitter)
  jitter: jax.Array      # extra diagonal added by the fallback (0 if none)


def regularization(sq_frobenius: jax.Array, n: int, reg: float,
                   scaling: str) -> jax.Array:
  """lambda from ||Phi_s||_F^2 = trace(K_ss) under the documented convention.

  lambda carries no gradient (as in the reference code): it sets the
  strength of the ridge, it is not a path through which the outer loss may
  move the support features (e.g. by inflating their norm to soften the fit).
  """
  sq_frobenius = jax.lax.stop_gradient(sq_frobenius)
  if scaling == "trace_over_n":
    return reg * sq_frobenius / n
  if scaling == "trace":
    return reg * sq_frobenius
  if scaling == "none":
    return jnp.asarray(reg, sq_frobenius.dtype)
  raise ValueError(f"unknown ridge scaling {scaling!r}; expected one of {SCALINGS}")


def _cholesky_with_jitter(gram: jax.Array, lam: jax.Array, unit: jax.Array,
                          jitter: float, retries: int):
  """Cholesky of gram + (lam + extra) I, escalating `extra` on failure.

  The common case costs one factorisation. Only when it fails does a
  `while_loop` search for the smallest working jitter level; that search
  runs on stopped gradients (which level to add is a discrete choice, and
  reverse-mode differentiation cannot go through a while_loop), and one
  differentiable factorisation at the chosen level follows.

  Args:
    gram: (m, m) symmetric PSD matrix.
    lam: scalar ridge.
    unit: scalar scale for the jitter (mean diagonal of gram).
    jitter: relative size of the first extra jitter.
    retries: how many escalations (x10 each) to try after the plain attempt.

  Returns:
    (factor (m, m) lower-triangular, ok bool, extra jitter used scalar).
  """
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
  factorize = lambda g, extra: jnp.linalg.cholesky(g + extra * eye)
  finite = lambda f: jnp.all(jnp.isfinite(f))
  factor = factorize(gram, lam)
  level = lambda k: (jitter * 10.0 ** (k - 1) * unit).astype(gram.dtype)

  def fallback():
    g, base = jax.lax.stop_gradient(gram), jax.lax.stop_gradient(lam)
    def keep_going(carry):
      k, ok = carry
      return jnp.logical_and(~ok, k < retries)
    def next_level(carry):
      k = carry[0] + 1
      return k, finite(factorize(g, base + jax.lax.stop_gradient(level(k))))
    k, ok = jax.lax.while_loop(keep_going, next_level, (0, jnp.array(False)))
    extra = jax.lax.stop_gradient(level(k))
    return factorize(gram, lam + extra), ok, extra

  ok = finite(factor)
  return jax.lax.cond(ok, lambda: (factor, ok, jnp.zeros((), gram.dtype)), fallback)


@functools.partial(jax.jit, static_argnames=("scaling", "form", "jitter", "retries"))
def krr_predict(phi_s: jax.Array, y_s: jax.Array, phi_t: jax.Array, reg: float,
                scaling: str = "trace_over_n", form: str = "auto",
                jitter: float = 1e-6, retries: int = 3):
  """Ridge predictions on targets from a linear kernel on features.

  Args:
    phi_s: (n, p) support features (include a ones column for a bias).
    y_s: (n, d) support targets.
    phi_t: (m, p) query features.
    reg: regularisation strength, see the module docstring for `scaling`.
    scaling: "trace_over_n" | "trace" | "none".
    form: "dual" (n x n solve), "primal" (p x p solve) or "auto" (the smaller).
    jitter: first extra diagonal, relative to trace/m, when Cholesky fails.
    retries: number of jitter escalations (x10 each) before giving up.

  Returns:
    yhat: (m, d) predictions, NaN if every attempt failed.
    info: SolveInfo.
  """
  n, p = phi_s.shape
  if form == "auto":
    form = "dual" if n <= p else "primal"
  if form == "dual":
    return krr_predict_kernel(phi_s @ phi_s.T, phi_t @ phi_s.T, y_s, reg, scaling,
                              jitter, retries)
  if form == "primal":
    sq_fro = jnp.sum(phi_s * phi_s)
    lam = regularization(sq_fro, n, reg, scaling)
    gram = phi_s.T @ phi_s
    factor, ok, extra = _cholesky_with_jitter(gram, lam, sq_fro / p, jitter, retries)
    weights = jax.scipy.linalg.cho_solve((factor, True), phi_s.T @ y_s)
    yhat = phi_t @ weights
    return yhat, SolveInfo(ok=ok, lam=lam, jitter=extra)
  raise ValueError(f"unknown ridge form {form!r}; expected 'dual', 'primal' or 'auto'")


@functools.partial(jax.jit, static_argnames=("scaling", "jitter", "retries"))
def krr_predict_kernel(k_ss: jax.Array, k_ts: jax.Array, y_s: jax.Array, reg: float,
                       scaling: str = "trace_over_n", jitter: float = 1e-6,
                       retries: int = 3):
  """Dual-form ridge predictions from precomputed kernel matrices.

  The entry point for kernels that have no explicit features (the NTK of
  `kernels.ntk`); `krr_predict`'s dual form is this with a linear kernel.
  Same regularisation convention (trace(K_ss) = sum of its diagonal) and
  failure policy.

  Args:
    k_ss: (n, n) support kernel. k_ts: (m, n) query-support kernel.
    y_s: (n, d) support targets.

  Returns:
    yhat (m, d), SolveInfo.
  """
  n = k_ss.shape[0]
  trace = jnp.trace(k_ss)
  lam = regularization(trace, n, reg, scaling)
  factor, ok, extra = _cholesky_with_jitter(k_ss, lam, trace / n, jitter, retries)
  yhat = k_ts @ jax.scipy.linalg.cho_solve((factor, True), y_s)
  return yhat, SolveInfo(ok=ok, lam=lam, jitter=extra)


@functools.partial(jax.jit, static_argnames=("scaling", "jitter", "retries"))
def ridge_fit(phi: jax.Array, y: jax.Array, reg: float,
              scaling: str = "trace_over_n", jitter: float = 1e-6,
              retries: int = 3):
  """Primal ridge weights W (p, d) minimising ||phi W - y||^2 + lambda ||W||^2.

  Used where the weights themselves are needed (linear probes); same
  regularisation convention and failure policy as `krr_predict`.

  Args:
    phi: (n, p) features. y: (n, d) targets.

  Returns:
    weights (p, d), SolveInfo.
  """
  n, p = phi.shape
  sq_fro = jnp.sum(phi * phi)
  lam = regularization(sq_fro, n, reg, scaling)
  gram = phi.T @ phi
  factor, ok, extra = _cholesky_with_jitter(gram, lam, sq_fro / p, jitter, retries)
  weights = jax.scipy.linalg.cho_solve((factor, True), phi.T @ y)
  return weights, SolveInfo(ok=ok, lam=lam, jitter=extra)


@functools.partial(jax.jit, static_argnames=("scaling",))
def ridge_path(phi: jax.Array, y: jax.Array, regs: jax.Array,
               scaling: str = "trace_over_n") -> jax.Array:
  """Primal ridge weights for a whole grid of regs from one eigendecomposition.

  phi^T phi = V diag(s) V^T gives W(lambda) = V diag(1 / (s + lambda)) V^T phi^T y
  for every lambda at the cost of one p x p eigendecomposition, which is what
  a cross-validated choice of reg needs. Same regularisation convention as
  `ridge_fit`; no jitter fallback (eigenvalues are clipped at 0, so every
  lambda > 0 gives finite weights). Use `ridge_fit` for the final fit.

  Args:
    phi: (n, p) features. y: (n, d) targets. regs: (r,) positive.

  Returns:
    (r, p, d) weights, one per reg.
  """
  n = phi.shape[0]
  sq_fro = jnp.sum(phi * phi)
  lams = regularization(sq_fro, n, jnp.asarray(regs, phi.dtype), scaling)
  s, v = jnp.linalg.eigh(phi.T @ phi)
  rotated = v.T @ (phi.T @ y)                                    # (p, d)
  inverse = 1.0 / (jnp.maximum(s, 0.0)[None, :] + lams[:, None])  # (r, p)
  return jnp.einsum("pk,rk,kd->rpd", v, inverse, rotated)


def with_bias(phi: jax.Array) -> jax.Array:
  """(n, p) -> (n, p + 1): appends the ones column of the bias term."""
  return jnp.concatenate([phi, jnp.ones((phi.shape[0], 1), phi.dtype)], axis=1)
