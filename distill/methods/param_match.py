"""Importance-weighted parameter matching (IADD-style); plain MTT as a special case.

From an expert checkpoint theta*_t (t < max_start) a student takes N SGD
steps on minibatches of the synthetic set with a learnable step size alpha,
and the loss compares where it lands with the expert M epochs later:

    loss = ||W o (theta_{t+N} - theta*_{t+M})||^2 / ||W o (theta*_t - theta*_{t+M})||^2

W are positive importance weights, one per parameter or one per tensor
(`granularity`): W = softplus(raw) / mean(softplus(raw)), the mean taken over
all parameters (a per-tensor weight counts once per parameter of its tensor).
The ratio alone does not change when W is scaled; the normalisation pins the
scale, so W = 1 always means "as much as in MTT" and W is comparable across
steps and runs. Raw weights start at softplus^-1(1), so W = 1 exactly and the
loss is plain MTT at step 0; method "mtt" keeps W = 1 fixed. The weights
minimise the same ratio as the images, which rewards moving weight onto
parameters the student already matches: keep `lr_weights` small and watch the
logged w_std / w_max.

Learned jointly, each with its own Adam learning rate: the images X_s, the
targets (teacher representations for "mse" experts, soft-label logits for
"ce" experts), the raw weights, and log(alpha) (so alpha stays positive; it
is also clipped to [1e-12, 1e3] so that exp never underflows to 0).

Teacher targets (`teacher_targets`, "mse" experts only): instead of stored
targets the student regresses T(X_s), the teacher's representation of the
current images, recomputed in every loss and differentiated through the
teacher. The experts regressed the teacher on real images; so does the
student, on the synthetic ones, and the exported targets are exactly what
the teacher says of the exported images. Stored targets, fixed or learned,
drift from that as the images move (1 - R^2 = 0.26 fixed, 1.20 learned on
the CIFAR-10 effect table, experiments/results/mtt_targets.json).

The N student steps are one `jax.lax.scan`; its memory grows with N x
syn_batch unless each step is rematerialised (`remat`, `jax.checkpoint`).
On the CPU the scan is unrolled into straight-line code (`unroll`): XLA:CPU
runs the convolutions of a loop body about 20x slower than the same
convolutions outside a loop (experiments/results/benchmark_param_match_cpu.md).
With `prune_fraction` > 0 the lowest-W fraction of parameters (whole tensors
at "tensor" granularity) is left out of both norms; the mask is recomputed
from the current W at every step and carries no gradient.
"""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill import plots
from distill.data import augment
from distill.errors import DistillError
from distill.methods import experts as experts_lib

METHODS = ("iadd", "mtt")
GRANULARITIES = ("parameter", "tensor")
INITS = ("random", "high_loss")
_RAW_FOR_ONE = float(np.log(np.expm1(1.0)))  # softplus(_RAW_FOR_ONE) == 1
_LOG_ALPHA_BOUNDS = (float(np.log(1e-12)), float(np.log(1e3)))


def check_config(cfg, buffer_epochs: int | None = None) -> None:
  """Raises DistillError naming the first bad `param_match` setting."""
  if cfg.method not in METHODS:
    raise DistillError(f"unknown param_match.method {cfg.method!r}; expected one of {METHODS}")
  if cfg.granularity not in GRANULARITIES:
    raise DistillError(f"unknown param_match.granularity {cfg.granularity!r}; expected one "
                       f"of {GRANULARITIES}")
  if cfg.init not in INITS:
    raise DistillError(f"unknown param_match.init {cfg.init!r}; expected one of {INITS}")
  if not 0.0 <= cfg.prune_fraction < 1.0:
    raise DistillError(f"param_match.prune_fraction={cfg.prune_fraction} must be in [0, 1)")
  if cfg.teacher_targets and cfg.lr_targets:
    raise DistillError(f"param_match.teacher_targets=True computes the targets from the "
                       f"images, so none are learned; set param_match.lr_targets=0 (it is "
                       f"{cfg.lr_targets})")
  if cfg.prune_fraction and cfg.method == "mtt":
    raise DistillError("param_match.prune_fraction ranks parameters by learned importance; "
                       "with method 'mtt' every W is 1 (use method 'iadd')")
  for key in ("num_synthetic", "syn_steps", "expert_epochs", "max_start", "steps"):
    if cfg[key] < 1:
      raise DistillError(f"param_match.{key}={cfg[key]} must be at least 1")
  if cfg.unroll < 0:
    raise DistillError(f"param_match.unroll={cfg.unroll} must be >= 0 (0: automatic)")
  if cfg.alpha_init < 0:
    raise DistillError(f"param_match.alpha_init={cfg.alpha_init} must be positive (or 0: "
                       f"the experts' learning rate)")
  if buffer_epochs is not None and cfg.max_start + cfg.expert_epochs > buffer_epochs + 1:
    raise DistillError(
        f"param_match.max_start={cfg.max_start} with expert_epochs={cfg.expert_epochs} reaches "
        f"past the buffer's last epoch {buffer_epochs}; use max_start <= "
        f"{buffer_epochs + 1 - cfg.expert_epochs}")


def init_raw_weights(params, granularity: str):
  """Raw importance weights that give W = 1: shaped like `params` or one scalar per leaf."""
  shape = (lambda p: p.shape) if granularity == "parameter" else (lambda p: ())
  return jax.tree.map(lambda p: jnp.full(shape(p), _RAW_FOR_ONE, jnp.float32), params)


def importance_weights(raw, params):
  """W = softplus(raw) / (its mean over all parameters of `params`).

  Args:
    raw: pytree like `params`, each leaf of the param's shape or a scalar.
    params: the parameters (only their shapes are used).

  Returns:
    Pytree of positive weights shaped like `raw`, with mean 1 over parameters.
  """
  soft = jax.tree.map(jax.nn.softplus, raw)
  count = sum(p.size for p in jax.tree.leaves(params))
  total = sum(jnp.sum(w) * (p.size // w.size)
              for w, p in zip(jax.tree.leaves(soft), jax.tree.leaves(params)))
  return jax.tree.map(lambda w: w / (total / count), soft)


def prune_mask(weights, params, fraction: float):
  """1/0 masks keeping all but the lowest-W `fraction` of the parameters.

  Per-parameter weights are ranked one by one (ties broken by position); a
  scalar weight per tensor prunes whole tensors while their parameters add
  up to at most `fraction` of all.

  Returns:
    Pytree of float32 masks shaped like `weights`.
  """
  leaves_w, treedef = jax.tree.flatten(weights)
  leaves_p = jax.tree.leaves(params)
  sizes = np.array([p.size for p in leaves_p])
  if any(w.shape != p.shape for w, p in zip(leaves_w, leaves_p)):
    order = jnp.argsort(jnp.stack(leaves_w), stable=True)
    pruned = jnp.cumsum(jnp.asarray(sizes)[order]) <= fraction * sizes.sum()
    keep = jnp.ones(len(leaves_w)).at[order].set(jnp.where(pruned, 0.0, 1.0))
    return jax.tree.unflatten(treedef, list(keep))
  flat = jnp.concatenate([jnp.ravel(w) for w in leaves_w])
  order = jnp.argsort(flat, stable=True)
  keep = jnp.ones_like(flat).at[order[:int(fraction * flat.size)]].set(0.0)
  parts = jnp.split(keep, np.cumsum([w.size for w in leaves_w])[:-1])
  return jax.tree.unflatten(treedef, [p.reshape(w.shape) for p, w in zip(parts, leaves_w)])


def matching_loss(student, start, target, weights, mask=None) -> jax.Array:
  """||W o (student - target)||^2 / ||W o (start - target)||^2 over all leaves.

  Args:
    student, start, target: params pytrees (theta_{t+N}, theta*_t, theta*_{t+M}).
    weights: pytree like them, leaves of the param's shape or scalars.
    mask: optional pytree like `weights` of 1 (kept) / 0 (pruned).
  """
  mask = jax.tree.map(lambda w: 1.0, weights) if mask is None else mask
  norm = lambda a, b: sum(jnp.sum(m * (w * (x - y)) ** 2) for x, y, w, m in zip(
      jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(weights), jax.tree.leaves(mask)))
  return norm(student, target) / norm(start, target)


def unroll(step_loss, params, images: jax.Array, targets: jax.Array, alpha: jax.Array,
           rng: jax.Array, *, syn_steps: int, syn_batch: int, augment_images: bool,
           remat: bool, unroll: int = 1):
  """N differentiable SGD steps of the student on minibatches of the synthetic set.

  Minibatches walk through seeded permutations of the set, epoch after
  epoch, as real training would.

  Args:
    step_loss: (params, x (b,H,W,C), y (b,k)) -> scalar.
    params: start parameters theta*_t.
    images: (n, H, W, C) synthetic images. targets: (n, k) their targets.
    alpha: scalar step size. rng: key for the batches and augmentation.
    syn_steps: N. syn_batch: images per step (<= 0 or >= n: all).
    augment_images: crop + flip each minibatch (differentiable in the images).
    remat: recompute each step's activations in the backward pass.
    unroll: student steps per iteration of the compiled loop (N: none left).

  Returns:
    theta_{t+N}, a params pytree.
  """
  n = images.shape[0]
  k_order, k_aug = jax.random.split(rng)
  if syn_batch <= 0 or syn_batch >= n:
    batches = jnp.broadcast_to(jnp.arange(n), (syn_steps, n))
  else:
    epochs = -(-syn_steps * syn_batch // n)
    orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(k_order, epochs))
    batches = orders.reshape(-1)[:syn_steps * syn_batch].reshape(syn_steps, syn_batch)
  # Keys only where they are used: every random op costs compile time.
  aug_keys = jax.random.split(k_aug, syn_steps) if augment_images else jnp.zeros(syn_steps)

  def student_step(p, inputs):
    idx, key = inputs
    x = images[idx]
    if augment_images:
      x = augment.random_crop_flip(key, x)
    grads = jax.grad(step_loss)(p, x, targets[idx])
    return jax.tree.map(lambda w, g: w - alpha * g, p, grads), None

  if remat:
    student_step = jax.checkpoint(student_step)
  params, _ = jax.lax.scan(student_step, params, (batches, aug_keys), unroll=unroll)
  return params


def initial_soft_labels(labels: np.ndarray, num_classes: int, smoothing: float = 0.1):
  """(n,) int labels -> (n, k) smoothed one-hot rows (finite logits for "ce" targets)."""
  return (1 - smoothing) * np.eye(num_classes, dtype=np.float32)[labels] + smoothing / num_classes


def scan_unroll(cfg, backend: str | None = None) -> int:
  """Student steps per loop iteration: `cfg.unroll`, or for 0 all N on the
  CPU (where loop bodies run slowly) and 1 elsewhere (compile time flat in N)."""
  if cfg.unroll:
    return int(cfg.unroll)
  return int(cfg.syn_steps) if (backend or jax.default_backend()) == "cpu" else 1


def make_optimizer(cfg, learn_weights: bool) -> optax.GradientTransformation:
  """Adam on each learned group with its own learning rate (0 freezes a group)."""
  adam = lambda lr: optax.adam(lr) if lr > 0 else optax.set_to_zero()
  groups = {"images": adam(cfg.lr_images), "targets": adam(cfg.lr_targets),
            "raw_weights": adam(cfg.lr_weights if learn_weights else 0.0),
            "log_alpha": adam(cfg.lr_alpha)}
  return optax.multi_transform(groups, {k: k for k in groups})


class ParamMatch:
  """Trajectory matching with learned importance weights ("iadd") or without ("mtt")."""

  def __init__(self, cfg, model: nn.Module, objective: str, teacher_fn=None):
    """Binds the settings.

    Args:
      cfg: the `param_match` config section.
      model: the expert architecture (a ConvNet whose variables are only params).
      objective: the experts' objective, "ce" or "mse".
      teacher_fn: with `cfg.teacher_targets`, the teacher as a jittable
        (n, H, W, C) images, normalised like the experts' -> (n, k) targets
        (e.g. `functools.partial(teacher.represent, teacher.variables)`).
    """
    check_config(cfg)
    if cfg.teacher_targets and (objective != "mse" or teacher_fn is None):
      raise DistillError("param_match.teacher_targets=True needs 'mse' experts and the "
                         "teacher they regressed" + ("" if objective == "mse" else
                                                     f" (the experts are {objective!r})"))
    if cfg.augment and objective == "mse":
      raise DistillError("param_match.augment=True with 'mse' experts: the learned teacher-"
                         "space targets belong to the un-augmented images, so cropping or "
                         "flipping the student's inputs would regress them onto other views; "
                         "set param_match.augment=False")
    if cfg.alpha_init <= 0:
      raise DistillError("ParamMatch needs a positive param_match.alpha_init (run_param_match "
                         "replaces 0 by the experts' learning rate)")
    self.cfg, self.model, self.objective = cfg, model, objective
    self.teacher_fn = teacher_fn if cfg.teacher_targets else None
    self.learn_weights = cfg.method == "iadd"
    self.optimizer = make_optimizer(cfg, self.learn_weights)
    self.step_loss = lambda params, x, y: experts_lib.supervised_loss(
        objective, model.apply({"params": params}, x)[1], y)
    self.unroll = functools.partial(
        unroll, self.step_loss, syn_steps=cfg.syn_steps, syn_batch=cfg.syn_batch,
        augment_images=cfg.augment, remat=cfg.remat, unroll=scan_unroll(cfg))
    # The jitted methods take `self` as a static argument: methods with equal
    # settings are equal and share their executables.
    self._settings = (model, objective, json.dumps(cfg.to_dict(), sort_keys=True),
                      self.teacher_fn)

  def __hash__(self):
    return hash(self._settings)

  def __eq__(self, other):
    return isinstance(other, ParamMatch) and self._settings == other._settings

  def init(self, rng: jax.Array, images, targets) -> dict:
    """State from images (n, H, W, C) and targets (n, k).

    Targets are teacher representations ("mse") or soft labels with positive
    entries ("ce"; learned as logits). Nothing here is random: `rng` only
    completes the method interface.
    """
    del rng
    return self._init(jnp.asarray(images, jnp.float32), jnp.asarray(targets, jnp.float32))

  @functools.partial(jax.jit, static_argnums=0)
  def _init(self, images, targets):
    # Shapes only: the template parameters are never computed.
    params = jax.eval_shape(self.model.init, jax.random.key(0), images[:1])["params"]
    if self.objective == "ce":
      targets = jnp.log(jnp.maximum(targets, 1e-6))
    learned = {"images": images, "targets": targets,
               "raw_weights": init_raw_weights(params, self.cfg.granularity),
               "log_alpha": jnp.log(jnp.asarray(self.cfg.alpha_init, images.dtype))}
    return {"learned": learned, "opt_state": self.optimizer.init(learned)}

  def targets(self, learned: dict) -> jax.Array:
    """(n, k) targets the student trains on: soft labels ("ce") or representations
    (stored, or the teacher's of the current images with `teacher_targets`)."""
    if self.teacher_fn is not None:
      return self.teacher_fn(learned["images"])
    if self.objective == "ce":
      return jax.nn.softmax(learned["targets"], axis=-1)
    return learned["targets"]

  def weights(self, learned: dict, params):
    """The importance weights W (exactly 1 for "mtt")."""
    if not self.learn_weights:
      return jax.tree.map(lambda w: jnp.ones_like(w), learned["raw_weights"])
    return importance_weights(learned["raw_weights"], params)

  def loss(self, learned: dict, start, target, rng: jax.Array):
    """(matching loss, {"weights", "mask"}) of one student unroll from `start`."""
    student = self.unroll(start, learned["images"], self.targets(learned),
                          jnp.exp(learned["log_alpha"]), rng)
    weights = self.weights(learned, start)
    mask = None
    if self.cfg.prune_fraction:
      mask = prune_mask(jax.lax.stop_gradient(weights), start, self.cfg.prune_fraction)
    return matching_loss(student, start, target, weights, mask), {"weights": weights,
                                                                  "mask": mask}

  @functools.partial(jax.jit, static_argnums=0)
  def export_targets(self, learned: dict) -> jax.Array:
    """`targets(learned)`, compiled: the (n, k) targets a set is exported with."""
    return self.targets(learned)

  # The state is donated: its buffers are reused for the next state.
  @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
  def step(self, state: dict, batch, rng: jax.Array):
    """One outer step on batch = (theta*_t, theta*_{t+M}) -> (state, metrics)."""
    start, target = batch
    (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state["learned"], start, target, rng)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["learned"])
    learned = optax.apply_updates(state["learned"], updates)
    learned = {**learned, "log_alpha": jnp.clip(learned["log_alpha"], *_LOG_ALPHA_BOUNDS)}
    metrics = {"loss": loss, "alpha": jnp.exp(learned["log_alpha"]),
               **{f"grad_norm_{k}": optax.global_norm(g) for k, g in grads.items()},
               **weight_stats(aux["weights"], start, aux["mask"])}
    return {"learned": learned, "opt_state": opt_state}, metrics

  @functools.partial(jax.jit, static_argnums=0)
  def _losses(self, learned: dict, start, target, rng: jax.Array):
    """(the method's own matching loss, the plain W = 1 loss) of one unroll."""
    student = self.unroll(start, learned["images"], self.targets(learned),
                          jnp.exp(learned["log_alpha"]), rng)
    weights = self.weights(learned, start)
    mask = (prune_mask(weights, start, self.cfg.prune_fraction)
            if self.cfg.prune_fraction else None)
    ones = jax.tree.map(jnp.ones_like, weights)
    return (matching_loss(student, start, target, weights, mask),
            matching_loss(student, start, target, ones))

  def held_out_loss(self, learned: dict, buffer, experts: list[int], seed: int) -> dict:
    """The matching loss of a set on experts it was not distilled with.

    Every start epoch t < max_start of each expert in `experts`: one student
    unroll from theta*_t, compared with theta*_{t+M}.

    Args:
      learned: the learned state's `learned` dict (images, targets, weights, alpha).
      buffer: the ExpertBuffer. experts: indices of the held-out experts.
      seed: the student's minibatch order.

    Returns:
      {"loss": mean loss with the set's own W (the method's objective),
       "loss_plain": the same with W = 1 (MTT's loss, comparable across
       methods and with the initial images), "pairs": how many were averaged}.
    """
    cfg = self.cfg
    losses = [self._losses(learned, buffer.checkpoint(e, t),
                           buffer.checkpoint(e, t + cfg.expert_epochs),
                           jax.random.key(seed * 1000 + e * cfg.max_start + t))
              for e in experts for t in range(cfg.max_start)]
    own, plain = np.asarray(jax.device_get(losses), np.float64).T
    return {"loss": float(own.mean()), "loss_plain": float(plain.mean()), "pairs": len(losses)}


def weight_stats(weights, params, mask=None) -> dict:
  """w_min, w_max, w_std (over parameters) and kept_fraction of a W pytree."""
  pairs = list(zip(jax.tree.leaves(weights), jax.tree.leaves(params)))
  count = sum(p.size for _, p in pairs)
  var = sum(jnp.sum((w - 1.0) ** 2) * (p.size // w.size) for w, p in pairs) / count
  stats = {"w_min": jnp.min(jnp.stack([jnp.min(w) for w, _ in pairs])),
           "w_max": jnp.max(jnp.stack([jnp.max(w) for w, _ in pairs])), "w_std": jnp.sqrt(var)}
  if mask is not None:
    stats["kept_fraction"] = sum(jnp.sum(m) * (p.size // m.size) for m, (_, p) in
                                 zip(jax.tree.leaves(mask), pairs)) / count
  return stats


def weight_summary(weights) -> dict:
  """{"Conv_0/kernel": {"mean", "min", "max", "size"}, ...} of a W pytree."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(weights), sep="/")
  return {k: dict(mean=float(np.mean(v)), min=float(np.min(v)), max=float(np.max(v)),
                  size=int(np.size(v))) for k, v in flat.items()}


def save_weight_plot(path: str, weights, title: str) -> str:
  """Box plot of W per tensor (bars for one weight per tensor) into a PNG."""
  plt = plots.plt  # pyplot, with the Agg backend set by plots
  flat = flax.traverse_util.flatten_dict(jax.device_get(weights), sep="/")
  names, values = list(flat), [np.ravel(v) for v in flat.values()]
  fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(names)), 3.6), dpi=120)
  if all(v.size == 1 for v in values):
    ax.bar(range(len(names)), [float(v[0]) for v in values])
  else:
    ax.boxplot(values, positions=range(len(names)), showfliers=False)
  ax.axhline(1.0, ls="--", lw=1, color="grey")
  ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("importance weight W")
  ax.set_title(title)
  return plots.save_figure(fig, path)


def set_name(method: str, objective: str) -> str:
  """Name of a parameter-matching set (and its table row): "iadd" / "mtt" for
  label-free ("mse") experts, "iadd_ce" / "mtt_ce" for supervised ones."""
  return method if objective == "mse" else f"{method}_{objective}"
