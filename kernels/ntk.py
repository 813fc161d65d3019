"""Infinite-width NNGP and NTK kernels of the distillation ConvNet.

The network is the ConvNet used throughout the dataset-distillation
literature (KIP, FRePo, ...): `depth` blocks of

  Conv(width, (3, 3), SAME) -> [LayerNorm over channels] -> Relu
  -> AvgPool((2, 2), strides (2, 2))

then Flatten -> Dense(num_outputs). Its infinite-width kernels come from
`neural_tangents.stax` (through `kernels.nt_compat`); the same `stax` triple
also gives finite-width `init_fn` / `apply_fn` for Monte Carlo checks.

All kernels use the NTK parameterisation (stax's default), so the infinite-
width kernels do not depend on `width` or `num_outputs`.

Inputs are NHWC images, shape (n, H, W, C), for the ConvNet and (n, d)
vectors for the MLP. A kernel_fn returned here is called as
`kernel_fn(x1, x2=None, get=("nngp", "ntk"))`; with a single string `get` it
returns the (n1, n2) matrix, with a tuple a namedtuple of such matrices.
"""

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from kernels.nt_compat import nt, stax

Get = Union[str, tuple[str, ...]]

NORMS = ("none", "layer")
KERNELS = ("nngp", "ntk")


def convnet_stax(depth: int = 3, width: int = 128, norm: str = "none",
                 W_std: float = 2**0.5, b_std: float = 0.1,
                 num_outputs: int = 10, pool: bool = True
                 ) -> tuple[Callable, Callable, Callable]:
  """Returns the stax `(init_fn, apply_fn, kernel_fn)` of the ConvNet.

  Args:
    depth: number of Conv-[Norm]-Relu-AvgPool blocks, >= 1.
    width: channels of each conv layer (finite-width nets only).
    norm: "none", or "layer" for LayerNorm over the channel axis.
    W_std: weight standard deviation (NTK parameterisation).
    b_std: bias standard deviation.
    num_outputs: width of the final Dense layer.
    pool: False drops the AvgPool layers. Pooling makes the infinite-width
      kernel carry the full spatial covariance, (H W)^2 numbers per pair of
      images; without it only the diagonal, H W per pair, is needed, which
      is what makes the kernel affordable at 32x32 on a CPU.

  Returns:
    The raw, unjitted stax triple; `apply_fn(params, x)` maps (n, H, W, C) to
    (n, num_outputs).
  """
  _check_arch(depth, norm)
  blocks = []
  for _ in range(depth):
    blocks.append(stax.Conv(width, (3, 3), padding="SAME", W_std=W_std,
                            b_std=b_std))
    if norm == "layer":
      blocks.append(stax.LayerNorm(axis=-1))
    blocks.append(stax.Relu())
    if pool:
      blocks.append(stax.AvgPool((2, 2), strides=(2, 2)))
  return stax.serial(*blocks, stax.Flatten(),
                     stax.Dense(num_outputs, W_std=W_std, b_std=b_std))


def dense_relu_stax(depth: int = 1, width: int = 512, W_std: float = 2**0.5,
                    b_std: float = 0.1,
                    num_outputs: int = 1) -> tuple[Callable, Callable, Callable]:
  """Returns the stax triple of `depth` x [Dense -> Relu] -> Dense.

  Args:
    depth: number of hidden Dense-Relu layers, >= 1.
    width: hidden width (finite-width nets only).
    W_std: weight standard deviation (NTK parameterisation).
    b_std: bias standard deviation.
    num_outputs: width of the final Dense layer.

  Returns:
    The raw stax triple; `apply_fn(params, x)` maps (n, d) to
    (n, num_outputs).
  """
  _check_arch(depth, "none")
  blocks = []
  for _ in range(depth):
    blocks += [stax.Dense(width, W_std=W_std, b_std=b_std), stax.Relu()]
  return stax.serial(*blocks, stax.Dense(num_outputs, W_std=W_std,
                                         b_std=b_std))


def convnet_kernel_fn(depth: int = 3, norm: str = "none",
                      W_std: float = 2**0.5, b_std: float = 0.1,
                      pool: bool = True) -> Callable:
  """Returns the jitted infinite-width kernel_fn of the ConvNet.

  Args:
    depth: number of conv blocks, >= 1. Each halves H and W, so inputs need
      H, W >= 2**depth.
    norm: "none" or "layer".
    W_std: weight standard deviation.
    b_std: bias standard deviation.
    pool: keep the AvgPool layers (see `convnet_stax`).

  Returns:
    `kernel_fn(x1, x2=None, get=("nngp", "ntk"))` with x1: (n1, H, W, C),
    x2: (n2, H, W, C) or None (meaning x1); returns (n1, n2) kernels.
  """
  _, _, kernel_fn = convnet_stax(depth=depth, norm=norm, W_std=W_std,
                                 b_std=b_std, pool=pool)
  return _validated(jax.jit(kernel_fn, static_argnames=("get",)), ndim=4,
                    min_spatial=2**depth if pool else 1)


def dense_relu_kernel_fn(depth: int = 1, W_std: float = 2**0.5,
                         b_std: float = 0.1) -> Callable:
  """Returns the jitted infinite-width kernel_fn of the Dense-Relu MLP.

  Args:
    depth: number of hidden Dense-Relu layers, >= 1.
    W_std: weight standard deviation.
    b_std: bias standard deviation.

  Returns:
    `kernel_fn(x1, x2=None, get=("nngp", "ntk"))` with x1: (n1, d),
    x2: (n2, d) or None; returns (n1, n2) kernels.
  """
  _, _, kernel_fn = dense_relu_stax(depth=depth, W_std=W_std, b_std=b_std)
  return _validated(jax.jit(kernel_fn, static_argnames=("get",)), ndim=2)


def kernel_matrix(kernel_fn: Callable, x1: jnp.ndarray,
                  x2: Optional[jnp.ndarray] = None, get: str = "ntk",
                  batch_size: int = 0) -> jnp.ndarray:
  """Computes one kernel matrix, optionally in blocks to bound memory.

  Args:
    kernel_fn: a kernel_fn from this module.
    x1: (n1, ...) inputs.
    x2: (n2, ...) inputs, or None for x1.
    get: "nngp" or "ntk".
    batch_size: 0 computes the whole matrix at once; otherwise blocks of
      batch_size x batch_size (at most max(n1, n2)) are computed one after the
      other with `nt.batch`, which bounds peak memory.

  Returns:
    (n1, n2) kernel matrix.
  """
  if get not in KERNELS:
    raise ValueError(f"get must be one of {KERNELS}, got {get!r}")
  if batch_size < 0:
    raise ValueError(f"batch_size must be >= 0, got {batch_size}")
  if batch_size == 0:
    return kernel_fn(x1, x2, get=get)
  n1 = x1.shape[0]
  n2 = n1 if x2 is None else x2.shape[0]
  batch_size = min(batch_size, max(n1, n2))
  # nt.batch needs batch_size to divide both sizes; padding by repeating the
  # last example keeps every block the same shape (one compilation) and the
  # padded rows finite, and they are sliced off below.
  x1 = _pad_to_multiple(x1, batch_size)
  x2 = None if x2 is None else _pad_to_multiple(x2, batch_size)
  # device_count=0: serial blocks on the default device, no pmap.
  batched = nt.batch(kernel_fn, batch_size=batch_size, device_count=0)
  return batched(x1, x2, get)[:n1, :n2]


def arccos_nngp_dense_relu(x1: jnp.ndarray, x2: jnp.ndarray, W_std: float,
                           b_std: float) -> jnp.ndarray:
  """Closed-form NNGP of Dense -> Relu -> Dense at infinite width.

  With the NTK parameterisation, the first layer's pre-activations have
  covariance k(x, y) = W_std^2 <x, y> / d + b_std^2. For jointly Gaussian
  (u, v) with that covariance, E[relu(u) relu(v)] is half the order-1
  arc-cosine kernel of Cho & Saul (2009):

    sqrt(k_xx k_yy) / (2 pi) * (sin t + (pi - t) cos t),
    t = arccos(k_xy / sqrt(k_xx k_yy)),

  and the readout layer maps it to W_std^2 * E[...] + b_std^2.

  Args:
    x1: (n1, d) inputs.
    x2: (n2, d) inputs.
    W_std: weight standard deviation of both Dense layers.
    b_std: bias standard deviation of both Dense layers.

  Returns:
    (n1, n2) NNGP kernel.
  """
  _check_ndim(x1, 2, "x1")
  _check_ndim(x2, 2, "x2")
  d = x1.shape[1]
  k12 = W_std**2 * (x1 @ x2.T) / d + b_std**2
  k11 = W_std**2 * jnp.sum(x1 * x1, axis=1) / d + b_std**2
  k22 = W_std**2 * jnp.sum(x2 * x2, axis=1) / d + b_std**2
  norms = jnp.sqrt(k11[:, None] * k22[None, :])
  # Rounding can push |cos| a hair above 1, where arccos is NaN.
  cos = jnp.clip(k12 / norms, -1.0, 1.0)
  theta = jnp.arccos(cos)
  relu_cov = norms / (2 * jnp.pi) * (jnp.sin(theta) + (jnp.pi - theta) * cos)
  return W_std**2 * relu_cov + b_std**2


def _validated(kernel_fn: Callable, ndim: int,
               min_spatial: int = 1) -> Callable:
  """Wraps a stax kernel_fn with input checks that raise ValueError.

  Args:
    kernel_fn: the jitted stax kernel_fn.
    ndim: expected ndim of x1 and x2.
    min_spatial: smallest H and W (4-D inputs): each AvgPool halves them.

  Returns:
    kernel_fn(x1, x2=None, get=("nngp", "ntk")) with checked arguments.
  """

  def checked(x1: jnp.ndarray, x2: Optional[jnp.ndarray] = None,
              get: Get = KERNELS):
    _check_ndim(x1, ndim, "x1")
    if ndim == 4 and min(x1.shape[1:3]) < min_spatial:
      raise ValueError(f"images of {x1.shape[1]}x{x1.shape[2]} are too "
                         f"small for this depth: need H, W >= {min_spatial}")
    if x2 is not None:
      _check_ndim(x2, ndim, "x2")
      if x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x1 and x2 differ in per-example shape: "
                           f"{x1.shape[1:]} vs {x2.shape[1:]}")
    gets = (get,) if isinstance(get, str) else tuple(get)
    if not gets or any(g not in KERNELS for g in gets):
      raise ValueError(f"get must be drawn from {KERNELS}, got {get!r}")
    return kernel_fn(x1, x2, get=get)

  return checked


def _check_arch(depth: int, norm: str) -> None:
  if depth < 1:
    raise ValueError(f"depth must be >= 1, got {depth}")
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _check_ndim(x, ndim: int, name: str) -> None:
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != ndim:
    layout = "(n, H, W, C) NHWC" if ndim == 4 else "(n, d)"
    raise ValueError(f"{name} must be a {ndim}-D {layout} array, got shape "
                       f"{shape}")


def _pad_to_multiple(x: jnp.ndarray, multiple: int) -> jnp.ndarray:
  """Pads axis 0 of x up to a multiple by repeating its last row."""
  pad = -x.shape[0] % multiple
  if pad == 0:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
