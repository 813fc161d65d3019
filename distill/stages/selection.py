"""The selection stages: source pruning -> `<workdir>/source_pruning.npz`,
label-free influence -> `<workdir>/influence.npz`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from distill import files
from distill.data import datasets
from distill.errors import DistillError
from distill.nn.loop import log
from distill.nn.models import extract_features
from distill.selection import influence, source_pruning
from distill.stages.artefacts import found, load_source, workdir_teacher


def run_prune_source(config, workdir: str) -> source_pruning.PruningResult:
  """Scores source groups with the target and writes `<workdir>/source_pruning.npz`.

  Needs `<workdir>/teacher` only when the groups are k-means clusters.
  """
  cfg = config.selection.prune
  out_path = os.path.join(workdir, source_pruning.ARTEFACT)
  if os.path.exists(out_path):
    found("prune_source", out_path)
    return source_pruning.load_pruning(out_path)
  if cfg.method not in source_pruning.METHODS:
    raise DistillError(f"unknown selection.prune.method {cfg.method!r}; expected one of "
                       f"{source_pruning.METHODS}")
  source_pruning.num_kept_groups(2, cfg.keep_fraction)  # validates the fraction before any work
  source = load_source(config)
  mean, std = datasets.channel_stats(source.images)
  x_source = datasets.normalize(source.images, mean, std)

  def teacher_features():
    teacher = workdir_teacher(config, workdir)
    return teacher.features(datasets.normalize(source.images, teacher.mean, teacher.std))

  groups, num_groups = source_pruning.source_groups(source.labels, teacher_features, cfg.groups,
                                                    cfg.num_clusters, config.seed)
  meta = dict(source=source.name, num_source=len(groups), num_groups=num_groups,
              config=json.loads(json.dumps(config.to_dict())))
  if cfg.method == "random":
    result = source_pruning.random_group_pruning(groups, num_groups, cfg.keep_fraction, config.seed)
  else:
    target = datasets.load_dataset(config.data.target, config.data.target_train_split,
                                   cache_dir=config.data.cache_dir or None,
                                   data_dir=config.data.data_dir or None)
    target = datasets.subsample(target, config.data.num_target_train, config.seed)
    images = datasets.match_format(target.images, source.images.shape[1], source.images.shape[3])
    x_target = datasets.normalize(images, mean, std)
    log(f"[prune_source] surrogate {cfg.surrogate.name} on {len(groups)} source images, "
        f"{num_groups} groups; {len(x_target)} target images vote ({cfg.method})")
    model, variables = source_pruning.train_surrogate(cfg, x_source, groups, num_groups,
                                                      config.seed, workdir)
    target_features, target_logits = source_pruning.surrogate_outputs(model, variables, x_target)
    # Both votes are cheap once the surrogate exists; both are recorded.
    source_features = extract_features(model, variables, x_source)
    votes = {"lm": source_pruning.lm_votes(target_logits),
             "fm": source_pruning.fm_votes(target_features, source_features, groups, num_groups)}
    result = source_pruning.prune_by_votes(cfg.method, votes[cfg.method], groups, cfg.keep_fraction)
    meta.update(target=target.name, votes={k: v.tolist() for k, v in votes.items()})
  source_pruning.save_pruning(out_path, result, meta)
  log(f"[prune_source] kept groups {result.kept_groups.tolist()} ({len(result.indices)} of "
      f"{len(groups)} images); votes {result.votes.tolist()}; wrote {out_path}")
  return result


def run_influence(config, workdir: str) -> dict:
  """Scores every source image with the teacher in `<workdir>/teacher`.

  Returns:
    The arrays written to `<workdir>/influence.npz`.
  """
  cfg = config.selection.influence
  out_path = os.path.join(workdir, influence.ARTEFACT)
  if os.path.exists(out_path):
    found("influence", out_path)
    with np.load(out_path) as f:
      return {k: f[k] for k in f.files}
  teacher = workdir_teacher(config, workdir)
  source = load_source(config)
  if source.images.shape[1:] != tuple(teacher.image_shape):
    raise DistillError(f"source images {source.images.shape[1:]} do not match the teacher's "
                       f"{tuple(teacher.image_shape)}")
  images = datasets.normalize(source.images, teacher.mean, teacher.std)
  log(f"[influence] {len(images)} images x {cfg.num_views} views, head on {teacher.dim} "
      f"features")
  key = jax.random.key(config.seed + 5)
  clean, views = influence.consistency_features(teacher, images, 2 * cfg.num_views, key,
                                                cfg.batch_size)
  # The first half of the views fit the head; the second half measure L.
  fit_views, eval_views = np.split(views, 2, axis=1)
  scores = influence.influence_scores(jnp.asarray(fit_views), jnp.asarray(clean),
                                      jnp.asarray(eval_views), float(cfg.reg))
  if not bool(scores.pop("ok")):
    raise DistillError("influence: the head's ridge solve failed; raise selection.influence.reg")
  lam = float(scores.pop("lam"))
  out = {k: np.asarray(v, np.float32) for k, v in scores.items()}
  out["duplicate"], out["nearest"] = influence.duplicate_scores(clean)
  meta = dict(source=source.name, num_images=len(images), num_views=cfg.num_views,
              reg=cfg.reg, lam=lam, feature_dim=teacher.dim)
  files.write_atomic(out_path, lambda f: np.savez(f, meta=json.dumps(meta), **out))
  for name in ("self_influence", "duplicate"):
    top = np.argsort(-out[name], kind="stable")[:5]
    log(f"[influence] highest {name}: " + ", ".join(f"#{i} ({out[name][i]:.3g})" for i in top))
  log(f"[influence] wrote {out_path}")
  return out
