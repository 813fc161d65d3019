r"""The effect table on one GPU: cifar10_effect.py's source, teacher and students,
with the paper's KRR-ST pool and MTT-size experts.

Command (one GPU, from the repository root, with ../shared/data beside it;
the whole table in one run under a time budget, rows of seed 0 first):
  bash experiments/cifar10_effect_gpu.sh
which runs, in runs/cifar10_effect_gpu:
  distill experts     --config experiments/configs/cifar10_effect_gpu.py --workdir W
  distill param-match --config experiments/configs/cifar10_effect_gpu.py --workdir W
  distill krr-st      --config experiments/configs/cifar10_effect_gpu.py --workdir W
  distill table       --config experiments/configs/cifar10_effect_gpu.py --workdir W

Same as cifar10_effect.py: all 50,000 CIFAR-10 training images as the
unlabelled source, the committed reference teacher (Barlow Twins
ConvNet-w64, 66.19% under the all-label probe), n = 1,000, ConvNet-w64
students pretrained by MSE without augmentation, ridge probes with all / 5% /
1% of CIFAR-10's labels and MKDT's logistic probe at 5%; Imagenette-32 as a
second target (Fashion-MNIST stays with the CPU table).

What the GPU buys:
  * KRR-ST with the paper's pool (10 ConvNets 128-256-512 with batch norm,
    ages up to 1,000, inner SGD lr 0.1), real batch 1,024, ridge 1e-6 x
    trace, for 2,000 outer steps (the paper's 160,000 do not fit the budget);
  * knowledge-distillation experts (MSE to the teacher's cached views) of
    the MTT ConvNet (width 128, instance norm): 10 experts of 6 epochs, the
    last 2 held out; matching 1,500 outer steps of 20 student steps on 100
    images, start epochs 0-3, target 2 epochs later, from MKDT's high-loss
    start, the student regressing the teacher's view of the current images
    (param_match.teacher_targets, so the exported targets are the teacher's
    representations of the exported images);
  * 3 seeds of every row.
Recorded: experiments/results/cifar10_effect_gpu.md (machine, versions, the
held-out objectives of both distillations, the table). Expected (3 seeds on
an H200; the stages and seed 0 in 557 s): CIFAR-10 probe with 5% of the
labels none 44.66, random 56.31, kmeans 55.55, krr_st 54.26, mtt 53.67, full
57.26, teacher 59.72 (std over seeds at most 0.4).

Variant `smoke`: the same stages at toy size (2,000 source images, n = 20,
a few steps of everything) for checking the script on a CPU in minutes.
"""

import os

from distill.config import base_config, load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str = ""):
  c = load_config(os.path.join(HERE, "cifar10_effect.py"))
  c.eval.results_path = os.path.normpath(os.path.join(HERE, "..", "results",
                                                      "cifar10_effect_gpu"))
  # random_mf (multi-formation, cifar10_effect_n100_multi_formation.md) is last:
  # it was added after the recorded run, whose entries stay as they were.
  c.eval.rows = ("none", "teacher", "random", "mtt", "krr_st", "full", "kmeans", "random_mf")
  c.eval.seeds = (0, 1, 2)
  c.eval.readouts = ("linear_probe_5pct", "linear_probe", "linear_probe_1pct",
                     "mkdt_probe_5pct")
  c.eval.extra_targets = c.eval.extra_targets[:1]  # Imagenette-32
  # The recorded table's `full` regressed 10 epochs (1,960 steps); the CPU
  # config's 20, chosen later by held-out error, reads 0.7 points higher
  # (full_regression_effect.md). Kept at 10 so this command gives the record.
  c.eval.full_epochs = 10

  # KRR-ST: the paper's settings (base_config's defaults) at n = 1,000.
  c.krr_st = base_config().krr_st
  c.krr_st.num_synthetic = 1_000
  c.krr_st.steps = 2_000
  c.krr_st.log_every = 100
  c.krr_st.checkpoint_every = 500

  # Knowledge-distillation experts and matching at MTT's ConvNet size.
  c.experts.arch.width = 128
  c.experts.num_experts = 10
  c.experts.epochs = 6
  c.experts.log_every = 196
  # The recorded table's experts regressed the raw representations (the
  # recipe expert_probe_n100.json later found does not learn the teacher);
  # kept so this command gives the record.
  c.experts.standardize_targets = False
  # `distill param-match` then writes the table's mtt set (plain MTT, W = 1).
  c.param_match.method = "mtt"
  c.param_match.held_out_experts = 2
  c.param_match.max_start = 4
  c.param_match.steps = 1_500
  c.param_match.log_every = 100
  c.param_match.checkpoint_every = 500
  c.param_match.teacher_targets = True

  if variant == "smoke":
    c.data.num_source = 2_000
    c.data.num_target_train = 1_000
    c.data.num_target_test = 500
    c.krr_st.num_synthetic = c.param_match.num_synthetic = 20
    c.krr_st.steps = 4
    c.krr_st.batch_size = 64
    c.krr_st.pool.size = 2
    c.krr_st.pool.arch.widths = (8, 8, 8)
    c.krr_st.held_out_models = 1
    c.krr_st.held_out_images = 100
    c.experts.num_experts = 3
    c.experts.arch.width = 8
    c.param_match.steps = 3
    c.param_match.syn_steps = 2
    c.param_match.syn_batch = 10
    c.param_match.held_out_experts = 1
    c.pretrain.epochs = 2
    c.eval.full_epochs = 1
    c.eval.seeds = (0, 1)
    c.probe.label_draws = 1
    c.eval.results_path = ""
  elif variant:
    raise ValueError(f"unknown variant {variant!r}")
  return c
