"""Image datasets as uint8 numpy arrays, from files on disk or from TFDS.

This module is the public data API: `ArrayDataset`, `load_dataset`, the
on-disk cache of decoded datasets, and preprocessing (`channel_stats`,
`normalize`, `denormalize`, `subsample`, `match_format`). The readers for
each source format are in `distill.data.sources`.

`load_dataset(source, split)` understands, checked in this order:

  1. a directory of IDX files (MNIST / Fashion-MNIST naming): split "train"
     reads `train-images-idx3-ubyte[.gz]`, split "test" reads `t10k-...`, and
     any split also accepts its own name as the prefix;
  2. a directory of images with one subfolder per class, using
     `<dir>/<split>/` when it exists and `<dir>/` itself otherwise;
  3. a `.tar`, `.tar.gz` or `.tgz` archive with the same layout inside,
     optionally under one top-level folder; members are read straight from
     the archive, nothing is extracted;
  4. an `.npz` file with `images` (and optional `labels`) arrays, or with
     `x_<split>` / `y_<split>` pairs;
  5. anything else: a TFDS name such as `cifar10`, optionally written
     `tfds:cifar10` (needed for names with a config, `tfds:name/config`).

Every loader returns an `ArrayDataset` whose images are (N, H, W, C) uint8
with C in {1, 3}. For folders and archives the class names are the sorted
names of the class folders that hold images, and labels index them. Nothing
is resized or recoloured silently: images of mixed sizes or channel counts
are an error naming one offending file. Use `match_format` to bring a dataset
to another resolution on purpose.

Folders and archives are slow to decode, so their decoded arrays are cached as
an uncompressed `.npz` under `cache_dir` (default `$DISTILL_CACHE`, else
`~/.cache/distill`; an empty string turns caching off). The cache key hashes
the absolute path, the size and mtime of the archive (or the file list, sizes
and newest mtime of the folder), the split and `_CACHE_VERSION`, so editing
the data invalidates the entry. A cache file that cannot be read is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import Callable

import numpy as np
from PIL import Image

from distill import files
from distill.data import sources
from distill.data.sources import ArrayDataset  # built by the readers; re-exported here
from distill.errors import DistillError

# Bump when the decoded content for the same input would change, including
# any change to how the readers in `distill.data.sources` decode images.
_CACHE_VERSION = 1


def load_dataset(source: str, split: str = "train", *,
                 cache_dir: str | None = None,
                 data_dir: str | None = None) -> ArrayDataset:
  """Loads one split of an image dataset (see the module docstring).

  Args:
    source: a directory, archive or `.npz` path, or a TFDS name (optionally
      prefixed with `tfds:`).
    split: split name, e.g. "train", "test", "val"; passed through to TFDS
      unchanged (so "train[:10%]" works there).
    cache_dir: where decoded folders and archives are cached; None means
      `$DISTILL_CACHE` or `~/.cache/distill`, "" disables the cache.
    data_dir: TFDS data directory (ignored for files).

  Returns:
    The split as an `ArrayDataset` with (N, H, W, C) uint8 images.

  Raises:
    DistillError: the source does not exist, cannot be read, is empty for
      this split, or holds images of inconsistent size or channels.
  """
  resolved = sources.resolve(source, split, data_dir)
  if resolved.cache_key is None:
    return resolved.read()
  return _cached(cache_dir, resolved.path, split, _cache_key(*resolved.cache_key, split),
                 resolved.read)


# ---------------------------------------------------------------- statistics


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation on the [0, 1] scale.

  Accumulates in float64 over chunks of images, so memory stays bounded and
  the result does not depend on float32 summation order.

  Args:
    images: (N, H, W, C) uint8.

  Returns:
    (mean, std), each (C,) float32.
  """
  sources.check_images(images, "images")
  n, h, w, c = images.shape
  if n == 0:
    raise DistillError("channel_stats needs at least one image, got 0")
  chunk = max(1, (1 << 22) // (h * w * c))
  count = n * h * w
  total = np.zeros(c, np.float64)
  for i in range(0, n, chunk):
    total += images[i:i + chunk].sum(axis=(0, 1, 2), dtype=np.float64)
  mean = total / (255.0 * count)
  # Second pass around the mean: avoids cancellation in E[x^2] - E[x]^2.
  sq = np.zeros(c, np.float64)
  for i in range(0, n, chunk):
    x = images[i:i + chunk].astype(np.float64) / 255.0 - mean
    sq += np.einsum("nhwc,nhwc->c", x, x)
  std = np.sqrt(sq / count)
  return mean.astype(np.float32), std.astype(np.float32)


def target_stats(targets: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, float]:
  """Centre and scale of representation targets: the map y -> (y - centre) / scale.

  A per-dimension centre and one overall scale (the root mean square of the
  centred targets), so the regression no longer spends its effort on the
  targets' large common mean while the relative size of the dimensions is
  kept. Accumulates in float64 over chunks (targets may be a float16 memory map).

  Args:
    targets: (n, d) representations, n >= 1.

  Returns:
    (centre (d,) float32, scale) with scale > 0.
  """
  if targets.ndim != 2 or len(targets) == 0:
    raise DistillError(f"target_stats needs (n, d) targets with n >= 1, got {targets.shape}")
  n = len(targets)
  total = np.zeros(targets.shape[1], np.float64)
  for i in range(0, n, chunk):
    total += targets[i:i + chunk].sum(0, dtype=np.float64)
  centre = total / n
  sq = sum(float(np.sum((targets[i:i + chunk].astype(np.float64) - centre) ** 2))
           for i in range(0, n, chunk))
  return centre.astype(np.float32), float(np.sqrt(sq / targets.size)) + 1e-8


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """Maps uint8 images to float32 `(images / 255 - mean) / std`.

  Args:
    images: (N, H, W, C) uint8.
    mean: (C,) or scalar, on the [0, 1] scale.
    std: (C,) or scalar, positive.

  Returns:
    (N, H, W, C) float32.
  """
  sources.check_images(images, "images")
  mean, std = _check_mean_std(mean, std, images.shape[-1])
  out = images.astype(np.float32)
  # In place: the float32 copy is the only full-size temporary.
  out /= 255.0
  out -= mean
  out /= std
  return out


def denormalize(x, mean, std) -> np.ndarray:
  """Inverse of `normalize`, clipped to [0, 1] for display.

  Args:
    x: (..., C) float array (numpy or JAX).
    mean: (C,) or scalar.
    std: (C,) or scalar.

  Returns:
    (..., C) float32 in [0, 1].
  """
  x = np.asarray(x, np.float32)
  mean, std = _check_mean_std(mean, std, x.shape[-1] if x.ndim else 1)
  return np.clip(x * std + mean, 0.0, 1.0)


def subsample(ds: ArrayDataset, num: int, seed: int) -> ArrayDataset:
  """A random subset of `num` examples, the same for the same seed.

  Args:
    ds: the dataset.
    num: how many examples to keep; <= 0 keeps all (and returns `ds`).
    seed: seed for `np.random.default_rng`.

  Returns:
    The subset, in random order.
  """
  n = len(ds)
  if num <= 0:
    return ds
  if num > n:
    raise DistillError(
        f"asked for {num} images but the dataset {ds.name!r} has {n}")
  idx = np.random.default_rng(seed).permutation(n)[:num]
  labels = None if ds.labels is None else ds.labels[idx]
  return dataclasses.replace(ds, images=ds.images[idx], labels=labels)


def match_format(images: np.ndarray, size: int, channels: int) -> np.ndarray:
  """Brings images to a given square size and channel count.

  Grey images are replicated to three channels; RGB images are reduced to
  grey by ITU-R 601 luminance (as PIL's "L" mode). Resizing uses PIL's
  bilinear filter, which antialiases when shrinking; non-square images are
  stretched to the square.

  Args:
    images: (N, H, W, C) uint8, C in {1, 3}.
    size: output height and width.
    channels: output channels, 1 or 3.

  Returns:
    (N, size, size, channels) uint8; `images` itself when nothing changes.
  """
  sources.check_images(images, "images")
  if channels not in (1, 3):
    raise DistillError(f"channels must be 1 or 3, got {channels}")
  if size < 1:
    raise DistillError(f"size must be positive, got {size}")
  out = images
  # Drop colour before resizing and add it after: resize the fewest pixels.
  if out.shape[-1] == 3 and channels == 1:
    grey = out.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    out = np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]
  if out.shape[1:3] != (size, size):
    out = _resize(out, size)
  if out.shape[-1] == 1 and channels == 3:
    out = np.repeat(out, 3, axis=-1)
  return out


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """(N, H, W, C) uint8 -> (N, size, size, C) uint8, PIL bilinear."""
  grey = images.shape[-1] == 1
  out = np.empty((images.shape[0], size, size, images.shape[-1]), np.uint8)
  for i, img in enumerate(images):
    pil = Image.fromarray(img[..., 0] if grey else img)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    out[i] = resized[..., None] if grey else resized
  return out


# -------------------------------------------------------------------- cache


def _cache_key(*parts) -> str:
  return hashlib.sha256(
      json.dumps([_CACHE_VERSION, *parts]).encode("utf-8")).hexdigest()


def _cached(cache_dir: str | None, path: str, split: str, key: str,
            build: Callable[[], ArrayDataset]) -> ArrayDataset:
  """Returns the cached dataset for `key`, building and caching it if needed."""
  if cache_dir is None:
    cache_dir = os.environ.get("DISTILL_CACHE",
                               os.path.join("~", ".cache", "distill"))
  if not cache_dir:
    return build()
  cache_dir = os.path.expanduser(cache_dir)
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "_",
                f"{sources.basename(path)}-{split}")
  file = os.path.join(cache_dir, f"{safe}-{key[:16]}.npz")
  ds = _read_cache(file, key)
  if ds is not None:
    return ds
  ds = build()
  _write_cache(file, key, ds)
  return ds


def _read_cache(file: str, key: str) -> ArrayDataset | None:
  """The dataset in a cache file, or None if absent, stale or unreadable."""
  if not os.path.isfile(file):
    return None
  try:
    with np.load(file, allow_pickle=False) as npz:
      if str(npz["key"]) != key:
        return None
      labels = npz["labels"] if "labels" in npz.files else None
      class_names = (tuple(str(c) for c in npz["class_names"])
                     if "class_names" in npz.files else None)
      return ArrayDataset(images=npz["images"], labels=labels,
                          name=str(npz["name"]), class_names=class_names)
  except Exception:  # pylint: disable=broad-except
    # Any damage (truncation, bad zip, wrong arrays) means: rebuild it.
    return None


def _write_cache(file: str, key: str, ds: ArrayDataset) -> None:
  """Writes the cache file atomically; failures only warn."""
  arrays = {"key": np.array(key), "name": np.array(ds.name),
            "images": ds.images}
  if ds.labels is not None:
    arrays["labels"] = ds.labels
  if ds.class_names is not None:
    arrays["class_names"] = np.array(ds.class_names, dtype=str)
  try:
    # Readers see either no file or a complete one, never a partial write.
    files.write_atomic(file, lambda f: np.savez(f, **arrays))
  except DistillError as e:
    warnings.warn(f"could not write dataset cache: {e}")


# ---------------------------------------------------------------- utilities


def _check_mean_std(mean, std, channels: int) -> tuple[np.ndarray, np.ndarray]:
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  for what, v in (("mean", mean), ("std", std)):
    if v.ndim > 1 or v.size not in (1, channels):
      raise DistillError(
          f"{what} must be a scalar or ({channels},), got shape {v.shape}")
  if not (std > 0).all():
    raise DistillError(f"std must be positive, got {std.tolist()}")
  return mean, std
