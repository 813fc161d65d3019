"""The matrix-product convolution gradients equal XLA's convolution gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from distill.nn import conv


def _loss(conv_fn, x, w, padding, strides=(1, 1)):
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  # A nonlinear read-out, so every output position has its own cotangent.
  return jnp.sum(jnp.sin(conv_fn(x, w, strides, padding, dimension_numbers=dn)))


@pytest.mark.parametrize("channels,padding", [
    (3, "SAME"),                  # thin: input gradient as a product too
    (3, ((0, 2), (1, 0))),        # asymmetric explicit padding
    (24, "SAME"),                 # wide: one product per kernel offset
    (24, "VALID"),
])
def test_value_and_gradients_match_lax(channels, padding):
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(5, 9, 7, channels)), jnp.float32)
  w = jnp.asarray(r.normal(size=(3, 3, channels, 6)) / 3, jnp.float32)
  ref_value, ref_grads = jax.value_and_grad(
      lambda x, w: _loss(lax.conv_general_dilated, x, w, padding), (0, 1))(x, w)
  value, grads = jax.jit(jax.value_and_grad(
      lambda x, w: _loss(conv.conv_general_dilated, x, w, padding), (0, 1)))(x, w)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=1e-4 * float(jnp.abs(want).max()))


def test_strided_convolutions_are_lax_unchanged():
  r = np.random.default_rng(1)
  x = jnp.asarray(r.normal(size=(2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(r.normal(size=(3, 3, 4, 5)), jnp.float32)
  grad = lambda fn: jax.grad(lambda w: _loss(fn, x, w, "SAME", strides=(2, 2)))(w)
  np.testing.assert_array_equal(grad(conv.conv_general_dilated), grad(lax.conv_general_dilated))


def test_a_flax_layer_with_it_trains_like_the_plain_layer():
  r = np.random.default_rng(2)
  x = jnp.asarray(r.normal(size=(4, 8, 8, 3)), jnp.float32)
  plain = nn.Conv(8, (3, 3), padding="SAME")
  fast = nn.Conv(8, (3, 3), padding="SAME", conv_general_dilated=conv.conv_general_dilated)
  params = plain.init(jax.random.key(0), x)
  loss = lambda layer: lambda p: jnp.sum(jnp.tanh(layer.apply(p, x)) ** 2)
  np.testing.assert_allclose(loss(fast)(params), loss(plain)(params), rtol=1e-6)
  g_fast, g_plain = jax.grad(loss(fast))(params), jax.grad(loss(plain))(params)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()))


def test_bfloat16_gradients_keep_the_kernel_dtype():
  r = np.random.default_rng(3)
  x = jnp.asarray(r.normal(size=(2, 6, 6, 3)), jnp.bfloat16)
  w = jnp.asarray(r.normal(size=(3, 3, 3, 4)), jnp.bfloat16)
  grads = jax.grad(lambda x, w: _loss(conv.conv_general_dilated, x, w, "SAME").astype(
      jnp.float32), (0, 1))(x, w)
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  want = jax.grad(lambda x, w: _loss(lax.conv_general_dilated, x.astype(jnp.float32),
                                     w.astype(jnp.float32), "SAME"), (0, 1))(x, w)
  for got, ref in zip(grads, want):
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=0.05 * float(
        jnp.abs(ref).max()))
