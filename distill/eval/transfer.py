"""Transfer protocol: pretrain on a (synthetic) set, then read out on a target.

Pretraining fits a fresh network with a linear head to the set's targets
(SGD with momentum and weight decay): MSE for teacher-space targets and
learned labels, cross-entropy for soft labels. Inputs and targets always
belong to the same view: a set's stored targets are those of its stored
images, so augmentation is used only where the targets can follow the view
(label targets, or real images whose targets the teacher recomputes on each
view). Then the head is dropped. Read-outs on a labelled target:

* `linear_probe`: a ridge classifier on the frozen features of the target's
  training split (the project's one ridge solver, `kernels.ridge.ridge_fit`),
  regularisation chosen by k-fold cross-validation; top-1 on the test split.
* `linear_probe_5pct`, `linear_probe_1pct`: the same on a class-stratified
  5% / 1% of the training labels, averaged over several draws (the
  low-label protocol of MKDT, ICLR 2025).
* `finetune`: a new linear head on the pretrained backbone, all layers
  trained by cross-entropy (SGD + momentum, weight decay, cosine schedule,
  crop + flip) for a stated number of steps; top-1 on the test split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill.data import augment, datasets
from distill.errors import DistillError
from distill.nn.loop import batch_indices, run_loop
from distill.nn.models import apply_model, build_model, gradient_step, init_model
from distill.selection import infobatch
from kernels.ridge import ridge_fit, ridge_path, with_bias


TARGET_KINDS = ("teacher", "learned", "labels")


def pretrain_steps(cfg: ml_collections.ConfigDict, n: int) -> int:
  return cfg.epochs * max(n // min(cfg.batch_size, n), 1)


def make_pretrain_step(model, optimizer, augment_images: bool, loss: str,
                       view_targets=None):
  """Jitted `(state, (images, targets), rng) -> (state, metrics)`.

  Args:
    model, optimizer: the network (with a head) and its optax optimizer.
    augment_images: crop + flip the inputs.
    loss: "mse" to the targets, or "ce" to soft-label targets (probabilities).
    view_targets: None (the batch's targets are used as they are), or a
      jittable `x (B,H,W,C) -> (B,d)` that recomputes them on the
      (augmented) inputs, e.g. the teacher.
  """
  if loss not in ("mse", "ce"):
    raise DistillError(f"unknown pretraining loss {loss!r}; expected 'mse' or 'ce'")

  def step(state, batch, rng):
    images, targets = batch
    if augment_images:
      images = augment.random_crop_flip(rng, images)
    if view_targets is not None:
      targets = jax.lax.stop_gradient(view_targets(images))

    def objective(features, outputs):
      if loss == "ce":
        return optax.softmax_cross_entropy(outputs, targets).mean()
      return jnp.mean((outputs - targets) ** 2)

    return gradient_step(model, optimizer, state, images, objective)

  return jax.jit(step, donate_argnums=0)


def target_standardizer(targets: np.ndarray):
  """The map `pretrain.standardize_targets` applies: per-dimension centre, one overall scale.

  Args:
    targets: (n, d) a set's targets; the map is fitted to them.

  Returns:
    `y (..., d) -> (y - centre) / scale`, for numpy or jax arrays (e.g. the
    teacher's targets of other images, to compare them with the head's output).
  """
  centre, scale = datasets.target_stats(np.asarray(targets, np.float32))
  return lambda y: (y - centre) / scale


def pretrain(cfg: ml_collections.ConfigDict, images: np.ndarray, targets: np.ndarray,
             seed: int, workdir: str, name: str, *, kind: str = "teacher",
             loss: str = "mse", teacher_fn=None, quiet: bool = False):
  """Pretrains a fresh `cfg.arch` network on (images, targets).

  Args:
    cfg: the `pretrain` config section.
    images: (n, H, W, C) float32 normalised images.
    targets: (n, d) float32 targets of those images.
    seed: initialisation and shuffling seed.
    workdir, name: checkpoints go to `workdir/name` (resumable).
    kind: what the targets are. "teacher": the teacher's representations of
      real images (with `cfg.augment`, `teacher_fn` recomputes them on each
      view); "learned": learned teacher-space targets (no teacher can
      recompute them, so never augmented); "labels": (learned) labels,
      the same for every view.
    loss: "mse" or "ce" (targets are then probabilities).
    teacher_fn: jittable `x (B,H,W,C) -> (B,d)`, the teacher's representation;
      needed for kind "teacher" with augmentation.

  Returns:
    (backbone model without head, its variables).
  """
  n, d = targets.shape
  if len(images) != n:
    raise DistillError(f"pretraining set has {len(images)} images but {n} targets")
  if kind not in TARGET_KINDS:
    raise DistillError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
  augment_images = bool(cfg.augment) and kind != "learned"
  if augment_images and kind == "teacher" and teacher_fn is None:
    raise DistillError("pretraining with augmentation on teacher targets needs the teacher "
                       "to recompute them on each view (teacher_fn)")
  view_targets = teacher_fn if augment_images and kind == "teacher" else None
  if loss == "mse" and kind != "labels" and cfg.get("standardize_targets", False):
    # One affine map of the targets (per-dimension centre, one overall
    # scale): the head absorbs it, and the regression no longer spends its
    # effort on the targets' large common mean.
    standardize = target_standardizer(targets)
    targets = standardize(targets)
    if view_targets is not None:
      teacher_view = view_targets
      view_targets = lambda x: standardize(teacher_view(x))
  model = build_model(cfg.arch, num_outputs=d)
  num_steps = pretrain_steps(cfg, n)
  schedule = (cfg.get("schedule", "cosine"), cfg.lr, num_steps)
  optimizer, step = _train_fns(make_pretrain_step, model, schedule, cfg.momentum,
                               cfg.weight_decay, augment_images, loss, view_targets)
  variables = init_model(model, jax.random.key(seed), images.shape[1:])
  state = {"variables": variables, "opt_state": optimizer.init(variables["params"])}
  batch_size = min(cfg.batch_size, n)
  images_j, targets_j = jnp.asarray(images), jnp.asarray(targets, jnp.float32)

  def batch_fn(i):
    idx = jnp.asarray(batch_indices(seed, i, n, batch_size))
    return images_j[idx], targets_j[idx]

  state, _ = run_loop(name=name, workdir=workdir, state=state, step_fn=step,
                      batch_fn=batch_fn, num_steps=num_steps,
                      rng=jax.random.key(seed + 1000),
                      log_every=max(num_steps // 5, 1), checkpoint_every=max(num_steps // 4, 1),
                      quiet=quiet)
  return build_model(cfg.arch), state["variables"]


def head_predictions(model_with_head, variables: dict, images: np.ndarray,
                     batch_size: int = 500) -> np.ndarray:
  """(N, d) predictions of a pretrained network's head (the training targets' space).

  Args:
    model_with_head: the network built with `num_outputs=d`, as `pretrain` trains it.
    variables: its variables (those `pretrain` returns). images: (N, H, W, C) normalised.
  """
  return np.concatenate([
      np.asarray(model_with_head.apply(variables, jnp.asarray(images[i:i + batch_size]))[1])
      for i in range(0, len(images), batch_size)])


def relative_error(predictions: np.ndarray, truth: np.ndarray) -> float:
  """Mean squared error over the variance of the truth (1 - R^2), both (N, d).

  Pretraining's own label-free objective: on images the network never saw,
  how much of the teacher's representation its head does not predict.
  """
  return float(np.mean((predictions - truth) ** 2) / np.mean((truth - truth.mean(0)) ** 2))


def fresh_backbone(cfg: ml_collections.ConfigDict, image_shape, seed: int):
  """The no-pretraining baseline: a randomly initialised backbone."""
  model = build_model(cfg.arch)
  return model, init_model(model, jax.random.key(seed), image_shape)


PROBE_FRACTIONS = {"linear_probe": 1.0, "linear_probe_5pct": 0.05, "linear_probe_1pct": 0.01,
                   # MKDT's linear evaluation (`logistic_probe`), so a table can
                   # stand beside the published numbers.
                   "mkdt_probe": 1.0, "mkdt_probe_5pct": 0.05, "mkdt_probe_1pct": 0.01}


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray,
                 regs=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), folds: int = 5,
                 seed: int = 0) -> dict:
  """Ridge-classifier probe: top-1 accuracy on the test split.

  Features are centred with the training mean and divided by one overall
  scale (root mean squared norm), never per dimension: per-dimension
  standardisation would inflate near-dead dimensions to the size of the
  informative ones. Labels become one-hot targets; `reg` (trace_over_n
  convention, so comparable across feature widths and scales) is chosen by
  `folds`-fold cross-validated accuracy on the training split, then the
  classifier is refitted on all of it.

  Args:
    train_features: (N, p). train_labels: (N,) int.
    test_features: (M, p). test_labels: (M,) int.
    regs: the grid, increasing; the choice should be interior (`interior`).
    folds: cross-validation folds (at most N).
    seed: fold assignment seed.

  Returns:
    {"accuracy", "reg" (chosen), "cv_accuracy" (its cross-validated
    accuracy), "interior" (True unless the chosen reg is an end of the grid)}.
  """
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  mu = train_features.mean(0)
  scale = float(np.sqrt(np.mean(np.sum((train_features - mu) ** 2, axis=1)))) + 1e-12
  prep = lambda f: with_bias(jnp.asarray((f - mu) / scale, jnp.float32))
  one_hot = lambda y: jax.nn.one_hot(y, num_classes)
  x_all, y_all = prep(train_features), np.asarray(train_labels)

  def accuracy(weights, x, y):
    return float(jnp.mean(jnp.argmax(x @ weights, -1) == jnp.asarray(y)))

  fold_of = np.random.default_rng(seed).permutation(len(y_all)) % max(min(folds, len(y_all)), 2)
  scores = np.zeros(len(regs))
  grid = jnp.asarray(regs, jnp.float32)
  for k in np.unique(fold_of):
    fit, val = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
    # One eigendecomposition per fold serves the whole grid.
    weights = ridge_path(x_all[fit], one_hot(y_all[fit]), grid)          # (r, p+1, classes)
    hits = jnp.argmax(jnp.einsum("vp,rpc->rvc", x_all[val], weights), -1) == y_all[val]
    scores += np.asarray(jnp.sum(hits, -1)) / len(y_all)
  best = int(np.argmax(scores))
  weights, info = ridge_fit(x_all, one_hot(y_all), regs[best])
  if not bool(info.ok):
    raise DistillError("linear probe: ridge solve failed even with jitter; features degenerate")
  return {"accuracy": accuracy(weights, prep(test_features), test_labels),
          "reg": float(regs[best]), "cv_accuracy": float(scores[best]),
          "interior": 0 < best < len(regs) - 1}


def logistic_probe(train_features: np.ndarray, train_labels: np.ndarray,
                   test_features: np.ndarray, test_labels: np.ndarray, reg: float = 1e-3,
                   iterations: int = 400) -> dict:
  """MKDT's linear evaluation (jiayini1119/MKDT, evaluation/linear_evaluation.py).

  A linear layer with bias on the raw frozen features (no centring or
  scaling), trained full-batch to minimise mean cross-entropy + reg *
  sum(W^2) with L-BFGS; their code runs torch's L-BFGS for 20 calls of up
  to 20 iterations each, so up to 400 iterations, which is what
  `iterations` bounds here (optax's L-BFGS, zoom line search). The problem
  is convex, so both approach the same minimiser; no hyper-parameter is
  chosen on the data.

  Args:
    train_features: (N, p). train_labels: (N,) int.
    test_features: (M, p). test_labels: (M,) int.
    reg: the L2 weight on W (their 1e-3). iterations: L-BFGS iterations.

  Returns:
    {"accuracy": top-1 on the test split, "loss": the final training objective,
    "grad_norm": its gradient's norm there (0 at the minimiser)}.
  """
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  x = jnp.asarray(train_features, jnp.float32)
  targets = jax.nn.one_hot(jnp.asarray(train_labels), num_classes)
  return _fit_logistic(x, targets, jnp.asarray(test_features, jnp.float32),
                       jnp.asarray(test_labels), reg, iterations)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _fit_logistic(x, targets, x_test, y_test, reg: float, iterations: int) -> dict:
  params = {"w": jnp.zeros((x.shape[1], targets.shape[1])), "b": jnp.zeros(targets.shape[1])}

  def objective(p):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy(logits, targets).mean() + reg * jnp.sum(p["w"] ** 2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=objective)
    return (optax.apply_updates(p, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), length=iterations)
  predicted = jnp.argmax(x_test @ params["w"] + params["b"], -1)
  return {"accuracy": jnp.mean(predicted == y_test), "loss": objective(params),
          "grad_norm": optax.global_norm(jax.grad(objective)(params))}


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of `fraction` of each class's samples (at least one each)."""
  rng = np.random.default_rng(seed)
  keep = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    keep.append(rng.choice(members, max(int(round(fraction * len(members))), 1), replace=False))
  return np.sort(np.concatenate(keep))


def probe_accuracies(readouts, train_features: np.ndarray, train_labels: np.ndarray,
                     test_features: np.ndarray, test_labels: np.ndarray,
                     probe_cfg: ml_collections.ConfigDict, seed: int) -> dict:
  """{read-out: top-1} of several `probe_readout`s on one backbone's frozen features.

  Args:
    readouts: names from PROBE_FRACTIONS.
    train_features, test_features: (N, p), (M, p). train_labels, test_labels: (N,), (M,).
    probe_cfg: the `probe` config section (regs, folds, label_draws).
  """
  return {r: probe_readout(r, train_features, train_labels, test_features, test_labels,
                           regs=tuple(probe_cfg.regs), folds=probe_cfg.folds,
                           label_draws=probe_cfg.label_draws, seed=seed)["accuracy"]
          for r in readouts}


def probe_readout(readout: str, train_features: np.ndarray, train_labels: np.ndarray,
                  test_features: np.ndarray, test_labels: np.ndarray, *, regs, folds: int,
                  label_draws: int, seed: int) -> dict:
  """A probe read-out of PROBE_FRACTIONS: all labels, or a low-label fraction.

  "linear_probe*" is the cross-validated ridge probe (`linear_probe`);
  "mkdt_probe*" is MKDT's L-BFGS logistic regression (`logistic_probe`).

  Low-label probes are averaged over `label_draws` class-stratified draws of
  the labelled subset (one draw's accuracy moves by points with which few
  images it gets).

  Returns:
    `linear_probe`'s dict; for fractions below 1, "accuracy" is the mean
    over draws, plus "accuracy_std", "draws" and "interior" (the share of
    draws whose chosen reg was interior).
  """
  if readout not in PROBE_FRACTIONS:
    raise DistillError(f"unknown probe read-out {readout!r}; expected one of "
                       f"{tuple(PROBE_FRACTIONS)}")
  fraction = PROBE_FRACTIONS[readout]
  if readout.startswith("mkdt"):
    probe = lambda idx, s: {k: float(v) for k, v in logistic_probe(
        train_features[idx], train_labels[idx], test_features, test_labels).items()}
  else:
    probe = lambda idx, s: linear_probe(train_features[idx], train_labels[idx], test_features,
                                        test_labels, regs=regs, folds=folds, seed=s)
  if fraction >= 1:
    return probe(np.arange(len(train_labels)), seed)
  runs = [probe(stratified_subset(train_labels, fraction, 10_000 * seed + draw), seed + draw)
          for draw in range(label_draws)]
  acc = np.array([r["accuracy"] for r in runs])
  out = {"accuracy": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if
         len(acc) > 1 else 0.0, "draws": len(runs)}
  if "reg" in runs[0]:  # the ridge probe's chosen regularisation per draw
    out.update(reg=[r["reg"] for r in runs],
               interior=float(np.mean([r["interior"] for r in runs])))
  return out


def with_new_head(backbone: dict, classifier_init: dict) -> dict:
  """The classifier's variables with every backbone tensor copied in.

  Args:
    backbone: variables of a pretrained backbone (a `head` entry, if the
      pretraining net had one, is dropped).
    classifier_init: freshly initialised variables of the same architecture
      with a `head` of the target's class count.
  """
  out = {}
  for collection, tree in classifier_init.items():
    pretrained = backbone.get(collection, {})
    missing = set(tree) - set(pretrained) - {"head"}
    if missing:
      raise DistillError(f"pretrained backbone lacks {sorted(missing)[:4]} in {collection!r}; "
                         f"architectures differ")
    out[collection] = {k: (v if k == "head" else pretrained[k]) for k, v in tree.items()}
  return out


def make_finetune_step(model, optimizer, augment_images: bool):
  """Jitted `(state, (images, labels), rng) -> (state, metrics)`: cross-entropy."""
  def step(state, batch, rng):
    images, labels = batch
    if augment_images:
      images = augment.random_crop_flip(rng, images)

    def objective(features, logits):
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return gradient_step(model, optimizer, state, images, objective)

  return jax.jit(step, donate_argnums=0)


def make_infobatch_finetune_step(model, optimizer, augment_images: bool, lr_fn):
  """Jitted InfoBatch fine-tuning step: weighted cross-entropy, per-sample scores.

  state: {"variables", "opt_state" (optax.inject_hyperparams), "scores" (N,)}.
  batch: (images (B,H,W,C), labels (B,), indices (B,), weights (B,), progress ()).
  Loss mean_i(w_i * CE_i); each sample's unweighted CE_i becomes its score;
  the learning rate is `lr_fn(progress)`.
  """
  def step(state, batch, rng):
    images, labels, indices, weights, progress = batch
    if augment_images:
      images = augment.random_crop_flip(rng, images)

    def objective(features, logits):
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.mean(weights * losses), losses

    lr = lr_fn(progress)
    inner = {"variables": state["variables"],
             "opt_state": infobatch.with_learning_rate(state["opt_state"], lr)}
    new_state, metrics, losses = gradient_step(model, optimizer, inner, images, objective,
                                               has_aux=True)
    new_state["scores"] = infobatch.update(state["scores"], indices, losses)
    return new_state, {**metrics, "lr": lr}

  return jax.jit(step, donate_argnums=0)


def _sgd(learning_rate, momentum, weight_decay):
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None))


@functools.lru_cache(maxsize=64)
def _infobatch_fns(model, lr: float, momentum: float, weight_decay: float, full_steps: int,
                   augment_images: bool):
  """(optimizer, jitted step) of InfoBatch fine-tuning; the cosine schedule of
  `_train_fns`, evaluated on epoch progress so it ends on time whatever is pruned."""
  optimizer = optax.inject_hyperparams(_sgd, static_args=("momentum", "weight_decay"))(
      learning_rate=0.0, momentum=momentum, weight_decay=weight_decay)
  lr_fn = infobatch.progress_schedule(optax.cosine_decay_schedule(lr, max(full_steps, 1)),
                                      full_steps)
  return optimizer, make_infobatch_finetune_step(model, optimizer, augment_images, lr_fn)


def finetune_length(cfg: ml_collections.ConfigDict, n: int) -> tuple[int, int]:
  """(optimiser steps, epochs) of fine-tuning on n images: `cfg.steps` when
  set (epochs rounded up to cover them), else `cfg.epochs` full epochs."""
  per_epoch = max(n // min(cfg.batch_size, n), 1)
  steps = cfg.get("steps", 0)
  if steps:
    return steps, -(-steps // per_epoch)
  return cfg.epochs * per_epoch, cfg.epochs


def finetune(cfg: ml_collections.ConfigDict, arch, backbone: dict, x_train: np.ndarray,
             y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int,
             workdir: str, name: str, quiet: bool = True) -> dict:
  """Fine-tunes all layers of a pretrained backbone on a labelled target.

  Args:
    cfg: the `finetune` config section. arch: the backbone's arch config.
    backbone: its pretrained variables (or a fresh initialisation).
    x_train: (N, H, W, C) normalised float32 images; y_train: (N,) int labels.
    x_test, y_test: the test split, same format.
    seed: head initialisation and shuffling seed.
    workdir, name: checkpoints go to `workdir/name` (resumable).

  Returns:
    {"accuracy": top-1 on the test split, "steps": optimiser steps}, plus
    "skipped_fraction" (realised share of sample-visits skipped) when
    `cfg.infobatch.prune_ratio` > 0.
  """
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  n = len(x_train)
  batch_size = min(cfg.batch_size, n)
  num_steps, num_epochs = finetune_length(cfg, n)
  model = build_model(arch, num_outputs=num_classes)
  variables = with_new_head(backbone, init_model(model, jax.random.key(seed), x_train.shape[1:]))
  # A copy: the train step donates its state, and the caller keeps the backbone.
  variables = jax.tree.map(jnp.array, variables)
  x_j, y_j = jnp.asarray(x_train), jnp.asarray(y_train, jnp.int32)
  ib = cfg.get("infobatch")
  if ib is not None and ib.prune_ratio > 0:
    optimizer, step = _infobatch_fns(model, cfg.lr, cfg.momentum, cfg.weight_decay,
                                     infobatch.full_data_steps(n, batch_size, num_epochs),
                                     cfg.augment)
    state = {"variables": variables, "opt_state": optimizer.init(variables["params"]),
             "scores": infobatch.init_scores(n)}
    state, records, _ = infobatch.run_epochs(
        name=name, workdir=workdir, state=state, step_fn=step,
        make_batch=lambda idx, w, progress, _: (x_j[idx], y_j[idx], jnp.asarray(idx),
                                                jnp.asarray(w), jnp.float32(progress)),
        num_samples=n, batch_size=batch_size, num_epochs=num_epochs,
        prune_ratio=ib.prune_ratio, delta=ib.delta, seed=seed + 7, quiet=quiet)
    report = infobatch.pruning_report(records, n, batch_size, num_epochs)
    return {"accuracy": accuracy(model, state["variables"], x_test, y_test),
            "steps": report["steps"], "skipped_fraction": report["skipped_fraction"]}
  optimizer, step = _train_fns(make_finetune_step, model, ("cosine", cfg.lr, num_steps),
                               cfg.momentum, cfg.weight_decay, cfg.augment)
  state = {"variables": variables, "opt_state": optimizer.init(variables["params"])}

  def batch_fn(i):
    idx = jnp.asarray(batch_indices(seed + 7, i, n, batch_size))
    return x_j[idx], y_j[idx]

  state, _ = run_loop(name=name, workdir=workdir, state=state,
                      step_fn=step,
                      batch_fn=batch_fn, num_steps=num_steps, rng=jax.random.key(seed + 2000),
                      log_every=max(num_steps // 5, 1), checkpoint_every=max(num_steps // 4, 1),
                      quiet=quiet)
  return {"accuracy": accuracy(model, state["variables"], x_test, y_test), "steps": num_steps}


def _schedule(kind: str, lr: float, num_steps: int):
  if kind == "constant":
    return lr
  if kind == "cosine":
    return optax.cosine_decay_schedule(lr, max(num_steps, 1))
  raise DistillError(f"unknown learning-rate schedule {kind!r}; expected 'constant' or 'cosine'")


@functools.lru_cache(maxsize=64)
def _train_fns(make_step, model, schedule: tuple, momentum: float, weight_decay: float,
               *step_args):
  """(optimizer, jitted step) of SGD + momentum + weight decay.

  Args:
    make_step: `(model, optimizer, *step_args) -> jitted step`.
    schedule: (kind, lr, num_steps) of `_schedule`.

  Cached on its (hashable) settings: a results table runs the same
  architecture and schedule many times, and each new jitted function would
  compile again.
  """
  optimizer = _sgd(_schedule(*schedule), momentum, weight_decay)
  return optimizer, make_step(model, optimizer, *step_args)


@functools.lru_cache(maxsize=None)
def _jitted_predict(model):
  return jax.jit(lambda v, x: jnp.argmax(apply_model(model, v, x, train=False)[0][1], -1))


def accuracy(model, variables: dict, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 500) -> float:
  """Top-1 accuracy of a classifier's `outputs` (inference mode)."""
  predict = _jitted_predict(model)
  correct = sum(int(jnp.sum(predict(variables, jnp.asarray(images[i:i + batch_size]))
                            == jnp.asarray(labels[i:i + batch_size])))
                for i in range(0, len(images), batch_size))
  return correct / len(images)
