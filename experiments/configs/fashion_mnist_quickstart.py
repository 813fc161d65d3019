r"""Quick start: the whole pipeline on Fashion-MNIST, offline, on 2 CPU cores.

Command (from the repository root; README's first command does set-up too):
  distill run --config experiments/configs/fashion_mnist_quickstart.py \
      --workdir runs/quickstart

Data: Debian's `dataset-fashion-mnist` (IDX files in
/usr/share/datasets/fashion-mnist). Source = 10k unlabelled training
images; target = Fashion-MNIST itself (labels used by the probe only).

Expected result: experiments/results/fashion_mnist_quickstart.md records
the numbers and duration of this exact config (rows none / random /
KRR-ST / teacher, 100 synthetic images, linear probes with all and with 1%
of the labels, 2 seeds).

Variant `:smoke` shrinks everything to seconds for tests; point it at any
small dataset with --set data.source=... data.target=...
"""

from distill.config import base_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.source = "/usr/share/datasets/fashion-mnist"
  c.data.num_source = 10_000
  c.data.target = "/usr/share/datasets/fashion-mnist"
  c.data.num_target_train = 10_000
  c.data.num_target_test = 5_000

  c.teacher.arch.name = "convnet"
  c.teacher.arch.width = 32
  c.teacher.projector = (256, 256)
  c.teacher.epochs = 24
  c.teacher.batch_size = 256
  c.teacher.lr = 2e-3
  c.teacher.warmup_steps = 50
  # Targets and probes use the pooled map ("gap", 32 dims). On Fashion-MNIST
  # a random-init ConvNet's flattened 3x3 map (288 dims) already reads like
  # the pixels: 84.5% under the probe, and Barlow Twins for 8 or 24 epochs
  # adds at most 0.3 there, so no pretraining could show. Pooled, the same
  # 24-epoch teacher reads 72.9% against 69.8% with all labels and 66.3%
  # against 60.7% with 1% of them (8 epochs: 69.8 and 63.0;
  # experiments/results/representation_headroom*.json).
  c.teacher.representation = "gap"
  c.probe.representation = "gap"
  # The student is trained through the view that is read: its head reads its
  # pooled map too. With the head on the flattened map, a student fitted the
  # teacher's pooled targets with spatial detail the pooled read-out
  # discards, and its probe fell the longer it trained (n = 1,000: 62.7 at
  # 100 steps, 58.4 at 1,000, against none 60.7 with 1% of the labels); with
  # the pooled head it rises with the fit, to 67.8 (teacher 66.4;
  # experiments/results/fashion_mnist_pretraining_gain.md).
  c.pretrain.arch.head_input = "gap"

  c.krr_st.num_synthetic = 100
  c.krr_st.steps = 600
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
  c.krr_st.log_every = 50
  c.krr_st.checkpoint_every = 200

  # The official pretraining recipe (MSE, no augmentation, SGD lr 0.1
  # constant, momentum 0.9, wd 1e-3: base_config) for 300 epochs instead of
  # 1000, to keep the quick start short.
  c.pretrain.arch.width = 32
  c.pretrain.epochs = 300
  c.eval.rows = ("none", "random", "krr_st", "teacher")
  c.eval.readouts = ("linear_probe", "linear_probe_1pct")
  c.eval.seeds = (0, 1)

  if variant == "smoke":
    c.data.num_source = 0
    c.data.num_target_train = 0
    c.data.num_target_test = 0
    c.teacher.arch.width = 8
    c.teacher.arch.depth = 2
    c.teacher.projector = (32, 32)
    # A width-8 teacher's pooled map is 8 numbers: the tests use the
    # flattened map (the default path), and test_protocol the pooled one.
    c.teacher.representation = "features"
    c.probe.representation = "features"
    c.pretrain.arch.head_input = "features"
    c.teacher.epochs = 2
    c.teacher.batch_size = 32
    c.krr_st.num_synthetic = 12
    c.krr_st.steps = 6
    c.krr_st.batch_size = 32
    c.krr_st.pool.size = 2
    c.krr_st.pool.max_age = 3
    c.krr_st.pool.arch.width = 8
    c.krr_st.pool.arch.depth = 2
    c.krr_st.log_every = 2
    c.krr_st.checkpoint_every = 3
    c.pretrain.arch.width = 8
    c.pretrain.arch.depth = 2
    c.pretrain.epochs = 2
    c.pretrain.batch_size = 12
    c.finetune.steps = 4
    c.eval.seeds = (0,)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'smoke'")
  return c
