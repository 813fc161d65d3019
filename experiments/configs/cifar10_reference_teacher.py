r"""The reference CIFAR-10 teacher: Barlow Twins on all 50,000 training images.

Command (from the repository root, with ../shared/data beside it; resumable:
rerun the same command after an interruption and it continues from the last
checkpoint):
  distill teacher --config experiments/configs/cifar10_reference_teacher.py \
      --workdir runs/cifar10_reference_teacher

A width-64 ConvNet (3 blocks, 4x4x64 = 1024-dim flattened features) trained
for 60 epochs (11,700 steps of batch 256): the length a 2-core CPU finishes in
about three hours. Calibration with the same recipe at 20 epochs: 60.8%
under the linear probe (random-init ConvNet-w64: 49.7%). The probe here is the
all-label one (50,000 labelled CIFAR-10 training images, accuracy on the
10,000 test images). Any other workdir uses the finished teacher without
retraining it: `--set teacher.checkpoint=runs/cifar10_reference_teacher/teacher`
(a folder saved by `distill teacher` is copied in with its card).

Recorded result: the run's checkpoint at step 4,680 (24 epochs), saved with
`distill.stages.teacher.snapshot_teacher`, probes at 66.19% (random-init
ConvNet-w64: 53.52%); it is committed as
experiments/teachers/cifar10_convnet_w64 (card and commands in its README.md)
and is the teacher of cifar10_effect.py. The full 60 epochs have not been
measured.
"""

import os

from distill.config import base_config

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared",
                      "data")


def get_config(variant: str = ""):
  c = base_config()
  c.data.source = os.path.normpath(os.path.join(SHARED, "cifar10-jpg.tar.gz"))
  c.data.num_source = 0
  c.data.target = c.data.source
  c.data.target_test_split = "test"
  c.data.num_target_train = 0
  c.data.num_target_test = 0

  c.teacher.arch.name = "convnet"
  c.teacher.arch.width = 64
  c.teacher.projector = (1024, 1024)
  c.teacher.epochs = 60
  c.teacher.batch_size = 256
  c.teacher.lr = 2e-3
  c.teacher.warmup_steps = 200
  c.teacher.representation = "features"
  if variant:
    raise ValueError(f"unknown variant {variant!r}")
  return c
