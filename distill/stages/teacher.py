"""Stage 1: the teacher -> `<workdir>/teacher/`.

The teacher is trained with Barlow Twins on the source (plainly, or with
InfoBatch pruning when `teacher.infobatch.prune_ratio` > 0), or imported from
a torchvision-layout checkpoint (`teacher.checkpoint`); then probed on the
target and saved as `teacher.json` (its card) + `variables.msgpack`.
`export-teacher` writes a torchvision-layout teacher back out.
"""

from __future__ import annotations

import os
import time

import jax

from distill import files, plots
from distill.data import datasets
from distill.errors import DistillError
from distill.methods import barlow_twins
from distill.nn.loop import Checkpointer, log
from distill.nn.models import build_model
from distill.stages.artefacts import (found, import_teacher, load_source, probe_backbone,
                                      workdir_teacher)

TEACHER = "teacher"


def run_teacher(config, workdir: str) -> barlow_twins.Teacher:
  """Trains the Barlow Twins teacher (or loads it) and probes it on the target."""
  directory = os.path.join(workdir, TEACHER)
  if os.path.exists(os.path.join(directory, "teacher.json")):
    found("teacher", directory)
    return barlow_twins.load_teacher(directory)
  if config.teacher.checkpoint:
    return import_teacher(config, workdir)
  if config.teacher.infobatch.prune_ratio > 0:
    teacher, report = train_infobatch_teacher(config, workdir, load_source(config).images)
    probe = probe_backbone(config, teacher.model, teacher.variables, teacher.image_shape,
                           teacher.mean, teacher.std)
    log(f"[teacher] InfoBatch skipped {100 * report.get('skipped_fraction', 0):.1f}% of "
        f"sample-steps; linear-probe accuracy on {config.data.target}: {probe['accuracy']:.4f}")
    barlow_twins.add_to_card(directory, probe=probe)
    return barlow_twins.load_teacher(directory)
  cfg = config.teacher
  t0 = time.perf_counter()
  source = load_source(config)
  images = source.images
  variables, history, num_steps = barlow_twins.train(cfg, images, config.seed, workdir, TEACHER)
  train_s = time.perf_counter() - t0
  mean, std = datasets.channel_stats(images)
  probe = probe_backbone(config, build_model(cfg.arch), barlow_twins.backbone_variables(variables),
                         images.shape[1:], mean, std)
  log(f"[teacher] linear-probe accuracy on {config.data.target}: {probe['accuracy']:.4f}")
  info = dict(source=source.name, num_images=len(images), steps=num_steps, train_seconds=train_s,
              final_loss=history[-1]["loss"] if history else None, probe=probe)
  barlow_twins.save_teacher(directory, cfg.arch.to_dict(), variables, mean, std,
                            images.shape[1:], info)
  plots.save_curve(os.path.join(directory, "loss.png"), history, "loss", "Barlow Twins loss")
  return barlow_twins.load_teacher(directory)


def train_infobatch_teacher(config, workdir: str, images,
                            name: str = "teacher_infobatch") -> tuple[barlow_twins.Teacher, dict]:
  """The teacher trained with InfoBatch pruning, saved in `<workdir>/teacher`; resumable.

  prune_ratio 0 trains on all data through the same code (the reference of
  experiments/infobatch_teacher.py). A finished teacher with its report is
  loaded, not retrained.

  Args:
    config: full config (`teacher`, its `infobatch` section, `seed`).
    workdir: job directory. images: (N, H, W, C) uint8 source images.
    name: job directory of the epoch plans and checkpoints.

  Returns:
    (teacher, report with steps and the realised skipped share).
  """
  directory = os.path.join(workdir, TEACHER)
  report_path = os.path.join(workdir, name, "report.json")
  if os.path.exists(os.path.join(directory, "teacher.json")) and os.path.exists(report_path):
    return barlow_twins.load_teacher(directory), files.read_json(report_path, {})
  cfg = config.teacher
  variables, report = barlow_twins.train_infobatch(cfg, images, config.seed, workdir, name)
  mean, std = datasets.channel_stats(images)
  barlow_twins.save_teacher(directory, cfg.arch.to_dict(), variables, mean, std,
                            images.shape[1:], dict(infobatch=report))
  files.write_json(report_path, report)
  return barlow_twins.load_teacher(directory), report



def snapshot_teacher(config, workdir: str, out_dir: str) -> barlow_twins.Teacher:
  """Saves the latest checkpoint of an unfinished teacher training as a teacher folder.

  The folder (teacher.json + variables.msgpack) is what `distill teacher`
  writes at the end, so `teacher.checkpoint=out_dir` uses it anywhere; its
  card says which step of how many it holds (`snapshot_step`,
  `num_steps`), so it is never mistaken for the finished teacher. The
  training run is only read: a run still going on is not disturbed.

  Args:
    config: the config the teacher is being trained with.
    workdir: the workdir of that training. out_dir: the folder to write.
  """
  cfg = config.teacher
  directory = os.path.join(workdir, TEACHER, "ckpt")
  # Checked before the checkpointer is made: it would create the folder.
  ckpt = Checkpointer(directory) if os.path.isdir(directory) else None
  step = ckpt.latest_step() if ckpt else None
  if not step:
    raise DistillError(f"no teacher checkpoint in {directory} (start `distill teacher` "
                       f"with this --workdir first)")
  source = load_source(config)
  images = source.images
  num_steps = barlow_twins.train_steps(cfg, len(images))
  model = barlow_twins.build_barlow_twins(cfg)
  like = barlow_twins.init_state(model, barlow_twins.make_optimizer(cfg, num_steps),
                                 jax.random.key(config.seed), images.shape[1:])
  variables = ckpt.restore(step, like)["variables"]
  mean, std = datasets.channel_stats(images)
  info = dict(source=source.name, num_images=len(images), snapshot_step=step,
              num_steps=num_steps, snapshot_of=os.path.abspath(workdir))
  barlow_twins.save_teacher(out_dir, cfg.arch.to_dict(), variables, mean, std,
                            images.shape[1:], info)
  log(f"[teacher] wrote the step-{step}/{num_steps} snapshot of {workdir}'s teacher to {out_dir}")
  return barlow_twins.load_teacher(out_dir)


def run_import_teacher(config, workdir: str) -> barlow_twins.Teacher:
  """Imports `teacher.checkpoint` (a torchvision-layout ResNet) as the workdir's teacher."""
  if not config.teacher.checkpoint:
    raise DistillError("import-teacher needs the checkpoint: --set teacher.checkpoint=PATH "
                       "(.safetensors, .npz, or .pt/.pth with torch installed)")
  return run_teacher(config, workdir)


def run_export_teacher(config, workdir: str) -> str:
  """Writes the workdir's teacher as torchvision-layout `.safetensors`
  (`<workdir>/teacher/backbone_torchvision.safetensors`)."""
  teacher = workdir_teacher(config, workdir)
  path = os.path.join(workdir, TEACHER, "backbone_torchvision.safetensors")
  barlow_twins.export_torch_backbone(teacher, path)
  log(f"[teacher] wrote {path} (torchvision names and layouts; input normalisation "
      f"mean {teacher.mean.tolist()}, std {teacher.std.tolist()}, images "
      f"{tuple(teacher.image_shape)})")
  return path
