"""Saving, loading, checking and looking at distilled synthetic sets.

A synthetic set is one `.npz` archive (format version "1") with keys:

  images      (n, H, W, C) float32, normalised input space (x/255 - mean)/std,
              C in {1, 3}.
  targets     (n, d) float32 target representations.
  labels      optional: (n,) int32 hard labels or (n, k) float32 soft labels.
  method, source, teacher, config, version, extra
              0-d string arrays; config and extra hold JSON objects.
  image_mean, image_std
              (C,) float32, the normalisation that maps images back to [0, 1].
  step        0-d int64, the distillation step the set was taken at.

Files are read with `allow_pickle=False`, so opening one never runs code. Every
problem with a file or an in-memory set raises `DistillError` with a one-line
message naming the file (or "synthetic set") and what is wrong.
"""

import dataclasses
import json
import math
import os

import numpy as np
from PIL import Image

from distill import files
from distill.errors import DistillError, one_line

FORMAT_VERSION = "1"

_STRING_KEYS = ("method", "source", "teacher", "config", "version")
_REQUIRED_KEYS = ("images", "targets", "image_mean", "image_std", "step",
                  *_STRING_KEYS)
# White padding separates dark synthetic images better than black.
_GRID_PAD_VALUE = 255


# eq=False: field-wise == on arrays is ambiguous, so sets compare by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticSet:
  """A distilled synthetic set and the metadata needed to reuse it.

  Attributes:
    images: (n, H, W, C) float32, normalised input space, C in {1, 3}.
    targets: (n, d) float32 target representations.
    labels: None, (n,) int32 hard labels or (n, k) float32 soft labels.
    method: distillation method name.
    source: name of the real dataset the set was distilled from.
    teacher: name of the model that produced the targets.
    image_mean: (C,) per-channel mean used for normalisation, [0, 1] scale.
    image_std: (C,) per-channel std used for normalisation, [0, 1] scale.
    config: the run configuration; stored as JSON, so tuples come back as
      lists and non-string keys as strings.
    step: distillation step the set was taken at.
    extra: anything else worth keeping (e.g. a learned step size), as JSON.
    version: file format version.
  """
  images: np.ndarray
  targets: np.ndarray
  labels: np.ndarray | None
  method: str
  source: str
  teacher: str
  image_mean: np.ndarray
  image_std: np.ndarray
  config: dict
  step: int
  extra: dict = dataclasses.field(default_factory=dict)
  version: str = FORMAT_VERSION


def _json_default(obj):
  # numpy scalars and arrays turn up in configs built from computed values.
  if isinstance(obj, (np.generic, np.ndarray)):
    return obj.tolist()
  raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _to_json(value, key: str, where: str) -> str:
  if not isinstance(value, dict):
    raise DistillError(f"{where}: {key} must be a dict, got {type(value).__name__}")
  try:
    return json.dumps(value, sort_keys=True, default=_json_default)
  except (TypeError, ValueError) as err:
    raise DistillError(
        f"{where}: {key} is not JSON-serialisable ({one_line(err)})") from None


def _check_version(version, where: str) -> None:
  if version == FORMAT_VERSION:
    return
  numeric = isinstance(version, str) and version.isdigit()
  if numeric and int(version) > int(FORMAT_VERSION):
    raise DistillError(
        f"{where}: format version {version} is newer than this code reads "
        f"(version {FORMAT_VERSION}); update the code")
  raise DistillError(
      f"{where}: unknown format version {version!r}, expected {FORMAT_VERSION!r}")


def _check_finite(arr: np.ndarray, key: str, where: str) -> None:
  n_nan = int(np.isnan(arr).sum())
  n_inf = int(np.isinf(arr).sum())
  if n_nan or n_inf:
    raise DistillError(
        f"{where}: {key} has {n_nan + n_inf} non-finite values "
        f"({n_nan} NaN, {n_inf} Inf) out of {arr.size}")


def _check_float(arr: np.ndarray, key: str, where: str) -> None:
  if not np.issubdtype(arr.dtype, np.floating):
    raise DistillError(f"{where}: {key} must be a float array, got dtype {arr.dtype}")


def _validate(s: SyntheticSet, where: str) -> None:
  """All checks on a set; `where` names the file (or the set) in messages."""
  _check_version(s.version, where)
  images = np.asarray(s.images)
  if images.ndim != 4:
    raise DistillError(
        f"{where}: images must be 4-D (n, H, W, C), got shape {images.shape}")
  n, h, w, c = images.shape
  if c not in (1, 3):
    raise DistillError(
        f"{where}: images must have C in {{1, 3}} channels, "
        f"got C={c} (shape {images.shape})")
  if n == 0 or h == 0 or w == 0:
    raise DistillError(f"{where}: images is empty, shape {images.shape}")
  _check_float(images, "images", where)

  targets = np.asarray(s.targets)
  if targets.ndim != 2:
    raise DistillError(f"{where}: targets must be 2-D (n, d), got shape {targets.shape}")
  if targets.shape[0] != n or targets.shape[1] == 0:
    raise DistillError(
        f"{where}: targets must have shape ({n}, d>0) to match images, "
        f"got {targets.shape}")
  _check_float(targets, "targets", where)

  if s.labels is not None:
    labels = np.asarray(s.labels)
    if labels.ndim == 1 and labels.shape[0] == n:
      if not np.issubdtype(labels.dtype, np.integer):
        raise DistillError(
            f"{where}: 1-D labels must be integers, got dtype {labels.dtype}")
      if n and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise DistillError(
            f"{where}: hard labels must lie in [0, 2**31), "
            f"got [{labels.min()}, {labels.max()}]")
    elif labels.ndim == 2 and labels.shape[0] == n and labels.shape[1] > 0:
      _check_float(labels, "soft labels", where)
      _check_finite(labels, "labels", where)
    else:
      raise DistillError(
          f"{where}: labels must have shape ({n},) or ({n}, k), got {labels.shape}")

  for key in ("image_mean", "image_std"):
    arr = np.asarray(getattr(s, key))
    if arr.shape != (c,):
      raise DistillError(
          f"{where}: {key} must have shape ({c},) to match C, got {arr.shape}")
    _check_float(arr, key, where)
    _check_finite(arr, key, where)
  std = np.asarray(s.image_std)
  if np.any(std <= 0):
    raise DistillError(f"{where}: image_std must be positive, got {std.tolist()}")

  for key in ("method", "source", "teacher"):
    value = getattr(s, key)
    if not isinstance(value, str):
      raise DistillError(f"{where}: {key} must be a str, got {type(value).__name__}")
  if isinstance(s.step, bool) or not isinstance(s.step, (int, np.integer)) or s.step < 0:
    raise DistillError(f"{where}: step must be a non-negative int, got {s.step!r}")
  _to_json(s.config, "config", where)
  _to_json(s.extra, "extra", where)

  # Finiteness last: it reads every value, the shape checks above do not.
  _check_finite(images, "images", where)
  _check_finite(targets, "targets", where)


def validate(synthetic: SyntheticSet) -> None:
  """Raises `DistillError` unless `synthetic` can be saved and loaded intact."""
  _validate(synthetic, "synthetic set")


def _prepare_target(path, overwrite: bool) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    raise DistillError(f"{path}: is a directory, expected a file path")
  if not overwrite and os.path.exists(path):
    raise DistillError(f"{path}: already exists and overwrite=False")
  directory = os.path.dirname(path)
  if directory:
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as err:
      raise DistillError(
          f"{path}: cannot create parent directory ({one_line(err)})") from None
  return path


def save_synthetic(path: str, synthetic: SyntheticSet, *, overwrite: bool = True) -> str:
  """Validates `synthetic` and writes it atomically to `path` as an `.npz`.

  Float arrays of any precision are stored as float32 and hard labels as
  int32. Nothing is written if validation fails. `path` is used as given (no
  `.npz` suffix is added). `overwrite=False` checks for an existing file
  before writing, so it guards against mistakes, not against a concurrent
  writer.

  Returns:
    `path`.
  """
  path = os.fspath(path)
  _validate(synthetic, path)
  path = _prepare_target(path, overwrite)
  arrays = {
      "images": np.asarray(synthetic.images, np.float32),
      "targets": np.asarray(synthetic.targets, np.float32),
      "image_mean": np.asarray(synthetic.image_mean, np.float32),
      "image_std": np.asarray(synthetic.image_std, np.float32),
      "method": np.array(synthetic.method),
      "source": np.array(synthetic.source),
      "teacher": np.array(synthetic.teacher),
      "config": np.array(_to_json(synthetic.config, "config", path)),
      "extra": np.array(_to_json(synthetic.extra, "extra", path)),
      "version": np.array(synthetic.version),
      "step": np.array(int(synthetic.step), np.int64),
  }
  if synthetic.labels is not None:
    labels = np.asarray(synthetic.labels)
    arrays["labels"] = labels.astype(np.int32 if labels.ndim == 1 else np.float32)
  files.write_atomic(path, lambda f: np.savez(f, **arrays))
  return path


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array in the `.npz` at `path`, keyed by name."""
  if not os.path.exists(path):
    raise DistillError(f"{path}: no such file")
  if os.path.isdir(path):
    raise DistillError(f"{path}: is a directory, expected a .npz file")
  bad = f"{path} is not a valid .npz (truncated or corrupt)"
  try:
    f = open(path, "rb")
  except OSError as err:
    raise DistillError(f"{path}: cannot read ({one_line(err)})") from None
  # We own the handle: np.load leaks its own when the zip directory is bad.
  with f:
    # Sniff the magic first: np.load takes any non-zip, non-npy bytes for a
    # pickle and answers with a hint to load it unsafely.
    magic = f.read(6)
    if magic == b"\x93NUMPY":
      raise DistillError(f"{path}: holds a single .npy array, expected a .npz archive")
    if not magic.startswith(b"PK"):
      raise DistillError(f"{bad}: not a zip archive" + ("" if magic else " (empty file)"))
    f.seek(0)
    data, key = {}, None
    try:
      # Read every member now, so corruption surfaces here and not later.
      with np.load(f, allow_pickle=False) as npz:
        for key in npz.files:
          data[key] = npz[key]
    except Exception as err:  # zipfile, zlib and numpy raise many types here.
      member = "" if key is None else f"key {key!r}: "
      raise DistillError(f"{bad}: {member}{one_line(err)}") from None
  return data


def _scalar_str(data: dict, key: str, path: str) -> str:
  arr = data[key]
  if arr.ndim != 0 or arr.dtype.kind not in "US":
    raise DistillError(
        f"{path}: {key} must be a 0-d string array, "
        f"got dtype {arr.dtype} shape {arr.shape}")
  value = arr.item()
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _json_dict(data: dict, key: str, path: str) -> dict:
  text = _scalar_str(data, key, path)
  try:
    value = json.loads(text)
  except ValueError as err:
    raise DistillError(f"{path}: {key} is not valid JSON ({one_line(err)})") from None
  if not isinstance(value, dict):
    raise DistillError(f"{path}: {key} must be a JSON object, got {type(value).__name__}")
  return value


def load_synthetic(path: str) -> SyntheticSet:
  """Reads and validates a synthetic set written by `save_synthetic`.

  Unknown extra keys are ignored; float arrays are returned as float32 and
  hard labels as int32.

  Raises:
    DistillError: the file is missing, unreadable, or fails `validate`.
  """
  path = os.fspath(path)
  data = _read_npz(path)
  missing = [k for k in _REQUIRED_KEYS if k not in data]
  if missing:
    raise DistillError(
        f"{path}: missing required keys {missing} (has {sorted(data)})")
  # Version first: a newer format may legitimately differ in everything else.
  _check_version(_scalar_str(data, "version", path), path)
  step = data["step"]
  if step.ndim != 0 or step.dtype.kind not in "iu":
    raise DistillError(
        f"{path}: step must be a 0-d integer array, "
        f"got dtype {step.dtype} shape {step.shape}")

  labels = data.get("labels")
  synthetic = SyntheticSet(
      images=data["images"],
      targets=data["targets"],
      labels=labels,
      method=_scalar_str(data, "method", path),
      source=_scalar_str(data, "source", path),
      teacher=_scalar_str(data, "teacher", path),
      image_mean=data["image_mean"],
      image_std=data["image_std"],
      config=_json_dict(data, "config", path),
      step=int(step),
      extra=_json_dict(data, "extra", path) if "extra" in data else {},
      version=_scalar_str(data, "version", path),
  )
  _validate(synthetic, path)
  if labels is not None:
    labels = labels.astype(np.int32 if labels.ndim == 1 else np.float32, copy=False)
  return dataclasses.replace(
      synthetic,
      images=synthetic.images.astype(np.float32, copy=False),
      targets=synthetic.targets.astype(np.float32, copy=False),
      labels=labels,
      image_mean=synthetic.image_mean.astype(np.float32, copy=False),
      image_std=synthetic.image_std.astype(np.float32, copy=False),
  )


def _fmt(values) -> str:
  return "[" + ", ".join(f"{v:.4f}" for v in np.ravel(values)) + "]"


def summary(synthetic: SyntheticSet) -> str:
  """A multi-line human-readable description of a (valid) synthetic set."""
  images = np.asarray(synthetic.images, np.float64)
  n, h, w, c = images.shape
  mean = np.asarray(synthetic.image_mean, np.float64)
  std = np.asarray(synthetic.image_std, np.float64)
  pixels = images * std + mean  # Back to the [0, 1] scale of the raw data.
  outside = float(np.mean((pixels < 0) | (pixels > 1)))
  targets = np.asarray(synthetic.targets, np.float64)
  norms = np.linalg.norm(targets, axis=1)
  lines = [
      f"synthetic set: n={n} images of {h}x{w}x{c}, target dim d={targets.shape[1]}",
      f"method: {synthetic.method}  source: {synthetic.source}  "
      f"teacher: {synthetic.teacher}  step: {synthetic.step}  "
      f"version: {synthetic.version}",
      f"images in [0,1] scale: channel mean {_fmt(pixels.mean(axis=(0, 1, 2)))}, "
      f"channel std {_fmt(pixels.std(axis=(0, 1, 2)))}, "
      f"{100 * outside:.1f}% of values outside [0, 1]",
      f"target L2 norm: mean {norms.mean():.4f}, std {norms.std():.4f}, "
      f"min {norms.min():.4f}, max {norms.max():.4f}",
  ]
  labels = synthetic.labels
  if labels is None:
    lines.append("labels: none")
  else:
    labels = np.asarray(labels)
    if labels.ndim == 1:
      counts = np.bincount(labels.astype(np.int64))
      lines.append(
          f"labels: hard, {int((counts > 0).sum())} distinct classes in "
          f"[{labels.min()}, {labels.max()}], "
          f"per-class count {counts.min()}..{counts.max()}")
    else:
      k = labels.shape[1]
      covered = len(np.unique(labels.argmax(axis=1)))
      lines.append(
          f"labels: soft, k={k}, row sum mean {labels.sum(axis=1).mean():.4f}, "
          f"argmax covers {covered} of {k} classes")
  lines.append(f"config: {len(synthetic.config)} keys; extra: "
               f"{', '.join(sorted(synthetic.extra)) or 'none'}")
  return "\n".join(lines)


def image_grid(images01: np.ndarray, ncols: int | None = None,
               pad: int = 1) -> np.ndarray:
  """Tiles images into one RGB uint8 grid, row-major, padded in white.

  Args:
    images01: (n, H, W, C) floats in [0, 1], C in {1, 3}; values outside are
      clipped and NaN drawn black. Grey images are replicated to RGB.
    ncols: columns; default ceil(sqrt(n)). Capped at n.
    pad: pixels of padding between and around the images.

  Returns:
    (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8, rows = ceil(n / cols).
  """
  images = np.asarray(images01)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
    raise DistillError(
        f"image_grid: expected (n>0, H, W, C in {{1, 3}}) images, "
        f"got shape {images.shape}")
  if not np.issubdtype(images.dtype, np.floating):
    raise DistillError(
        f"image_grid: expected float images in [0, 1], got dtype {images.dtype}")
  if pad < 0 or (ncols is not None and ncols < 1):
    raise DistillError(
        f"image_grid: need pad >= 0 and ncols >= 1, got pad={pad} ncols={ncols}")
  n, h, w, c = images.shape
  cols = min(ncols or math.ceil(math.sqrt(n)), n)
  rows = math.ceil(n / cols)
  pixels = np.round(np.clip(np.nan_to_num(images.astype(np.float32)), 0, 1) * 255)
  pixels = pixels.astype(np.uint8)
  if c == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  shape = (rows * (h + pad) + pad, cols * (w + pad) + pad, 3)
  grid = np.full(shape, _GRID_PAD_VALUE, np.uint8)
  for i in range(n):
    top = pad + (i // cols) * (h + pad)
    left = pad + (i % cols) * (w + pad)
    grid[top:top + h, left:left + w] = pixels[i]
  return grid


def save_image_grid(path: str, images: np.ndarray, mean, std,
                    max_images: int = 100, scale: int = 2) -> str:
  """Writes the first `max_images` normalised images as an upscaled PNG grid.

  Args:
    path: output PNG path; parent directories are created.
    images: (n, H, W, C) in normalised space (x - mean) / std.
    mean: (C,) or scalar, [0, 1] scale.
    std: (C,) or scalar, [0, 1] scale.
    max_images: at most this many images are drawn.
    scale: integer nearest-neighbour upscaling, so 32px images stay visible.

  Returns:
    `path`.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise DistillError(
        f"{path}: images must be 4-D (n, H, W, C), got shape {images.shape}")
  c = images.shape[-1]
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  for name, arr in (("mean", mean), ("std", std)):
    if arr.shape not in ((), (c,)):
      raise DistillError(
          f"{path}: {name} must have shape ({c},) to match C, got {arr.shape}")
  if max_images < 1 or scale < 1:
    raise DistillError(
        f"{path}: need max_images >= 1 and scale >= 1, got {max_images}, {scale}")
  grid = image_grid(np.clip(images[:max_images] * std + mean, 0, 1))
  image = Image.fromarray(grid)  # (h, w, 3) uint8 is RGB.
  if scale > 1:
    size = (image.width * scale, image.height * scale)
    image = image.resize(size, Image.Resampling.NEAREST)
  path = _prepare_target(path, overwrite=True)
  files.write_atomic(path, lambda f: image.save(f, format="PNG"))
  return path


def inspect(path: str, png_path: str | None = None) -> str:
  """Loads a synthetic set, writes its image grid and returns its summary.

  Args:
    path: the `.npz` file.
    png_path: where to write the grid; default `<stem>_grid.png` beside it.

  Returns:
    `summary(...)` plus a final line naming the PNG.
  """
  path = os.fspath(path)
  synthetic = load_synthetic(path)
  if png_path is None:
    png_path = os.path.splitext(path)[0] + "_grid.png"
  save_image_grid(png_path, synthetic.images, synthetic.image_mean, synthetic.image_std)
  return f"{summary(synthetic)}\ngrid: {png_path}"


def image_shift(images: np.ndarray, initial: np.ndarray) -> dict:
  """How far learned images moved from their initialisation, both (n, H, W, C) normalised.

  Returns:
    {"rms": root-mean-square change per pixel (in units of the source's
    per-channel std), "relative": ||images - initial|| / ||initial||}.
  """
  diff = np.asarray(images, np.float64) - np.asarray(initial, np.float64)
  return {"rms": float(np.sqrt(np.mean(diff ** 2))),
          "relative": float(np.linalg.norm(diff) / max(np.linalg.norm(initial), 1e-12))}
