"""The one config system: ml_collections `get_config()` files.

An experiment file under `experiments/configs/` starts from `base_config()`,
changes what it needs and returns the result; a `:variant` suffix on the
path is passed to its `get_config(variant)` (e.g. `...quickstart.py:smoke`).
The base config is locked, so a misspelt key in an experiment file or in a
command-line override (`--set krr_st.steps=100`) is an error naming the key,
never a silently ignored setting.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections

from distill.errors import DistillError, one_line


def _arch(name="convnet", width=128, depth=3, norm="default", widths=()):
  # `widths` (ConvNet only): per-block channel counts; when given it replaces
  # `width` and `depth` (the paper's pool is widths=(128, 256, 512)).
  return ml_collections.ConfigDict(dict(name=name, width=width, depth=depth, norm=norm,
                                        widths=tuple(widths)))


def base_config() -> ml_collections.ConfigDict:
  """Every setting of the pipeline, with the paper-scale defaults (GPU)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Source (unlabelled for distillation) and the labelled transfer target.
  c.data = ml_collections.ConfigDict(dict(
      source="cifar100",       # TFDS name, image folder, .tar.gz, .npz or IDX dir
      source_split="train",
      num_source=0,            # 0 = all; else a seeded random subset
      target="cifar10",
      target_train_split="train",
      target_test_split="test",
      num_target_train=0,      # at most this many target images per split (0 = all)
      num_target_test=0,
      cache_dir="",            # "" = DISTILL_CACHE or ~/.cache/distill
      data_dir="",             # TFDS data_dir ("" = TFDS default)
  ))

  # Self-supervised teacher (Barlow Twins).
  c.teacher = ml_collections.ConfigDict(dict(
      arch=_arch("resnet18", width=64),
      projector=(512, 512, 512),
      lambda_offdiag=5e-3,
      epochs=100,
      batch_size=256,
      lr=1e-3,
      weight_decay=1e-4,
      warmup_steps=500,
      # What the teacher hands on as target representations g(x):
      # "features": its backbone features as they are (a ResNet's are global-
      # average-pooled; a ConvNet's are its flattened last feature map);
      # "gap": the last feature map averaged over space (a ConvNet's map
      # pooled the way a ResNet's is; for ResNets the same as "features").
      representation="features",
      # A teacher to use instead of training one: a torchvision-layout
      # ResNet-18/34/50 checkpoint (.safetensors, .npz; .pt/.pth with torch
      # installed), or a folder saved by `distill teacher` (teacher.json +
      # variables.msgpack, e.g. a committed reference teacher). `distill
      # import-teacher`, and any stage that needs the teacher, imports it
      # into <workdir>/teacher. "" = train Barlow Twins.
      checkpoint="",
      # The input normalisation the checkpoint was trained with (torchvision's
      # ImageNet statistics by default), per channel of the source.
      checkpoint_mean=(0.485, 0.456, 0.406),
      checkpoint_std=(0.229, 0.224, 0.225),
      # Teacher-view cache (distill/methods/teacher_views.py): 0 = run the
      # teacher on a fresh random crop + flip of every real batch; V > 0 =
      # compute its representations of V fixed views per source image once
      # (view 0 = the image itself), stored memory-mapped in the workdir, and
      # draw (image, view) pairs instead (KRR-ST, knowledge-distillation experts).
      views=0,
      views_dtype="float16",   # storage: "float16" or "float32"
      # InfoBatch dynamic pruning (distill/selection/infobatch.py); `distill teacher`
      # uses it when prune_ratio > 0.
      infobatch=ml_collections.ConfigDict(dict(
          prune_ratio=0.0,     # fraction r of below-mean-score samples dropped per epoch
          delta=0.875,         # full data (no pruning) from epoch int(delta * epochs) on
      )),
  ))

  # KRR-ST distillation.
  c.krr_st = ml_collections.ConfigDict(dict(
      num_synthetic=1000,
      init="random",           # start images: "random", "kmeans" (teacher features) or
                               # "pruned" (among <workdir>/source_pruning.npz's indices)
      steps=160_000,
      batch_size=1024,         # real images per outer step
      lr_images=1e-3,          # the paper's outer AdamW lr (CIFAR-100)
      lr_targets=1e-3,
      weight_decay=0.0,
      clip_norm=0.0,           # 0 = no clipping of the outer gradient
      reg=1e-6,                # ridge strength, see kernels/ridge.py
      reg_scaling="trace",     # reference convention: reg * trace(K_ss)
      ridge_form="auto",       # "dual" (n x n), "primal" (p x p) or "auto" (smaller)
      augment_real=True,
      # "bfloat16": the pool's convolutions in bf16 (mixed precision; the
      # kernel, the ridge solve and the learned set stay float32).
      compute_dtype="float32",
      # The held-out objective, after distilling: the outer loss of the set
      # and of its initial subset on this many fresh pool models (never used
      # in distillation) over this many source images; 0 models = skip.
      held_out_models=4,
      held_out_images=1000,
      # The paper's pool for 32x32 sources (convnet_128_256_512_bn): batch
      # norm in train mode for the inner step, eval mode (running statistics)
      # for the kernel features. arch.widths=() with norm "instance" gives
      # the constant-width instance-norm ConvNet.
      pool=ml_collections.ConfigDict(dict(
          size=10,
          max_age=1000,
          arch=_arch("convnet", width=128, depth=3, norm="batch", widths=(128, 256, 512)),
          lr=0.1,              # inner full-batch SGD on (X_s, Y_s)
          momentum=0.9,
          weight_decay=1e-3,   # of the inner SGD (coupled, added to the gradient)
          init_age="uniform",  # "uniform": T ~ U{1..max_age}; "zero": fresh nets
      )),
      log_every=100,
      checkpoint_every=1000,
  ))

  # Expert trajectories for parameter matching (distill/methods/experts.py).
  c.experts = ml_collections.ConfigDict(dict(
      num_experts=10,
      epochs=50,               # checkpoints saved after every epoch (and at init)
      objective="ce",          # "ce": source labels; "mse": regress the teacher's reps
                               # (the table's iadd/mtt rows use "mse", iadd_ce/mtt_ce "ce")
      arch=_arch("convnet", width=128, depth=3, norm="instance"),
      batch_size=256,
      lr_ce=0.01,              # plain SGD, as in MTT
      lr_mse=1.0,              # MSE to unit-scale reps has small gradients: larger step
      momentum=0.0,
      augment=True,            # random crop + flip
      # "mse": regress (g - centre) / scale, the teacher's representations
      # centred per dimension and scaled to unit RMS over the source (as the
      # table's students standardise theirs); False regresses g as it is,
      # which left the effect table's experts unable to learn the teacher
      # (experiments/results/expert_probe_n100*.json).
      standardize_targets=True,
      dtype="float32",         # buffer storage: "float32" or "float16"
      # InfoBatch dynamic pruning of the expert epochs (distill/selection/infobatch.py); 0 = off.
      infobatch=ml_collections.ConfigDict(dict(prune_ratio=0.0, delta=0.875)),
      log_every=100,
  ))

  # Importance-weighted parameter matching (distill/methods/param_match.py).
  c.param_match = ml_collections.ConfigDict(dict(
      method="iadd",           # "iadd": learned importance weights W; "mtt": W = 1
      num_synthetic=100,
      syn_steps=30,            # N student steps on the synthetic set
      expert_epochs=2,         # M: the target is the expert M epochs later
      max_start=20,            # start epochs t are drawn from 0..max_start-1
      syn_batch=256,           # synthetic images per student step (>= n: all)
      # Start images: "random" (a random, or for "ce" experts class-balanced,
      # subset) or "high_loss" (MKDT's: the n source images a trained expert
      # fits worst, i.e. the highest loss of the first expert's last
      # checkpoint against the teacher's representation of the image; "mse"
      # experts only).
      init="random",
      steps=5000,
      lr_images=1e-2,          # Adam learning rates of each learned group
      lr_targets=1e-2,
      # "mse" experts: the student regresses the teacher's representation of
      # the current images, differentiated through the teacher, instead of
      # stored targets (then lr_targets must be 0). Costs a teacher forward
      # and backward pass over the set per outer step.
      teacher_targets=False,
      lr_weights=1e-2,
      lr_alpha=1e-2,           # on log(alpha)
      alpha_init=0.0,          # the student's initial SGD step size (0: the experts' lr)
      granularity="parameter", # one weight per "parameter" or per "tensor"
      # The held-out objective: the last `held_out_experts` experts of the
      # buffer are never matched; after distilling, the matching loss of the
      # set and of its initial images is measured on them (every start epoch).
      # At least one expert is always left for distillation.
      held_out_experts=1,
      prune_fraction=0.0,      # leave this fraction of lowest-W parameters out of the loss
      remat=False,             # jax.checkpoint each student step (memory for compute)
      # Student steps per iteration of the unroll's compiled loop; 0 = all N
      # on the CPU (XLA:CPU ran a loop body's convolutions ~20x slower;
      # straight-line code keeps every step's activations even with remat,
      # so where memory binds use 1 with remat), 1 on accelerators (compile
      # time independent of N).
      unroll=0,
      # Crop + flip the synthetic images in the student steps: only for
      # label targets ("ce" experts); teacher-space targets belong to the
      # un-augmented images, so "mse" rows refuse it.
      augment=False,
      log_every=50,
      checkpoint_every=500,
  ))

  # Pretraining a fresh network on a set: MSE to teacher-space targets or
  # learned labels, cross-entropy to soft labels of "ce" parameter matching
  # (the recipe of each row is in distill/stages/sets.py). The official recipe:
  # SGD lr 0.1 constant, momentum 0.9, wd 1e-3, batch 256, 1000 epochs, no
  # augmentation.
  pretrain_arch = _arch("convnet", width=128, depth=3)
  # What the student's head reads: "features" (a ConvNet's flattened map) or
  # "gap" (its spatial mean); set it to the view the probe reads
  # (`probe.representation`), so the student is trained through what is read.
  pretrain_arch.head_input = "features"
  c.pretrain = ml_collections.ConfigDict(dict(
      arch=pretrain_arch,
      epochs=1000,
      batch_size=256,
      lr=0.1,
      schedule="constant",     # "constant" or "cosine" (to 0 over the run)
      momentum=0.9,
      weight_decay=1e-3,
      # Crop + flip. A set's fixed teacher targets belong to its un-augmented
      # images, so with augmentation the targets of real-image sets (random,
      # kmeans, full) are recomputed by the teacher on each view; learned
      # teacher-space targets (krr_st, iadd, mtt) have no such teacher and
      # always pretrain un-augmented; label targets are view-invariant.
      augment=False,
      # Regress (targets - their mean) / their overall std instead of the raw
      # targets: same optimum up to the linear head, far better conditioned
      # when the targets' mean dominates their spread (post-ReLU features).
      standardize_targets=True,
  ))

  # Selection tools: source pruning for transfer and label-free influence.
  c.selection = ml_collections.ConfigDict(dict(
      # `distill prune-source` (distill/selection/source_pruning.py).
      prune=ml_collections.ConfigDict(dict(
          method="fm",             # "lm" (label match), "fm" (feature match) or "random"
          keep_fraction=0.5,       # share of source groups kept (rounded, at least 1)
          groups="auto",           # "labels", "kmeans" (teacher features) or "auto"
          num_clusters=10,         # k-means groups when there are no labels
          surrogate=_arch("convnet", width=32, depth=3),
          epochs=5,                # surrogate cross-entropy training on the groups
          batch_size=128,
          lr=1e-3,
      )),
      # `distill influence` (distill/selection/influence.py).
      influence=ml_collections.ConfigDict(dict(
          num_views=2,             # augmented views per image in the consistency loss
          reg=1e-2,                # ridge of the linear head (trace_over_n convention)
          batch_size=500,
      )),
  ))

  # Fine-tuning read-out: new linear head, all layers trained by cross-entropy.
  c.finetune = ml_collections.ConfigDict(dict(
      steps=10_000,            # optimiser steps (the paper: 10k on CIFAR-size targets,
                               # 5k on fine-grained ones); 0 = `epochs` epochs
      epochs=30,
      batch_size=128,
      lr=0.01,
      momentum=0.9,
      weight_decay=5e-4,
      augment=True,            # random crop + flip
      num_train=0,             # fine-tune on this many target training images (0 = all)
      # InfoBatch dynamic pruning of the fine-tuning epochs (distill/selection/infobatch.py);
      # prune_ratio 0 = off. The lr schedule then runs on epoch progress.
      infobatch=ml_collections.ConfigDict(dict(prune_ratio=0.0, delta=0.875)),
  ))

  # KIP baseline (distill/methods/kip.py): synthetic images + learned labels fitted
  # by kernel ridge regression with the ConvNet's infinite-width NTK.
  c.kip = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=256,          # labelled real images per step
      lr_images=1e-3,
      lr_targets=1e-3,         # the learned labels
      weight_decay=0.0,
      clip_norm=0.0,
      reg=1e-3,
      reg_scaling="trace_over_n",
      depth=3,                 # conv-relu blocks of the NTK's ConvNet
      pool=False,              # AvgPool in the kernel (full spatial covariance: costly)
      downsample=1,            # average f x f pixel blocks before the kernel
      augment_real=True,
      log_every=50,
  ))

  # Linear probes on frozen features: ridge classifier, reg (trace_over_n
  # convention, features centred and scaled to unit mean squared norm)
  # chosen by k-fold cross-validation on the labelled training images.
  # Read-outs linear_probe (all labels), linear_probe_5pct and
  # linear_probe_1pct (a class-stratified 5% / 1% of them, averaged over
  # `label_draws` draws: the low-label protocol of MKDT).
  c.probe = ml_collections.ConfigDict(dict(
      regs=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
      folds=5,
      label_draws=5,
      # Which view of each backbone the probes read (nn.models.FEATURE_KINDS):
      # "features" as they are (a ConvNet's flattened last map), "gap" that
      # map averaged over space. Where random-init flattened maps already
      # read like the pixels (Fashion-MNIST), "gap" is where training shows.
      representation="features",
  ))

  # The results table (distill/stages/table.py): rows x architectures x targets x
  # read-outs x seeds. Rows: none, random, random_mf, kmeans, kip, frepo, krr_st, iadd,
  # mtt, full (regress the teacher on the whole source), teacher.
  c.eval = ml_collections.ConfigDict(dict(
      seeds=(0, 1, 2),
      rows=("none", "random", "krr_st"),
      readouts=("linear_probe",),  # and/or linear_probe_5pct, linear_probe_1pct, finetune,
                               # mkdt_probe, mkdt_probe_5pct, mkdt_probe_1pct (MKDT's read-out)
      archs=(),                # more pretraining archs, "name" or "name:width" (pretrain.arch first)
      extra_targets=(),        # more targets, "dataset|train_split|test_split" (data.target first)
      sizes=(),                # extra set sizes for the size sweep (linear probe, first target)
      sweep_rows=("random", "krr_st"),
      full_epochs=10,          # pretraining epochs of the "full" row
      multi_formation=2,       # random_mf row: real images per stored image = this^2 (IDC)
      multi_formation_full=0.0,  # random_mf row: share of stored images kept at full
                               # resolution, one real image each (a mixed set)
      results_path="",         # also write <results_path>.{md,json,csv,png}
  ))

  # Devices and hosts (distill/nn/parallel.py). One device: nothing to set.
  # Several devices of one process: every loop is data parallel on its own.
  # Several processes: each is started with the same command and config plus
  # its id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
  c.parallel = ml_collections.ConfigDict(dict(
      coordinator_address="",  # "host:port" of process 0; "" = environment or one process
      num_processes=0,
      process_id=-1,
      # Split KRR-ST's synthetic set along n over the devices from this size
      # on (its features are gathered for the kernel); smaller sets are
      # replicated. 0 = never split.
      shard_synthetic_from=2048,
  ))

  c.lock()
  return c


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:variant]` and applies `key.sub=value` overrides.

  Raises:
    DistillError: missing file, no get_config, unknown key, bad value.
  """
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise DistillError(f"config file does not exist: {path}")
  module_spec = importlib.util.spec_from_file_location("_experiment_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except (AttributeError, KeyError) as e:
    # A locked ConfigDict raises these for a misspelt key.
    raise DistillError(f"config {path}: {one_line(e)}") from e
  if not hasattr(module, "get_config"):
    raise DistillError(f"config {path} has no get_config() function")
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except (AttributeError, KeyError) as e:
    raise DistillError(f"config {path}: {one_line(e)}") from e
  apply_overrides(config, overrides)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  """Applies `a.b.c=value` strings in place; values parse as Python literals."""
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise DistillError(f"override {item!r} is not of the form key=value")
    *parents, leaf = key.strip().split(".")
    node = config
    for i, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise DistillError(f"unknown config key {'.'.join(parents[:i + 1])!r} in override {item!r}")
      node = node[part]
    if leaf not in node:
      known = ", ".join(sorted(node.keys()))
      raise DistillError(f"unknown config key {key!r} (known at that level: {known})")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw  # a bare string such as a dataset name or path
    old = node[leaf]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, ml_collections.ConfigDict) or (
        old is not None and not isinstance(value, type(old))):
      raise DistillError(f"config key {key!r} expects {type(old).__name__}, got {raw!r}")
    with config.unlocked():
      node[leaf] = value


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-ready plain dict (tuples become lists)."""
  return config.to_dict()
