r"""Label-free influence for self-supervised training: which images matter, which are odd.

No labels are used. A frozen teacher backbone g represents each image; a
linear head h(u) = W^T [u; 1] with W (p+1, k) is fitted by ridge regression to
map the representation of an augmented view back to that of the clean image:

    l_i(W) = (1/V) sum_v || W^T a_iv - y_i ||^2,
    a_iv = [s(g(aug_v(x_i))); 1],   y_i = s(g(x_i)),
    J(W) = sum_i l_i(W) + (lam / V) ||W||_F^2,

where s standardises features with the set's statistics (held fixed). l_i is
image i's augmentation-consistency loss: how far the representations of its
views stay from its own after the best common linear map. Fitting J is
`kernels.ridge.ridge_fit` on all N V views (`trace_over_n` regularisation).

Hessian approximation: only the last layer (the head) is differentiated,
the backbone is frozen. For a squared loss of a linear head the Gauss-Newton
matrix is the exact Hessian of J:

    H = (2 / V) (Phi^T Phi + lam I) (x) I_k,   Phi = all a_iv stacked (N V, p + 1),

so every H^{-1} product is one (p+1) x (p+1) Cholesky solve.

Per-sample gradients: `vmap(grad)` of l_i with respect to the head outputs
gives c_iv (k,); the gradient with respect to W is sum_v a_iv c_iv^T, of rank
V, kept factored so nothing of size N (p+1) k is ever built.

Scores of image i (all (N,)):
  * `influence` I(i) = -g_i^T H^{-1} grad L, where L = sum_j l_j is the
    total consistency loss measured on *fresh* views of every image (other
    augmentations than the fit saw): up-weighting image i by eps changes L by
    eps I(i) (Koh and Liang's formula), so removing it changes L by about
    -I(i). Fresh views matter: on the fitting views grad L is only the ridge
    term at the optimum, and removal effects there are second order.
  * `self_influence` g_i^T H^{-1} g_i: large for images the head fits badly
    in directions few others share (outliers, corrupted images).
  * `duplicate`: the highest cosine similarity of y_i to another image's
    (1 for an exact copy), with `nearest` the index of that image.

Artefact `<workdir>/influence.npz` (atomic): those arrays plus `loss` (l_i),
and `meta` (JSON). Indices follow `artefacts.load_source(config)`. Memory is
O(N V p): about 0.2 GB for 50k images, 2 views and 512 features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from distill.data import augment
from distill.errors import DistillError
from kernels.ridge import ridge_fit, with_bias

ARTEFACT = "influence.npz"


def _consistency_loss(outputs: jax.Array, target: jax.Array) -> jax.Array:
  """l_i from the head outputs of image i's views: (V, k), (k,) -> scalar."""
  return jnp.mean(jnp.sum((outputs - target) ** 2, -1))


@functools.partial(jax.jit, static_argnames=("reg",))
def influence_scores(views: jax.Array, clean: jax.Array, eval_views: jax.Array,
                     reg: float) -> dict:
  """Consistency loss, influence and self-influence of every image.

  Args:
    views: (N, V, p) standardised representations of V augmented views (fit).
    clean: (N, k) standardised representations of the images themselves.
    eval_views: (N, V', p) fresh views on which the total loss L is measured.
    reg: ridge strength of the head (trace_over_n convention).

  Returns:
    {"loss", "influence", "self_influence"}: (N,) float32 each; "lam": the
    ridge (with any jitter) the head and the Hessian used; "ok": whether the
    factorisation succeeded.
  """
  n, v, p = views.shape
  a = with_bias(views.reshape(n * v, p))
  weights, info = ridge_fit(a, jnp.repeat(clean, v, axis=0), reg)
  lam = info.lam + info.jitter
  a = a.reshape(n, v, p + 1)
  outputs = a @ weights                                             # (N, V, k)
  losses = jax.vmap(_consistency_loss)(outputs, clean)
  c = jax.vmap(jax.grad(_consistency_loss))(outputs, clean)         # (N, V, k)
  phi = a.reshape(n * v, p + 1)
  factor = jax.scipy.linalg.cho_factor(phi.T @ phi + lam * jnp.eye(p + 1), lower=True)
  # grad L on the fresh views: sum_j sum_w e_jw (dl_j / d out_jw)^T.
  e = with_bias(eval_views.reshape(-1, p)).reshape(n, -1, p + 1)
  c_eval = jax.vmap(jax.grad(_consistency_loss))(e @ weights, clean)
  # H^{-1} = (V / 2) M^{-1} (x) I with M = Phi^T Phi + lam I.
  grad_total = jnp.einsum("nvp,nvk->pk", e, c_eval)
  h_inv_grad_total = (v / 2) * jax.scipy.linalg.cho_solve(factor, grad_total)
  influence = -jnp.einsum("nvp,pk,nvk->n", a, h_inv_grad_total, c)
  m_inv_a = jax.scipy.linalg.cho_solve(factor, phi.T).T.reshape(n, v, p + 1)
  gram_a = jnp.einsum("nvp,nwp->nvw", a, m_inv_a)
  gram_c = jnp.einsum("nvk,nwk->nvw", c, c)
  self_influence = (v / 2) * jnp.sum(gram_a * gram_c, (1, 2))
  return {"loss": losses, "influence": influence, "self_influence": self_influence,
          "lam": lam, "ok": info.ok}


@functools.partial(jax.jit, static_argnames=("chunk",))
def _nearest_cosine(unit: jax.Array, chunk: int):
  n = unit.shape[0]
  padded = jnp.pad(unit, ((0, -n % chunk), (0, 0)))

  def block(start):
    sims = jax.lax.dynamic_slice_in_dim(padded, start, chunk) @ unit.T
    rows = start + jnp.arange(chunk)
    sims = jnp.where(rows[:, None] == jnp.arange(n)[None], -jnp.inf, sims)
    return jnp.max(sims, -1), jnp.argmax(sims, -1)

  best, nearest = jax.lax.map(block, jnp.arange(0, padded.shape[0], chunk))
  return best.reshape(-1)[:n], nearest.reshape(-1)[:n]


def duplicate_scores(features: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Cosine similarity of each row to its nearest other row.

  Args:
    features: (N, p), N >= 2 (standardised, so cosine compares directions
      around the set's mean).

  Returns:
    (similarity (N,) float32 in [-1, 1], nearest (N,) int64 index).
  """
  features = jnp.asarray(features, jnp.float32)
  if features.shape[0] < 2:
    raise DistillError("duplicate scores need at least two images")
  unit = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  best, nearest = _nearest_cosine(unit, min(chunk, features.shape[0]))
  return np.asarray(best, np.float32), np.asarray(nearest, np.int64)


def consistency_features(teacher, images: np.ndarray, num_views: int, key: jax.Array,
                         batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """Standardised teacher representations of the images and of augmented views.

  Args:
    teacher: a `teacher.Teacher`. images: (N, H, W, C) normalised float32.
    num_views: V views per image (`augment.ssl_augment`, the teacher's own).
    key: PRNG key; view v of chunk j uses fold_in(fold_in(key, j), v).

  Returns:
    (clean (N, p), views (N, V, p)) float32, standardised with the clean
    representations' per-dimension mean and standard deviation. Calling
    again with another key gives fresh views.
  """
  if num_views < 1:
    raise DistillError(f"selection.influence.num_views must be at least 1, got {num_views}")
  mean, std = jnp.asarray(teacher.mean), jnp.asarray(teacher.std)
  apply = jax.jit(lambda x, k: teacher.represent(
      teacher.variables, augment.ssl_augment(k, x, mean, std)))
  clean = teacher.features(images, batch_size)
  views = []
  for j, start in enumerate(range(0, len(images), batch_size)):
    x = jnp.asarray(images[start:start + batch_size])
    chunk_key = jax.random.fold_in(key, j)
    views.append(np.stack([np.asarray(apply(x, jax.random.fold_in(chunk_key, v)))
                           for v in range(num_views)], axis=1))
  views = np.concatenate(views)
  mu, sigma = clean.mean(0), clean.std(0) + 1e-6
  return (clean - mu) / sigma, (views - mu) / sigma
