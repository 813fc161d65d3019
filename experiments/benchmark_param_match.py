r"""Benchmark of the parameter-matching outer step: time and memory against N.

For each number of unrolled student steps N, each `param_match.unroll`
(student steps per iteration of the compiled loop; 0 = the backend's
automatic choice, all N on the CPU), with and without remat
(`jax.checkpoint` per student step), it builds the real jitted IADD outer
step (ConvNet student, per-parameter importance weights, 32x32x3 synthetic
images, crop + flip) and reports:
  * compile seconds and the step time (median of timed steps after a warm-up);
  * memory: XLA's temporary bytes of the compiled step (`memory_analysis()`,
    the part that grows with N x syn_batch), its whole footprint (arguments +
    outputs + temporaries - aliased), the device's peak bytes where the
    backend reports them (GPU), and the peak resident set size of the process.
Each configuration runs in its own subprocess, so every peak RSS is its own.

Usage (CPU, the figures in experiments/results/benchmark_param_match_cpu.md):
  python experiments/benchmark_param_match.py --syn-steps 5 20 --unroll 1 0 --width 32 \
      --n 1000 --syn-batch 100 --repeats 2 --out experiments/results/benchmark_param_match_cpu.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def bench_one(syn_steps: int, remat: bool, unroll: int, width: int, depth: int, n: int, syn_batch: int,
              repeats: int, image: int = 32, num_classes: int = 10) -> dict:
  """Compiles and times one configuration in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from distill.config import base_config
  from distill.methods.param_match import ParamMatch, initial_soft_labels, scan_unroll
  from distill.nn.models import ConvNet

  config = base_config()
  cfg = config.param_match
  with cfg.unlocked():
    # alpha_init 0 means "the experts' lr" in the stage; here there are no
    # experts, so the CE experts' default lr stands in (timing does not depend on it).
    cfg.update(dict(method="iadd", granularity="parameter", syn_steps=syn_steps,
                    syn_batch=syn_batch, remat=remat, unroll=unroll, augment=True,
                    alpha_init=float(config.experts.lr_ce)))
  model = ConvNet(width=width, depth=depth, num_outputs=num_classes)
  method = ParamMatch(cfg, model, "ce")
  r = np.random.default_rng(0)
  images = r.normal(size=(n, image, image, 3)).astype(np.float32)
  state = method.init(jax.random.key(0), images,
                      initial_soft_labels(np.arange(n) % num_classes, num_classes))
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1])["params"]
  start = jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape) * 0.05, p.dtype), shapes)
  target = jax.tree.map(lambda p: p + 0.01 * jnp.asarray(r.normal(size=p.shape), p.dtype),
                        start)
  batch = (start, target)

  t0 = time.perf_counter()
  compiled = method.step.lower(method, state, batch, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = footprint = None
  if mem is not None:
    temp = mem.temp_size_in_bytes
    footprint = (mem.argument_size_in_bytes + mem.output_size_in_bytes + temp
                 - mem.alias_size_in_bytes)

  holder = {"state": state}

  def one_step(i):
    holder["state"], metrics = method.step(holder["state"], batch, jax.random.key(i))
    jax.block_until_ready(metrics)

  one_step(0)  # warm-up (and the dispatch-path compile)
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    one_step(i + 1)
    times.append(time.perf_counter() - t0)
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  num_params = sum(p.size for p in jax.tree.leaves(shapes))
  return dict(syn_steps=syn_steps, remat=remat, unroll=scan_unroll(cfg), num_params=int(num_params),
              compile_s=compile_s, step_s=statistics.median(times),
              temp_mib=temp and temp / 2**20, footprint_mib=footprint and footprint / 2**20,
              device_peak_mib=stats and stats.get("peak_bytes_in_use", 0) / 2**20 or None,
              rss_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              backend=f"{device.platform} ({device.device_kind})", jax=jax.__version__)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--syn-steps", type=int, nargs="+", default=[10, 20, 40],
                      help="numbers N of unrolled student steps")
  parser.add_argument("--width", type=int, default=32, help="ConvNet width")
  parser.add_argument("--depth", type=int, default=3, help="ConvNet depth")
  parser.add_argument("--n", type=int, default=100, help="synthetic images")
  parser.add_argument("--syn-batch", type=int, default=50, help="images per student step")
  parser.add_argument("--unroll", type=int, nargs="+", default=[1, 0],
                      help="param_match.unroll values (0: automatic, all N on the CPU)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="also write the table to this markdown file")
  parser.add_argument("--single", nargs=3, metavar=("N", "REMAT", "UNROLL"), default=None,
                      help=argparse.SUPPRESS)  # one configuration, JSON on stdout
  args = parser.parse_args(argv)
  settings = dict(width=args.width, depth=args.depth, n=args.n, syn_batch=args.syn_batch,
                  repeats=args.repeats)
  if args.single:
    row = bench_one(int(args.single[0]), args.single[1] == "1", int(args.single[2]),
                    **settings)
    print("RESULT " + json.dumps(row), flush=True)
    return 0

  rows = []
  for syn_steps, unroll, remat in itertools.product(args.syn_steps, args.unroll, (False, True)):
    command = [sys.executable, os.path.abspath(__file__), "--single", str(syn_steps),
               str(int(remat)), str(unroll), "--width", str(args.width),
               "--depth", str(args.depth), "--n", str(args.n), "--syn-batch", str(args.syn_batch),
               "--repeats", str(args.repeats)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows.append(json.loads(out.split("RESULT ", 1)[1]))
    row = rows[-1]
    print(f"N={syn_steps} unroll={row['unroll']} remat={remat}: step {row['step_s']:.2f} s, "
          f"temp {row['temp_mib']:.0f} MiB, peak RSS {row['rss_peak_mib']:.0f} MiB", flush=True)

  first = rows[0]
  header = (f"IADD outer step (per-parameter W, {first['num_params']} parameters): ConvNet "
            f"width {args.width} depth {args.depth}, n={args.n} synthetic 32x32x3 images, "
            f"syn_batch {args.syn_batch}, crop+flip; backend {first['backend']}, "
            f"{os.cpu_count()} CPU cores, jax {first['jax']}, Python "
            f"{platform.python_version()}")
  fmt = lambda v, spec=".0f": "-" if v is None else format(v, spec)
  lines = [header, "",
           "| N | unroll | remat | compile s | step s | XLA temp MiB | step footprint MiB "
           "| device peak MiB | process peak RSS MiB |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['syn_steps']} | {row['unroll']} | {'yes' if row['remat'] else 'no'} "
                 f"| {row['compile_s']:.1f} | {row['step_s']:.2f} | {fmt(row['temp_mib'], '.1f')} "
                 f"| {fmt(row['footprint_mib'], '.1f')} | {fmt(row['device_peak_mib'])} "
                 f"| {fmt(row['rss_peak_mib'])} |")
  command = "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:]))
  text = "\n".join(lines + ["", f"Command: `{command}`", ""])
  print(text, flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
