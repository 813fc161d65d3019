"""The outer optimiser of the kernel-based distillers (KRR-ST, FRePo, KIP)."""

from __future__ import annotations

import ml_collections
import optax


def outer_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(W) on images and targets, each with its own linearly decaying lr."""
  def adam(lr):
    schedule = optax.linear_schedule(lr, 0.0, max(cfg.steps, 1))
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)
  tx = optax.multi_transform({"images": adam(cfg.lr_images), "targets": adam(cfg.lr_targets)},
                             {"images": "images", "targets": "targets"})
  if cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx
