r"""Benchmark of the KRR-ST outer step: speed, memory, and the ridge solve's share.

For each synthetic-set size n it builds the real jitted outer step (pool of
ConvNets, random teacher of the same architecture, 32x32x3 source batch)
and prints:
  * compile seconds and outer steps/s (median of timed steps after warm-up);
  * memory: XLA's compiled footprint of the step (arguments + temporaries,
    from `memory_analysis()`), the device's peak bytes where the backend
    reports it (GPU), and the process's peak resident set size;
  * solve share: the time of the ridge part alone (Gram matrices, Cholesky,
    triangular solves, predictions and their backward pass, same shapes and
    form) divided by the full step time.

Usage (CPU, the figures in experiments/results/benchmark_krr_st_cpu.md):
  python experiments/benchmark_krr_st.py --sizes 100 1000 --width 32 \
      --out experiments/results/benchmark_krr_st_cpu.md
On a GPU, the same command with --width 128 (the paper's pool) is the
interesting one.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from distill.config import base_config
from distill.methods.krr_st import KRRST
from distill.nn.models import build_model, init_model
from kernels.ridge import krr_predict


def _time(fn, repeats: int) -> float:
  """Median wall seconds of `fn()` (which must block on its result)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_size(n: int, width: int, batch: int, pool_size: int, form: str, repeats: int,
               image: int = 32) -> dict:
  cfg = base_config().krr_st
  with cfg.unlocked():
    cfg.update(dict(num_synthetic=n, batch_size=batch, steps=1000, ridge_form=form,
                    reg=1e-6, reg_scaling="trace"))
    cfg.pool.update(dict(size=pool_size, max_age=10**6, init_age="zero"))
    cfg.pool.arch.update(dict(width=width, depth=3, widths=(), norm="instance"))
  shape = (image, image, 3)
  teacher = build_model(dict(name="convnet", width=width, depth=3))
  teacher_vars = init_model(teacher, jax.random.key(1), shape)
  dim = width * (image // 8) ** 2
  method = KRRST(cfg, shape, dim, teacher, mean=[0.5] * 3, std=[0.25] * 3)
  r = np.random.default_rng(0)
  images = jnp.asarray(r.normal(size=(n, *shape)), jnp.float32)
  targets = jnp.asarray(r.normal(size=(n, dim)), jnp.float32)
  state = method.init(jax.random.key(0), images, targets)
  real = jnp.asarray(r.integers(0, 256, size=(batch, *shape), dtype=np.uint8))

  t0 = time.perf_counter()
  compiled = method.step.lower(state, real, jax.random.key(0), teacher_vars).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  footprint = None
  if mem is not None:
    footprint = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes)

  holder = {"state": state, "i": 0}

  def one_step():
    holder["i"] += 1
    holder["state"], m = method.step(holder["state"], real, jax.random.key(holder["i"]),
                                     teacher_vars)
    jax.block_until_ready(m)

  one_step()  # warm-up
  step_s = _time(one_step, repeats)

  # The ridge part alone, at the same shapes, forward and backward.
  p = dim + 1
  phi_s = jnp.asarray(r.normal(size=(n, p)), jnp.float32)
  phi_t = jnp.asarray(r.normal(size=(batch, p)), jnp.float32)
  target = jnp.asarray(r.normal(size=(batch, dim)), jnp.float32)
  targets = jnp.asarray(r.normal(size=(n, dim)), jnp.float32)  # the first was donated
  solve = jax.jit(jax.value_and_grad(
      lambda a, y: jnp.mean((target - krr_predict(a, y, phi_t, 1e-6, scaling="trace",
                                                  form=form)[0]) ** 2), argnums=(0, 1)))
  jax.block_until_ready(solve(phi_s, targets))
  solve_s = _time(lambda: jax.block_until_ready(solve(phi_s, targets)), repeats)

  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  peak_device = stats.get("peak_bytes_in_use") if stats else None
  used_form = form if form != "auto" else ("dual" if n <= p else "primal")
  return dict(n=n, form=used_form, feature_dim=p, compile_s=compile_s,
              steps_per_s=1.0 / step_s, step_ms=1e3 * step_s, solve_ms=1e3 * solve_s,
              solve_share=solve_s / step_s, footprint_mib=footprint and footprint / 2**20,
              device_peak_mib=peak_device and peak_device / 2**20,
              rss_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
  parser.add_argument("--width", type=int, default=32, help="pool/teacher ConvNet width")
  parser.add_argument("--batch", type=int, default=256, help="real images per outer step")
  parser.add_argument("--pool", type=int, default=4, help="pool size")
  parser.add_argument("--forms", nargs="+", default=["auto"], help="auto | dual | primal")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None, help="also write the table to this markdown file")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  header = (f"KRR-ST outer step, 32x32x3 source, ConvNet width {args.width} depth 3 "
            f"(pool of {args.pool}), real batch {args.batch}; backend {device.platform} "
            f"({device.device_kind}), {os.cpu_count()} CPU cores, jax {jax.__version__}, "
            f"{platform.python_version()}")
  lines = [header, "",
           "| n | ridge form | p+1 | compile s | steps/s | step ms | solve ms | solve share "
           "| step footprint MiB | device peak MiB | process peak RSS MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  print(header, flush=True)
  for n in args.sizes:
    for form in args.forms:
      row = bench_size(n, args.width, args.batch, args.pool, form, args.repeats)
      fmt = lambda v: "-" if v is None else f"{v:.0f}"
      lines.append(f"| {row['n']} | {row['form']} | {row['feature_dim']} | {row['compile_s']:.1f} "
                   f"| {row['steps_per_s']:.2f} | {row['step_ms']:.0f} | {row['solve_ms']:.1f} "
                   f"| {100 * row['solve_share']:.1f}% | {fmt(row['footprint_mib'])} "
                   f"| {fmt(row['device_peak_mib'])} | {fmt(row['rss_peak_mib'])} |")
      print(lines[-1], flush=True)
  command = "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:]))
  text = "\n".join(lines + ["", f"Command: `{command}`", ""])
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
