"""Coreset baselines and the choice of a learned set's starting images."""

from types import SimpleNamespace

import numpy as np
import pytest

from distill.errors import DistillError
from distill.selection import coresets, source_pruning
from distill.stages.krr_st import initial_indices


def _three_clusters(per=40, seed=0):
  r = np.random.default_rng(seed)
  centres = np.array([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
  x = np.concatenate([c + r.normal(size=(per, 4)) for c in centres]).astype(np.float32)
  return x, np.repeat(np.arange(3), per)


def test_kmeans_recovers_separated_clusters():
  x, truth = _three_clusters()
  centroids, assignment = coresets.kmeans(x, 3, seed=1)
  # Each found cluster is exactly one true cluster (up to relabelling).
  pairs = {(int(a), int(t)) for a, t in zip(assignment, truth)}
  assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
  for a, t in pairs:
    np.testing.assert_allclose(centroids[a], x[truth == t].mean(0), atol=1e-4)


def test_kmeans_coreset_is_distinct_and_covers_every_cluster():
  x, truth = _three_clusters()
  idx = coresets.kmeans_coreset(x, 3, seed=0)
  assert len(set(idx.tolist())) == 3 and sorted(truth[idx].tolist()) == [0, 1, 2]
  many = coresets.kmeans_coreset(x, 30, seed=0)
  assert len(set(many.tolist())) == 30 and np.all(np.diff(many) > 0)


def test_lloyd_step_and_coreset_match_their_direct_definitions():
  # One Lloyd step against the definition (nearest centroid by explicit
  # differences, then per-cluster means; an empty cluster keeps its centre),
  # and the coreset against a brute-force nearest-unused-sample search.
  r = np.random.default_rng(0)
  x = r.normal(size=(300, 8)).astype(np.float32)
  init = np.concatenate([x[:5], np.full((1, 8), 50.0, np.float32)])  # the last one stays empty
  centroids, assignment, _ = coresets._lloyd(x, init, iters=1)
  nearest = np.argmin(((x[:, None] - init[None]) ** 2).sum(-1), 1)
  expected = np.stack([x[nearest == c].mean(0) if np.any(nearest == c) else init[c]
                       for c in range(len(init))])
  np.testing.assert_allclose(np.asarray(centroids), expected, rtol=1e-5, atol=1e-5)
  assert np.asarray(assignment).shape == (300,)

  idx = coresets.kmeans_coreset(x, 40, seed=2)
  cents, _ = coresets.kmeans(x, 40, seed=2)
  chosen, brute = set(), []
  for c in cents:
    j = next(int(j) for j in np.argsort(((x - c) ** 2).sum(-1)) if int(j) not in chosen)
    chosen.add(j)
    brute.append(j)
  np.testing.assert_array_equal(idx, np.sort(brute))


def test_class_balanced_and_random_subsets():
  labels = np.r_[np.zeros(50), np.ones(5), np.full(100, 2)].astype(int)
  idx = coresets.class_balanced_subset(labels, 30, seed=0)
  assert len(set(idx.tolist())) == 30
  # The small class gives all 5; the other 25 split 12/13 between the rest.
  counts = sorted(np.bincount(labels[idx]).tolist())
  assert counts == [5, 12, 13]
  r = coresets.random_subset(20, 7, seed=3)
  assert len(set(r.tolist())) == 7 and r.max() < 20
  np.testing.assert_array_equal(r, coresets.random_subset(20, 7, seed=3))
  with pytest.raises(DistillError, match="larger than the source"):
    coresets.random_subset(5, 6, 0)
  with pytest.raises(DistillError, match="NaN"):
    coresets.kmeans(np.full((4, 2), np.nan), 2, 0)


def test_initial_indices_from_kmeans_and_from_a_pruned_source(tmp_path):
  x, truth = _three_clusters(per=10)
  # A stand-in teacher whose features are the points themselves.
  images = np.zeros((30, 2, 2, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(30)
  source = SimpleNamespace(images=images, labels=None)
  teacher = SimpleNamespace(mean=np.zeros(1), std=np.ones(1) / 255.0,
                            features=lambda im: x[np.rint(im[:, 0, 0, 0]).astype(int)])
  idx = initial_indices("kmeans", 0, str(tmp_path), source, teacher, 3)
  assert sorted(truth[idx].tolist()) == [0, 1, 2]

  with pytest.raises(DistillError, match="prune-source"):
    initial_indices("pruned", 0, str(tmp_path), source, teacher, 3)
  kept = np.arange(10, 20)
  result = source_pruning.PruningResult("fm", np.zeros(3, np.int64), np.array([1]), kept,
                                        truth.astype(np.int32), 0.34)
  source_pruning.save_pruning(str(tmp_path / "source_pruning.npz"), result, {})
  idx = initial_indices("pruned", 0, str(tmp_path), source, teacher, 4)
  assert len(set(idx.tolist())) == 4 and set(idx.tolist()) <= set(kept.tolist())
  with pytest.raises(DistillError, match="keeps 10"):
    initial_indices("pruned", 0, str(tmp_path), source, teacher, 11)
