"""The faithful transfer protocol: targets that match the inputs, probes that
choose an interior regularisation, low-label read-outs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill.config import base_config
from distill.data import augment
from distill.errors import DistillError
from distill.eval import transfer
from distill.eval.table import arch_of, parse_arch
from distill.nn.models import apply_model, build_model, extract_features, init_model

SHAPE = (16, 16, 3)
ARCH = dict(name="convnet", width=16, depth=3, norm="instance", widths=())


def _pretrain_cfg(**overrides):
  cfg = base_config().pretrain
  with cfg.unlocked():
    cfg.update({**dict(epochs=30, batch_size=64, lr=0.05, schedule="constant", augment=False,
                       standardize_targets=True), **overrides})
    cfg.arch.update(ARCH)
  return cfg


@pytest.fixture(scope="module")
def toy_teacher():
  """A toy world where the teacher's features carry the labels and random ones less.

  Images are smooth random fields plus noise; the teacher is a random-init
  ConvNet (its own seed); labels are the argmax of a random linear map of
  the teacher's centred features, so a linear probe on the teacher reads
  them off while a differently initialised network does worse.
  """
  r = np.random.default_rng(0)
  low = r.normal(size=(1280, 4, 4, 3))
  images = np.repeat(np.repeat(low, 4, 1), 4, 2).astype(np.float32)
  images += 0.3 * r.normal(size=images.shape).astype(np.float32)
  teacher = build_model(ARCH)
  teacher_vars = init_model(teacher, jax.random.key(100), SHAPE)
  features = extract_features(teacher, teacher_vars, images)
  labels = np.argmax((features - features.mean(0)) @ r.normal(size=(features.shape[1], 4)), 1)
  return images, features, labels, teacher, teacher_vars


def _probe(model, variables, images, labels):
  f = extract_features(model, variables, images)
  return transfer.linear_probe(f[256:768], labels[256:768], f[768:], labels[768:])["accuracy"]


def test_regressing_the_teacher_recovers_it_only_with_matching_targets(toy_teacher, tmp_path):
  images, targets, labels, teacher, teacher_vars = toy_teacher
  source = slice(0, 1024)
  teacher_acc = _probe(teacher, teacher_vars, images, labels)
  none_acc = _probe(*transfer.fresh_backbone(ml_collections.ConfigDict({"arch": ARCH}), SHAPE,
                                             0), images, labels)
  assert teacher_acc > none_acc + 0.1, (teacher_acc, none_acc)
  # The fixed recipe: the targets are the un-augmented images' own.
  recipe = dict(epochs=50, batch_size=128, lr=0.1)   # 400 steps
  fixed = transfer.pretrain(_pretrain_cfg(**recipe), images[source], targets[source], 0,
                            str(tmp_path), "fixed", quiet=True)
  # The old recipe: crop + flip the inputs away from their fixed targets
  # (what kind="labels" allows, since labels do not depend on the view).
  old = transfer.pretrain(_pretrain_cfg(augment=True, standardize_targets=False, **recipe),
                          images[source], targets[source], 0, str(tmp_path), "old",
                          kind="labels", quiet=True)
  gain = lambda acc: (acc - none_acc) / (teacher_acc - none_acc)
  fixed_gain, old_gain = gain(_probe(*fixed, images, labels)), gain(_probe(*old, images, labels))
  assert fixed_gain > 0.5 and fixed_gain > old_gain + 0.3, (fixed_gain, old_gain)
  # Its own label-free objective: on images outside its subset the head predicts
  # the teacher's (standardised) representation far better than their mean does.
  unseen = slice(1024, None)
  head = build_model(ml_collections.ConfigDict(ARCH), num_outputs=targets.shape[1])
  error = transfer.relative_error(
      transfer.head_predictions(head, fixed[1], images[unseen]),
      transfer.target_standardizer(targets[source])(targets[unseen]))
  assert error < 0.8, error


def test_relative_error_and_the_target_map_against_closed_forms():
  rng = np.random.default_rng(0)
  truth = rng.normal(3.0, 2.0, (4000, 8))
  assert transfer.relative_error(np.broadcast_to(truth.mean(0), truth.shape), truth) == \
      pytest.approx(1.0)
  assert transfer.relative_error(truth, truth) == 0.0
  noise = rng.normal(0.0, 1.0, truth.shape)
  # E||noise||^2 / Var(truth) = 1 / 4, to Monte Carlo precision.
  assert transfer.relative_error(truth + noise, truth) == pytest.approx(0.25, rel=0.03)
  standardize = transfer.target_standardizer(truth)
  z = standardize(truth)
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)  # the centre is kept in float32
  assert np.sqrt(np.mean(z ** 2)) == pytest.approx(1.0, rel=1e-6)
  # One overall scale, not per dimension: ratios between dimensions survive.
  np.testing.assert_allclose(z.std(0) / z.std(0)[0], truth.std(0) / truth.std(0)[0], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(standardize(jnp.asarray(truth, jnp.float32))), z,
                             rtol=1e-4, atol=1e-5)


def test_augmented_pretraining_recomputes_targets_on_the_same_view():
  model = build_model(ARCH, num_outputs=8)
  optimizer = transfer._sgd(0.0, 0.0, 0.0)
  # Any function of the view will do: its value on the cropped, flipped
  # image must be what the loss compares the outputs with.
  view = lambda x: x[:, :2, :2, :].reshape(x.shape[0], -1)[:, :8] * 3.0
  step = transfer.make_pretrain_step(model, optimizer, True, "mse", view_targets=view)
  r = np.random.default_rng(1)
  images = jnp.asarray(r.normal(size=(4, *SHAPE)), jnp.float32)
  variables = init_model(model, jax.random.key(0), SHAPE)
  state = {"variables": variables, "opt_state": optimizer.init(variables["params"])}
  rng = jax.random.key(5)
  stored = jnp.zeros((4, 8))   # the set's stored targets: ignored when views are recomputed
  _, metrics = step(jax.tree.map(jnp.array, state), (images, stored), rng)
  x = augment.random_crop_flip(rng, images)
  (_, outputs), _ = apply_model(model, variables, x, train=True)
  np.testing.assert_allclose(metrics["loss"], jnp.mean((outputs - view(x)) ** 2), rtol=1e-5)


def test_augmenting_fixed_teacher_targets_is_refused(tmp_path):
  images = np.zeros((4, *SHAPE), np.float32)
  targets = np.zeros((4, 3), np.float32)
  with pytest.raises(DistillError, match="recompute them on each view"):
    transfer.pretrain(_pretrain_cfg(augment=True), images, targets, 0, str(tmp_path), "p",
                      kind="teacher", quiet=True)


def test_learned_targets_are_never_augmented(tmp_path):
  # A learned set's targets belong to its images as they are: with augment
  # on, the step must still be the un-augmented one (loss as without it).
  r = np.random.default_rng(2)
  images = r.normal(size=(8, *SHAPE)).astype(np.float32)
  targets = r.normal(size=(8, 3)).astype(np.float32)
  cfg = lambda aug: _pretrain_cfg(augment=aug, epochs=3, batch_size=8)
  _, a = transfer.pretrain(cfg(True), images, targets, 0, str(tmp_path), "a", kind="learned",
                           quiet=True)
  _, b = transfer.pretrain(cfg(False), images, targets, 0, str(tmp_path), "b", kind="learned",
                           quiet=True)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_the_probe_picks_an_interior_regularisation():
  # As many noisy features as examples: no ridge overfits, a huge one
  # underfits; the cross-validated choice lies inside the grid.
  r = np.random.default_rng(3)
  n, p = 200, 150
  w = r.normal(size=(p, 3))
  x = r.normal(size=(2 * n, p)).astype(np.float32)
  y = np.argmax(x @ w + 4.0 * r.normal(size=(2 * n, 3)), 1)
  result = transfer.linear_probe(x[:n], y[:n], x[n:], y[n:], folds=5)
  assert result["interior"], result
  assert 1e-6 < result["reg"] < 100.0
  assert result["accuracy"] > 0.5


def test_low_label_probes_use_a_stratified_fraction_and_average_draws():
  r = np.random.default_rng(4)
  labels = np.repeat(np.arange(4), 250)
  picked = transfer.stratified_subset(labels, 0.05, seed=0)
  assert np.bincount(labels[picked]).tolist() == [12, 12, 12, 12]   # round(0.05 * 250)
  assert transfer.stratified_subset(labels, 0.001, seed=0).size == 4  # at least one per class
  centres = 3.0 * np.eye(4, 8)
  x = (centres[labels] + r.normal(size=(1000, 8))).astype(np.float32)
  test_labels = r.integers(0, 4, 400)
  xt = (centres[test_labels] + r.normal(size=(400, 8))).astype(np.float32)
  out = transfer.probe_readout("linear_probe_5pct", x, labels, xt, test_labels,
                               regs=(1e-4, 1e-2, 1.0, 100.0), folds=4, label_draws=3, seed=0)
  assert out["draws"] == 3 and len(out["reg"]) == 3 and out["accuracy_std"] >= 0
  assert out["accuracy"] > 0.8
  full = transfer.probe_readout("linear_probe", x, labels, xt, test_labels,
                                regs=(1e-4, 1e-2, 1.0, 100.0), folds=4, label_draws=3, seed=0)
  assert "draws" not in full and full["accuracy"] >= out["accuracy"] - 0.05
  with pytest.raises(DistillError, match="unknown probe read-out"):
    transfer.probe_readout("linear_probe_2pct", x, labels, xt, test_labels, regs=(1.0,),
                           folds=2, label_draws=1, seed=0)


def test_finetuning_length_is_stated_in_steps():
  cfg = ml_collections.ConfigDict(dict(steps=1000, epochs=3, batch_size=128))
  assert transfer.finetune_length(cfg, 1000) == (1000, 143)   # 7 steps an epoch
  with cfg.unlocked():
    cfg.steps = 0
  assert transfer.finetune_length(cfg, 1000) == (21, 3)


def test_mkdt_probe_reaches_the_minimiser_of_its_objective():
  """MKDT's read-out: L2-regularised logistic regression on raw features."""
  r = np.random.default_rng(0)
  centres = r.normal(size=(4, 30))
  y = r.integers(0, 4, 800)
  x = 5.0 * (centres[y] + r.normal(size=(800, 30)))  # raw, unscaled features
  out = transfer.logistic_probe(x[:500], y[:500], x[500:], y[500:])
  assert float(out["grad_norm"]) < 1e-3 * max(float(out["loss"]), 1.0)  # stationary
  # A heavier penalty can only raise the minimum of the training objective.
  heavier = transfer.logistic_probe(x[:500], y[:500], x[500:], y[500:], reg=1e-1)
  assert float(heavier["loss"]) > float(out["loss"])
  assert float(out["accuracy"]) > 0.8
  low = transfer.probe_readout("mkdt_probe_5pct", x[:500], y[:500], x[500:], y[500:],
                               regs=(1.0,), folds=2, label_draws=2, seed=0)
  assert low["draws"] == 2 and 0 <= low["accuracy"] <= 1 and "reg" not in low


def test_gap_features_average_the_convnet_map_and_leave_a_resnet_as_is():
  images = np.random.default_rng(1).normal(size=(6,) + SHAPE).astype(np.float32)
  model = build_model(ARCH)
  variables = init_model(model, jax.random.key(0), SHAPE)
  flat = extract_features(model, variables, images)
  # Three 2x2 poolings of 16x16: a 2x2 map of 16 channels, flattened (h, w, c).
  assert flat.shape == (6, 2 * 2 * 16)
  gap = extract_features(model, variables, images, batch_size=4, kind="gap")
  np.testing.assert_allclose(gap, flat.reshape(6, 4, 16).mean(1), rtol=1e-6, atol=1e-6)
  resnet = build_model(dict(name="resnet10", width=8, depth=0, norm="default", widths=()))
  resnet_vars = init_model(resnet, jax.random.key(0), SHAPE)
  np.testing.assert_array_equal(extract_features(resnet, resnet_vars, images, kind="gap"),
                                extract_features(resnet, resnet_vars, images))
  with pytest.raises(DistillError, match="unknown feature kind 'pool'"):
    extract_features(model, variables, images, kind="pool")


def test_a_gap_head_reads_the_mean_of_the_convnet_map_and_round_trips():
  images = np.random.default_rng(2).normal(size=(5,) + SHAPE).astype(np.float32)
  model = build_model({**ARCH, "head_input": "gap"}, num_outputs=3)
  variables = init_model(model, jax.random.key(0), SHAPE)
  features, outputs = model.apply(variables, jnp.asarray(images))
  head = variables["params"]["head"]
  assert head["kernel"].shape == (16, 3)  # 16 channels, not the 2*2*16 flattened map
  mean = np.asarray(features).reshape(5, 4, 16).mean(1)
  np.testing.assert_allclose(outputs, mean @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
  # The flattened head (the default) reads all 64 numbers.
  flat = build_model(ARCH, num_outputs=3)
  assert init_model(flat, jax.random.key(0), SHAPE)["params"]["head"]["kernel"].shape == (64, 3)
  # arch_of rebuilds the same network (fine-tuning and other columns use it).
  assert build_model(arch_of(model), num_outputs=3) == model
  assert parse_arch("convnet:8", ml_collections.ConfigDict(
      {**ARCH, "head_input": "gap"}))[1]["head_input"] == "gap"
  with pytest.raises(DistillError, match="head_input 'pool'"):
    build_model({**ARCH, "head_input": "pool"}, num_outputs=3)
