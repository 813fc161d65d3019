"""Barlow Twins loss, models, pretraining and the linear probe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.config import base_config
from distill.data import augment
from distill.errors import DistillError
from distill.eval import transfer
from distill.methods import barlow_twins
from distill.nn.models import build_model, extract_features


def test_barlow_twins_loss_closed_forms():
  r = np.random.default_rng(0)
  # Identical views with decorrelated, standardised columns: C = I, loss 0.
  x = r.normal(size=(64, 8))
  q, _ = np.linalg.qr(x - x.mean(0))  # centred, orthogonal columns
  z = jnp.asarray(q, jnp.float32)
  assert float(barlow_twins.barlow_twins_loss(z, z, 5e-3)) < 1e-4
  # Independent views: C_ii ~ N(0, 1/B), so the invariance term is
  # k - 2 sum C_ii + O(k/B) = 8 with standard deviation 2 sqrt(k/B) ~ 0.09.
  a, b = (jnp.asarray(r.normal(size=(4096, 8))) for _ in range(2))
  loss = float(barlow_twins.barlow_twins_loss(a, b, 0.0))
  assert abs(loss - 8.0) < 0.35
  # Redundancy: two identical columns add 2 * lambda per off-diagonal 1.
  dup = jnp.concatenate([z[:, :1], z], axis=1)
  assert float(barlow_twins.barlow_twins_loss(dup, dup, 0.5)) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name,dim", [("convnet", 4 * 4 * 8), ("resnet10", 8 * 8),
                                      ("resnet18", 8 * 8)])
def test_models_expose_penultimate_features(name, dim):
  # Shapes only: tracing is enough, compiling ResNets would cost a minute.
  model = build_model(dict(name=name, width=8, depth=3), num_outputs=5)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  features, outputs = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert features.shape == (2, dim) and outputs.shape == (2, 5)
  with pytest.raises(DistillError, match="unknown architecture"):
    build_model(dict(name="vgg", width=8))


def test_augmentations_keep_shape_and_differ_per_sample():
  x = jax.random.normal(jax.random.key(0), (6, 16, 16, 3))
  y = jax.jit(augment.random_crop_flip)(jax.random.key(1), x)
  assert y.shape == x.shape
  mean, std = jnp.full(3, 0.5), jnp.full(3, 0.25)
  v1 = jax.jit(augment.ssl_augment)(jax.random.key(2), x * 0.1, mean, std)
  v2 = jax.jit(augment.ssl_augment)(jax.random.key(3), x * 0.1, mean, std)
  assert v1.shape == x.shape and bool(jnp.all(jnp.isfinite(v1)))
  assert float(jnp.abs(v1 - v2).mean()) > 1e-3


def _separable(n, seed, dim=6):
  r = np.random.default_rng(seed)
  labels = r.integers(0, 3, n)
  centers = np.eye(3, dim) * 3.0
  return (centers[labels] + r.normal(size=(n, dim))).astype(np.float32), labels


def test_linear_probe_on_separable_features():
  x_train, y_train = _separable(300, 0)
  x_test, y_test = _separable(200, 1)
  result = transfer.linear_probe(x_train, y_train, x_test, y_test)
  assert result["accuracy"] > 0.9
  noise = np.random.default_rng(2).normal(size=x_train.shape).astype(np.float32)
  chance = transfer.linear_probe(noise, y_train, x_test, y_test)
  assert chance["accuracy"] < 0.6


def test_pretraining_lowers_the_regression_loss(tmp_path):
  cfg = base_config().pretrain
  with cfg.unlocked():
    cfg.update(dict(epochs=30, batch_size=16, lr=0.05, augment=False))
    cfg.arch.update(dict(width=8, depth=2))
  r = np.random.default_rng(0)
  images = r.normal(size=(16, 8, 8, 3)).astype(np.float32)
  targets = r.normal(size=(16, 4)).astype(np.float32)
  model, variables = transfer.pretrain(cfg, images, targets, seed=0, workdir=str(tmp_path),
                                       name="p", quiet=True)
  lines = (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()
  import json
  losses = [json.loads(l)["loss"] for l in lines]
  assert losses[-1] < 0.5 * losses[0]
  feats = extract_features(model, variables, images)
  assert feats.shape == (16, 8 * 2 * 2)
