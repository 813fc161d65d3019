"""A few KRR-ST outer steps through `run_loop`, on whatever devices this process sees.

Run by tests/test_parallel.py in fresh processes (the device count is fixed
when JAX starts):

  python tests/parallel_worker.py OUT.npz WORKDIR [--split-synthetic] [--cache]
      [--process-id I --num-processes P --coordinator HOST:PORT]

Writes the learned synthetic set (process 0) to OUT.npz.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("workdir")
  parser.add_argument("--split-synthetic", action="store_true")
  parser.add_argument("--cache", action="store_true", help="teacher-view cache batches")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--process-id", type=int, default=-1)
  parser.add_argument("--num-processes", type=int, default=0)
  parser.add_argument("--coordinator", default="")
  args = parser.parse_args()

  from distill.nn import parallel
  parallel.initialize(args.coordinator, args.num_processes, args.process_id)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from distill.config import base_config
  from distill.methods import teacher_views
  from distill.methods.krr_st import KRRST, split_along_n
  from distill.nn.loop import batch_indices, run_loop
  from distill.nn.models import build_model, init_model

  shape = (8, 8, 3)
  cfg = base_config().krr_st
  with cfg.unlocked():
    cfg.update(dict(num_synthetic=8, steps=args.steps, batch_size=16, lr_images=1e-2,
                    lr_targets=1e-2, reg=1e-3, reg_scaling="trace_over_n"))
    cfg.pool.update(dict(size=2, max_age=4, lr=0.01))
    # Batch norm: its batch statistics over the split synthetic set must be
    # reduced across devices to match one device.
    cfg.pool.arch.update(dict(width=8, depth=2, widths=(), norm="batch"))
  teacher = build_model(dict(name="convnet", width=4, depth=2))
  teacher_vars = init_model(teacher, jax.random.key(7), shape)
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  method = KRRST(cfg, shape, 16, teacher, mean=mean, std=std)
  r = np.random.default_rng(0)
  source = r.integers(0, 256, size=(64, *shape)).astype(np.uint8)
  x0 = (source[:8] / 255.0 - 0.5) / 0.25
  y0 = jax.jit(teacher.apply)(teacher_vars, jnp.asarray(x0, jnp.float32))[0]
  state = method.init(jax.random.key(0), x0, y0)
  if args.split_synthetic:
    state = split_along_n(state)
  views = teacher_views.view_table(0, len(source), 3)
  represent = teacher_views.represent_views_fn(teacher, "features")
  targets = np.stack([np.asarray(represent(teacher_vars, source, views[:, v], mean, std))
                      for v in range(3)], 1)

  def batch_fn(i):
    idx = batch_indices(0, i, len(source), cfg.batch_size)
    if args.cache:
      return teacher_views.cached_real_batch(source, views, targets, idx,
                                             teacher_views.draw_views(0, i, len(idx), 3))
    return source[idx]

  state, _ = run_loop(name="krr_st", workdir=args.workdir, state=state,
                      step_fn=lambda s, b, k: method.step(s, b, k, teacher_vars),
                      batch_fn=batch_fn, num_steps=args.steps, rng=jax.random.key(2),
                      log_every=2, checkpoint_every=3, quiet=True)
  learned = parallel.to_host(state["synthetic"])
  if parallel.is_main_process():
    np.savez(args.out, devices=jax.device_count(), processes=jax.process_count(),
             split=bool(args.split_synthetic and
                        not state["synthetic"]["images"].sharding.is_fully_replicated),
             **learned)


if __name__ == "__main__":
  main()
