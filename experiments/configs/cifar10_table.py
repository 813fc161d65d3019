r"""The results table at CPU scale: CIFAR-10 source, n = 100, label-free rows.

Commands (from the repository root, with ../shared/data beside it and
Debian's dataset-fashion-mnist installed; ~2 h on 2 CPU cores):
  distill teacher --config experiments/configs/cifar10_table.py --workdir runs/c10t30
  distill table   --config experiments/configs/cifar10_table.py --workdir runs/c10t30

Protocol (distill/eval/transfer.py): a set pretrains a fresh width-32 ConvNet by
MSE on its targets without augmentation (SGD lr 0.1 constant, momentum 0.9,
wd 1e-3, batch 256, 1000 epochs; targets centred and scaled to unit overall
std); `full` regresses the teacher on all 10k source images for 30 epochs
(the recipe with the lowest held-out regression error among those measured
by experiments/full_regression.py: experiments/results/full_regression.md). Read-outs: ridge linear probes on
frozen features with reg chosen by 5-fold cross-validation on the labelled
training images, using all of them (10k CIFAR-10, 9.5k Imagenette-32,
a seeded 10k of Fashion-MNIST's 60k) and class-stratified 5% and 1% of them (mean of 5
draws); CIFAR-10 is scored on its 10k test images. 3 seeds.
Rows: none (random init), random and k-means real subsets with teacher
targets, KRR-ST, full, teacher.
Teacher, source and KRR-ST settings are those of cifar10_krr_st.py (same
seed), so the teacher of that workdir may be copied into this one.
Recorded result, with its machine and timings:
experiments/results/cifar10_table.md (+ .json, .csv, .png).

Variant `:sweep` is the size sweep (random and KRR-ST at n = 100, 500,
1000, linear probe on CIFAR-10; KRR-ST sets get 300 outer steps). It has
no recorded result under this protocol.
"""

import os

from distill.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data"))


def get_config(variant: str = ""):
  c = load_config(os.path.join(HERE, "cifar10_param_match.py"))
  c.data.num_target_test = 0          # all 10k CIFAR-10 test images (2k moved a row by ~1 point)
  # The label-free rows and their references. KIP and FRePo (label rows) and
  # the parameter-matching rows can be added here; they have no recorded
  # result under this protocol yet.
  c.eval.rows = ("none", "random", "full", "teacher", "krr_st", "kmeans")
  c.eval.readouts = ("linear_probe", "linear_probe_5pct", "linear_probe_1pct")
  c.eval.archs = ()
  c.eval.extra_targets = (os.path.join(SHARED, "imagenette32-png.tar.gz") + "|train|val",
                          "/usr/share/datasets/fashion-mnist|train|test")
  c.eval.full_epochs = 30
  c.eval.results_path = os.path.normpath(os.path.join(HERE, "..", "results", "cifar10_table"))
  # Fine-tuning (the `finetune` read-out; not in the recorded table): 1,000
  # labelled images, 10 epochs, as a quick check of a backbone's start.
  c.finetune.num_train = 1_000
  c.finetune.steps = 0
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
    c.krr_st.steps = 300
    c.eval.results_path = os.path.normpath(os.path.join(HERE, "..", "results",
                                                        "cifar10_size_sweep"))
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'sweep'")
  return c
