r"""Benchmark of the k-means coreset (the table's `kmeans` row) at the table's shape.

Times the three phases of `coresets.kmeans_coreset` on random features:
k-means++ seeding (numpy), the jitted Lloyd iterations, and the choice of
the nearest unused sample per centroid; prints seconds per phase and in all.

Usage (the effect table's shape: 50,000 teacher features of 1,024 dims,
k = n = 1,000):
  python experiments/benchmark_kmeans.py --num 50000 --dim 1024 --k 1000
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

from distill.selection import coresets


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=50_000)
  parser.add_argument("--dim", type=int, default=1024)
  parser.add_argument("--k", type=int, default=1000)
  parser.add_argument("--iters", type=int, default=50)
  args = parser.parse_args()
  features = np.random.default_rng(0).standard_normal((args.num, args.dim), dtype=np.float32)
  print(f"k-means coreset: N={args.num}, p={args.dim}, k={args.k}, {args.iters} Lloyd "
        f"iterations; {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  t0 = time.perf_counter()
  init = coresets._kmeans_plus_plus(features, args.k, np.random.default_rng(0))
  t1 = time.perf_counter()
  centroids, _, _ = coresets._lloyd(features, init, args.iters)
  centroids = np.asarray(jax.block_until_ready(centroids))
  t2 = time.perf_counter()
  idx = coresets.kmeans_coreset(features, args.k, 0, args.iters)
  t3 = time.perf_counter()
  whole = t3 - t2
  print(f"seeding {t1 - t0:.1f} s, Lloyd {t2 - t1:.1f} s (compile included), "
        f"whole coreset {whole:.1f} s (so nearest-sample choice about "
        f"{max(whole - (t2 - t0), 0.0):.1f} s); {len(idx)} distinct indices")


if __name__ == "__main__":
  main()
