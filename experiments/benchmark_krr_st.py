r"""Benchmark of the KRR-ST outer step: speed, multiply-adds per second, memory.

For each synthetic-set size n it builds the real jitted outer step (the
`KRRST.step` the stage runs: teacher on the real batch or a teacher-view
cache batch, pool member features of real and synthetic images, ridge solve,
outer gradient and Adam update, inner step and age/reset of the pool model)
and prints:
  * compile seconds, and the median step time over timed steps after warm-up;
  * multiply-adds per step (XLA's cost analysis of the compiled step,
    flops / 2) and the achieved rate, so the per-MAC speed stands beside
    other implementations'; on a GPU, the share of the device's peak;
  * memory: XLA's footprint of the compiled step (arguments + outputs +
    temporaries), the device's peak bytes where the backend reports it (GPU),
    and the process's peak resident set size;
  * with --cache both, the step with the teacher running and with cached
    teacher views (the teacher's forward pass replaced by reading targets).

Presets (each states the shapes it measures):
  --preset official   The official PyTorch KRR-ST's shapes on a CPU: 32x32x3,
                      real batch 256, ResNet-18 (width 64, CIFAR stem) teacher
                      in eval mode, the paper's pool of 10 ConvNets
                      128-256-512 with batch norm, T = 1000, n = 100 and 1000,
                      with and without the cache. Official step times measured
                      on the same 2-core CPU are printed beside: 2.65 s at
                      n = 100, 13.9 s at n = 1000.
  --preset sweep      Memory and step time against n = 100 ... 10,000 with the
                      synthetic set split along n over forced CPU devices
                      (--cpu-devices, default 4), the CPU-scale pool
                      (width-32 instance-norm ConvNet), cached views.
  --preset gpu        The paper's shapes on one GPU: batch 1024, n = 1000 and
                      10,000, cached views, float32 and bfloat16 convolutions;
                      prints the share of the device's peak and the hours
                      160,000 outer steps take (experiments/benchmark_krr_st_gpu.sh).

Usage (the figures in experiments/results/benchmark_krr_st_cpu.md):
  python experiments/benchmark_krr_st.py --preset official \
      --out experiments/results/benchmark_krr_st_cpu.md
  python experiments/benchmark_krr_st.py --preset sweep --append \
      --out experiments/results/benchmark_krr_st_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

# Peak dense FLOP/s by device kind (float32 via TF32 tensor cores, which XLA
# uses for float32 convolutions by default on these GPUs; bfloat16).
PEAK_TFLOPS = {"H200": {"float32": 494.7, "bfloat16": 989.4},
               "H100": {"float32": 494.7, "bfloat16": 989.4},
               "A100": {"float32": 156.0, "bfloat16": 312.0}}

# The official implementation on this project's 2-core CPU, seconds per outer step.
OFFICIAL_CPU_S = {100: 2.65, 1000: 13.9}

PRESETS = {
    "official": dict(sizes=[100, 1000], batch=256, teacher="resnet18", teacher_width=64,
                     pool=10, pool_widths=(128, 256, 512), pool_norm="batch", max_age=1000,
                     cache="both", dtypes=["float32"], split=False),
    "sweep": dict(sizes=[100, 1000, 3000, 10000], batch=256, teacher="resnet18",
                  teacher_width=64, pool=10, pool_widths=(32, 32, 32), pool_norm="instance",
                  max_age=1000, cache="on", dtypes=["float32"], split=True),
    "gpu": dict(sizes=[1000, 10000], batch=1024, teacher="resnet18", teacher_width=64, pool=10,
                pool_widths=(128, 256, 512), pool_norm="batch", max_age=1000, cache="on",
                dtypes=["float32", "bfloat16"], split=False),
}


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="official")
  parser.add_argument("--sizes", type=int, nargs="+", help="synthetic-set sizes n")
  parser.add_argument("--batch", type=int, help="real images per outer step")
  parser.add_argument("--cache", choices=["off", "on", "both"], help="teacher-view cache")
  parser.add_argument("--dtypes", nargs="+", help="pool compute dtypes")
  parser.add_argument("--cpu-devices", type=int, default=0,
                      help="force this many CPU devices (sweep preset: 4)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="also write the table to this markdown file")
  parser.add_argument("--append", action="store_true", help="append to --out")
  args = parser.parse_args(argv)
  settings = dict(PRESETS[args.preset])
  for key in ("sizes", "batch", "cache", "dtypes"):
    if getattr(args, key) is not None:
      settings[key] = getattr(args, key)
  if args.preset == "sweep" and not args.cpu_devices:
    args.cpu_devices = 4
  return args, settings


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench(n: int, settings: dict, cached: bool, dtype: str, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from distill.config import base_config
  from distill.methods.krr_st import KRRST, split_along_n
  from distill.nn import parallel
  from distill.nn.models import build_model, init_model

  cfg = base_config().krr_st
  with cfg.unlocked():
    cfg.update(dict(num_synthetic=n, batch_size=settings["batch"], steps=160_000,
                    compute_dtype=dtype))
    cfg.pool.update(dict(size=settings["pool"], max_age=settings["max_age"]))
    cfg.pool.arch.update(dict(widths=tuple(settings["pool_widths"]), norm=settings["pool_norm"]))
  shape = (32, 32, 3)
  teacher = build_model(dict(name=settings["teacher"], width=settings["teacher_width"],
                             depth=3))
  teacher_vars = init_model(teacher, jax.random.key(1), shape)
  dim = int(teacher.apply(teacher_vars, jnp.zeros((1, *shape)), train=False)[0].shape[-1])
  method = KRRST(cfg, shape, dim, teacher, mean=[0.5] * 3, std=[0.25] * 3)
  r = np.random.default_rng(0)
  images = r.normal(size=(n, *shape)).astype(np.float32)
  targets = r.normal(size=(n, dim)).astype(np.float32)
  # Fresh models (no warm-up): the step's cost does not depend on their ages.
  state = method.init(jax.random.key(0), images, targets, warm_up=False)
  if settings["split"]:
    state = split_along_n(state)
  state = parallel.place_like(state, state)
  batch = settings["batch"]
  real = r.integers(0, 256, size=(batch, *shape), dtype=np.uint8)
  if cached:
    views = np.tile(np.array([[4, 4, 0]], np.uint8), (batch, 1))
    real = {"images": real, "views": views,
            "targets": r.normal(size=(batch, dim)).astype(np.float16)}
  real = parallel.shard_batch(real)
  tv = None if cached else teacher_vars

  t0 = time.perf_counter()
  compiled = method.step.lower(state, real, jax.random.key(0), tv).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  macs = cost.get("flops", 0.0) / 2 if cost else None
  mem = compiled.memory_analysis()
  footprint = None
  if mem is not None:
    footprint = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  holder = {"state": state, "i": 0}

  def one_step():
    holder["i"] += 1
    holder["state"], m = method.step(holder["state"], real, jax.random.key(holder["i"]), tv)
    jax.block_until_ready(m)

  one_step()  # warm-up
  step_s = _median_seconds(one_step, repeats)
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  peak = stats.get("peak_bytes_in_use") if stats else None
  return dict(n=n, cached=cached, dtype=dtype, compile_s=compile_s, step_s=step_s, macs=macs,
              footprint_mib=footprint and footprint / 2**20, device_peak_mib=peak and peak / 2**20,
              rss_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              device=device)


def _peak_tflops(device, dtype):
  for kind, peaks in PEAK_TFLOPS.items():
    if kind in device.device_kind:
      return peaks[dtype]
  return None


def main(argv=None) -> int:
  args, settings = _parse(argv)
  if args.cpu_devices:
    # Must precede JAX's start-up.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
  import jax
  device = jax.devices()[0]
  pool = "-".join(map(str, settings["pool_widths"]))
  header = (f"KRR-ST outer step ({args.preset}): 32x32x3 source, real batch {settings['batch']}, "
            f"{settings['teacher']}-w{settings['teacher_width']} teacher, pool of "
            f"{settings['pool']} ConvNets {pool} ({settings['pool_norm']} norm), T = "
            f"{settings['max_age']}; {jax.device_count()} x {device.platform} "
            f"({device.device_kind}), {os.cpu_count()} CPU cores, jax {jax.__version__}, "
            f"Python {platform.python_version()}"
            + (", synthetic set split along n" if settings["split"] else ""))
  lines = [header, "",
           "| n | teacher views | dtype | compile s | step s | official step s | speed-up | "
           "GMAC/step | GMAC/s | peak share | step footprint MiB | device peak MiB "
           "| process peak RSS MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  print(header, flush=True)
  modes = {"off": [False], "on": [True], "both": [False, True]}[settings["cache"]]
  fmt = lambda v, spec=".0f": "-" if v is None else format(v, spec)
  for n in settings["sizes"]:
    for dtype in settings["dtypes"]:
      for cached in modes:
        row = bench(n, settings, cached, dtype, args.repeats)
        official = OFFICIAL_CPU_S.get(n) if (args.preset == "official"
                                             and device.platform == "cpu") else None
        rate = row["macs"] / row["step_s"] if row["macs"] else None
        peak = _peak_tflops(device, dtype)
        share = rate * 2 / (peak * 1e12) if (rate and peak) else None
        lines.append(
            f"| {n} | {'cached' if cached else 'teacher runs'} | {dtype} "
            f"| {row['compile_s']:.1f} | {row['step_s']:.3f} | {fmt(official, '.2f')} "
            f"| {fmt(official and official / row['step_s'], '.2f')}"
            f"{'x' if official else ''} | {fmt(row['macs'] and row['macs'] / 1e9, '.1f')} "
            f"| {fmt(rate and rate / 1e9, '.1f')} | {fmt(share and 100 * share, '.1f')}"
            f"{'%' if share else ''} | {fmt(row['footprint_mib'])} "
            f"| {fmt(row['device_peak_mib'])} | {fmt(row['rss_peak_mib'])} |")
        print(lines[-1], flush=True)
        if device.platform == "gpu" or device.platform == "cuda":
          print(f"  160,000 outer steps at n = {n} ({dtype}): "
                f"{160_000 * row['step_s'] / 3600:.2f} h", flush=True)
  command = "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:]))
  text = "\n".join(lines + ["", f"Command: `{command}`", ""])
  if args.out:
    with open(args.out, "a" if args.append else "w") as f:
      f.write(("\n" if args.append else "") + text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
