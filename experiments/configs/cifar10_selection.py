r"""Selection tools on CIFAR-10 at 2-CPU scale: source pruning, InfoBatch, influence.

Commands (from the repository root, with ../shared/data beside it):
  distill prune-source --config experiments/configs/cifar10_selection.py \
      --workdir runs/selection_cifar10/prune
  distill influence --config experiments/configs/cifar10_selection.py \
      --workdir runs/selection_cifar10/influence      (needs <workdir>/teacher)
and the measurement scripts, which use this config:
  experiments/source_pruning.py, experiments/infobatch_teacher.py,
  experiments/infobatch_finetune.py, experiments/influence_duplicates.py

Source: 5k labelled CIFAR-10 training images (10 groups = classes).
Target: Imagenette resized to 32x32 (votes from 3k training images, linear
probe accuracy on its 3,925 validation images). Teacher: the width-32
ConvNet Barlow Twins of cifar10_krr_st.py, 10 epochs here.

Recorded results: experiments/results/selection_influence.md,
selection_infobatch.md, selection_infobatch_finetune.md and
selection_source_pruning.md.
"""

import os

from distill.config import base_config

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared",
                      "data")


def get_config(variant: str = ""):
  c = base_config()
  c.data.source = os.path.normpath(os.path.join(SHARED, "cifar10-jpg.tar.gz"))
  c.data.num_source = 5_000
  c.data.target = os.path.normpath(os.path.join(SHARED, "imagenette32-png.tar.gz"))
  c.data.target_train_split = "train"
  c.data.target_test_split = "val"
  c.data.num_target_train = 3_000
  c.data.num_target_test = 0

  c.teacher.arch.name = "convnet"
  c.teacher.arch.width = 32
  c.teacher.projector = (512, 512)
  c.teacher.epochs = 10
  c.teacher.batch_size = 256
  c.teacher.lr = 2e-3
  c.teacher.warmup_steps = 50
  c.teacher.infobatch.prune_ratio = 0.5
  c.teacher.infobatch.delta = 0.8

  c.selection.prune.method = "fm"
  c.selection.prune.keep_fraction = 0.5
  c.selection.prune.surrogate.width = 32
  c.selection.prune.epochs = 4
  c.selection.prune.batch_size = 128
  c.selection.prune.lr = 2e-3

  c.selection.influence.num_views = 2
  c.selection.influence.reg = 1e-2
  if variant == "smoke":
    c.data.num_source = 200
    c.data.num_target_train = 100
    c.data.num_target_test = 100
    c.teacher.arch.width = 8
    c.teacher.projector = (32, 32)
    c.teacher.epochs = 2
    c.teacher.batch_size = 50
    c.selection.prune.surrogate.width = 8
    c.selection.prune.epochs = 1
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'smoke'")
  return c
