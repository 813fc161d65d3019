"""The one config system: ml_collections `get_config()` files.

An experiment file under `experiments/configs/` starts from `base_config()`,
changes what it needs and returns the result; a `:variant` suffix on the
path is passed to its `get_config(variant)` (e.g. `...quickstart.py:smoke`).
The base config is locked, so a misspelt key in an experiment file or in a
command-line override (`--set distill.steps=100`) is an error naming the key,
never a silently ignored setting.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections

from distill.errors import DistillError


def _arch(name="convnet", width=128, depth=3, norm="default"):
  return ml_collections.ConfigDict(dict(name=name, width=width, depth=depth, norm=norm))


def base_config() -> ml_collections.ConfigDict:
  """Every setting of the pipeline, with the paper-scale defaults (GPU)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Source (unlabelled for distillation) and the labelled transfer target.
  c.data = ml_collections.ConfigDict(dict(
      source="cifar100",       # TFDS name, image folder, .tar.gz, .npz or IDX dir
      source_split="train",
      num_source=0,            # 0 = all; else a seeded random subset
      target="cifar10",
      target_train_split="train",
      target_test_split="test",
      num_target_train=0,
      num_target_test=0,
      cache_dir="",            # "" = DISTILL_CACHE or ~/.cache/distill
      data_dir="",             # TFDS data_dir ("" = TFDS default)
  ))

  # Self-supervised teacher (Barlow Twins).
  c.teacher = ml_collections.ConfigDict(dict(
      arch=_arch("resnet18", width=64),
      projector=(512, 512, 512),
      lambda_offdiag=5e-3,
      epochs=100,
      batch_size=256,
      lr=1e-3,
      weight_decay=1e-4,
      warmup_steps=500,
  ))

  # KRR-ST distillation.
  c.distill = ml_collections.ConfigDict(dict(
      num_synthetic=1000,
      init="random",           # how the synthetic images are drawn from the source
      steps=160_000,
      batch_size=1024,         # real images per outer step
      lr_images=1e-4,
      lr_targets=1e-4,
      weight_decay=0.0,
      clip_norm=0.0,           # 0 = no clipping of the outer gradient
      reg=1e-6,                # ridge strength, see kernels/ridge.py
      reg_scaling="trace",     # reference convention: reg * trace(K_ss)
      ridge_form="auto",       # "dual" (n x n), "primal" (p x p) or "auto" (smaller)
      augment_real=True,
      pool=ml_collections.ConfigDict(dict(
          size=10,
          max_age=1000,
          arch=_arch("convnet", width=128, depth=3),
          lr=0.1,              # inner full-batch SGD on (X_s, Y_s)
          momentum=0.9,
          init_age="uniform",  # "uniform": T ~ U{1..max_age}; "zero": fresh nets
      )),
      log_every=100,
      checkpoint_every=1000,
  ))

  # Pretraining a fresh network on a synthetic set (MSE to its targets).
  c.pretrain = ml_collections.ConfigDict(dict(
      arch=_arch("convnet", width=128, depth=3),
      epochs=1000,
      batch_size=256,
      lr=0.1,
      momentum=0.9,
      weight_decay=1e-3,
      augment=True,
  ))

  # Linear probe on frozen features: ridge classifier, reg picked on a split.
  c.probe = ml_collections.ConfigDict(dict(
      regs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
      val_fraction=0.1,
  ))

  # Transfer read-out.
  c.eval = ml_collections.ConfigDict(dict(
      seeds=(0, 1, 2),
      rows=("none", "random", "krr_st"),
  ))

  c.lock()
  return c


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:variant]` and applies `key.sub=value` overrides.

  Raises:
    DistillError: missing file, no get_config, unknown key, bad value.
  """
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise DistillError(f"config file does not exist: {path}")
  module_spec = importlib.util.spec_from_file_location("_experiment_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except (AttributeError, KeyError) as e:
    # A locked ConfigDict raises these for a misspelt key.
    raise DistillError(f"config {path}: {_first_line(e)}") from e
  if not hasattr(module, "get_config"):
    raise DistillError(f"config {path} has no get_config() function")
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except (AttributeError, KeyError) as e:
    raise DistillError(f"config {path}: {_first_line(e)}") from e
  apply_overrides(config, overrides)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  """Applies `a.b.c=value` strings in place; values parse as Python literals."""
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise DistillError(f"override {item!r} is not of the form key=value")
    *parents, leaf = key.strip().split(".")
    node = config
    for i, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise DistillError(f"unknown config key {'.'.join(parents[:i + 1])!r} in override {item!r}")
      node = node[part]
    if leaf not in node:
      known = ", ".join(sorted(node.keys()))
      raise DistillError(f"unknown config key {key!r} (known at that level: {known})")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw  # a bare string such as a dataset name or path
    old = node[leaf]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, ml_collections.ConfigDict) or (
        old is not None and not isinstance(value, type(old))):
      raise DistillError(f"config key {key!r} expects {type(old).__name__}, got {raw!r}")
    with config.unlocked():
      node[leaf] = value


def _first_line(e: BaseException) -> str:
  text = str(e).strip().strip("'\"")
  return text.splitlines()[0] if text else type(e).__name__


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-ready plain dict (tuples become lists)."""
  return config.to_dict()
