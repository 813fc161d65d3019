"""Tests for kernels.nt_compat and kernels.ntk (CPU, small sizes)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from kernels import nt_compat, ntk
from kernels.nt_compat import nt, PATCHED, RESTORED, stax

W_STD, B_STD = 2**0.5, 0.1
REPO = pathlib.Path(__file__).resolve().parents[1]


def _enable_x64():
  """Context manager turning on float64 (its home moved across JAX versions)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


def _normal(seed: int, *shape: int) -> np.ndarray:
  # numpy, not jax.random: each new jax.random shape costs a CPU compile.
  return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _images(seed: int, n: int, size: int = 8) -> np.ndarray:
  return _normal(seed, n, size, size, 3)


@pytest.fixture(scope="module")
def conv_kernel_fn():
  return ntk.convnet_kernel_fn(depth=2, W_std=W_STD, b_std=B_STD)


@pytest.fixture(scope="module")
def conv_images():
  return _images(0, 6)


@pytest.fixture(scope="module")
def conv_kernels(conv_kernel_fn, conv_images):
  """Both kernels of the depth-2 ConvNet on conv_images, computed once."""
  return conv_kernel_fn(conv_images, None, ("nngp", "ntk"))


# (a) The shim.


def test_nt_compat_imports_neural_tangents():
  assert nt.__version__ == "0.6.5"
  assert callable(stax.serial) and callable(nt.empirical_ntk_fn)
  # Every restored name now resolves where neural_tangents looks for it.
  for dotted in RESTORED:
    module, _, name = dotted.rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is not None
  from jax.core import Jaxpr  # pylint: disable=g-import-not-at-top
  assert Jaxpr is not None
  for dotted in PATCHED:
    name = dotted.rpartition(".")[2]
    assert getattr(nt._src.empirical, name) is getattr(nt_compat, name)


def test_only_nt_compat_imports_neural_tangents():
  pattern = re.compile(r"^\s*(import|from)\s+neural_tangents\b", re.M)
  offenders = [
      str(path.relative_to(REPO))
      for folder in ("distill", "kernels", "experiments", "tests")
      for path in (REPO / folder).rglob("*.py")
      if path.name != "nt_compat.py" and pattern.search(path.read_text())
  ]
  assert not offenders, offenders


# (b) Closed forms.


def _arccos_ntk_dense_relu(x1, x2, W_std, b_std):
  """Closed-form NTK of Dense -> Relu -> Dense (NTK parameterisation).

  Theta = NNGP + W_std^2 * K0 * E[relu'(u) relu'(v)], where K0 is the first
  layer's covariance (also its NTK) and E[relu' relu'] = (pi - t) / (2 pi).
  """
  d = x1.shape[1]
  k12 = W_std**2 * (x1 @ x2.T) / d + b_std**2
  k11 = W_std**2 * jnp.sum(x1 * x1, axis=1) / d + b_std**2
  k22 = W_std**2 * jnp.sum(x2 * x2, axis=1) / d + b_std**2
  cos = jnp.clip(k12 / jnp.sqrt(k11[:, None] * k22[None, :]), -1.0, 1.0)
  theta = jnp.arccos(cos)
  nngp = ntk.arccos_nngp_dense_relu(x1, x2, W_std, b_std)
  return nngp + W_std**2 * k12 * (jnp.pi - theta) / (2 * jnp.pi)


@pytest.mark.parametrize("W_std,b_std", [(W_STD, B_STD), (1.3, 0.5)])
def test_dense_relu_matches_arccos_closed_form(W_std, b_std):
  with _enable_x64():
    x1 = _normal(0, 5, 7).astype(np.float64)
    x2 = _normal(1, 3, 7).astype(np.float64)
    x2[0] = -2.0 * x1[0]  # an anti-parallel pair: theta near pi
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    kernels = ntk.dense_relu_kernel_fn(depth=1, W_std=W_std, b_std=b_std)(
        x1, x2, ("nngp", "ntk"))
    assert kernels.nngp.dtype == jnp.float64
    np.testing.assert_allclose(
        kernels.nngp, ntk.arccos_nngp_dense_relu(x1, x2, W_std, b_std),
        rtol=1e-6, atol=0)
    np.testing.assert_allclose(
        kernels.ntk, _arccos_ntk_dense_relu(x1, x2, W_std, b_std),
        rtol=1e-6, atol=0)


# (c) Monte Carlo over finite-width nets.

MC_WIDTH = 128
MC_NETS = 256  # NNGP: independent nets ...
MC_OUTPUTS = 16  # ... times outputs each: 4096 draws of f(x).
MC_NTK_NETS = 32


def _standard_normal_params(init_fn, input_shape, num_nets, seed):
  """Draws `num_nets` parameter sets distributed exactly as stax's init_fn.

  In the NTK parameterisation stax's init_fn draws every weight and bias from
  N(0, 1) (W_std / sqrt(fan_in) and b_std are applied in apply_fn), so a flat
  standard-normal vector unravelled into init_fn's parameter tree has the same
  law. Drawing it with numpy avoids compiling JAX's RNG once per layer, which
  dominates the run time of this test on CPU.

  Returns:
    (num_nets, num_params) float32 array and the function unravelling one row
    into a parameter tree.
  """
  shapes = jax.eval_shape(lambda: init_fn(jax.random.PRNGKey(0),
                                          input_shape)[1])
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  flat, unravel = ravel_pytree(zeros)
  rng = np.random.default_rng(seed)
  draws = rng.standard_normal((num_nets, flat.size), dtype=np.float32)
  return draws, unravel


def _correlation(k: np.ndarray) -> np.ndarray:
  d = np.sqrt(np.diag(k))
  return k / np.outer(d, d)


def test_monte_carlo_matches_infinite_width_convnet(conv_images,
                                                    conv_kernels):
  depth = 2
  x = jnp.asarray(conv_images)
  nngp, ntk_exact = (np.asarray(k, np.float64) for k in conv_kernels)
  init_fn, apply_fn, _ = ntk.convnet_stax(
      depth=depth, width=MC_WIDTH, W_std=W_STD, b_std=B_STD,
      num_outputs=MC_OUTPUTS)
  draws, unravel = _standard_normal_params(init_fn, x.shape, MC_NETS, seed=0)

  # NNGP. Each of the N = MC_NETS * MC_OUTPUTS outputs f(x) is ~Gaussian with
  # covariance K, so by Isserlis Var[f(x) f(y)] = K_xx K_yy + K_xy^2 and the
  # mean of N products has standard error se = sqrt((K_xx K_yy + K_xy^2) / N)
  # (relative ~ sqrt(2 / N) ~ 2% on the diagonal). The outputs of one net
  # share its hidden features, which inflates se by sqrt(1 + O(outputs /
  # width)) ~ 1.2 here, so a bound of 6 se is about 5 true standard errors.
  # Finite-width bias is O(1 / width) < 1%, well inside it.
  def outer(z):
    f = apply_fn(unravel(z), x)
    return f @ f.T / MC_OUTPUTS

  per_net = jax.jit(lambda zs: jax.lax.map(outer, zs))(draws)
  estimate = np.asarray(per_net, np.float64).mean(axis=0)
  n_draws = MC_NETS * MC_OUTPUTS
  diag = np.diag(nngp)
  se = np.sqrt((np.outer(diag, diag) + nngp**2) / n_draws)
  np.testing.assert_array_less(np.abs(estimate - nngp), 6 * se)
  # The error above is largely common to all entries; correlations cancel it
  # and test the spatial structure (padding, pooling) far more tightly:
  # a sample correlation has se = (1 - rho^2) / sqrt(N), ~0.003 here.
  rho = _correlation(nngp)
  np.testing.assert_array_less(
      np.abs(_correlation(estimate) - rho),
      6 * (1 - rho**2) / np.sqrt(n_draws) + 1e-6)

  # NTK, by the default empirical implementation (Jacobian contraction) of the
  # first output. Unlike f f^T, the finite-width NTK concentrates: one net's
  # NTK deviates from the limit by O(sqrt(depth / width)) relative (~12%
  # measured at width 128), and its mean differs from the limit by
  # O(depth / width). So: mean over nets within
  # 5 standard errors (measured across the nets) plus 2 depth / width.
  ntk_fn = nt.empirical_ntk_fn(lambda params, x: apply_fn(params, x)[:, :1],
                               trace_axes=(-1,))
  per_net = jax.jit(lambda zs: jax.lax.map(
      lambda z: ntk_fn(x, None, unravel(z)), zs))(draws[:MC_NTK_NETS])
  per_net = np.asarray(per_net, np.float64)
  rel_std = per_net.std(axis=0, ddof=1) / ntk_exact
  assert rel_std.max() < 2 * np.sqrt(depth / MC_WIDTH), rel_std
  rel_err = np.abs(per_net.mean(axis=0) - ntk_exact) / ntk_exact
  np.testing.assert_array_less(
      rel_err, 5 * rel_std / np.sqrt(MC_NTK_NETS) + 2 * depth / MC_WIDTH)


def test_empirical_ntk_implementations_agree():
  init_fn, apply_fn, _ = ntk.dense_relu_stax(depth=1, width=16,
                                             num_outputs=2)
  x = jnp.asarray(_normal(0, 3, 5))
  _, params = init_fn(jax.random.PRNGKey(1), x.shape)
  by_jacobian, by_products = (
      jax.jit(nt.empirical_ntk_fn(apply_fn, implementation=i))(x, None, params)
      for i in (1, 2))
  np.testing.assert_allclose(by_jacobian, by_products, rtol=1e-4, atol=1e-6)


# (d) Kernel matrix properties.


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_convnet_kernel_is_symmetric_psd(conv_kernels, get):
  k = np.asarray(getattr(conv_kernels, get), np.float64)
  assert k.shape == (6, 6)
  np.testing.assert_allclose(k, k.T, rtol=1e-6, atol=0)
  eigenvalues = np.linalg.eigvalsh((k + k.T) / 2)
  assert eigenvalues.min() >= -1e-6 * eigenvalues.max(), eigenvalues


def test_layer_norm_kernel_is_psd():
  kernel_fn = ntk.convnet_kernel_fn(depth=1, norm="layer")
  k = np.asarray(kernel_fn(_images(2, 5), None, "ntk"), np.float64)
  eigenvalues = np.linalg.eigvalsh((k + k.T) / 2)
  assert np.isfinite(k).all()
  assert eigenvalues.min() >= -1e-6 * eigenvalues.max(), eigenvalues


def test_batched_kernel_matrix_equals_unbatched(conv_kernel_fn, conv_images,
                                                conv_kernels):
  # 4 divides neither 6 nor 5, which exercises the padding.
  x1, x2 = conv_images, conv_images[1:]
  batched = ntk.kernel_matrix(conv_kernel_fn, x1, x2, get="ntk", batch_size=4)
  assert batched.shape == (6, 5)
  np.testing.assert_allclose(batched, conv_kernels.ntk[:, 1:], rtol=1e-5,
                             atol=1e-7)
  # x2=None (the symmetric path); the MLP kernel keeps the compile cheap.
  dense_kernel_fn = ntk.dense_relu_kernel_fn(depth=2)
  x = _normal(6, 7, 5)
  square = ntk.kernel_matrix(dense_kernel_fn, x, None, get="nngp",
                             batch_size=3)
  whole = ntk.kernel_matrix(dense_kernel_fn, x, None, get="nngp")
  assert square.shape == whole.shape == (7, 7)
  np.testing.assert_allclose(square, whole, rtol=1e-5, atol=1e-7)


# (e) Input validation.


def test_bad_inputs_raise_distill_error(conv_kernel_fn):
  dense_kernel_fn = ntk.dense_relu_kernel_fn()
  images, vectors = _images(5, 2), np.ones((2, 4), np.float32)
  bad_calls = [
      lambda: conv_kernel_fn(images[0]),  # 3-D
      lambda: conv_kernel_fn(images, vectors),  # x2 2-D
      lambda: conv_kernel_fn(images, _images(5, 2, size=4)),  # H, W differ
      lambda: conv_kernel_fn(images, None, "gp"),
      lambda: conv_kernel_fn(_images(5, 2, size=2)),  # 2x2 < 2**depth
      lambda: dense_kernel_fn(images),  # 4-D
      lambda: ntk.arccos_nngp_dense_relu(vectors[0], vectors, 1.0, 0.0),
      lambda: ntk.kernel_matrix(dense_kernel_fn, vectors, get="both"),
      lambda: ntk.convnet_kernel_fn(norm="batch"),
      lambda: ntk.convnet_kernel_fn(depth=0),
  ]
  for call in bad_calls:
    with pytest.raises(ValueError) as info:
      call()
    assert "\n" not in str(info.value)
