"""Multi-formation: several downsampled images stored in the space of one.

IDC (Kim et al., ICML 2022, "Dataset Condensation via Efficient
Synthetic-Data Parameterization") stores f x f images, each downsampled f
times, as the tiles of one stored image ("slot"), and trains on the tiles
upsampled back to full size. Under a fixed storage budget of n images a set
then holds n * f^2 training images, at 1/f of the resolution. Where a student
is limited by the number of distinct images it sees rather than by their
detail (a student regressing a teacher on 100 images memorises them), that
trade pays (experiments/results/cifar10_effect_n100_multi_formation.md).

A mixed set keeps its first `full` slots at full resolution, one image
each, and forms the rest: where a student loses on full-resolution images
what it gains from more of them (the n = 1,000 diagnostic in that file), part
of the budget buys back the detail.

Everything here is numpy in the model's input space, NHWC:
  encode: (full + (n - full) * f^2, H, W, C) images -> (n, H, W, C) slots (stored)
  decode: (n, H, W, C) slots -> (full + (n - full) * f^2, H, W, C) training images
decode(encode(x)) is x for the first `full` images and the rest averaged over
f x f blocks and upsampled bilinearly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from distill.errors import DistillError


def check(shape: tuple, factor: int, what: str) -> None:
  """Raises DistillError unless `factor` is an integer >= 1 dividing the (N, H, W, C)
  `shape`'s height and width; `what` names the caller in the message."""
  if not isinstance(factor, (int, np.integer)) or factor < 1:
    raise DistillError(f"multi-formation factor must be an integer >= 1, got {factor!r}")
  if len(shape) != 4:
    raise DistillError(f"{what}: expected (N, H, W, C) images, got shape {shape}")
  if shape[1] % factor or shape[2] % factor:
    raise DistillError(f"{what}: the factor {factor} does not divide the image size "
                       f"{shape[1]}x{shape[2]}")


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
  """(N, H, W, C) -> (N, H/f, W/f, C), the mean of each f x f block."""
  check(images.shape, factor, "downsample")
  n, h, w, c = images.shape
  return images.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))


def upsample(tiles: np.ndarray, factor: int) -> np.ndarray:
  """(N, h, w, C) -> (N, h*f, w*f, C) by bilinear interpolation (half-pixel centres,
  edges clamped), as IDC's decoder."""
  if factor < 1:
    raise DistillError(f"multi-formation factor must be an integer >= 1, got {factor!r}")
  n, h, w, c = tiles.shape
  if factor == 1:
    return np.asarray(tiles, np.float32)
  # jax.image.resize's "bilinear" antialiases only when shrinking, so growing
  # is plain bilinear interpolation.
  return np.asarray(jax.image.resize(jnp.asarray(tiles, jnp.float32),
                                     (n, h * factor, w * factor, c), "bilinear"))


def mosaic(tiles: np.ndarray, factor: int) -> np.ndarray:
  """(N * f^2, h, w, C) tiles -> (N, h*f, w*f, C): tile k * f^2 + i * f + j of slot k
  at block row i, column j."""
  m, h, w, c = tiles.shape
  if m % (factor * factor):
    raise DistillError(f"mosaic: {m} tiles do not fill slots of {factor}x{factor}")
  n = m // (factor * factor)
  grid = tiles.reshape(n, factor, factor, h, w, c).transpose(0, 1, 3, 2, 4, 5)
  return grid.reshape(n, factor * h, factor * w, c)


def tiles_of(slots: np.ndarray, factor: int) -> np.ndarray:
  """The inverse of `mosaic`: (N, H, W, C) -> (N * f^2, H/f, W/f, C)."""
  check(slots.shape, factor, "tiles_of")
  n, hh, ww, c = slots.shape
  h, w = hh // factor, ww // factor
  grid = slots.reshape(n, factor, h, factor, w, c).transpose(0, 1, 3, 2, 4, 5)
  return grid.reshape(n * factor * factor, h, w, c)


def _check_full(full: int, count: int, what: str) -> None:
  if not isinstance(full, (int, np.integer)) or not 0 <= full <= count:
    raise DistillError(f"{what}: `full` (slots kept at full resolution) must be an integer "
                       f"in [0, {count}], got {full!r}")


def image_count(slots: int, factor: int, full: int = 0) -> int:
  """The training images `slots` stored images hold, the first `full` one each."""
  _check_full(full, slots, "image_count")
  return full + (slots - full) * factor * factor


def encode(images: np.ndarray, factor: int, full: int = 0) -> np.ndarray:
  """(full + N * f^2, H, W, C) full-size images -> (full + N, H, W, C) stored slots; the
  first `full` images are stored as they are."""
  _check_full(full, len(images), "encode")
  return np.concatenate([np.asarray(images[:full], np.float32),
                         mosaic(downsample(images[full:], factor), factor)])


def decode(slots: np.ndarray, factor: int, full: int = 0) -> np.ndarray:
  """(full + N, H, W, C) stored slots -> (full + N * f^2, H, W, C) training images; the
  first `full` slots are images already."""
  _check_full(full, len(slots), "decode")
  return np.concatenate([np.asarray(slots[:full], np.float32),
                         upsample(tiles_of(slots[full:], factor), factor)])


def storage(slots: int, image_shape: tuple, target_dim: int, factor: int,
            full: int = 0) -> dict:
  """What a multi-formation set stores against real images with one target each.

  Each formed slot carries f^2 training images and so f^2 target vectors, each
  of the `full` others one of each: the set holds
  slots * H*W*C + (full + (slots - full) * f^2) * d numbers, which a plain set
  of `equal_storage_images` real images (H*W*C + d numbers each) also holds.
  """
  pixels = int(np.prod(image_shape))
  training = image_count(slots, factor, full)
  numbers = slots * pixels + training * target_dim
  return dict(slots=slots, factor=factor, full_resolution_slots=full,
              training_images=training, stored_numbers=numbers,
              equal_storage_images=numbers / (pixels + target_dim))
