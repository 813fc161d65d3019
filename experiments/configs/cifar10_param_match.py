r"""CIFAR-10 -> expert buffer -> importance-weighted parameter matching, CPU scale.

Commands (from the repository root, with ../shared/data beside it; the
teacher stage is only needed for the label-free "mse" experts):
  distill teacher     --config experiments/configs/cifar10_param_match.py \
      --workdir runs/param_match_cifar10
  distill experts     --config experiments/configs/cifar10_param_match.py \
      --workdir runs/param_match_cifar10
  distill param-match --config experiments/configs/cifar10_param_match.py \
      --workdir runs/param_match_cifar10

Variants: "" (label-free: experts regress the Barlow Twins teacher's
representations, W learned per parameter), ":ce" (experts trained with the
CIFAR-10 labels, learned soft labels), ":mtt" (W = 1: plain MTT baseline),
":smoke" (seconds, for tests; point data.source at any small labelled set).

Scale (2-core CPU; the second-order unroll costs ~5 s per outer step even
here): 10k source images, 2 width-16 ConvNet experts of 6 epochs, 100
synthetic images matched with N=10 student steps of 20 images against M=2
expert epochs from start epochs 0..4, 60 outer steps. On a GPU raise
experts.arch.width (128), experts.num_experts, experts.epochs, syn_steps,
syn_batch and steps. The teacher section equals cifar10_krr_st.py's, so that
run's teacher can be copied into the workdir.
No recorded transfer result under the current protocol (un-augmented
pretraining, cross-validated probes); the step's memory and speed are in
experiments/results/benchmark_param_match_cpu.md.
"""

import os

from distill.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = ""):
  # Source, target, teacher (and KRR-ST, pretraining) as in cifar10_krr_st.py.
  c = load_config(os.path.join(HERE, "cifar10_krr_st.py"))

  c.experts.num_experts = 2
  c.experts.epochs = 6
  c.experts.objective = "mse"
  c.experts.arch.width = 16
  c.experts.batch_size = 256
  c.experts.log_every = 39

  c.param_match.method = "iadd"
  c.param_match.num_synthetic = 100
  c.param_match.syn_steps = 10
  c.param_match.expert_epochs = 2
  c.param_match.max_start = 5
  c.param_match.syn_batch = 20
  c.param_match.steps = 60
  c.param_match.lr_images = 1e-2
  c.param_match.lr_targets = 1e-2
  c.param_match.lr_weights = 1e-2
  c.param_match.lr_alpha = 1e-2
  c.param_match.log_every = 5
  c.param_match.checkpoint_every = 20

  if variant == "ce":
    c.experts.objective = "ce"
  elif variant == "mtt":
    c.param_match.method = "mtt"
  elif variant == "smoke":
    c.data.num_source = 0
    c.data.num_target_train = 0
    c.teacher.arch.width = 8
    c.teacher.arch.depth = 2
    c.teacher.projector = (32, 32)
    c.teacher.epochs = 1
    c.teacher.batch_size = 32
    c.experts.num_experts = 2
    c.experts.epochs = 3
    c.experts.objective = "ce"
    c.experts.arch.width = 4
    c.experts.arch.depth = 1
    c.experts.batch_size = 32
    c.experts.lr_ce = 0.05
    c.experts.augment = False
    c.experts.log_every = 3
    c.param_match.num_synthetic = 6
    c.param_match.syn_steps = 3
    c.param_match.expert_epochs = 1
    c.param_match.max_start = 2
    c.param_match.syn_batch = 0
    c.param_match.steps = 4
    c.param_match.augment = False
    c.param_match.lr_images = 3e-2
    c.param_match.lr_targets = 3e-2
    c.param_match.lr_weights = 3e-2
    c.param_match.lr_alpha = 3e-2
    c.param_match.log_every = 2
    c.param_match.checkpoint_every = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r}")
  return c
