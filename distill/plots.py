"""Pictures of results: training curves, the results table, the size sweep
(image grids of synthetic sets live in distill/data/synthetic_set.py)."""

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


def save_accuracy_dots(path: str, panels: dict, rows: list[str], reference: str = "none") -> str:
  """The results table as a dot plot: one panel per (target, read-out), one
  dot per row and architecture (mean, with a std whisker) and a dashed line
  per architecture at the `reference` row, so gains and losses against it
  show. Dots rather than bars, so the axis can zoom onto the few points that
  separate the rows.

  Args:
    panels: {panel title: {arch: {row: (mean accuracy, std)}}}, accuracies in [0, 1].
    rows: the rows in display order (top to bottom); rows absent from a panel
      leave a gap.
  """
  archs = list(dict.fromkeys(a for panel in panels.values() for a in panel))
  ncols = min(3, len(panels))
  nrows = -(-len(panels) // ncols)
  fig, axes = plt.subplots(nrows, ncols, squeeze=False, dpi=120,
                           figsize=(4.2 * ncols, (0.8 + 0.28 * len(rows)) * nrows))
  offset = 0.5 / len(archs)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, (title, by_arch) in zip(axes.flat, panels.items()):
    for i, arch in enumerate(archs):
      color = colors[i % len(colors)]
      values = by_arch.get(arch, {})
      shown = [r for r in rows if r in values]
      if not shown:
        continue
      ys = [rows.index(r) + (i - (len(archs) - 1) / 2) * offset for r in shown]
      means, stds = (100 * np.asarray(v) for v in zip(*[values[r] for r in shown]))
      ax.errorbar(means, ys, xerr=stds, fmt="o", ms=4, capsize=2, color=color, label=arch)
      if reference in values:
        ax.axvline(100 * values[reference][0], color=color, ls="--", lw=1)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
  """Writes through a temporary file, so a kill never leaves a broken PNG."""
  fig.tight_layout()
  try:
    return files.write_atomic(path, lambda f: fig.savefig(f, format="png"))
  finally:
    plt.close(fig)
