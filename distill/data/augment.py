"""Image augmentations as pure, jittable JAX functions of (rng, batch).

All functions take and return normalised NHWC float32 batches (the model's
input space, (x - mean) / std); photometric ones go through [0, 1] space
internally, which is why they take the dataset's `mean` and `std`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize_batch(images: jax.Array, mean, std) -> jax.Array:
  """The model's input space inside a jitted step: uint8 -> (x / 255 - mean) / std.

  `datasets.normalize` is the same map for whole numpy datasets (chunked).

  Args:
    images: (B, H, W, C) uint8. mean, std: (C,) in [0, 1] units.

  Returns:
    (B, H, W, C) float32.
  """
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def crop_flip(x: jax.Array, offsets: jax.Array, flip: jax.Array, pad: int = 4) -> jax.Array:
  """A given crop after zero padding, then a given horizontal flip, per image.

  Args:
    x: (B, H, W, C) images.
    offsets: (B, 2) int top-left corners in the padded image, in [0, 2 * pad]
      ((pad, pad) is the uncropped image).
    flip: (B,) bool, flip image b left-right.
    pad: pixels of padding on each side (0: no cropping, offsets ignored).

  Returns:
    (B, H, W, C) views.
  """
  b, h, w, _ = x.shape
  if pad:
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    x = jax.vmap(crop)(padded, offsets)
  return jnp.where(flip.reshape(b, 1, 1, 1), x[:, :, ::-1, :], x)


def random_crop_flip(rng: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop after zero padding, plus random horizontal flip (`crop_flip`).

  Args:
    rng: PRNG key.
    x: (B, H, W, C) images.
    pad: pixels of padding on each side (0 disables cropping).

  Returns:
    (B, H, W, C) augmented images.
  """
  b = x.shape[0]
  k_crop, k_flip = jax.random.split(rng)
  offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
  flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
  return crop_flip(x, offsets, flip.reshape(b), pad)


def _resized_crop(rng, img, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """Inception-style random resized crop of one (H, W, C) image, bilinear."""
  h, w, _ = img.shape
  k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * h * w
  log_r = jax.random.uniform(k_ratio, (), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
  aspect = jnp.exp(log_r)
  ch = jnp.clip(jnp.sqrt(area / aspect), 1.0, h)
  cw = jnp.clip(jnp.sqrt(area * aspect), 1.0, w)
  top = jax.random.uniform(k_y, ()) * (h - ch)
  left = jax.random.uniform(k_x, ()) * (w - cw)
  scale_hw = jnp.stack([h / ch, w / cw])
  translation = -jnp.stack([top, left]) * scale_hw
  return jax.image.scale_and_translate(img, img.shape, (0, 1), scale_hw, translation,
                                       method="linear", antialias=False)


def _grey(img):
  if img.shape[-1] == 1:
    return img
  return jnp.sum(img * jnp.array([0.299, 0.587, 0.114], img.dtype), -1, keepdims=True)


def _color_jitter(rng, img, strength):
  """Brightness, contrast and saturation jitter of one [0, 1] image."""
  kb, kc, ks = jax.random.split(rng, 3)
  u = lambda k: jax.random.uniform(k, (), minval=1 - strength, maxval=1 + strength)
  img = img * u(kb)
  mean = jnp.mean(_grey(img))
  img = (img - mean) * u(kc) + mean
  grey = _grey(img)
  img = (img - grey) * u(ks) + grey
  return jnp.clip(img, 0.0, 1.0)


def ssl_augment(rng: jax.Array, x: jax.Array, mean: jax.Array, std: jax.Array,
                jitter: float = 0.4, p_jitter: float = 0.8, p_grey: float = 0.2,
                crop_scale: tuple[float, float] = (0.2, 1.0)) -> jax.Array:
  """The usual SimCLR / Barlow Twins view: resized crop, flip, colour, grey.

  Blur and solarisation are left out: at 32x32 they cost more than they add.

  Args:
    rng: PRNG key.
    x: (B, H, W, C) normalised images.
    mean, std: (C,) statistics that define the normalisation.

  Returns:
    (B, H, W, C) normalised augmented views.
  """
  c = x.shape[-1]

  def one(key, img):
    k_crop, k_flip, k_jit, k_pj, k_pg = jax.random.split(key, 5)
    img = jnp.clip(img * std + mean, 0.0, 1.0)
    img = _resized_crop(k_crop, img, scale=crop_scale)
    img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
    img = jnp.where(jax.random.bernoulli(k_pj, p_jitter), _color_jitter(k_jit, img, jitter), img)
    grey = jnp.broadcast_to(_grey(img), img.shape[:-1] + (c,))
    img = jnp.where(jax.random.bernoulli(k_pg, p_grey), grey, img)
    return (img - mean) / std

  return jax.vmap(one)(jax.random.split(rng, x.shape[0]), x)
