"""KIP: kernel inducing points with the ConvNet's infinite-width NTK.

A supervised baseline for the results table. Learns synthetic images X_s
(n, H, W, C) and labels Y_s (n, classes) such that kernel ridge regression
with the NTK of the distillation ConvNet (`kernels.ntk`), fitted on
(X_s, Y_s), predicts the one-hot labels of real batches:

    loss = mean_{x in B, classes} (onehot(y) - K_ts (K_ss + lambda I)^-1 Y_s)^2

solved by the project's one ridge solver (`kernels.ridge.krr_predict_kernel`,
same regularisation convention as KRR-ST). There is no model pool: the
infinite-width kernel is the feature extractor. By default the kernel is the
ConvNet without its AvgPool layers (`kip.pool=False`), because with pooling
the kernel needs the full spatial covariance of every pair of images, too
much for a CPU at 32x32 (see `kernels.ntk.convnet_stax`); for the same reason
`kip.downsample=f` averages f x f pixel blocks before the kernel (the
synthetic images stay full size, and the gradient reaches every pixel).

    method = KIP(cfg, mean, std)
    state = method.init(images, one_hot_labels)
    state, metrics = method.step(state, (uint8_images, labels), rng)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from distill.data import augment
from distill.errors import DistillError
from distill.nn.optim import outer_optimizer
from kernels.ntk import convnet_kernel_fn
from kernels.ridge import krr_predict_kernel


def kip_loss(kernel_fn, synthetic: dict, x_real: jax.Array, y_real: jax.Array,
             reg: float, scaling: str):
  """The KIP loss of one real batch.

  Args:
    kernel_fn: `(x1, x2, get) -> (n1, n2)` kernel.
    synthetic: {"images": (n, H, W, C), "targets": (n, k) learned labels}.
    x_real: (B, H, W, C) normalised real images. y_real: (B, k) one-hot labels.
    reg, scaling: ridge settings (kernels/ridge.py).

  Returns:
    (scalar loss, SolveInfo).
  """
  k_ss = kernel_fn(synthetic["images"], None, get="ntk")
  k_ts = kernel_fn(x_real, synthetic["images"], get="ntk")
  pred, info = krr_predict_kernel(k_ss, k_ts, synthetic["targets"], reg, scaling)
  return jnp.mean((y_real - pred) ** 2), info


class KIP:
  """KIP distillation with the ConvNet NTK."""

  def __init__(self, cfg: ml_collections.ConfigDict, mean, std):
    """Binds the settings.

    Args:
      cfg: the `kip` config section (steps, lrs, reg, depth, pool, ...).
      mean, std: (C,) normalisation of the source images.
    """
    self.cfg = cfg
    self.mean = jnp.asarray(mean, jnp.float32)
    self.std = jnp.asarray(std, jnp.float32)
    try:
      kernel_fn = convnet_kernel_fn(depth=cfg.depth, pool=cfg.pool)
    except ValueError as e:  # the kernels name the argument; the config names the key
      raise DistillError(f"kip: {e}") from e
    f = cfg.downsample

    def downsampled(x1, x2=None, get="ntk"):
      shrink = lambda x: x if f == 1 else nn.avg_pool(x, (f, f), strides=(f, f))
      return kernel_fn(shrink(x1), None if x2 is None else shrink(x2), get=get)

    self.kernel_fn = downsampled
    self.optimizer = outer_optimizer(cfg)
    self.step = jax.jit(self._step, donate_argnums=0)

  def init(self, images: jax.Array, labels_one_hot: jax.Array) -> dict:
    """State from real images (n, H, W, C) normalised and their (n, k) one-hot labels."""
    synthetic = {"images": jnp.asarray(images, jnp.float32),
                 "targets": jnp.asarray(labels_one_hot, jnp.float32)}
    return {"synthetic": synthetic, "opt_state": self.optimizer.init(synthetic)}

  def _step(self, state: dict, batch, rng: jax.Array):
    cfg = self.cfg
    images_uint8, labels = batch
    x_real = augment.normalize_batch(images_uint8, self.mean, self.std)
    if cfg.augment_real:
      x_real = augment.random_crop_flip(rng, x_real)
    y_real = jax.nn.one_hot(labels, state["synthetic"]["targets"].shape[-1])
    loss_fn = functools.partial(kip_loss, self.kernel_fn, x_real=x_real, y_real=y_real,
                                reg=cfg.reg, scaling=cfg.reg_scaling)
    (loss, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["synthetic"])
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["synthetic"])
    synthetic = optax.apply_updates(state["synthetic"], updates)
    metrics = {"loss": loss, "grad_norm_images": optax.global_norm(grads["images"]),
               "solve_ok": info.ok.astype(jnp.float32), "jitter": info.jitter}
    return {"synthetic": synthetic, "opt_state": opt_state}, metrics
