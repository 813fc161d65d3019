"""The one training loop: progress, checkpoints, resume, finiteness checks.

Every long job (teacher, KRR-ST, pretraining) is `run_loop` over a pure
`step_fn(state, batch, rng) -> (state, metrics)`. Batches and per-step keys
are functions of the step number alone, so a run killed at any point and
resumed from its last checkpoint continues exactly as if uninterrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from distill import files
from distill.errors import DistillError
from distill.nn import parallel


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
  """Indices of the batch at `step` of a seeded, epoch-wise shuffle.

  Args:
    seed: shuffle seed. step: global step. n: dataset size.
    batch_size: batch size; if >= n every batch is the whole (shuffled) set.

  Returns:
    (min(batch_size, n),) int64 indices; a pure function of its arguments.
  """
  if batch_size >= n:
    return np.random.default_rng([seed, step]).permutation(n)
  steps_per_epoch = n // batch_size  # drop the ragged last batch
  epoch, i = divmod(step, steps_per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[i * batch_size:(i + 1) * batch_size]


def _format_time(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


class Checkpointer:
  """Keeps the last few checkpoints of a pytree state under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> Any:
    abstract = jax.tree.map(np.asarray, parallel.to_host(like))
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))


def run_loop(*, name: str, workdir: str, state: Any,
             step_fn: Callable[[Any, Any, jax.Array], tuple[Any, dict]],
             batch_fn: Callable[[int], Any], num_steps: int, rng: jax.Array,
             log_every: int = 100, checkpoint_every: int = 1000,
             hint: str = "lower the learning rate or raise the regularisation",
             quiet: bool = False) -> tuple[Any, list[dict]]:
  """Runs `num_steps` steps with progress, checkpoints and resume.

  Args:
    name: job name; checkpoints in `workdir/name/ckpt`, metrics in
      `workdir/name/metrics.jsonl` and as TensorBoard scalars in
      `workdir/name/tensorboard/` (`tensorboard --logdir <workdir>` shows
      every job of a workdir).
    workdir: job directory.
    state: initial state pytree (arrays only; used as the restore template).
    step_fn: `(state, batch, rng) -> (state, metrics)`, usually jitted.
    batch_fn: `step -> batch`, deterministic in `step`.
    num_steps: total steps of the job (not of this call).
    rng: base key; step `i` gets `fold_in(rng, i)`.
    log_every: steps between progress lines and metric records (each
      record holds the mean of the metrics over those steps).
    checkpoint_every: steps between checkpoints (0: only at the end).
    hint: what to change when a step goes bad (ends the error message).
    quiet: no progress lines.

  Every step's metrics are checked (on the device, without waiting for the
  step): a non-finite `loss`, or a `solve_ok` below 1 (a ridge solve that
  failed even with jitter), marks the step bad. The first bad step is
  reported at the next log point or checkpoint, whichever comes first, and
  no checkpoint is ever written after it: a resumed run restarts from a
  healthy state.

  Returns:
    (final state, list of the logged metric dicts of this job).

  Raises:
    DistillError: a bad step (see above).
  """
  job_dir = os.path.join(workdir, name)
  os.makedirs(job_dir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(job_dir, "ckpt"))
  metrics_path = os.path.join(job_dir, "metrics.jsonl")
  start = ckpt.latest_step() or 0
  history = _read_history(metrics_path, upto=start)
  main = parallel.is_main_process()  # the one process that prints and writes records
  quiet = quiet or not main
  placed = state
  if start:
    state = ckpt.restore(start, state)
    if not quiet:
      print(f"[{name}] resumed from step {start}/{num_steps}", flush=True)
  # Several devices: the state on all of them (leaves a stage placed otherwise,
  # e.g. a synthetic set split along n, keep that placement), each batch split.
  state = parallel.place_like(state, placed)
  # Drop records past the checkpoint (they will be logged again); atomic, so a
  # kill here cannot lose the records before it.
  if main:
    files.write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
  # purge_step: TensorBoard drops the events past the checkpoint, as the
  # metrics file above does, so a resumed curve has no doubled stretch. The
  # suffix (the start step) keeps a resume within the same second from
  # overwriting the earlier file, and orders the files as TensorBoard reads them.
  board = SummaryWriter(os.path.join(job_dir, "tensorboard"),
                        purge_step=start + 1 if start else None,
                        filename_suffix=f".from{start:010d}") if main else None
  with contextlib.closing(board) if main else contextlib.nullcontext():
    last_saved = start
    t_last, s_last, t_start = time.perf_counter(), start, time.perf_counter()
    fold_in = jax.jit(jax.random.fold_in)  # eager, it would dispatch op by op each step
    accumulate = jax.jit(lambda total, m: jax.tree.map(jnp.add, total, m))
    window, window_len = None, 0
    first_bad = jnp.int32(-1)  # first bad step (1-based), kept on the device
    for step in range(start, num_steps):
      state, metrics = step_fn(state, parallel.shard_batch(batch_fn(step)),
                               fold_in(rng, step))
      # Logged metrics are means over the steps since the last record (summed
      # on the device, so the loop never waits on a step to finish).
      window = metrics if window is None else accumulate(window, metrics)
      window_len += 1
      done = step + 1
      first_bad = _mark_bad(first_bad, metrics, done)
      log_now = done % log_every == 0 or done == num_steps
      save_now = (checkpoint_every and done % checkpoint_every == 0) or done == num_steps
      if log_now or save_now:
        _raise_if_bad(int(parallel.to_host(first_bad)), metrics, name, last_saved, job_dir,
                      hint)
      if log_now:
        record = {k: float(v) / window_len for k, v in parallel.to_host(window).items()}
        window, window_len = None, 0
        now = time.perf_counter()
        record.update(step=done, steps_per_s=(done - s_last) / max(now - t_last, 1e-9),
                      elapsed_s=now - t_start)
        t_last, s_last = now, done
        history.append(record)
        if main:
          with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
          for key, value in record.items():
            if key != "step":
              board.add_scalar(key, value, done)
        if not quiet:
          eta = (num_steps - done) / max(record["steps_per_s"], 1e-9)
          shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                            if k not in ("step", "steps_per_s", "elapsed_s"))
          print(f"[{name}] step {done}/{num_steps}  {shown}  "
                f"{record['steps_per_s']:.2f} steps/s  ETA {_format_time(eta)}", flush=True)
      if save_now:
        ckpt.save(done, state)
        last_saved = done
    return state, history


@jax.jit
def _mark_bad(first_bad: jax.Array, metrics: dict, step: int) -> jax.Array:
  """`step` if it is the first whose loss is not finite or whose solve failed."""
  bad = jnp.zeros((), bool)
  if "loss" in metrics:
    bad |= ~jnp.isfinite(metrics["loss"])
  if "solve_ok" in metrics:
    bad |= ~(metrics["solve_ok"] >= 1)
  return jnp.where((first_bad < 0) & bad, jnp.int32(step), first_bad)


def _raise_if_bad(first_bad: int, metrics: dict, name: str, last_saved: int,
                  job_dir: str, hint: str) -> None:
  if first_bad < 0:
    return
  solve = "solve_ok" in metrics
  raise DistillError(
      f"[{name}] step {first_bad} went bad (loss not finite"
      f"{' or ridge solve failed even with jitter' if solve else ''}); nothing after it was "
      f"saved: the last checkpoint is step {last_saved} in {job_dir}; {hint}")


def _read_history(path: str, upto: int) -> list[dict]:
  """Metric records of an earlier run, up to the step it is resumed from."""
  if not upto or not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        break  # a line cut by a kill
      if record.get("step", 0) <= upto:
        records.append(record)
  return records


def log(message: str) -> None:
  print(message, file=sys.stdout, flush=True)
