r"""The results table at CPU scale: CIFAR-10 source, n = 100, every row.

Command (from the repository root, with ../shared/data beside it and
Debian's dataset-fashion-mnist installed):
  distill run --config experiments/configs/cifar10_table.py \
      --workdir runs/cifar10_table

Teacher, source and KRR-ST settings are those of cifar10_krr_st.py (same
seed), so the teacher and synthetic.npz of that workdir may be copied into
this one instead of recomputed; experts and parameter matching are those of
cifar10_param_match.py. Rows: none, random, k-means, KIP (ConvNet
NTK without pooling, 2x2-averaged inputs, depth 2), FRePo-style supervised
KRR (the KRR-ST pool, learned labels), KRR-ST, IADD and MTT against label-
free experts (iadd, mtt) and against cross-entropy experts (iadd_ce,
mtt_ce), full-source pretraining and the teacher itself. Pretraining on
ConvNet-w32, ResNet-10-w16 and ResNet-18-w16 (the sets are distilled once,
with ConvNets); targets CIFAR-10 test, Imagenette-32 (val) and Fashion-MNIST
(test), each read out by a ridge linear probe and by fine-tuning (1,000
training images, 10 epochs), 3 seeds. Recorded result, with the subsets of
rows, seeds and read-outs each architecture got on a 2-core CPU and the
commands that made it: experiments/results/cifar10_table.md (+ .png).

Variant `:sweep` is the size sweep, in its own workdir (copy or link the
teacher of the table's workdir into it; the teacher settings are the same):
  distill table --config experiments/configs/cifar10_table.py:sweep \
      --workdir runs/cifar10_sweep
random and KRR-ST at n = 100, 500, 1000 (linear probe on CIFAR-10, ConvNet,
3 seeds; none as the floor). To fit a 2-core CPU every KRR-ST set here gets
300 outer steps instead of 1,500, so its n = 100 point is not the table's.
Recorded result: experiments/results/cifar10_size_sweep.md.
"""

import os

from distill.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data"))


def get_config(variant: str = ""):
  c = load_config(os.path.join(HERE, "cifar10_param_match.py"))
  c.data.num_target_test = 2_000
  c.eval.rows = ("none", "random", "kmeans", "kip", "frepo", "krr_st", "iadd", "mtt",
                 "iadd_ce", "mtt_ce", "full", "teacher")
  c.eval.readouts = ("linear_probe", "finetune")
  c.eval.archs = ("resnet10:16", "resnet18:16")
  c.eval.extra_targets = (os.path.join(SHARED, "imagenette32-png.tar.gz") + "|train|val",
                          "/usr/share/datasets/fashion-mnist|train|test")
  c.eval.full_epochs = 5
  c.eval.results_path = os.path.normpath(os.path.join(HERE, "..", "results", "cifar10_table"))
  c.pretrain.epochs = 200
  c.finetune.num_train = 1_000
  c.finetune.epochs = 10
  c.finetune.lr = 0.05         # few steps (80), so a larger step than the paper's 0.01
  c.kip.steps = 300
  c.kip.batch_size = 128
  c.kip.depth = 2
  c.kip.downsample = 2
  c.kip.lr_images = 1e-3
  c.kip.lr_targets = 1e-3
  if variant == "sweep":
    c.eval.rows = ("none", "random", "krr_st")
    c.eval.sweep_rows = ("random", "krr_st")
    c.eval.sizes = (500, 1000)
    c.eval.readouts = ("linear_probe",)
    c.eval.archs = ()
    c.distill.steps = 300
    c.eval.results_path = os.path.normpath(os.path.join(HERE, "..", "results",
                                                        "cifar10_size_sweep"))
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'sweep'")
  return c
