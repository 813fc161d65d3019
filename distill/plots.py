"""Pictures of results: training curves (image grids live in export.py)."""

from __future__ import annotations

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display on servers; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from distill import files  # noqa: E402


def save_curve(path: str, history: list[dict], key: str, title: str) -> str | None:
  """Plots `key` against `step` from logged metric records into a PNG.

  Returns the path, or None when there is nothing to plot.
  """
  points = [(r["step"], r[key]) for r in history if key in r]
  if not points:
    return None
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  ax.plot(*zip(*points), lw=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel(key)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  return save_figure(fig, path)


def save_size_sweep(path: str, series: dict, title: str) -> str:
  """Accuracy against set size, one line with error bars per row.

  Args:
    series: {row: [(n, mean accuracy, std), ...]}.
  """
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  for row, points in sorted(series.items()):
    n, mean, std = (np.asarray(v) for v in zip(*sorted(points)))
    ax.errorbar(n, 100 * mean, yerr=100 * std, marker="o", capsize=3, label=row)
  ax.set_xscale("log")
  ax.set_xlabel("set size n")
  ax.set_ylabel("top-1 (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
  """Writes through a temporary file, so a kill never leaves a broken PNG."""
  fig.tight_layout()
  try:
    return files.write_atomic(path, lambda f: fig.savefig(f, format="png"))
  finally:
    plt.close(fig)
