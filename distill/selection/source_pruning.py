"""Source pruning for transfer (DP4TL-style): keep the source groups a target needs.

The source is split into groups: its classes when it has labels, otherwise
k-means clusters of the teacher's features. A small surrogate ConvNet is
trained briefly with cross-entropy to predict the group of each source image;
then every target image votes for one group:

  * "lm" (label matching): the argmax of the surrogate's group head on it;
  * "fm" (feature matching): the group whose prototype (mean surrogate
    feature of the group's source images) is nearest in Euclidean distance
    to its surrogate feature.

The `round(keep_fraction * G)` groups (at least one) with the most votes are
kept, ties going to the lower group id, and the source indices of their
members are exported. `random_group_pruning` keeps the same number of groups
drawn at random: the baseline at the same ratio.

Artefact `<workdir>/source_pruning.npz` (written atomically): `method`,
`keep_fraction`, `votes` (G,), `kept_groups` (K,) best first, `indices` (M,)
sorted, `groups` (N,), `source` and `config` (JSON). Indices refer to the
source as `artefacts.load_source(config)` returns it (after the seeded
`data.num_source` subsampling).
"""

from __future__ import annotations

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill import files
from distill.data import augment
from distill.errors import DistillError
from distill.nn.loop import batch_indices, run_loop
from distill.nn.models import build_model, extract_features, gradient_step, init_model
from distill.selection import coresets

METHODS = ("lm", "fm", "random")
GROUPINGS = ("auto", "labels", "kmeans")
ARTEFACT = "source_pruning.npz"


class PruningResult(NamedTuple):
  """Which source groups and images survive.

  Attributes:
    method: "lm", "fm" or "random".
    votes: (G,) int64 target votes per group (zeros for "random").
    kept_groups: (K,) int64 kept group ids, most voted first.
    indices: (M,) int64 sorted source indices whose group is kept.
    groups: (N,) int32 group of every source image.
    keep_fraction: the requested share of groups.
  """
  method: str
  votes: np.ndarray
  kept_groups: np.ndarray
  indices: np.ndarray
  groups: np.ndarray
  keep_fraction: float


def num_kept_groups(num_groups: int, keep_fraction: float) -> int:
  """round(keep_fraction * G) (halves up), clipped to [1, G]."""
  if not 0.0 < keep_fraction <= 1.0:
    raise DistillError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
  return int(min(max(np.floor(keep_fraction * num_groups + 0.5), 1), num_groups))


def top_groups(votes: np.ndarray, keep_fraction: float) -> np.ndarray:
  """(K,) ids of the most voted groups, most first; ties to the lower id."""
  votes = np.asarray(votes)
  order = np.lexsort((np.arange(len(votes)), -votes))
  return order[:num_kept_groups(len(votes), keep_fraction)].astype(np.int64)


def lm_votes(target_logits: np.ndarray) -> np.ndarray:
  """(M, G) surrogate group logits of the target -> (G,) argmax counts."""
  logits = np.asarray(target_logits)
  return np.bincount(np.argmax(logits, -1), minlength=logits.shape[-1]).astype(np.int64)


def group_prototypes(features: np.ndarray, groups: np.ndarray, num_groups: int):
  """Mean feature per group.

  Args:
    features: (N, p). groups: (N,) ints in [0, G).

  Returns:
    (prototypes (G, p) float32, counts (G,) int64); empty groups get zeros.
  """
  features = np.asarray(features, np.float64)
  counts = np.bincount(groups, minlength=num_groups)
  sums = np.zeros((num_groups, features.shape[1]))
  np.add.at(sums, groups, features)
  return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32), counts


def fm_votes(target_features: np.ndarray, source_features: np.ndarray, groups: np.ndarray,
             num_groups: int) -> np.ndarray:
  """(G,) counts of target samples whose nearest group prototype is each group.

  Args:
    target_features: (M, p). source_features: (N, p). groups: (N,) group ids.
  """
  prototypes, counts = group_prototypes(source_features, groups, num_groups)
  t = jnp.asarray(target_features, jnp.float32)
  p = jnp.asarray(prototypes)
  dist = jnp.sum(t ** 2, -1)[:, None] - 2 * t @ p.T + jnp.sum(p ** 2, -1)[None]
  # An empty group has no prototype and can never be the nearest.
  dist = jnp.where(jnp.asarray(counts)[None] > 0, dist, jnp.inf)
  return np.bincount(np.asarray(jnp.argmin(dist, -1)), minlength=num_groups).astype(np.int64)


def kept_indices(groups: np.ndarray, kept_groups: np.ndarray) -> np.ndarray:
  """(M,) sorted indices of the samples whose group is in `kept_groups`."""
  return np.flatnonzero(np.isin(groups, kept_groups)).astype(np.int64)


def prune_by_votes(method: str, votes: np.ndarray, groups: np.ndarray,
                   keep_fraction: float) -> PruningResult:
  kept = top_groups(votes, keep_fraction)
  return PruningResult(method, np.asarray(votes, np.int64), kept, kept_indices(groups, kept),
                       np.asarray(groups, np.int32), float(keep_fraction))


def random_group_pruning(groups: np.ndarray, num_groups: int, keep_fraction: float,
                         seed: int) -> PruningResult:
  """The baseline: as many groups as the voting methods keep, drawn at random."""
  k = num_kept_groups(num_groups, keep_fraction)
  kept = np.random.default_rng(seed).choice(num_groups, k, replace=False).astype(np.int64)
  return PruningResult("random", np.zeros(num_groups, np.int64), kept,
                       kept_indices(groups, kept), np.asarray(groups, np.int32),
                       float(keep_fraction))


def source_groups(labels: np.ndarray | None, features_fn, mode: str, num_clusters: int,
                  seed: int) -> tuple[np.ndarray, int]:
  """Group of every source sample: its label, or its k-means cluster.

  Args:
    labels: (N,) source labels or None. features_fn: `() -> (N, p)` teacher
      features, called only when clustering. mode: "auto" (labels when there
      are any), "labels" or "kmeans".

  Returns:
    (groups (N,) int32, number of groups G).
  """
  if mode not in GROUPINGS:
    raise DistillError(f"unknown selection.prune.groups {mode!r}; expected one of {GROUPINGS}")
  if mode == "labels" and labels is None:
    raise DistillError("selection.prune.groups='labels' but the source has no labels")
  if mode == "labels" or (mode == "auto" and labels is not None):
    labels = np.asarray(labels, np.int64)
    return labels.astype(np.int32), int(labels.max()) + 1
  _, assignment = coresets.kmeans(features_fn(), num_clusters, seed)
  return assignment.astype(np.int32), num_clusters


def train_surrogate(cfg, images: np.ndarray, groups: np.ndarray, num_groups: int, seed: int,
                    workdir: str, quiet: bool = False):
  """Trains the surrogate (cfg.surrogate arch + group head) by cross-entropy.

  Args:
    cfg: the `selection.prune` config section.
    images: (N, H, W, C) float32 normalised source images. groups: (N,) ids.

  Returns:
    (model, variables) with a `num_groups`-wide head.
  """
  n = len(images)
  batch_size = min(cfg.batch_size, n)
  num_steps = cfg.epochs * max(n // batch_size, 1)
  model = build_model(cfg.surrogate, num_outputs=num_groups)
  optimizer = optax.adam(optax.cosine_decay_schedule(cfg.lr, max(num_steps, 1)))
  variables = init_model(model, jax.random.key(seed), images.shape[1:])
  state = {"variables": variables, "opt_state": optimizer.init(variables["params"])}

  @jax.jit
  def step(state, batch, rng):
    x, y = batch
    ce = lambda _, logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return gradient_step(model, optimizer, state, augment.random_crop_flip(rng, x), ce)

  images_j, groups_j = jnp.asarray(images), jnp.asarray(groups)

  def batch_fn(i):
    idx = jnp.asarray(batch_indices(seed, i, n, batch_size))
    return images_j[idx], groups_j[idx]

  state, _ = run_loop(name="surrogate", workdir=workdir, state=state, step_fn=step,
                      batch_fn=batch_fn, num_steps=num_steps, rng=jax.random.key(seed + 7),
                      log_every=max(num_steps // 5, 1), checkpoint_every=max(num_steps // 2, 1),
                      quiet=quiet)
  return model, state["variables"]


def surrogate_outputs(model, variables, images: np.ndarray):
  """(features (N, p), group logits (N, G)) of normalised images."""
  features = extract_features(model, variables, images)
  head = variables["params"]["head"]
  return features, features @ np.asarray(head["kernel"]) + np.asarray(head["bias"])


def save_pruning(path: str, result: PruningResult, meta: dict) -> None:
  """Writes the result as .npz atomically (temp file + rename)."""
  arrays = dict(method=result.method, keep_fraction=result.keep_fraction,
                votes=result.votes, kept_groups=result.kept_groups, indices=result.indices,
                groups=result.groups, meta=json.dumps(meta))
  files.write_atomic(path, lambda f: np.savez(f, **arrays))


def load_pruning(path: str) -> PruningResult:
  try:
    with np.load(path) as f:
      return PruningResult(str(f["method"]), f["votes"], f["kept_groups"], f["indices"],
                           f["groups"], float(f["keep_fraction"]))
  except (OSError, KeyError, ValueError) as e:
    raise DistillError(f"cannot read source pruning file {path}: {e}") from e
