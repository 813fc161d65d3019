"""InfoBatch: unbiased dynamic data pruning for any training loop.

Each sample keeps the score (loss) it had the last time it was trained on.
Before every epoch, `plan_epoch` drops at random a fraction `prune_ratio`
(r) of the samples whose last score is below the mean of the seen scores
(one Bernoulli draw per sample: O(1) each, no sorting) and gives the kept
below-mean samples the loss weight 1 / (1 - r), so the expected weighted sum
of per-sample gradients over an epoch equals the full-data sum. From epoch
`anneal_start = int(delta * num_epochs)` on, every sample is used with
weight 1 (annealing: the last epochs see the unbiased full objective).

Scores start at +inf ("unseen"): an unseen sample is never below the mean,
and the mean is taken over seen samples only, so nothing is pruned before
a score exists; when all scores are equal none is strictly below the mean.

Learning-rate schedules when the epoch length changes: the number of
optimiser steps of a pruned run depends on the scores, so it is not known
ahead of time. This module takes the *progress* route: the learning rate at
a step is the ordinary full-data schedule evaluated at the same fraction of
the run, measured in epochs (`epoch_progress`, `progress_schedule`), so
warm-up and decay end exactly where they would without pruning.
`full_data_steps` is the step count the schedule is defined on, and
`expected_steps` estimates a pruned run's length ahead of time (for ETAs and
budgets) from an assumed share of below-mean samples.

`run_epochs` runs any jitted step that takes (indices, weights, progress)
in its batch and scatters per-sample scores into `state["scores"]`.
`barlow_twins.train_infobatch` wires it to Barlow Twins training (see
`barlow_twins.weighted_barlow_twins_loss` for the per-sample score it uses),
`transfer.finetune` to fine-tuning (`finetune.infobatch`; the score is the
sample's cross-entropy) and `experts.train_expert` to expert training
(`experts.infobatch`; the sample's CE or MSE).
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distill import files
from distill.errors import DistillError
from distill.nn.loop import Checkpointer, log, run_loop


class EpochPlan(NamedTuple):
  """What one epoch trains on.

  Attributes:
    indices: (M,) int64 ids of the kept samples, in random order.
    weights: (M,) float32 loss weight of each kept sample (1 or 1 / (1 - r)).
    num_pruned: how many of the N samples this epoch skips.
  """
  indices: np.ndarray
  weights: np.ndarray
  num_pruned: int


def init_scores(num_samples: int) -> jax.Array:
  """(N,) float32 scores, all +inf (unseen)."""
  return jnp.full((num_samples,), jnp.inf, jnp.float32)


def anneal_start(num_epochs: int, delta: float) -> int:
  """First epoch trained on the full data with weights 1."""
  return int(delta * num_epochs)


@jax.jit
def prune_mask(scores: jax.Array, key: jax.Array, prune_ratio: float):
  """One pruning draw.

  Args:
    scores: (N,) last scores, +inf for unseen samples.
    key: PRNG key. prune_ratio: r in [0, 1).

  Returns:
    (keep (N,) bool, weights (N,) float32): a below-mean sample is dropped
    with probability r and weighted 1 / (1 - r) when kept; others weigh 1.
  """
  seen = jnp.isfinite(scores)
  floor = jnp.min(jnp.where(seen, scores, jnp.inf))
  # The mean as floor + mean excess: equal scores give exactly their value,
  # so rounding can never put a sample "below the mean" of equal scores.
  excess = jnp.where(seen, scores - floor, 0.0)
  mean = floor + jnp.sum(excess) / jnp.maximum(jnp.sum(seen), 1)
  below = seen & (scores < mean)
  drop = below & jax.random.bernoulli(key, prune_ratio, scores.shape)
  weights = jnp.where(below, 1.0 / (1.0 - prune_ratio), 1.0).astype(jnp.float32)
  return ~drop, weights


def plan_epoch(scores: jax.Array, epoch: int, key: jax.Array, *, num_epochs: int,
               prune_ratio: float, delta: float) -> EpochPlan:
  """The kept samples and their loss weights for `epoch`.

  Args:
    scores: (N,) last per-sample scores (`init_scores`, then `update`).
    epoch: 0-based epoch; folded into `key`, so one base key serves a run.
    key: base PRNG key. num_epochs: epochs of the run.
    prune_ratio: r in [0, 1). delta: share of epochs that may prune.

  Returns:
    EpochPlan; from `anneal_start(num_epochs, delta)` on, all samples, weights 1.
  """
  if not 0.0 <= prune_ratio < 1.0:
    raise DistillError(f"infobatch prune_ratio must be in [0, 1), got {prune_ratio}")
  if not 0.0 <= delta <= 1.0:
    raise DistillError(f"infobatch delta must be in [0, 1], got {delta}")
  key_prune, key_order = jax.random.split(jax.random.fold_in(key, epoch))
  n = scores.shape[0]
  if epoch < anneal_start(num_epochs, delta) and prune_ratio > 0:
    keep, weights = jax.device_get(prune_mask(scores, key_prune, prune_ratio))
  else:
    keep, weights = np.ones(n, bool), np.ones(n, np.float32)
  # Shuffle all N and filter: one permutation shape per run, no recompiles.
  perm = np.asarray(jax.random.permutation(key_order, n))
  order = perm[np.asarray(keep)[perm]]
  return EpochPlan(order.astype(np.int64), np.asarray(weights, np.float32)[order],
                   int(n - len(order)))


@jax.jit
def update(scores: jax.Array, indices: jax.Array, new_scores: jax.Array) -> jax.Array:
  """Scatters the (B,) scores just seen for samples `indices` into (N,) `scores`."""
  return scores.at[indices].set(new_scores.astype(scores.dtype))


def epoch_batches(plan: EpochPlan, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Full batches of (indices (B,), weights (B,)); the ragged tail is dropped.

  Dropping the tail keeps one compiled step shape, as the unpruned loop does
  (`loop.batch_indices`). An epoch with fewer than B kept samples cycles them
  into one batch.
  """
  m = len(plan.indices)
  if m < batch_size:
    take = np.resize(np.arange(m), batch_size)
    return [(plan.indices[take], plan.weights[take])]
  return [(plan.indices[i:i + batch_size], plan.weights[i:i + batch_size])
          for i in range(0, m - batch_size + 1, batch_size)]


def skipped_fraction(plans: list[EpochPlan], num_samples: int) -> float:
  """Realised share of sample-visits skipped: sum of num_pruned / (epochs * N)."""
  if not plans:
    return 0.0
  return sum(p.num_pruned for p in plans) / (len(plans) * num_samples)


def full_data_steps(num_samples: int, batch_size: int, num_epochs: int) -> int:
  """Optimiser steps of the unpruned run (what schedules are defined on)."""
  return num_epochs * max(num_samples // batch_size, 1)


def expected_steps(num_samples: int, batch_size: int, num_epochs: int, prune_ratio: float,
                   delta: float, below_mean_share: float = 0.5) -> int:
  """Expected optimiser steps of a pruned run, assuming `below_mean_share` of the
  samples sit below the mean score in every pruning epoch (after the first,
  which has no scores yet). An estimate for ETAs; the schedule does not use it.
  """
  pruning_epochs = max(anneal_start(num_epochs, delta) - 1, 0)
  kept = num_samples * (1.0 - prune_ratio * below_mean_share)
  steps_pruned = max(int(kept) // batch_size, 1)
  return (full_data_steps(num_samples, batch_size, num_epochs - pruning_epochs)
          + pruning_epochs * steps_pruned)


def epoch_progress(epoch: int, step_in_epoch: int, steps_in_epoch: int,
                   num_epochs: int) -> float:
  """Fraction of the run done before this step, in epochs: in [0, 1)."""
  return (epoch + step_in_epoch / max(steps_in_epoch, 1)) / num_epochs


def progress_schedule(schedule, full_steps: int):
  """`progress -> lr`: the full-data `schedule(step)` at step progress * full_steps."""
  return lambda progress: schedule(progress * full_steps)


def with_learning_rate(opt_state, lr):
  """`opt_state` of an `optax.inject_hyperparams` optimizer with its lr set to `lr`."""
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})


def run_epochs(*, name: str, workdir: str, state: dict, step_fn, make_batch,
               num_samples: int, batch_size: int, num_epochs: int, prune_ratio: float,
               delta: float, seed: int, quiet: bool = False):
  """Runs `num_epochs` InfoBatch epochs of any training step; resumable.

  Each epoch is planned from `state["scores"]` (`plan_epoch`), cut into full
  batches (`epoch_batches`) and run by one `run_loop` call that checkpoints at
  its end. The plans are logged to `workdir/name/plans.json` before an epoch
  runs, so a killed run resumes after the last finished epoch and replays the
  same plans.

  Args:
    name, workdir: job name and directory (as `loop.run_loop`).
    state: pytree holding "scores" (N,) (`init_scores`); `step_fn` must
      scatter each batch's per-sample scores into it (`update`).
    step_fn: `(state, batch, rng) -> (state, metrics)`.
    make_batch: `(indices (B,) int, weights (B,) float32, progress float,
      epoch_end int) -> batch`; progress (`epoch_progress`) drives the
      learning rate, epoch_end is the 1-based number of the epoch the step
      finishes and 0 on every other step (for per-epoch snapshots).
    num_samples, batch_size, num_epochs: the full-data run.
    prune_ratio, delta: InfoBatch's r and annealing share.
    seed: plans and step keys derive from it.
    quiet: no per-epoch lines.

  Returns:
    (state, per-epoch records {epoch, start, steps, kept, pruned}, history of
    the last epoch's metrics).
  """
  job_dir = os.path.join(workdir, name)
  os.makedirs(job_dir, exist_ok=True)
  plans_path = os.path.join(job_dir, "plans.json")
  done = Checkpointer(os.path.join(job_dir, "ckpt")).latest_step() or 0
  records = files.read_json(plans_path, [])
  finished = [r for r in records if r["start"] + r["steps"] <= done]
  if sum(r["steps"] for r in finished) != done:
    raise DistillError(f"{plans_path} does not match the checkpoint at step {done}; "
                       f"remove {job_dir} to start over")
  if done:
    state = Checkpointer(os.path.join(job_dir, "ckpt")).restore(done, state)
    if not quiet:
      log(f"[{name}] resumed after epoch {len(finished)} (step {done})")
  plan_key, step_key = jax.random.key(seed + 3), jax.random.key(seed + 1)
  history, t0 = [], time.perf_counter()
  for epoch in range(len(finished), num_epochs):
    plan = plan_epoch(state["scores"], epoch, plan_key, num_epochs=num_epochs,
                      prune_ratio=prune_ratio, delta=delta)
    batches = epoch_batches(plan, batch_size)
    finished.append(dict(epoch=epoch, start=done, steps=len(batches),
                         kept=len(plan.indices), pruned=plan.num_pruned))
    files.write_json(plans_path, finished)

    def batch_fn(i, start=done, batches=batches, epoch=epoch):
      idx, w = batches[i - start]
      last = i - start == len(batches) - 1
      return make_batch(idx, w, epoch_progress(epoch, i - start, len(batches), num_epochs),
                        epoch + 1 if last else 0)

    # log_every past the end: one metrics record per epoch, the epoch's mean.
    end = done + len(batches)
    state, history = run_loop(name=name, workdir=workdir, state=state, step_fn=step_fn,
                              batch_fn=batch_fn, num_steps=end, rng=step_key,
                              log_every=end + 1, checkpoint_every=0, quiet=True)
    done = end
    if not quiet:
      log(f"[{name}] epoch {epoch + 1}/{num_epochs}  loss {history[-1]['loss']:.4g}  "
          f"kept {len(plan.indices)}/{num_samples}  steps {len(batches)}  "
          f"{time.perf_counter() - t0:.0f}s")
  return state, finished, history


def pruning_report(records: list[dict], num_samples: int, batch_size: int,
                   num_epochs: int) -> dict:
  """Steps taken vs the full-data run and the realised skipped share."""
  steps, full = sum(r["steps"] for r in records), full_data_steps(num_samples, batch_size,
                                                                  num_epochs)
  return dict(steps=steps, full_data_steps=full, step_fraction=steps / full,
              skipped_fraction=sum(r["pruned"] for r in records) / (num_epochs * num_samples),
              pruned_per_epoch=[r["pruned"] for r in records])
