"""Makes `neural_tangents` 0.6.5 importable and usable on current JAX.

neural-tangents 0.6.5 (its latest release) imports names that JAX has since
moved or removed. Importing this module puts back exactly those names, taken
from their new homes, and only where the old module lacks them, so it is a
no-op for any name a JAX version still provides. It then imports
neural_tangents and re-exports it:

  from kernels.nt_compat import nt, stax

Nothing else in the project may import `neural_tangents` directly, so the
shim always runs first.

Names restored (old location <- first new home found):

  jax.core.Jaxpr, JaxprEqn, Literal, Primitive, Var
      <- jax.extend.core (public), else jax._src.core
  jax.core.ShapedArray, AbstractValue, Value, eval_context
      <- jax._src.core (still present on jax 0.10.2; listed for later JAX)
  jax.util (whole module, removed) with safe_map, safe_zip
      <- jax._src.util
  jax.interpreters.ad.zeros_like_p, add_jaxvals_p
      <- jax._src.ad_util
  jax.interpreters.ad.source_info_util
      <- jax._src.source_info_util
  jax.interpreters.ad.reducing_transposes, config, UndefinedPrimal, Zero,
  linearize, primitive_jvps, get_primitive_transpose, add_tangents,
  is_undefined_primal
      <- jax._src.interpreters.ad (the last seven still present on 0.10.2)

`RESTORED` lists the ones actually put back (on jax 0.10.2: the five
jax.core classes, jax.util.safe_map / safe_zip, and ad.zeros_like_p,
source_info_util, reducing_transposes, config). The last three are only read
by the structured-derivatives empirical NTK, which fails anyway (below); they
are restored so that every name neural_tangents refers to resolves. Not
restorable, since JAX removed them without a new home: jax.core.DShapedArray,
get_aval and lattice_join, again read only by that code path.

One behaviour is patched as well, again only where needed: the empirical
NTK's `implementation=2` calls `jnp.size` on `jax.ShapeDtypeStruct`s, which
jax 0.10 deprecates ("in a future JAX release this will be an error"). Where
`jnp.size` warns about or rejects that, `empirical._std_basis` and
`empirical._unravel_array_into_pytree` are replaced by equivalents that read
`.shape` (listed in `PATCHED`; on jax 0.10.2 the replacement is active).

Tested with jax 0.10.2 / jaxlib 0.10.2, Python 3.11. The same table is meant
for jax 0.11.x: every entry is looked up defensively, and a name with no new
home is left missing (the failing neural_tangents import then names it).

What works: `stax` layers with their analytic `kernel_fn` (NNGP and NTK),
`init_fn` / `apply_fn`, `nt.batch`, and `nt.empirical_ntk_fn` with
`implementation=1` (Jacobian contraction, the default) or `implementation=2`
(NTK-vector products), all exercised by tests/test_ntk.py;
`nt.empirical_nngp_fn` also ran by hand.

What does not:
  * `implementation=3` (structured derivatives) of the empirical NTK. It
    re-implements JAX's linearize/transpose internals, whose signatures have
    changed (`ad.linearize` now takes flat trees and returns different
    values), so it fails with a TypeError. No name restore can fix that;
    do not use it.

`nt.experimental` (the TensorFlow round trip, `empirical_ntk_fn_tf`) is not
imported eagerly: neural_tangents' `__init__` would otherwise import
TensorFlow and jax2tf in every process (several seconds, and TensorFlow
probing the GPU next to JAX). A stand-in module imports the real one on first
attribute access (`empirical_ntk_fn_tf` on a small `tf.Module` ran by hand
on the versions above).
"""

import importlib
import math
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# (old module, name, candidate new homes as "module:attribute", first wins).
_RESTORES = (
    ("jax.core", "Jaxpr", ("jax.extend.core:Jaxpr", "jax._src.core:Jaxpr")),
    ("jax.core", "JaxprEqn",
     ("jax.extend.core:JaxprEqn", "jax._src.core:JaxprEqn")),
    ("jax.core", "Literal",
     ("jax.extend.core:Literal", "jax._src.core:Literal")),
    ("jax.core", "Primitive",
     ("jax.extend.core:Primitive", "jax._src.core:Primitive")),
    ("jax.core", "Var", ("jax.extend.core:Var", "jax._src.core:Var")),
    ("jax.core", "ShapedArray", ("jax._src.core:ShapedArray",)),
    ("jax.core", "AbstractValue", ("jax._src.core:AbstractValue",)),
    ("jax.core", "Value", ("jax._src.core:Value",)),
    ("jax.core", "eval_context", ("jax._src.core:eval_context",)),
    ("jax.util", "safe_map", ("jax._src.util:safe_map",)),
    ("jax.util", "safe_zip", ("jax._src.util:safe_zip",)),
    ("jax.interpreters.ad", "zeros_like_p",
     ("jax._src.ad_util:zeros_like_p",)),
    ("jax.interpreters.ad", "add_jaxvals_p",
     ("jax._src.ad_util:add_jaxvals_p",)),
    ("jax.interpreters.ad", "source_info_util",
     ("jax._src.source_info_util:",)),
    ("jax.interpreters.ad", "reducing_transposes",
     ("jax._src.interpreters.ad:reducing_transposes",)),
    ("jax.interpreters.ad", "config", ("jax._src.interpreters.ad:config",)),
    ("jax.interpreters.ad", "UndefinedPrimal",
     ("jax._src.interpreters.ad:UndefinedPrimal",)),
    ("jax.interpreters.ad", "Zero",
     ("jax._src.interpreters.ad:Zero", "jax._src.ad_util:Zero")),
    ("jax.interpreters.ad", "linearize",
     ("jax._src.interpreters.ad:linearize",)),
    ("jax.interpreters.ad", "primitive_jvps",
     ("jax._src.interpreters.ad:primitive_jvps",)),
    ("jax.interpreters.ad", "get_primitive_transpose",
     ("jax._src.interpreters.ad:get_primitive_transpose",)),
    ("jax.interpreters.ad", "add_tangents",
     ("jax._src.interpreters.ad:add_tangents",)),
    ("jax.interpreters.ad", "is_undefined_primal",
     ("jax._src.interpreters.ad:is_undefined_primal",)),
)


def _old_module(name: str) -> types.ModuleType:
  """Returns module `name`, creating an empty one if JAX removed it."""
  try:
    return importlib.import_module(name)
  except ImportError:
    module = types.ModuleType(name, f"Stand-in for the removed `{name}`.")
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(importlib.import_module(parent), child, module)
    return module


def _lookup(source: str):
  """Returns the object at "module:attribute" ("module:" is the module)."""
  module_name, _, attr = source.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    return None
  return getattr(module, attr, None) if attr else module


def _restore() -> tuple[str, ...]:
  """Restores each missing name; returns "module.name" for those restored."""
  restored = []
  for module_name, name, sources in _RESTORES:
    module = _old_module(module_name)
    if hasattr(module, name):
      continue
    for source in sources:
      value = _lookup(source)
      if value is not None:
        setattr(module, name, value)
        restored.append(f"{module_name}.{name}")
        break
  return tuple(restored)


class _LazyModule(types.ModuleType):
  """Stands in for a submodule; imports the real one on first attribute use."""

  def __getattr__(self, name: str):
    if sys.modules.get(self.__name__) is self:
      # Dropping the stand-in lets the import system load the real module and
      # rebind it on the parent package.
      del sys.modules[self.__name__]
    return getattr(importlib.import_module(self.__name__), name)


def _size_of_shape_struct_deprecated() -> bool:
  """Whether `jnp.size` warns about, or rejects, a `jax.ShapeDtypeStruct`."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    try:
      jnp.size(jax.ShapeDtypeStruct((1,), jnp.float32))
    except (DeprecationWarning, TypeError, ValueError):
      return True
  return False


def _std_basis(pytree):
  """`empirical._std_basis`, reading sizes from `.shape` attributes."""
  leaves = jax.tree_util.tree_leaves(pytree)
  dim = sum(math.prod(_shape(leaf)) for leaf in leaves)
  flat_basis = jnp.eye(dim, dtype=jax.dtypes.result_type(*leaves))
  return _unravel_array_into_pytree(pytree, 1, flat_basis)


def _unravel_array_into_pytree(pytree, axis: int, arr: jnp.ndarray):
  """`empirical._unravel_array_into_pytree`, reading `.shape` attributes."""
  leaves, treedef = jax.tree_util.tree_flatten(pytree)
  if arr.ndim > 0:
    axis %= arr.ndim
  shapes = [arr.shape[:axis] + _shape(leaf) + arr.shape[axis + 1:]
            for leaf in leaves]
  splits = np.cumsum([math.prod(_shape(leaf)) for leaf in leaves[:-1]])
  parts = jnp.split(arr, splits, axis)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.reshape(x, shape) for x, shape in zip(parts, shapes)])


def _shape(leaf) -> tuple[int, ...]:
  return tuple(leaf.shape) if hasattr(leaf, "shape") else jnp.shape(leaf)


RESTORED: tuple[str, ...] = _restore()
"""The "module.name"s this JAX version lacked and the shim put back."""

_EXPERIMENTAL = "neural_tangents.experimental"
if "neural_tangents" not in sys.modules:
  # Only before the first import: `neural_tangents/__init__.py` then binds the
  # stand-in as `nt.experimental` instead of importing TensorFlow.
  sys.modules.setdefault(_EXPERIMENTAL, _LazyModule(_EXPERIMENTAL))

import neural_tangents as nt  # noqa: E402  (needs the names restored above)
from neural_tangents import stax  # noqa: E402
from neural_tangents._src import empirical as _nt_empirical  # noqa: E402

PATCHED: tuple[str, ...] = ()
"""The neural_tangents functions replaced on this JAX version."""
if _size_of_shape_struct_deprecated():
  _nt_empirical._std_basis = _std_basis
  _nt_empirical._unravel_array_into_pytree = _unravel_array_into_pytree
  PATCHED = ("neural_tangents._src.empirical._std_basis",
             "neural_tangents._src.empirical._unravel_array_into_pytree")

__all__ = ["nt", "stax", "RESTORED", "PATCHED"]
