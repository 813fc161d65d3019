"""Source pruning: group counts, exact members, LM / FM votes on a toy with a known answer."""

import json
import os

import numpy as np
import pytest

from distill.cli import main
from distill.errors import DistillError
from distill.selection import source_pruning as sp

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMOKE = os.path.join(ROOT, "experiments", "configs", "fashion_mnist_quickstart.py") + ":smoke"
COLOURS = np.array([[230, 30, 30], [30, 220, 30], [30, 30, 230], [230, 230, 30],
                    [30, 220, 220]], np.float32)


def _colour_classes(classes, per_class, seed):
  """8x8 images of flat class colours plus noise: an easy 5-way problem."""
  r = np.random.default_rng(seed)
  labels = np.repeat(np.asarray(classes), per_class).astype(np.int32)
  images = COLOURS[labels][:, None, None, :] + r.normal(0, 20, (len(labels), 8, 8, 3))
  return images.clip(0, 255).astype(np.uint8), labels


def test_top_groups_counts_ties_and_members():
  votes = np.array([3, 5, 5, 0, 1])
  assert sp.top_groups(votes, 0.4).tolist() == [1, 2]           # tie: lower id first
  assert sp.top_groups(votes, 0.5).tolist() == [1, 2, 0]        # round(2.5) = 3, halves up
  assert sp.top_groups(votes, 0.01).tolist() == [1]             # at least one group
  assert sp.top_groups(votes, 1.0).tolist() == [1, 2, 0, 4, 3]
  assert [sp.num_kept_groups(10, f) for f in (0.5, 0.2, 0.24, 0.25)] == [5, 2, 2, 3]
  with pytest.raises(DistillError, match="keep_fraction"):
    sp.num_kept_groups(5, 0.0)
  groups = np.random.default_rng(0).integers(0, 5, 200)
  result = sp.prune_by_votes("lm", votes, groups, 0.4)
  assert np.array_equal(result.indices, np.flatnonzero((groups == 1) | (groups == 2)))
  assert np.all(np.diff(result.indices) > 0)


def test_votes_on_constructed_features_and_logits():
  r = np.random.default_rng(1)
  centres = 10 * np.eye(5, 6)
  groups = np.repeat(np.arange(5), 20)
  source = centres[groups] + r.normal(size=(100, 6))
  target = centres[np.array([1, 3] * 15)] + r.normal(size=(30, 6))
  votes = sp.fm_votes(target, source, groups, 5)
  assert votes.tolist() == [0, 15, 0, 15, 0]
  prototypes, counts = sp.group_prototypes(source, groups, 5)
  np.testing.assert_allclose(prototypes[2], source[groups == 2].mean(0), rtol=1e-5)
  # An empty group never attracts votes, even when it would be nearest.
  assert sp.fm_votes(np.zeros((4, 6)), source[groups != 0], groups[groups != 0], 5)[0] == 0
  logits = np.array([[0, 2, 1], [3, 0, 0], [0, 5, 1], [0, 1, 0]], np.float32)
  assert sp.lm_votes(logits).tolist() == [1, 3, 0]


def test_random_baseline_same_size_and_deterministic():
  groups = np.random.default_rng(2).integers(0, 10, 500)
  a = sp.random_group_pruning(groups, 10, 0.2, seed=3)
  b = sp.random_group_pruning(groups, 10, 0.2, seed=3)
  c = sp.random_group_pruning(groups, 10, 0.2, seed=4)
  voted = sp.prune_by_votes("fm", np.arange(10), groups, 0.2)
  assert len(a.kept_groups) == len(voted.kept_groups) == 2
  assert np.array_equal(a.kept_groups, b.kept_groups) and np.array_equal(a.indices, b.indices)
  assert any(not np.array_equal(sp.random_group_pruning(groups, 10, 0.2, s).kept_groups,
                                a.kept_groups) for s in range(4, 10))
  assert np.array_equal(c.indices, np.flatnonzero(np.isin(groups, c.kept_groups)))


def test_unlabelled_source_groups_are_kmeans_clusters():
  r = np.random.default_rng(5)
  truth = np.repeat(np.arange(3), 30)
  features = 8 * np.eye(3, 4)[truth] + r.normal(size=(90, 4))
  groups, g = sp.source_groups(None, lambda: features, "auto", 3, seed=0)
  assert g == 3
  # Same partition up to renaming the clusters.
  assert len(set(zip(groups.tolist(), truth.tolist()))) == 3
  with pytest.raises(DistillError, match="no labels"):
    sp.source_groups(None, lambda: features, "labels", 3, seed=0)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
  d = tmp_path_factory.mktemp("prune")
  x, y = _colour_classes(range(5), 24, seed=0)
  xt, yt = _colour_classes([1, 3], 20, seed=1)
  np.savez(d / "source.npz", images=x, labels=y)
  np.savez(d / "target.npz", x_train=xt, y_train=yt, x_test=xt, y_test=yt)
  return d


def test_cli_keeps_the_groups_the_target_comes_from(toy_data, tmp_path):
  args = ["prune-source", "--config", SMOKE, "--workdir", str(tmp_path),
          "--set", f"data.source={toy_data / 'source.npz'}",
          "--set", f"data.target={toy_data / 'target.npz'}",
          "--set", "selection.prune.method=lm", "--set", "selection.prune.keep_fraction=0.4",
          "--set", "selection.prune.surrogate.width=8", "--set", "selection.prune.surrogate.depth=1",
          "--set", "selection.prune.epochs=6", "--set", "selection.prune.batch_size=24",
          "--set", "selection.prune.lr=0.01"]
  assert main(args) == 0
  result = sp.load_pruning(str(tmp_path / "source_pruning.npz"))
  labels = np.load(toy_data / "source.npz")["labels"]
  assert result.method == "lm" and sorted(result.kept_groups.tolist()) == [1, 3]
  assert np.array_equal(result.indices, np.flatnonzero(np.isin(labels, [1, 3])))
  # Both votes are recorded; each puts (nearly) all 40 target images on groups 1 and 3.
  votes = json.loads(str(np.load(tmp_path / "source_pruning.npz")["meta"]))["votes"]
  assert np.array_equal(votes["lm"], result.votes)
  for v in votes.values():
    assert sum(v) == 40 and v[1] + v[3] >= 36 and sorted(sp.top_groups(v, 0.4)) == [1, 3]


def test_cli_rejects_an_unknown_method(toy_data, tmp_path, capsys):
  args = ["prune-source", "--config", SMOKE, "--workdir", str(tmp_path),
          "--set", f"data.source={toy_data / 'source.npz'}",
          "--set", "selection.prune.method=best"]
  assert main(args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unknown selection.prune.method 'best'") and "\n" not in err
  assert not (tmp_path / "source_pruning.npz").exists()
