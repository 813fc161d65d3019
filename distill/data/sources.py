"""The format readers behind `distill.data.datasets.load_dataset`.

Each reader turns one kind of source into an `ArrayDataset`:

  * IDX files (`find_idx`, `load_idx`), plain or gzipped;
  * image folders (`list_folder`, `folder_key`, `decode_folder`) and tar
    archives read member by member (`decode_archive`), decoded in chunks by
    forked worker processes;
  * `.npz` files (`load_npz`);
  * TFDS datasets (`load_tfds`).

`resolve` picks the reader a source name calls for and says whether its
decoded content is worth caching; `ArrayDataset`, what every reader returns,
is defined here. Caching decoded folders and archives, and the format rules
the readers follow, are described in `distill.data.datasets`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import itertools
import multiprocessing
import os
import posixpath
import re
import tarfile
import warnings
import zipfile
import zlib
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from distill.errors import DistillError, one_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# Images per decoding task; large enough to amortise inter-process transfer.
_CHUNK_SIZE = 1024
# PIL modes that decode to one grey channel; every other mode becomes RGB.
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_IDX_RE = re.compile(
    r"^(?P<prefix>.+)-(?P<kind>images|labels)[-.]idx\d-ubyte(\.gz)?$")
# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
               0x0D: ">f4", 0x0E: ">f8"}
_IDX_SPLIT_PREFIXES = {"test": ("t10k",)}


# eq=False: numpy arrays have no single truth value, so field-wise == would
# raise; datasets compare (and hash) by identity instead.
@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """A labelled (or unlabelled) image dataset held in memory.

  Attributes:
    images: (N, H, W, C) uint8, C in {1, 3}.
    labels: (N,) int32 class indices, or None when the source has none.
    name: human-readable source name, e.g. "cifar10-jpg.tar.gz:test".
    class_names: names of the classes, indexed by label, when known.
  """

  images: np.ndarray
  labels: np.ndarray | None
  name: str
  class_names: tuple[str, ...] | None = None

  def __post_init__(self):
    check_images(self.images, f"dataset {self.name!r}")
    if self.labels is not None:
      labels = self.labels
      if (not isinstance(labels, np.ndarray) or labels.ndim != 1
          or not np.issubdtype(labels.dtype, np.integer)):
        raise DistillError(
            f"dataset {self.name!r}: labels must be a 1-D integer array, got "
            f"{_describe(labels)}")
      if len(labels) != len(self.images):
        raise DistillError(
            f"dataset {self.name!r}: {len(self.images)} images but "
            f"{len(labels)} labels")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_classes(self) -> int | None:
    """Number of classes: from `class_names`, else max label + 1."""
    if self.class_names is not None:
      return len(self.class_names)
    if self.labels is None or len(self.labels) == 0:
      return None
    return int(self.labels.max()) + 1


# ---------------------------------------------------------------------- IDX


class Resolved(NamedTuple):
  """How to read one split of a dataset named by the user.

  Attributes:
    read: `() -> ArrayDataset`, decoding the split.
    path: the expanded path (or the TFDS name).
    cache_key: what identifies the decoded content (path, kind, sizes,
      mtimes) for a source slow to decode (folders, archives); None for one
      read directly (IDX, .npz, TFDS).
  """
  read: Callable[[], "ArrayDataset"]
  path: str
  cache_key: tuple | None = None


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def resolve(source: str, split: str, data_dir: str | None) -> Resolved:
  """Which reader a source name calls for (see `datasets.load_dataset` for the order).

  Raises:
    DistillError: a path that does not exist, an unsupported file, an
      unreadable folder.
  """
  if source.startswith("tfds:"):
    name = source[len("tfds:"):]
    return Resolved(lambda: load_tfds(name, split, data_dir), name)
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    try:
      idx = find_idx(path, split)
      if idx is not None:
        return Resolved(lambda: load_idx(path, split, *idx), path)
      listing = list_folder(path, split)
      key = (os.path.abspath(path), "folder", *folder_key(path, listing))
    except OSError as e:
      raise DistillError(f"cannot read dataset folder {path}: {one_line(e)}") from e
    return Resolved(lambda: decode_folder(path, split, listing), path, key)
  if os.path.isfile(path):
    lower = path.lower()
    if lower.endswith(ARCHIVE_SUFFIXES):
      st = os.stat(path)
      key = (os.path.abspath(path), "archive", st.st_size, st.st_mtime_ns)
      return Resolved(lambda: decode_archive(path, split), path, key)
    if lower.endswith(".npz"):
      return Resolved(lambda: load_npz(path, split), path)
    raise DistillError(f"unsupported dataset file {path}: expected a folder, .npz, .tar, "
                       ".tar.gz or .tgz")
  if _looks_like_path(source):
    hint = ""
    if not source.startswith(("/", ".", "~")) and source.count("/") == 1:
      hint = f" (for a TFDS name with a config write tfds:{source})"
    raise DistillError(f"dataset path does not exist: {path}{hint}")
  return Resolved(lambda: load_tfds(source, split, data_dir), source)


def _looks_like_path(source: str) -> bool:
  seps = [os.sep] + ([os.altsep] if os.altsep else [])
  return (any(s in source for s in seps) or source.startswith(("~", "."))
          or source.lower().endswith((".npz",) + ARCHIVE_SUFFIXES))


def find_idx(path: str, split: str) -> tuple[str, str | None] | None:
  """Finds the IDX image (and label) files of `split` in directory `path`.

  Returns:
    None when the directory holds no IDX files at all, else the paths of the
    images file and of the labels file (None when absent).
  """
  found = {}  # (prefix, kind) -> file name
  for name in sorted(os.listdir(path)):
    m = _IDX_RE.match(name)
    if m:
      found.setdefault((m["prefix"], m["kind"]), name)
  if not found:
    return None
  prefixes = _IDX_SPLIT_PREFIXES.get(split, ()) + (split,)
  for prefix in prefixes:
    if (prefix, "images") in found:
      labels = found.get((prefix, "labels"))
      return (os.path.join(path, found[(prefix, "images")]),
              None if labels is None else os.path.join(path, labels))
  available = sorted({p for p, kind in found if kind == "images"})
  raise DistillError(
      f"no IDX images for split {split!r} in {path}: looked for prefix "
      f"{' or '.join(prefixes)}, found {_names(available)}")


def load_idx(path: str, split: str, images_file: str,
             labels_file: str | None) -> ArrayDataset:
  """Reads one split from the IDX files that `find_idx` found in `path`."""
  images = _read_idx(images_file)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise DistillError(
        f"IDX images {images_file}: expected uint8 (N, H, W) or (N, H, W, C), "
        f"got {_describe(images)}")
  labels = None
  if labels_file is not None:
    labels = _read_idx(labels_file)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise DistillError(
          f"IDX labels {labels_file}: expected 1-D integers, got "
          f"{_describe(labels)}")
    if len(labels) != len(images):
      raise DistillError(
          f"IDX labels {labels_file} has {len(labels)} entries but "
          f"{images_file} has {len(images)} images")
    labels = labels.astype(np.int32)
  if len(images) == 0:
    raise DistillError(f"no images for split {split!r} in {images_file}")
  return ArrayDataset(images=images, labels=labels,
                      name=f"{basename(path)}:{split}")


def _read_idx(filename: str) -> np.ndarray:
  """Parses one IDX file (optionally gzipped) into a native-endian array."""
  try:
    if filename.endswith(".gz"):
      with gzip.open(filename, "rb") as f:
        raw = f.read()
    else:
      with open(filename, "rb") as f:
        raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DistillError(
        f"cannot read IDX file {filename}: {one_line(e)}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DistillError(
        f"not an IDX file: {filename} (bad magic number {raw[:4].hex()})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise DistillError(f"IDX file {filename} has a truncated header")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  expected = header + int(np.prod(dims)) * dtype.itemsize
  if len(raw) != expected:
    raise DistillError(
        f"IDX file {filename} has {len(raw)} bytes but its header {dims} "
        f"needs {expected}")
  data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
  return data.astype(dtype.newbyteorder("="))


# --------------------------------------------------------- folders, archives


def list_folder(path: str, split: str) -> list[tuple[str, str]]:
  """Lists (class name, file path) pairs of one split of an image folder."""
  root = os.path.join(path, split)
  if not os.path.isdir(root):
    root = path
  subdirs = sorted(d for d in os.listdir(root)
                   if not _hidden(d) and os.path.isdir(os.path.join(root, d)))
  files = []
  for cls in subdirs:
    cls_dir = os.path.join(root, cls)
    for name in sorted(os.listdir(cls_dir)):
      full = os.path.join(cls_dir, name)
      if _is_image_name(name) and os.path.isfile(full):
        files.append((cls, full))
  if not files:
    found = (f"found subfolders {_names(subdirs)} without such files" if subdirs else
             "the folder is empty" if not os.listdir(root) else
             f"found no subfolders, only {_names(sorted(os.listdir(root)))}")
    raise DistillError(
        f"no images for split {split!r} in {root}: expected class subfolders "
        f"of {'/'.join(IMAGE_EXTENSIONS)} files; {found}")
  return files


def folder_key(path: str, files: list[tuple[str, str]]) -> tuple:
  """What a folder's cache key depends on besides its path and the split.

  The cache itself lives in `distill.data`, which hashes these parts into
  the key; a change to any file name, size or mtime changes them.

  Args:
    path: the dataset folder.
    files: its (class name, file path) pairs, as from `list_folder`.

  Returns:
    (number of files, total size in bytes, newest mtime in ns, SHA-256 hex
    digest of the file paths relative to `path`).
  """
  names = hashlib.sha256()
  size = newest = 0
  for _, f in files:
    st = os.stat(f)
    size += st.st_size
    newest = max(newest, st.st_mtime_ns)
    names.update(os.path.relpath(f, path).encode("utf-8", "surrogateescape"))
    names.update(b"\0")
  return len(files), size, newest, names.hexdigest()


def decode_folder(path: str, split: str,
                  files: list[tuple[str, str]]) -> ArrayDataset:
  """Decodes the images that `list_folder` found for `split` in `path`."""
  items = [(cls, f, f) for cls, f in files]
  chunks = (items[i:i + _CHUNK_SIZE] for i in range(0, len(items), _CHUNK_SIZE))
  return _assemble(_map_chunks(_decode_chunk, chunks),
                   f"{basename(path)}:{split}")


def decode_archive(path: str, split: str) -> ArrayDataset:
  """Decodes one split of a tar archive, reading members in one stream."""
  return _assemble(_map_chunks(_decode_chunk, _archive_chunks(path, split)),
                   f"{basename(path)}:{split}")


def _archive_chunks(path: str, split: str) -> Iterator[list]:
  """Yields chunks of (class, name, bytes) for one split of an archive.

  A generator, so that workers decode earlier chunks while later members
  are still being read. Members under `<split>/<class>/` (optionally below
  one top-level folder) are found in one streaming pass; only when there is
  no such folder is the archive read again for the flat `<class>/` layout
  (at its root or under one top folder), mirroring the folder rule.
  """
  names = []  # every image member, as path components
  roots = set()  # folders holding the split's class folders
  chunk = []
  try:
    # Stream mode: one sequential read, no seeks inside the compressed data.
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        parts = _member_parts(member)
        if parts is None:
          continue
        names.append(parts)
        if ((len(parts) == 3 and parts[0] == split)
            or (len(parts) == 4 and parts[1] == split)):
          roots.add("/".join(parts[:-2]))
          chunk.append((parts[-2], f"{path}:{member.name}",
                        _read_member(tar, member)))
          if len(chunk) == _CHUNK_SIZE:
            yield chunk
            chunk = []
    if not roots:
      root = _flat_archive_root(path, split, names)
      with tarfile.open(path, "r|*") as tar:
        for member in tar:
          parts = _member_parts(member)
          if parts is not None and parts[:-2] == root:
            chunk.append((parts[-2], f"{path}:{member.name}",
                          _read_member(tar, member)))
            if len(chunk) == _CHUNK_SIZE:
              yield chunk
              chunk = []
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DistillError(f"cannot read archive {path}: {one_line(e)}") from e
  if len(roots) > 1:
    raise DistillError(
        f"archive {path} has several folders for split {split!r}: "
        f"{_names(roots)}")
  if chunk:
    yield chunk


def _member_parts(member: tarfile.TarInfo) -> tuple[str, ...] | None:
  """Path components of an image member; None for anything else."""
  if not member.isfile():
    return None
  parts = tuple(p for p in posixpath.normpath(member.name).split("/")
                if p not in ("", "."))
  if (len(parts) < 2 or not _is_image_name(parts[-1])
      or any(_hidden(p) for p in parts)):
    return None
  return parts


def _flat_archive_root(path: str, split: str,
                       names: list[tuple[str, ...]]) -> tuple[str, ...]:
  """Folder of an archive without split folders that holds class folders."""
  depths = {len(p) for p in names}
  if depths == {2}:
    return ()
  tops = {p[0] for p in names}
  if depths == {3} and len(tops) == 1:
    return (tops.pop(),)
  raise DistillError(
      f"no images for split {split!r} in archive {path}: expected "
      f"[top/]{split}/<class>/<image>, found top-level entries {_names(tops)}")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
  f = tar.extractfile(member)
  assert f is not None  # regular files always have a stream
  return f.read()


def _decode_image(data: bytes | str, name: str) -> tuple[np.ndarray, str]:
  """Decodes one image file to (H, W, C) uint8 and its original PIL mode."""
  source = io.BytesIO(data) if isinstance(data, bytes) else data
  try:
    with Image.open(source) as im:
      mode = im.mode
      im = im.convert("L" if mode in _GREY_MODES else "RGB")
      arr = np.asarray(im)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DistillError(f"cannot decode image {name}: {one_line(e)}") from e
  return (arr[..., None] if arr.ndim == 2 else arr), mode


def _decode_chunk(items: Sequence[tuple[str, str, bytes | str]]) -> list:
  """(class, name, bytes or path) items -> (class, name, image, mode)."""
  return [(cls, name, *_decode_image(data, name)) for cls, name, data in items]


def _num_workers() -> int:
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:
    cpus = os.cpu_count() or 1
  # One core stays with the parent, which reads files and archive members.
  return min(cpus - 1, 16)


def _map_chunks(fn: Callable[[list], list], chunks: Iterable[list]) -> list:
  """Concatenated `fn(chunk)` over chunks, in worker processes if worthwhile.

  Chunks are submitted as they are produced, so decoding overlaps with
  reading an archive. Workers are forked: they only run PIL and numpy, never
  JAX or TF, so the parent's threads do not matter to them, and unlike
  "spawn" this does not re-run the caller's main script. If the pool breaks,
  the chunks are decoded in this process instead.
  """
  chunks = iter(chunks)
  head = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
  if (len(head) < 2 or _num_workers() < 1
      or "fork" not in multiprocessing.get_all_start_methods()):
    return [r for c in itertools.chain(head, chunks) for r in fn(c)]
  submitted = []
  pool = concurrent.futures.ProcessPoolExecutor(
      _num_workers(), mp_context=multiprocessing.get_context("fork"))
  try:
    futures = []
    with warnings.catch_warnings():
      # JAX warns on every fork once it runs, since a child using JAX could
      # deadlock; these children never touch JAX.
      warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
      for c in itertools.chain(head, chunks):
        submitted.append(c)
        futures.append(pool.submit(fn, c))
    return [r for f in futures for r in f.result()]
  except concurrent.futures.BrokenExecutor:
    return [r for c in itertools.chain(submitted, chunks) for r in fn(c)]
  finally:
    # On an error (say, a corrupt image) do not decode the rest in vain.
    pool.shutdown(wait=True, cancel_futures=True)


def _assemble(decoded: list[tuple[str, str, np.ndarray, str]],
              name: str) -> ArrayDataset:
  """Stacks decoded images in (class, file) order, checking their formats.

  Args:
    decoded: (class name, file name, (H, W, C) uint8 image, PIL mode).
    name: the dataset name.
  """
  if not decoded:
    raise DistillError(f"no images in {name}")
  decoded.sort(key=lambda d: (d[0], d[1]))
  _, ref_file, ref_arr, ref_mode = decoded[0]
  for _, file, arr, mode in decoded:
    if arr.shape != ref_arr.shape:
      h, w, c = arr.shape
      rh, rw, rc = ref_arr.shape
      raise DistillError(
          f"images differ in size or channels: {file} is {w}x{h} {mode} "
          f"({c} channels) but {ref_file} is {rw}x{rh} {ref_mode} ({rc} "
          "channels); convert them to one format first")
  class_names = tuple(sorted({d[0] for d in decoded}))
  index = {c: i for i, c in enumerate(class_names)}
  labels = np.array([index[d[0]] for d in decoded], np.int32)
  images = np.stack([d[2] for d in decoded])
  return ArrayDataset(images=images, labels=labels, name=name,
                      class_names=class_names)


# ---------------------------------------------------------------------- npz


def load_npz(path: str, split: str) -> ArrayDataset:
  """Reads one split of an `.npz` file (see `_npz_keys` for the layouts)."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      keys = list(npz.keys())
      ikey, lkey = _npz_keys(path, split, keys)
      images = npz[ikey]
      labels = npz[lkey] if lkey in keys else None
      class_names = (tuple(str(c) for c in npz["class_names"])
                     if "class_names" in keys else None)
  except DistillError:
    raise
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile,
          zlib.error) as e:
    raise DistillError(
        f"cannot read npz file {path}: {one_line(e)}"
    ) from e
  images = _npz_images(path, ikey, images)
  if labels is not None:
    if labels.ndim == 2 and labels.shape[1] == 1:
      labels = labels[:, 0]  # Keras-style (N, 1) labels
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise DistillError(
          f"npz file {path}: {lkey!r} must be (N,) integers, got "
          f"{_describe(labels)}")
    if len(labels) != len(images):
      raise DistillError(
          f"npz file {path}: {len(images)} images but {len(labels)} labels")
    labels = labels.astype(np.int32)
  if len(images) == 0:
    raise DistillError(f"no images for split {split!r} in {path}")
  return ArrayDataset(images=images, labels=labels,
                      name=f"{basename(path)}:{split}",
                      class_names=class_names)


def _npz_keys(path: str, split: str, keys: list[str]) -> tuple[str, str]:
  if f"x_{split}" in keys:
    return f"x_{split}", f"y_{split}"
  if "images" in keys:
    return "images", "labels"
  raise DistillError(
      f"npz file {path} has no 'images' or 'x_{split}' array (keys: "
      f"{_names(keys)})")


def _npz_images(path: str, key: str, images: np.ndarray) -> np.ndarray:
  """Validates npz images and converts them to (N, H, W, C) uint8."""
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DistillError(
        f"npz file {path}: {key!r} must be (N, H, W, C) with C in {{1, 3}} or "
        f"(N, H, W), got shape {images.shape}")
  if images.dtype == np.uint8 or images.size == 0:
    return images.astype(np.uint8, copy=False)
  if np.issubdtype(images.dtype, np.floating):
    if not np.isfinite(images).all():
      raise DistillError(f"npz file {path}: {key!r} contains NaN or Inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
      raise DistillError(
          f"npz file {path}: float {key!r} must lie in [0, 1], got "
          f"[{lo:g}, {hi:g}]")
    return np.rint(images * 255.0).astype(np.uint8)
  if np.issubdtype(images.dtype, np.integer):
    lo, hi = int(images.min()), int(images.max())
    if lo < 0 or hi > 255:
      raise DistillError(
          f"npz file {path}: integer {key!r} must lie in [0, 255], got "
          f"[{lo}, {hi}]")
    return images.astype(np.uint8)
  raise DistillError(
      f"npz file {path}: {key!r} must be uint8 or float in [0, 1], got "
      f"{images.dtype}")


# --------------------------------------------------------------------- TFDS


def load_tfds(name: str, split: str, data_dir: str | None) -> ArrayDataset:
  """Loads a TFDS split as numpy, without letting TF take the GPU."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DistillError(
        f"TFDS dataset {name!r} needs tensorflow and tensorflow-datasets: "
        f"{one_line(e)}") from e
  try:
    # JAX owns the accelerator; TF only needs the CPU to read records.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # TF is already initialised; its devices were chosen earlier.
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    ds, info = tfds.load(name, split=split, as_supervised=False,
                         with_info=True, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DistillError(
        f"cannot load TFDS dataset {name!r} split {split!r}: "
        f"{one_line(e)}") from e
  spec = ds.element_spec
  if not isinstance(spec, dict) or "image" not in spec:
    keys = list(spec) if isinstance(spec, dict) else []
    raise DistillError(
        f"TFDS dataset {name!r} has no 'image' feature (features: "
        f"{_names(keys)})")
  img_spec = spec["image"]
  if img_spec.dtype != tf.uint8:
    raise DistillError(
        f"TFDS dataset {name!r}: images must be uint8, got "
        f"{img_spec.dtype.name}")
  label_spec = spec.get("label")
  has_label = (label_spec is not None and label_spec.shape.rank == 0
               and label_spec.dtype.is_integer)
  keep = ("image", "label") if has_label else ("image",)
  ds = ds.map(lambda ex: {k: ex[k] for k in keep})
  # batch_size=-1 in tfds.load pads variable-size images to a common size and
  # reserves sys.maxsize rows when the split size is unknown; batching
  # ourselves keeps sizes honest (one at a time when they may vary).
  fixed = img_spec.shape.is_fully_defined()
  images, labels = [], []
  try:
    for batch in tfds.as_numpy(ds.batch(_CHUNK_SIZE if fixed else 1)):
      img = batch["image"]
      if images and img.shape[1:] != images[0].shape[1:]:
        raise DistillError(
            f"TFDS dataset {name!r} split {split!r} has images of size "
            f"{img.shape[1:]} and {images[0].shape[1:]}; pick a fixed-size "
            "config")
      images.append(img)
      if has_label:
        labels.append(batch["label"])
  except DistillError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DistillError(
        f"cannot read TFDS dataset {name!r} split {split!r}: "
        f"{one_line(e)}") from e
  if not images:
    raise DistillError(
        f"no images for split {split!r} in TFDS dataset {name!r}")
  images = np.concatenate(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DistillError(
        f"TFDS dataset {name!r}: expected (H, W, 1) or (H, W, 3) images, got "
        f"{images.shape[1:]}")
  class_names = None
  label_feature = info.features["label"] if has_label else None
  if getattr(label_feature, "names", None):
    class_names = tuple(label_feature.names)
  return ArrayDataset(
      images=images,
      labels=np.concatenate(labels).astype(np.int32) if has_label else None,
      name=f"{name}:{split}", class_names=class_names)


# ---------------------------------------------------------------- utilities


def check_images(images, what: str) -> None:
  """Raises unless `images` is (N, H, W, C) uint8 with C in {1, 3}."""
  if (not isinstance(images, np.ndarray) or images.ndim != 4
      or images.dtype != np.uint8 or images.shape[-1] not in (1, 3)):
    raise DistillError(
        f"{what}: expected (N, H, W, C) uint8 with C in {{1, 3}}, got "
        f"{_describe(images)}")


def _describe(x) -> str:
  if isinstance(x, np.ndarray):
    return f"{x.dtype} array of shape {x.shape}"
  return type(x).__name__


def _names(names: Iterable[str], limit: int = 12) -> str:
  names = sorted(names)
  if not names:
    return "(none)"
  more = f", ... ({len(names)} in all)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def basename(path: str) -> str:
  """The last component of `path`, also when it ends in a separator."""
  return os.path.basename(os.path.normpath(os.path.abspath(path)))


def _hidden(name: str) -> bool:
  # Dot files and macOS archive junk ("._x.jpg", "__MACOSX/") are not data.
  return name.startswith(".") or name == "__MACOSX"


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)
