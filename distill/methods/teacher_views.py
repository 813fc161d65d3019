"""Teacher-view cache: the frozen teacher's representations of fixed views.

The teacher is frozen during distillation, yet KRR-ST (and the knowledge-
distillation experts) run it on a fresh random crop + flip of every real
batch, at every one of up to 160,000 outer steps; at n = 100 that forward
pass is most of the step. This module fixes V views per source image
instead, so their representations can be computed once and read back:

    views[i, v] = (dy, dx, flip)      (N, V, 3) uint8, view v of image i
    targets[i, v] = g(view(x_i))      (N, V, d) float16 (or float32)

View 0 of every image is the image itself ((pad, pad) offset, no flip), so
a cache of V = 1 holds the plain teacher features (the un-augmented targets
of `augment_real=False` and of the `full` row); views 1..V-1 are drawn
uniformly from the (2 * pad + 1)^2 * 2 crops and flips of
`augment.random_crop_flip`, seeded, so the table is a pure function of
(seed, N, V). A step then draws (image, view) pairs and applies the stored
view to the image itself (`apply_views`), which is exactly what the
teacher saw.

Files and resumption live in distill/stages/teacher_views.py; this module
is the pure part.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from distill.data import augment
from distill.methods import barlow_twins

PAD = 4  # as augment.random_crop_flip


def view_table(seed: int, num_images: int, num_views: int, pad: int = PAD) -> np.ndarray:
  """The fixed views: (N, V, 3) uint8 rows (dy, dx, flip); view 0 is the identity.

  Args:
    seed: draws of views 1..V-1.
    num_images: N. num_views: V >= 1. pad: crop padding.
  """
  if num_views < 1:
    raise ValueError(f"num_views must be >= 1, got {num_views}")
  rng = np.random.default_rng([seed, num_images, num_views])
  table = np.empty((num_images, num_views, 3), np.uint8)
  table[:, 0] = (pad, pad, 0)
  rest = (num_images, num_views - 1)
  table[:, 1:, 0] = rng.integers(0, 2 * pad + 1, rest)
  table[:, 1:, 1] = rng.integers(0, 2 * pad + 1, rest)
  table[:, 1:, 2] = rng.integers(0, 2, rest)
  return table


def apply_views(x: jax.Array, views: jax.Array, pad: int = PAD) -> jax.Array:
  """Views (B, 3) (`view_table` rows) of normalised images x (B, H, W, C)."""
  views = views.astype(jnp.int32)
  return augment.crop_flip(x, views[:, :2], views[:, 2] > 0, pad)


def draw_views(seed: int, step: int, batch_size: int, num_views: int,
               augment_views: bool = True) -> np.ndarray:
  """Which view of each batch image step `step` uses: (B,) int, seeded by step.

  `augment_views=False` always takes view 0, the image itself.
  """
  if not augment_views or num_views == 1:
    return np.zeros(batch_size, np.int64)
  return np.random.default_rng([seed, step, 7]).integers(0, num_views, batch_size)


@functools.lru_cache(maxsize=None)
def represent_views_fn(model, kind: str):
  """Jitted `(variables, uint8 (B,H,W,C), views (B,3), mean, std) -> (B, d) float32`.

  The teacher's representation of each image's given view: what the cache
  stores, and what a step without the cache computes for the same view.
  """
  def represent(variables, images, views, mean, std):
    x = apply_views(augment.normalize_batch(images, mean, std), views)
    return barlow_twins.represent(model, variables, x, kind)

  return jax.jit(represent)


def cached_real_batch(images: np.ndarray, views: np.ndarray, targets: np.ndarray,
                      idx: np.ndarray, view_ids: np.ndarray) -> dict:
  """One real batch read from a cache.

  Args:
    images: (N, H, W, C) uint8 source. views: (N, V, 3). targets: (N, V, d)
      (a memory map: only the rows read are loaded).
    idx: (B,) image indices. view_ids: (B,) view of each.

  Returns:
    {"images": (B, H, W, C) uint8, "views": (B, 3) uint8, "targets": (B, d)
    in the cache's dtype}: a step applies the view and takes the targets.
  """
  order = np.argsort(idx, kind="stable")   # sorted reads of the memory map
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  rows = np.asarray(targets[idx[order], view_ids[order]])[inverse]
  return {"images": images[idx], "views": views[idx, view_ids], "targets": rows}
