"""What every stage shares: the workdir, its config, the data, the artefacts' places.

    <workdir>/config.json      the config the workdir was made with
    <workdir>/teacher/         stage 1 (distill/stages/teacher.py)
    <workdir>/synthetic.npz    stage 2, KRR-ST (distill/stages/krr_st.py)
    <workdir>/sets/            every other row's set (distill/stages/sets.py)
    <workdir>/table.*          stage 3 (distill/stages/table.py)

Each stage reads the previous stage's artefact from disk, skips work whose
artefact already exists, and resumes from checkpoints after a kill. Running
a different config on the same workdir is refused rather than mixing
artefacts of two settings (`prepare_workdir`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import ml_collections
import numpy as np

from distill import files, plots
from distill.config import to_dict
from distill.data import datasets, synthetic_set
from distill.errors import DistillError
from distill.eval import transfer
from distill.methods import barlow_twins
from distill.nn import parallel
from distill.nn.loop import log
from distill.nn.models import extract_features

SYNTHETIC = "synthetic.npz"


# Settings that only choose WHICH table entries to measure (each entry is
# keyed by them in table.json), so they may change between runs of a workdir,
# e.g. to add a row or a seed later.
SELECTION_KEYS = frozenset(f"eval.{k}" for k in (
    "rows", "seeds", "readouts", "archs", "extra_targets", "sizes", "sweep_rows",
    "results_path"))


# Sections that only shape artefacts built on demand (the table's KIP and
# parameter-matching rows). Their settings may change while none of the artefacts they
# shape exists in the workdir; config.json then takes the new values, so
# later runs are checked against what was actually used.
ON_DEMAND_SECTIONS = {"experts": ("experts_*",), "kip": ("kip_*", "sets/kip_*"),
                      "param_match": ("param_match_*", "synthetic_iadd*", "synthetic_mtt*")}


# Files a workdir holds before any stage has built anything.
BOOKKEEPING = frozenset({"config.json", "timings.json"})

# Config sections that were renamed: old name -> new name.
RENAMED_SECTIONS = {"distill": "krr_st"}


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates the workdir and checks it was not made with another config.

  A workdir with nothing built in it takes the new config. Otherwise keys
  in SELECTION_KEYS may differ, settings newer than the stored
  config.json are accepted, and so are changes to an ON_DEMAND_SECTIONS
  section none of whose artefacts exists yet; otherwise the stored file
  keeps the first config.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  current = json.loads(json.dumps(to_dict(config)))
  if not os.path.exists(path) or not set(os.listdir(workdir)) - BOOKKEEPING:
    # Nothing built yet (e.g. the last run stopped at a typo in the config):
    # there is nothing the new settings could mix with.
    files.write_json(path, current)
    return
  previous = files.read_json(path, None)
  if RENAMED_SECTIONS.keys() & previous.keys():
    # A workdir made before a section was renamed: the same settings, new name.
    previous = {RENAMED_SECTIONS.get(k, k): v for k, v in previous.items()}
    files.write_json(path, previous)
  diff = sorted(k for k in _diff_keys(previous, current) if k not in SELECTION_KEYS)
  unbuilt = {section for section, patterns in ON_DEMAND_SECTIONS.items()
             if not any(glob.glob(os.path.join(workdir, p)) for p in patterns)}
  fixed = [k for k in diff if k.split(".")[0] not in unbuilt]
  if fixed:
    raise DistillError(f"workdir {workdir} was made with a different config (differs at: "
                       f"{', '.join(fixed[:8])}); use a new --workdir")
  changed = {k.split(".")[0] for k in diff}
  if changed:
    files.write_json(path, {**previous, **{section: current[section] for section in changed}})


def _diff_keys(a, b, prefix=""):
  """Dotted keys whose values differ; keys only in `b` (settings added to the
  code since `a` was stored, defaulting to the old behaviour) do not count."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a):
      yield from _diff_keys(a[k], b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield prefix.rstrip(".")


def load_source(config) -> datasets.ArrayDataset:
  cfg = config.data
  ds = datasets.load_dataset(cfg.source, cfg.source_split, cache_dir=cfg.cache_dir or None,
                             data_dir=cfg.data_dir or None)
  return datasets.subsample(ds, cfg.num_source, config.seed)


def parse_target(spec: str) -> tuple[str, str, str]:
  """"dataset|train_split|test_split" -> its parts (splits default to train, test)."""
  parts = spec.split("|")
  if len(parts) not in (1, 3) or not all(parts):
    raise DistillError(f"target {spec!r}: expected 'dataset' or "
                       f"'dataset|train_split|test_split'")
  return (parts[0], "train", "test") if len(parts) == 1 else tuple(parts)


def main_target(config) -> str:
  cfg = config.data
  return f"{cfg.target}|{cfg.target_train_split}|{cfg.target_test_split}"


def load_target(config, image_shape, mean, std, spec: str | None = None):
  """A labelled target brought to the source's size/channels and normalisation.

  Args:
    config: the full config (`data.num_target_*`, cache settings).
    image_shape: (H, W, C) of the source. mean, std: (C,) normalisation.
    spec: "dataset|train_split|test_split"; None = the config's main target.

  Returns:
    (train images (N,H,W,C) float32, train labels (N,) int32, test images, test labels).
  """
  dataset, train_split, test_split = parse_target(spec or main_target(config))
  cfg = config.data
  out = []
  for split, num in ((train_split, cfg.num_target_train), (test_split, cfg.num_target_test)):
    ds = datasets.load_dataset(dataset, split, cache_dir=cfg.cache_dir or None,
                               data_dir=cfg.data_dir or None)
    if ds.labels is None:
      raise DistillError(f"transfer target {dataset!r} split {split!r} has no labels")
    # A cap, not a demand: one setting serves targets of different sizes.
    ds = datasets.subsample(ds, min(num, len(ds.images)), 0)
    images = datasets.match_format(ds.images, image_shape[0], image_shape[2])
    out += [datasets.normalize(images, mean, std), ds.labels.astype(np.int32)]
  return tuple(out)


def probe_backbone(config, model, variables, image_shape, mean, std, seed: int = 0) -> dict:
  """Linear-probe accuracy of a backbone's frozen features on the target."""
  x_train, y_train, x_test, y_test = load_target(config, image_shape, mean, std)
  features = lambda x: extract_features(model, variables, x, kind=config.probe.representation)
  return transfer.linear_probe(features(x_train), y_train, features(x_test), y_test,
                               regs=tuple(config.probe.regs),
                               folds=config.probe.folds, seed=seed)


def set_path(workdir: str, row: str, n: int, config) -> str:
  """Where the pretraining set of a table row at size n lives."""
  if row == "krr_st" and n == config.krr_st.num_synthetic:
    return os.path.join(workdir, SYNTHETIC)  # the main artefact of `distill krr-st`
  return os.path.join(workdir, "sets", f"{row}_n{n}.npz")


def save_set(out_path: str, synthetic: synthetic_set.SyntheticSet, workdir: str, name: str,
             history: list[dict] | None = None, what: str = "outer loss") -> None:
  """Exports a set with its image grid and, for a learned set, its loss curve.

  Args:
    out_path: the `.npz`; the grid goes next to it as `<stem>_grid.png`.
    synthetic: the set. workdir, name: the curve goes to `<workdir>/<name>/loss.png`.
    history: the run's metrics records; None = no curve (a selected real subset).
    what: the curve's title after `name`.

  In a multi-process run only process 0 writes (every process holds the set).
  """
  if not parallel.is_main_process():
    return
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  synthetic_set.save_synthetic(out_path, synthetic)
  synthetic_set.save_image_grid(os.path.splitext(out_path)[0] + "_grid.png", synthetic.images,
                                synthetic.image_mean, synthetic.image_std)
  if history is not None:
    plots.save_curve(os.path.join(workdir, name, "loss.png"), history, "loss", f"{name} {what}")
  log(f"[{name}] wrote {out_path}")


def source_features(source, teacher) -> np.ndarray:
  """(N, d) teacher features of the whole source, in chunks."""
  chunks = [teacher.features(datasets.normalize(source.images[i:i + 2000], teacher.mean,
                                                teacher.std))
            for i in range(0, len(source.images), 2000)]
  return np.concatenate(chunks)


def found(stage: str, path: str) -> None:
  """Says that a stage's artefact exists, so the stage is skipped."""
  log(f"[{stage}] found {path}: done before, skipped (delete it to redo this stage)")


def workdir_teacher(config: ml_collections.ConfigDict, workdir: str) -> barlow_twins.Teacher:
  """The workdir's teacher, handing on the representation the config names.

  With `teacher.checkpoint` set and no teacher in the workdir yet, the
  checkpoint is imported first (`import_teacher`), so any stage can start
  from an imported teacher.
  """
  directory = os.path.join(workdir, "teacher")
  if config.teacher.checkpoint and not os.path.exists(os.path.join(directory, "teacher.json")):
    import_teacher(config, workdir)
  return barlow_twins.load_teacher(directory, config.teacher.representation)


def import_teacher(config: ml_collections.ConfigDict, workdir: str) -> barlow_twins.Teacher:
  """Imports `teacher.checkpoint` into `<workdir>/teacher/`, probed on the target.

  The card (teacher.json) records the checkpoint's path and sha256, the
  architecture found in it, what was dropped (heads, counters), the input
  normalisation and the source resolution it is used at.
  """
  cfg = config.teacher
  directory = os.path.join(workdir, "teacher")
  source = load_source(config)
  image_shape = source.images.shape[1:]
  if os.path.isdir(cfg.checkpoint):
    teacher = _copy_saved_teacher(cfg.checkpoint, directory, image_shape)
  else:
    mean, std = np.asarray(cfg.checkpoint_mean, np.float32), np.asarray(cfg.checkpoint_std,
                                                                        np.float32)
    teacher = barlow_twins.import_torch_backbone(cfg.checkpoint, directory, image_shape, mean,
                                                 std, dict(source=source.name))
  probe = probe_backbone(config, teacher.model, teacher.variables, image_shape, teacher.mean,
                         teacher.std)
  kept = (f", {teacher.info['tensors']} tensors, {teacher.info['dropped']} dropped"
          if "tensors" in teacher.info else "")
  log(f"[teacher] imported {cfg.checkpoint} ({teacher.model.__class__.__name__}{kept}); "
      f"linear-probe accuracy on {config.data.target}: {probe['accuracy']:.4f}")
  barlow_twins.add_to_card(directory, probe=probe)
  return barlow_twins.load_teacher(directory, cfg.representation)


def _copy_saved_teacher(source_dir: str, directory: str, image_shape) -> barlow_twins.Teacher:
  """Copies a teacher saved by `distill teacher` (its teacher.json + variables.msgpack).

  The card keeps the teacher's own input normalisation and training record;
  `imported_from` and the variables' sha256 are added (the probe is redone
  on this workdir's target by the caller).
  """
  saved = barlow_twins.load_teacher(source_dir)  # checks both files are there and readable
  if tuple(saved.image_shape) != tuple(image_shape):
    raise DistillError(f"teacher in {source_dir} was trained on {tuple(saved.image_shape)} "
                       f"images; the source has {tuple(image_shape)}")
  for name in ("teacher.json", "variables.msgpack"):
    with open(os.path.join(source_dir, name), "rb") as f:
      files.write_atomic(os.path.join(directory, name), f.read())
  with open(os.path.join(source_dir, "variables.msgpack"), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  barlow_twins.add_to_card(directory, imported_from=os.path.abspath(source_dir),
                           sha256=digest)
  return barlow_twins.load_teacher(directory)
