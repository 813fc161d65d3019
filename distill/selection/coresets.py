"""Coreset baselines: which real images to keep when n of them must do.

* `random_subset`: n indices uniformly without replacement.
* `class_balanced_subset`: as equal a share per class as the classes allow.
* `kmeans_coreset`: k-means (k = n) in a feature space (the teacher's),
  then the real image nearest to each centroid, so the set covers the
  feature distribution instead of sampling its dense regions repeatedly.

All are pure functions of their inputs and a seed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from distill.errors import DistillError


def _check_size(n: int, total: int, what: str) -> None:
  if n < 1:
    raise DistillError(f"{what}: subset size must be at least 1, got {n}")
  if n > total:
    raise DistillError(f"{what}: subset size {n} is larger than the source ({total} images)")


def random_subset(total: int, n: int, seed: int) -> np.ndarray:
  """(n,) sorted int64 indices drawn uniformly without replacement from range(total)."""
  _check_size(n, total, "random subset")
  return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


def class_balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
  """(n,) sorted indices with per-class counts differing by at most one where possible.

  Classes smaller than their share give all their images; the remainder
  goes to the other classes.
  """
  labels = np.asarray(labels)
  _check_size(n, len(labels), "class-balanced subset")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  members = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
  counts = {c: 0 for c in classes}
  remaining = n
  while remaining:
    open_classes = [c for c in classes if counts[c] < len(members[c])]
    share, extra = divmod(remaining, len(open_classes))
    # The classes that get one more image than the others are picked at random.
    lucky = set(rng.permutation(open_classes)[:extra].tolist())
    for c in open_classes:
      take = min(share + (c in lucky), len(members[c]) - counts[c])
      counts[c] += take
      remaining -= take
  return np.sort(np.concatenate([members[c][:counts[c]] for c in classes]))


@functools.partial(jax.jit, static_argnames=("iters",))
def _lloyd(features, centroids, iters: int):
  sq_norms = jnp.sum(features ** 2, -1)

  def assign(c):
    dist = sq_norms[:, None] - 2 * features @ c.T + jnp.sum(c ** 2, -1)[None]
    return jnp.argmin(dist, -1), jnp.min(dist, -1)

  def update(c, _):
    assignment, _ = assign(c)
    # Sums per cluster by segment, not a one-hot (N, k) product: N p adds
    # instead of N k p multiply-adds.
    k = c.shape[0]
    counts = jax.ops.segment_sum(jnp.ones_like(sq_norms), assignment, num_segments=k)
    sums = jax.ops.segment_sum(features, assignment, num_segments=k)
    means = sums / jnp.maximum(counts, 1)[:, None]
    # An empty cluster keeps its centroid rather than collapsing to the origin.
    return jnp.where(counts[:, None] > 0, means, c), None

  centroids, _ = jax.lax.scan(update, centroids, None, length=iters)
  assignment, dist = assign(centroids)
  return centroids, assignment, jnp.sum(jnp.maximum(dist, 0.0))


def _sq_dists_to(features: np.ndarray, sq_norms: np.ndarray, x: np.ndarray) -> np.ndarray:
  """(N,) squared distances of the rows of `features` (N, p) to `x` (p,).

  |f|^2 - 2 f.x + |x|^2 is one matrix-vector product; `features - x` would
  allocate an (N, p) temporary per call, which at 50k x 1,024 made seeding
  k = 1,000 centres take minutes.
  """
  return np.maximum(sq_norms - 2.0 * (features @ x) + x @ x, 0.0)


def _kmeans_plus_plus(features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding: each new centre drawn with probability ∝ squared distance."""
  sq_norms = np.einsum("ij,ij->i", features, features)
  first = rng.integers(len(features))
  centres = [features[first]]
  d2 = _sq_dists_to(features, sq_norms, centres[0])
  d2[first] = 0.0  # exactly, whatever the rounding of the expansion
  for _ in range(1, k):
    total = d2.sum()
    i = rng.choice(len(features), p=d2 / total) if total > 0 else rng.integers(len(features))
    centres.append(features[i])
    d2 = np.minimum(d2, _sq_dists_to(features, sq_norms, features[i]))
    d2[i] = 0.0
  return np.stack(centres)


def kmeans(features: np.ndarray, k: int, seed: int, iters: int = 50
           ) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means with k-means++ seeding.

  Args:
    features: (N, p) float features. k: number of clusters (1 <= k <= N).
    seed: seeding randomness. iters: Lloyd iterations (jitted scan).

  Returns:
    (centroids (k, p) float32, assignment (N,) int32 cluster of each row).
  """
  features = np.asarray(features, np.float32)
  if features.ndim != 2:
    raise DistillError(f"kmeans expects (N, p) features, got shape {features.shape}")
  _check_size(k, len(features), "kmeans")
  if not np.all(np.isfinite(features)):
    raise DistillError("kmeans: features contain NaN or Inf")
  init = _kmeans_plus_plus(features, k, np.random.default_rng(seed))
  centroids, assignment, _ = _lloyd(jnp.asarray(features), jnp.asarray(init), iters)
  return np.asarray(centroids), np.asarray(assignment, np.int32)


def kmeans_coreset(features: np.ndarray, n: int, seed: int, iters: int = 50) -> np.ndarray:
  """(n,) sorted distinct indices: the real sample nearest to each of n centroids.

  When two centroids share a nearest sample the later one takes its next
  nearest unused sample, so exactly n distinct images come back.
  """
  centroids, _ = kmeans(features, n, seed, iters)
  features = np.asarray(features, np.float32)
  sq_norms = np.einsum("ij,ij->i", features, features)
  chosen = np.zeros(len(features), bool)
  out = []
  for start in range(0, len(centroids), 256):
    # Distances of a block of centroids to every sample by one matrix product.
    block = centroids[start:start + 256]
    dists = sq_norms[None] - 2.0 * (block @ features.T) + np.sum(block ** 2, -1)[:, None]
    for row in dists:
      i = int(np.argmin(row))
      if chosen[i]:
        i = next(int(j) for j in np.argsort(row) if not chosen[j])
      chosen[i] = True
      out.append(i)
  return np.sort(np.asarray(out, np.int64))
