"""The teacher-view cache of a workdir (`teacher.views` = V > 0).

    <workdir>/teacher_views_v<V>/views.npy      (N, V, 3) uint8 view table
    <workdir>/teacher_views_v<V>/targets.npy    (N, V, d) float16 (memory-mapped)
    <workdir>/teacher_views_v<V>/progress.json  chunks done (while building)
    <workdir>/teacher_views_v<V>/card.json      shapes, dtype, bytes, seconds

Built once, on first use by KRR-ST or the knowledge-distillation experts, in
chunks of images: a killed build resumes at the first unfinished chunk (a
chunk's rows are flushed to disk before it is counted as done). The
cache belongs to the workdir's teacher and source, which a workdir never
changes (`prepare_workdir`).
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from distill import files
from distill.errors import DistillError
from distill.methods import teacher_views
from distill.nn import parallel
from distill.nn.loop import log

DTYPES = ("float16", "float32")


class ViewCache(NamedTuple):
  """A built cache: `batch(idx, view_ids)` reads one real batch."""
  images: np.ndarray       # (N, H, W, C) uint8, the source
  views: np.ndarray        # (N, V, 3) uint8
  targets: np.ndarray      # (N, V, d) memory map
  card: dict

  @property
  def num_views(self) -> int:
    return self.views.shape[1]

  def batch(self, idx: np.ndarray, view_ids: np.ndarray) -> dict:
    return teacher_views.cached_real_batch(self.images, self.views, self.targets, idx, view_ids)


def cache_dir(workdir: str, num_views: int) -> str:
  return os.path.join(workdir, f"teacher_views_v{num_views}")


def workdir_views(config, workdir: str, source, teacher, chunk: int = 1000) -> ViewCache | None:
  """The workdir's teacher-view cache, built (or resumed) first if needed.

  Args:
    config: the full config (`teacher.views`, `teacher.views_dtype`, `seed`).
    workdir: the job directory. source: the source dataset (uint8 images).
    teacher: the workdir's `Teacher`.
    chunk: images per unit of work (and of resumption).

  Returns:
    The cache, or None when `teacher.views` is 0 (the teacher runs at every step).
  """
  num_views, dtype = int(config.teacher.views), config.teacher.views_dtype
  if num_views == 0:
    return None
  if num_views < 0:
    raise DistillError(f"teacher.views must be >= 0 (0 = no cache), got {num_views}")
  if dtype not in DTYPES:
    raise DistillError(f"unknown teacher.views_dtype {dtype!r}; expected one of {DTYPES}")
  directory = cache_dir(workdir, num_views)
  images = source.images
  n = len(images)
  card_path = os.path.join(directory, "card.json")
  if not os.path.exists(card_path):
    # One writer; the other processes of a multi-host run wait for it (the
    # workdir is on a filesystem they share, as for checkpoints).
    if parallel.is_main_process():
      build(directory, images, teacher, num_views, config.seed, dtype, chunk)
    parallel.barrier(f"teacher_views_v{num_views}")
  card = files.read_json(card_path, None)
  if card["num_images"] != n or card["dim"] != teacher.dim:
    raise DistillError(f"{directory} holds {card['num_images']} images of dim {card['dim']}; "
                       f"the source has {n} and the teacher dim {teacher.dim}: it was made "
                       f"with other data settings; delete it to rebuild")
  return ViewCache(images, np.load(os.path.join(directory, "views.npy")),
                   np.load(os.path.join(directory, "targets.npy"), mmap_mode="r"), card)


def build(directory: str, images: np.ndarray, teacher, num_views: int, seed: int,
          dtype: str = "float16", chunk: int = 1000) -> None:
  """Computes the cache into `directory`; resumable at chunk granularity.

  Args:
    directory: the cache folder (created).
    images: (N, H, W, C) uint8 source. teacher: a `Teacher`.
    num_views: V. seed: the view table's seed. dtype: storage dtype.
    chunk: images per unit of work.
  """
  n = len(images)
  os.makedirs(directory, exist_ok=True)
  views_path = os.path.join(directory, "views.npy")
  targets_path = os.path.join(directory, "targets.npy")
  progress_path = os.path.join(directory, "progress.json")
  shape = [n, num_views, teacher.dim]
  progress = files.read_json(progress_path, None)
  if progress is not None and (progress["shape"] != shape or progress["dtype"] != dtype
                               or progress["chunk"] != chunk or progress["seed"] != seed):
    raise DistillError(f"{directory} was started with other settings ({progress}); "
                       f"delete it to rebuild")
  if progress is None:
    table = teacher_views.view_table(seed, n, num_views)
    files.write_atomic(views_path, lambda f: np.save(f, table))
    np.lib.format.open_memmap(targets_path, mode="w+", dtype=dtype, shape=tuple(shape)).flush()
    progress = dict(shape=shape, dtype=dtype, chunk=chunk, seed=seed, done=0, seconds=0.0)
    files.write_json(progress_path, progress)
  table = np.load(views_path)
  targets = np.load(targets_path, mmap_mode="r+")
  represent = teacher_views.represent_views_fn(teacher.model, teacher.representation)
  mean, std = jnp.asarray(teacher.mean, jnp.float32), jnp.asarray(teacher.std, jnp.float32)
  num_chunks = -(-n // chunk)
  if progress["done"]:
    log(f"[teacher_views] resuming at chunk {progress['done'] + 1}/{num_chunks}")
  t0, seconds_before, first = time.perf_counter(), progress["seconds"], progress["done"]
  for c in range(first, num_chunks):
    lo, hi = c * chunk, min((c + 1) * chunk, n)
    for v in range(num_views):
      out = represent(teacher.variables, images[lo:hi], table[lo:hi, v], mean, std)
      targets[lo:hi, v] = np.asarray(out).astype(dtype)
    targets.flush()
    elapsed = time.perf_counter() - t0
    progress.update(done=c + 1, seconds=seconds_before + elapsed)
    files.write_json(progress_path, progress)
    speed = (hi - first * chunk) * num_views / max(elapsed, 1e-9)
    eta = (n - hi) * num_views / max(speed, 1e-9)
    log(f"[teacher_views] {hi}/{n} images x {num_views} views  "
        f"{speed:.0f} views/s  ETA {eta:.0f}s")
  del targets
  card = dict(num_images=n, num_views=num_views, dim=teacher.dim, dtype=dtype, seed=seed,
              bytes=int(np.prod(shape)) * np.dtype(dtype).itemsize,
              seconds=progress["seconds"], views_per_second=n * num_views / max(
                  progress["seconds"], 1e-9))
  files.write_json(os.path.join(directory, "card.json"), card)
  os.remove(progress_path)
  log(f"[teacher_views] {n} x {num_views} teacher views ({card['bytes'] / 2**20:.0f} MiB "
      f"{dtype}) in {card['seconds']:.0f}s -> {directory}")
