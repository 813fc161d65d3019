r"""CIFAR-10 -> KRR-ST (n=100) -> linear probe on CIFAR-10, CPU scale.

Command (from the repository root, with ../shared/data beside it):
  distill run --config experiments/configs/cifar10_krr_st.py \
      --workdir runs/cifar10_krr_st

Scale chosen to finish in well under an hour on 2 CPU cores: 10k
unlabelled source images, a width-32 ConvNet teacher (Barlow Twins, 20
epochs), 100 synthetic images learned for 1500 outer steps with a pool of 4
width-32 ConvNets, pretraining a width-32 ConvNet, ridge linear probe on
10k labelled CIFAR-10 training images, accuracy on the 10k test images,
3 seeds. The same teacher and KRR-ST settings make the krr_st row of
experiments/results/cifar10_table.md (its recorded result).
"""

import os

from distill.config import base_config

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared",
                      "data")


def get_config(variant: str = ""):
  c = base_config()
  c.data.source = os.path.normpath(os.path.join(SHARED, "cifar10-jpg.tar.gz"))
  c.data.num_source = 10_000
  c.data.target = c.data.source
  c.data.target_test_split = "test"
  c.data.num_target_train = 10_000
  c.data.num_target_test = 0

  c.teacher.arch.name = "convnet"
  c.teacher.arch.width = 32
  c.teacher.projector = (512, 512)
  c.teacher.epochs = 20
  c.teacher.batch_size = 256
  c.teacher.lr = 2e-3
  c.teacher.warmup_steps = 50
  # Targets are the flattened 4x4 feature map (4*4*32 = 512 dims, the width
  # of a ResNet-18's pooled features): "gap" would leave a ConvNet-w32
  # teacher 32 dims and drop where in the image each feature fired.
  c.teacher.representation = "features"

  c.krr_st.num_synthetic = 100
  c.krr_st.steps = 1500
  c.krr_st.batch_size = 256
  c.krr_st.lr_images = 1e-3
  c.krr_st.lr_targets = 1e-3
  c.krr_st.reg = 1e-3
  c.krr_st.reg_scaling = "trace_over_n"
  c.krr_st.pool.size = 4
  c.krr_st.pool.max_age = 100
  # At 2-CPU scale the pool is the constant-width instance-norm ConvNet (the
  # paper's 128-256-512 batch-norm pool costs ~40x the multiply-adds).
  c.krr_st.pool.arch.widths = ()
  c.krr_st.pool.arch.norm = "instance"
  c.krr_st.pool.arch.width = 32
  c.krr_st.pool.weight_decay = 0.0
  c.krr_st.pool.lr = 0.01
  c.krr_st.log_every = 100
  c.krr_st.checkpoint_every = 250

  # The official pretraining recipe (MSE, SGD lr 0.1 constant, momentum 0.9,
  # wd 1e-3, batch 256, 1000 epochs, no augmentation: base_config), on a
  # width-32 ConvNet like the teacher's.
  c.pretrain.arch.width = 32
  c.eval.seeds = (0, 1, 2)
  if variant:
    raise ValueError(f"unknown variant {variant!r}")
  return c
