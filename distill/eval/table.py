"""The results table's pure parts: its keys, summary and formats.

One entry per (row, architecture, target, read-out, n, seed) with its top-1
accuracy and wall-clock; `summarize` gives mean, std and median cost per
group; `format_markdown`, `format_csv` and `save_table_figure` present it.
The stage that measures the entries is distill/stages/table.py.
"""

from __future__ import annotations

import csv
import io
import os
from typing import NamedTuple, Sequence

import ml_collections
import numpy as np

from distill import plots
from distill.errors import DistillError
from distill.eval import transfer
from distill.nn.models import ARCHS, TORCH_RESNETS, TorchResNet


READOUTS = (*transfer.PROBE_FRACTIONS, "finetune")


class Job(NamedTuple):
  """One block of the table: set size, rows, architectures, targets, read-outs."""
  n: int
  rows: tuple
  archs: tuple       # of (label, arch dict)
  targets: tuple     # of (label, spec)
  readouts: tuple


def parse_arch(spec: str, base: ml_collections.ConfigDict) -> tuple[str, dict]:
  """"resnet10:32" -> ("resnet10-w32", arch dict); depth/norm from `base` for a ConvNet."""
  name, _, width = spec.partition(":")
  # A ConvNet without an explicit width keeps the base's per-block widths.
  keep_widths = name == "convnet" == base.name and not width
  if name not in ARCHS:
    raise DistillError(f"eval.archs entry {spec!r}: unknown architecture {name!r}; "
                       f"expected one of {ARCHS}")
  try:
    width = int(width) if width else int(base.width)
  except ValueError:
    raise DistillError(f"eval.archs entry {spec!r}: width {width!r} is not an integer") from None
  same = name == base.name
  arch = dict(name=name, width=width, depth=base.depth if name == "convnet" else 0,
              norm=base.norm if same else "default",
              widths=tuple(base.get("widths", ())) if keep_widths else ())
  if name == "convnet":
    arch["head_input"] = base.get("head_input", "features")
  return arch_label(arch), arch


def arch_label(arch) -> str:
  widths = tuple(arch.get("widths", ()) or ())
  return f"{arch['name']}-w{'-'.join(map(str, widths)) if widths else arch['width']}"


def target_label(dataset: str) -> str:
  base = os.path.basename(dataset.rstrip("/")) or dataset
  for ext in (".tar.gz", ".tgz", ".npz"):
    base = base[:-len(ext)] if base.endswith(ext) else base
  return base


def arch_of(model) -> dict:
  """The arch dict that rebuilds a backbone (the teacher's may differ from the column's)."""
  if isinstance(model, TorchResNet):
    name = next(n for n, (stages, bottleneck) in TORCH_RESNETS.items()
                if tuple(stages) == tuple(model.stage_sizes) and bottleneck == model.bottleneck)
    return dict(name=name, width=model.width, depth=0, norm="batch", widths=(), stem=model.stem)
  if hasattr(model, "depth"):
    name = "convnet"
  else:
    name = "resnet10" if tuple(model.stage_sizes) == (1, 1, 1, 1) else "resnet18"
  arch = dict(name=name, width=model.width, depth=getattr(model, "depth", 0), norm=model.norm,
              widths=tuple(getattr(model, "widths", ())))
  if name == "convnet":
    arch["head_input"] = model.head_input
  return arch


def run_key(r: dict) -> tuple:
  return (r["row"], r["arch"], r["target"], r["readout"], r["n"], r["seed"])


def summarize(runs: list[dict]) -> list[dict]:
  """Mean, std (ddof=1) and median wall-clock per (n, row, arch, target, readout)."""
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    groups.setdefault((r["n"], r["row"], r["arch"], r["target"], r["readout"]), []).append(r)
  out = []
  for (n, row, arch, target, readout), rs in groups.items():
    acc = np.array([r["accuracy"] for r in rs])
    out.append(dict(n=n, row=row, arch=arch, target=target, readout=readout,
                    mean=float(acc.mean()), std=float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    seeds=len(acc),
                    # Medians: one seed slowed by another job should not set the cost.
                    set_seconds=float(np.median([r["set_seconds"] for r in rs])),
                    pretrain_seconds=float(np.median([r["pretrain_seconds"] for r in rs])),
                    readout_seconds=float(np.median([r["readout_seconds"] for r in rs]))))
  return out


def mean_std_text(values) -> str:
  """"mean ± std" of `values` (sample std, ddof=1; 0 for a single value), 2 decimals."""
  values = np.asarray(values, np.float64)
  return f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"


def shown_path(name: str) -> str:
  """A dataset or folder as a published table names it: no machine-specific prefix.

  A tfds name or relative path is kept; an absolute path becomes relative to
  the working directory when inside it, else its last component (a shared
  data folder's absolute location says nothing to a reader elsewhere).
  """
  if not os.path.isabs(name):
    return name
  here = os.getcwd()
  if os.path.commonpath([here, name]) == here:
    return os.path.relpath(name, here)
  return os.path.basename(name.rstrip(os.sep)) or name


def format_markdown(results: dict, config, rows: Sequence[str]) -> str:
  """One accuracy table per (target, read-out) at the main n, then costs and the sweep.

  Args:
    results: the table file's content ({"runs": [...], "teacher": {...}}).
    config: the config the table was measured with. rows: every row name, in table order.
  """
  summary = summarize(results["runs"])
  n_main = config.krr_st.num_synthetic
  order = {r: i for i, r in enumerate(rows)}
  main = [s for s in summary if s["n"] == n_main]
  archs = list(dict.fromkeys(s["arch"] for s in main))
  lines = [f"Source {shown_path(config.data.source)} (n = {n_main}); mean ± std top-1 (%) "
           f"over seeds (their count), [difference to `none`].", ""]
  for target, readout in dict.fromkeys((s["target"], s["readout"]) for s in main):
    block = [s for s in main if s["target"] == target and s["readout"] == readout]
    lines += [f"### {target}, {readout.replace('_', ' ')}", "",
              "| row | " + " | ".join(archs) + " |", "|---" * (len(archs) + 1) + "|"]
    floor = {s["arch"]: s["mean"] for s in block if s["row"] == "none"}
    for row in sorted(dict.fromkeys(s["row"] for s in block), key=order.get):
      cells = []
      for arch in archs:
        hit = [s for s in block if s["row"] == row and s["arch"] == arch]
        # Each row against `none`, every pretrained network's starting point.
        versus = (f" [{100 * (hit[0]['mean'] - floor[arch]):+.2f}]"
                  if hit and row != "none" and arch in floor else "")
        cells.append(f"{100 * hit[0]['mean']:.2f} ± {100 * hit[0]['std']:.2f} "
                     f"({hit[0]['seeds']}){versus}" if hit else "-")
      lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["### Cost (seconds, median over seeds)", "",
            "| row | arch | building the set | pretraining | set + pretraining |",
            "|---|---|---|---|---|"]
  seen = set()
  for s in sorted(main, key=lambda s: (order[s["row"]], s["arch"])):
    if (s["row"], s["arch"]) in seen or s["row"] == "none":
      continue
    seen.add((s["row"], s["arch"]))
    lines.append(f"| {s['row']} | {s['arch']} | {s['set_seconds']:.0f} | "
                 f"{s['pretrain_seconds']:.0f} | {s['set_seconds'] + s['pretrain_seconds']:.0f} |")
  lines.append("")
  first = (archs[0], main[0]["target"]) if main else None
  sweep = sorted((s for s in summary if s["readout"] == "linear_probe"
                  and s["row"] in config.eval.sweep_rows and (s["arch"], s["target"]) == first),
                 key=lambda s: (s["row"], s["n"]))
  if config.eval.sizes and sweep:
    lines += ["### Size sweep (linear probe, first target and architecture)", "",
              "| row | n | top-1 (%) |", "|---|---|---|"]
    lines += [f"| {s['row']} | {s['n']} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f} |"
              for s in sweep]
    lines.append("")
  t = results.get("teacher", {})
  if t.get("probe") is not None:
    origin = (f"imported from {shown_path(t['imported_from'])}" if t.get("imported_from") else
              f"trained in {t.get('train_seconds') or 0:.0f} s")
    lines.append(f"Teacher: linear probe {100 * t['probe']:.2f}% on "
                 f"{shown_path(config.data.target)}, "
                 f"{origin}.")
  return "\n".join(lines) + "\n"


def format_csv(results: dict) -> str:
  buf = io.StringIO()
  fields = ["row", "arch", "target", "readout", "n", "seed", "accuracy", "set_seconds",
            "pretrain_seconds", "readout_seconds"]
  writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(results["runs"])
  return buf.getvalue()


def read_csv(text: str) -> list[dict]:
  """Inverse of `format_csv` (numbers parsed back)."""
  out = []
  for r in csv.DictReader(io.StringIO(text)):
    out.append({**r, "n": int(r["n"]), "seed": int(r["seed"]),
                **{k: float(r[k]) for k in ("accuracy", "set_seconds", "pretrain_seconds",
                                            "readout_seconds")}})
  return out


def save_table_figure(path: str, summary: list[dict], n: int, rows: Sequence[str]
                      ) -> str | None:
  """The size-n accuracy tables of `summarize` as a dot plot (see plots.save_accuracy_dots).

  Returns:
    The PNG's path, or None when there is no entry of size n.
  """
  panels: dict = {}
  for s in summary:
    if s["n"] == n:
      title = f"{s['target']}, {s['readout'].replace('_', ' ')}"
      panels.setdefault(title, {}).setdefault(s["arch"], {})[s["row"]] = (s["mean"], s["std"])
  if not panels:
    return None
  present = {s["row"] for s in summary if s["n"] == n}
  return plots.save_accuracy_dots(path, panels, [r for r in rows if r in present])
