"""A convolution whose weight gradient is a matrix product (faster on XLA:CPU).

XLA:CPU computes a convolution's forward pass and its input gradient at
close to the machine's matmul rate, but its weight gradient (a convolution
reducing over batch x height x width) runs 3-13x slower: measured on the
2-core CPU for the KRR-ST pool's layers at n = 1000, 7.5 GMAC/s (3 -> 128
channels, 32x32), 16 (128 -> 256, 16x16) and 30 (256 -> 512, 8x8), where the
matrix-product form below reaches 27, 68 and 100 GMAC/s. That gradient is
most of a pool model's inner step. So for the plain case (stride 1, no
dilation, one group, NHWC/HWIO) `conv_general_dilated` keeps XLA's forward
and input-gradient convolutions and takes the weight gradient as

    dW[i, j] = sum_{b,y,x} x_pad[b, y + i, x + j, :]^T dY[b, y, x, :]

i.e. one (kh kw C, B H W) @ (B H W, O) product on stacked shifted copies for
few input channels, or kh * kw products of (C, B H W) @ (B H W, O) for many
(less memory). For few input channels (the image layer, 3 -> 128: XLA
8 GMAC/s, the products 20) the input gradient is a matrix product too
(dY W^T, scattered back over the window). It
computes the same numbers up to summation order; other cases go to
`lax.conv_general_dilated` unchanged. Pass it to flax's
`nn.Conv(conv_general_dilated=...)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Below this many input channels the kh*kw shifted copies are stacked into
# one product (one small product per offset would be too thin).
STACK_BELOW_CHANNELS = 16


def _is_nhwc_hwio(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    # NHWC / HWIO / NHWC as lax numbers them.
    return (tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
            and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
            and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
  return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with a matrix-product weight gradient where it applies."""
  plain = (lhs.ndim == 4 and all(s == 1 for s in window_strides)
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and feature_group_count == 1 and batch_group_count == 1
           and _is_nhwc_hwio(dimension_numbers)
           and preferred_element_type is None)
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, preferred_element_type)
  if isinstance(padding, str):  # "SAME" / "VALID", as flax passes them
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return _conv(lhs, rhs, padding, precision)


def _xla_conv(x, w, padding, precision):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO",
                                                                            "NHWC"),
                                  precision=precision)


def _thin(w) -> bool:
  """Few input channels (the image layer): the gradients as stacked matrix products."""
  return w.shape[2] < STACK_BELOW_CHANNELS


def _shifted(xp, kh, kw, h_out, w_out):
  """The kh * kw shifted (B, H', W', C) windows of a padded input."""
  return [xp[:, i:i + h_out, j:j + w_out, :] for i in range(kh) for j in range(kw)]


def input_gradient(dy, w, x_shape, padding, precision=None):
  """dL/dx of a thin stride-1 convolution: dY W^T, scattered back over the window."""
  kh, kw, c, o = w.shape
  b, h, wd, _ = x_shape
  h_out, w_out = dy.shape[1:3]
  cols = jnp.dot(dy.reshape(-1, o), w.reshape(kh * kw * c, o).T, precision=precision)
  cols = cols.reshape(b, h_out, w_out, kh, kw, c)
  (top, bottom), (left, right) = padding
  out = jnp.zeros((b, h + top + bottom, wd + left + right, c), dy.dtype)
  for i in range(kh):
    for j in range(kw):
      out = out.at[:, i:i + h_out, j:j + w_out, :].add(cols[:, :, :, i, j, :])
  return out[:, top:top + h, left:left + wd, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, padding, precision):
  return _xla_conv(x, w, padding, precision)


def _conv_fwd(x, w, padding, precision):
  return _xla_conv(x, w, padding, precision), (x, w)


def _conv_bwd(padding, precision, residuals, dy):
  x, w = residuals
  # Input gradient: XLA's transposed convolution where it is fast. Dead code
  # when the input needs no gradient (e.g. the first layer of a parameter update).
  if _thin(w):
    dx = input_gradient(dy, w, x.shape, padding, precision)
  else:
    dx = jax.vjp(lambda x_: _xla_conv(x_, w, padding, precision), x)[1](dy)[0]
  return dx.astype(x.dtype), weight_gradient(x, dy, w, padding, precision)


def weight_gradient(x, dy, w, padding, precision=None):
  """dL/dW of a stride-1 NHWC/HWIO convolution as matrix products.

  Args:
    x: (B, H, W, C) input. dy: (B, H', W', O) output gradient.
    w: the (kh, kw, C, O) kernel (its shape and dtype).
    padding: ((top, bottom), (left, right)).

  Returns:
    (kh, kw, C, O) in the kernel's dtype.
  """
  kh, kw, c, o = w.shape
  h_out, w_out = dy.shape[1:3]
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  d = dy.reshape(-1, o)
  shifted = [s.reshape(-1, c) for s in _shifted(xp, kh, kw, h_out, w_out)]
  if c < STACK_BELOW_CHANNELS:
    grad = jnp.dot(jnp.concatenate(shifted, 1).T, d, precision=precision)
  else:
    grad = jnp.stack([jnp.dot(s.T, d, precision=precision) for s in shifted])
  return grad.reshape(kh, kw, c, o).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)
