"""The pretraining set of each row of the results table.

    none     no pretraining (a fresh backbone)
    random   n random real images, teacher targets (a new subset per seed)
    random_mf IDC's multi-formation of random real images (IDC-I, label-free):
             n stored images, each the f x f tiles of f^2 random real images
             downsampled f times (f = eval.multi_formation); the set holds the
             n * f^2 tiles upsampled back (distill/data/multi_formation.py),
             teacher targets (a new subset per seed). n counts stored images;
             a share eval.multi_formation_full of them holds one full-resolution
             image each (a mixed set).
    kmeans   the real image nearest to each of n k-means centroids of the
             teacher's features, teacher targets
    kip      KIP with the ConvNet NTK: images + learned labels (supervised)
    frepo    FRePo-style KRR with the KRR-ST pool: images + learned labels
    krr_st   KRR-ST: images + learned teacher-space targets
    iadd     importance-weighted parameter matching (distill/methods/param_match.py)
             against label-free experts that regress the teacher's
             representations: images + learned teacher-space targets
    mtt      the same with W = 1 (plain trajectory matching)
    iadd_ce  importance-weighted parameter matching against cross-entropy
             experts (supervised): images + learned soft labels
    mtt_ce   the same with W = 1
    full     every source image, teacher targets (the upper reference)
    teacher  the teacher's own backbone (a second reference)

Set artefacts are `.npz` files under `<workdir>/sets/` (KRR-ST's main one is
`<workdir>/synthetic.npz`); a row whose file exists is not rebuilt.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from distill.config import to_dict
from distill.data import datasets, multi_formation, synthetic_set
from distill.errors import DistillError
from distill.methods import kip as kip_lib
from distill.nn.loop import batch_indices, log, run_loop
from distill.selection import coresets
from distill.stages.artefacts import save_set, source_features
from distill.stages.krr_st import run_krr_st
from distill.stages.param_match import run_experts, run_param_match, set_path as param_match_set_path


def _real_set(method: str, idx: np.ndarray, source, teacher, config, t0: float,
              formation: int = 1, full: int = 0) -> synthetic_set.SyntheticSet:
  """Real images with teacher targets; `extra.seconds` counts from `t0` (perf_counter).

  With `formation` f > 1 the images after the first `full` are stored f x f to
  a slot and the set holds them decoded (distill/data/multi_formation.py), in
  the order of `idx`.
  """
  images = datasets.normalize(source.images[idx], teacher.mean, teacher.std)
  if formation > 1:
    images = multi_formation.decode(multi_formation.encode(images, formation, full),
                                    formation, full)
  targets = teacher.features(images)
  extra = ({} if formation == 1 else multi_formation.storage(
      full + (len(idx) - full) // formation ** 2, images.shape[1:], targets.shape[1],
      formation, full))
  seconds = time.perf_counter() - t0
  return synthetic_set.SyntheticSet(
      images=images, targets=targets,
      labels=None if source.labels is None else source.labels[idx].astype(np.int32),
      method=method, source=source.name, teacher="barlow_twins", image_mean=teacher.mean,
      image_std=teacher.std, config=to_dict(config), step=0,
      extra=dict(seconds=seconds, indices=idx.tolist(), **extra))


def _selected_set(path: str, method: str, pick, config, workdir: str, source, teacher,
                  formation: int = 1, full: int = 0) -> synthetic_set.SyntheticSet:
  """The real images `pick()` selects, with teacher targets; read from `path` if there."""
  if os.path.exists(path):
    return synthetic_set.load_synthetic(path)
  t0 = time.perf_counter()
  out = _real_set(method, pick(), source, teacher, config, t0, formation, full)
  save_set(path, out, workdir, method)
  return out


def random_set(config, workdir: str, n: int, seed: int, source, teacher
               ) -> synthetic_set.SyntheticSet:
  """n random real images with teacher targets; one subset per evaluation seed."""
  return _selected_set(os.path.join(workdir, "sets", f"random_n{n}_seed{seed}.npz"), "random",
                       lambda: coresets.random_subset(len(source.images), n, 1000 + seed),
                       config, workdir, source, teacher)


def random_mf_set(config, workdir: str, n: int, seed: int, source, teacher
                  ) -> synthetic_set.SyntheticSet:
  """n stored images holding n * f^2 random real images (multi-formation), teacher targets
  of the decoded images; one subset per evaluation seed. With a share
  `eval.multi_formation_full` the first round(share * n) stored images hold one
  full-resolution image each."""
  f = config.eval.multi_formation
  share = config.eval.get("multi_formation_full", 0.0)
  full = round(share * n) if f > 1 else 0
  name = f"random_mf{f}" + (f"_full{share:g}" if full else "") + f"_n{n}_seed{seed}.npz"
  return _selected_set(os.path.join(workdir, "sets", name), "random_mf",
                       lambda: coresets.random_subset(len(source.images),
                                                      multi_formation.image_count(n, f, full),
                                                      3000 + seed),
                       config, workdir, source, teacher, formation=f, full=full)


def kmeans_set(config, workdir: str, n: int, seed: int, source, teacher
               ) -> synthetic_set.SyntheticSet:
  """The real images nearest to n k-means centroids of the teacher's features."""
  return _selected_set(os.path.join(workdir, "sets", f"kmeans_n{n}.npz"), "kmeans",
                       lambda: coresets.kmeans_coreset(source_features(source, teacher), n,
                                                       config.seed),
                       config, workdir, source, teacher)


def kip_set(config, workdir: str, n: int, seed: int, source, teacher
            ) -> synthetic_set.SyntheticSet:
  """KIP: class-balanced real init, then images and labels fitted with the NTK."""
  path = os.path.join(workdir, "sets", f"kip_n{n}.npz")
  if os.path.exists(path):
    return synthetic_set.load_synthetic(path)
  if source.labels is None:
    raise DistillError(f"the kip row needs a labelled source; {source.name} has no labels")
  cfg = config.kip
  t0 = time.perf_counter()
  idx = coresets.class_balanced_subset(source.labels, n, config.seed)
  num_classes = int(source.labels.max()) + 1
  method = kip_lib.KIP(cfg, teacher.mean, teacher.std)
  state = method.init(datasets.normalize(source.images[idx], teacher.mean, teacher.std),
                      np.eye(num_classes, dtype=np.float32)[source.labels[idx]])
  num_source = len(source.images)
  batch_size = min(cfg.batch_size, num_source)
  name = f"kip_n{n}"
  log(f"[{name}] KIP with the ConvNet NTK (depth {cfg.depth}, pool {cfg.pool}, downsample "
      f"{cfg.downsample}): n={n}, {cfg.steps} steps")

  def batch_fn(i):
    b = batch_indices(config.seed, i, num_source, batch_size)
    return source.images[b], source.labels[b]

  state, history = run_loop(name=name, workdir=workdir, state=state, step_fn=method.step,
                            batch_fn=batch_fn, num_steps=cfg.steps,
                            rng=jax.random.key(config.seed + 3), log_every=cfg.log_every,
                            checkpoint_every=max(cfg.steps // 4, 1),
                            hint=f"raise kip.reg (now {cfg.reg})")
  out = synthetic_set.SyntheticSet(
      images=np.asarray(state["synthetic"]["images"]),
      targets=np.asarray(state["synthetic"]["targets"]),
      labels=source.labels[idx].astype(np.int32), method="kip", source=source.name,
      teacher="labels", image_mean=teacher.mean, image_std=teacher.std,
      config=to_dict(config), step=cfg.steps,
      extra=dict(seconds=time.perf_counter() - t0, init_indices=idx.tolist(),
                 final_loss=history[-1]["loss"] if history else None))
  save_set(path, out, workdir, name, history)
  return out


def param_match_set(row: str, config, workdir: str, n: int, seed: int, source, teacher
                    ) -> synthetic_set.SyntheticSet:
  """The parameter-matching set; trains the experts and distils if missing.

  The row names the method and the experts' objective ("_ce": supervised,
  otherwise label-free "mse"); `config.experts.objective` is not used here.
  """
  if n != config.param_match.num_synthetic:
    raise DistillError(f"row {row!r}: param_match.num_synthetic is "
                       f"{config.param_match.num_synthetic}, the table needs n={n}")
  method, _, objective = row.partition("_")
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.param_match.method = method
    cfg.experts.objective = objective or "mse"
  if not os.path.exists(param_match_set_path(cfg, workdir)):
    run_experts(cfg, workdir)  # a set made before needs no buffer (it may be gone)
  return run_param_match(cfg, workdir)


class Row(NamedTuple):
  """One row of the table.

  Attributes:
    build: `(config, workdir, n, seed, source, teacher) -> SyntheticSet`,
      reading the set from `<workdir>` or building and saving it; None for a
      reference without a set (none, teacher) and for `full` (the whole
      source, never saved).
    recipe: how a backbone is pretrained on the set, (target kind, loss) of
      `transfer.pretrain`; None when nothing is pretrained.
  """
  build: Callable | None
  recipe: tuple[str, str] | None


def _krr_st_set(config, workdir, n, seed, source, teacher, supervised=False):
  return run_krr_st(config, workdir, n, supervised=supervised)


# The registry, in table order. Recipes: real images keep the teacher's
# targets (recomputed per view if pretraining augments); learned
# teacher-space targets belong to their images as they are; KIP and FRePo
# fit their labels by kernel ridge regression, i.e. squared error, and are
# pretrained the same way; the "ce" parameter-matching sets hold soft labels
# learned against cross-entropy experts, and are pretrained by cross-entropy.
ROWS = {
    "none": Row(None, None),
    "random": Row(random_set, ("teacher", "mse")),
    "random_mf": Row(random_mf_set, ("teacher", "mse")),
    "kmeans": Row(kmeans_set, ("teacher", "mse")),
    "kip": Row(kip_set, ("labels", "mse")),
    "frepo": Row(functools.partial(_krr_st_set, supervised=True), ("labels", "mse")),
    "krr_st": Row(_krr_st_set, ("learned", "mse")),
    **{name: Row(functools.partial(param_match_set, name),
                 ("labels", "ce") if name.endswith("_ce") else ("learned", "mse"))
       for name in ("iadd", "mtt", "iadd_ce", "mtt_ce")},
    "full": Row(None, ("teacher", "mse")),
    "teacher": Row(None, None),
}


def build_set(row: str, config, workdir: str, n: int, seed: int, source, teacher
              ) -> synthetic_set.SyntheticSet:
  """The set of `row` at size n for evaluation seed `seed` (read, or built and saved)."""
  if row not in ROWS or ROWS[row].build is None:
    raise DistillError(f"row {row!r} has no set to build; rows with one: "
                       f"{[r for r, spec in ROWS.items() if spec.build]}")
  return ROWS[row].build(config, workdir, n, seed, source, teacher)
