"""torchvision-layout ResNet weights <-> `models.TorchResNet` variables.

A torchvision state dict names each tensor by module path ("layer2.0.conv1.
weight", "layer2.0.downsample.1.running_var") and stores convolutions as
(out, in, kh, kw). `TorchResNet` uses the same names with "_" for the
index dots ("layer2_0/conv1/kernel") and flax's (kh, kw, in, out) layout.

Reading: `.safetensors` and `.npz` need nothing beyond numpy and safetensors;
`.pt` / `.pth` need torch (the optional `torch` extra). Self-supervised
checkpoints wrap the backbone: the common prefixes (`module.`, `backbone.`,
`encoder.`, `model.`) are stripped, and classifier / projector heads (`fc`,
`projector`, `classifier`, `head`, `predictor`, `prototypes`) are dropped.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np

from distill.errors import DistillError
from distill.nn.models import TORCH_RESNETS, build_model, init_model

PREFIXES = ("module.", "backbone.", "encoder.", "model.")
HEADS = ("fc", "projector", "classifier", "head", "predictor", "prototypes")
# flax leaf name -> torch name, per collection.
_PARAM_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a checkpoint file as float32 numpy arrays, by name.

  Raises:
    DistillError: missing file, unknown suffix, unreadable content, or a
      `.pt` file without torch installed.
  """
  if not os.path.isfile(path):
    raise DistillError(f"teacher checkpoint {path} does not exist")
  lower = path.lower()
  try:
    if lower.endswith(".safetensors"):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      state = load_file(path)
    elif lower.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        state = {k: f[k] for k in f.files}
    elif lower.endswith((".pt", ".pth", ".ckpt")):
      state = _torch_state(path)
    else:
      raise DistillError(f"teacher checkpoint {path}: expected .safetensors, .npz, .pt or .pth")
  except DistillError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DistillError(f"cannot read teacher checkpoint {path}: {e}") from e
  return {k: np.asarray(v) for k, v in state.items()}


def _torch_state(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DistillError(f"reading {path} needs torch (pip install -e '.[torch]'); "
                       f"or convert it to .safetensors") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "backbone"):   # Lightning / solo-learn wrappers
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def backbone_state(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Strips wrapper prefixes and drops heads and counters.

  Returns:
    (backbone tensors by torchvision name, the dropped names).
  """
  out, dropped = {}, []
  for key, value in state.items():
    name = key
    while name.startswith(PREFIXES):
      name = name[next(len(p) for p in PREFIXES if name.startswith(p)):]
    if name.split(".")[0] in HEADS or name.endswith("num_batches_tracked"):
      dropped.append(key)
    else:
      out[name] = value
  return out, dropped


def infer_arch(state: dict[str, np.ndarray]) -> dict:
  """The `TorchResNet` arch of a backbone state dict: depth, block type, stem, width."""
  if "conv1.weight" not in state:
    raise DistillError(f"not a torchvision-layout ResNet: no 'conv1.weight' among "
                       f"{sorted(state)[:5]}...")
  blocks = {}
  for key in state:
    m = re.match(r"layer(\d)\.(\d+)\.", key)
    if m:
      blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
  stages = tuple(blocks.get(i, 0) for i in (1, 2, 3, 4))
  bottleneck = any(".conv3." in k for k in state)
  names = [n for n, spec in TORCH_RESNETS.items() if spec == (stages, bottleneck)]
  if not names:
    raise DistillError(f"a ResNet with stages {stages} ({'bottleneck' if bottleneck else 'basic'}"
                       f" blocks) is none of {tuple(TORCH_RESNETS)}")
  conv1 = state["conv1.weight"]
  return dict(name=names[0], width=int(conv1.shape[0]),
              stem="imagenet" if conv1.shape[2] == 7 else "cifar")


def torch_name(collection: str, path: tuple) -> str:
  """torchvision name of a flax leaf: ("params", ("layer1_0", "conv1", "kernel")) ->
  "layer1.0.conv1.weight"."""
  modules = [re.sub(r"^(layer\d|downsample)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
  leaf = (_PARAM_NAMES if collection == "params" else _STAT_NAMES)[path[-1]]
  return ".".join([*modules, leaf])


def to_variables(state: dict[str, np.ndarray], arch: dict, image_shape) -> dict:
  """flax variables of `build_model(arch)` from torchvision-named tensors.

  Raises:
    DistillError: naming the first missing, unexpected or mis-shaped tensor.
  """
  template = jax.device_get(init_model(build_model(arch), jax.random.key(0), image_shape))
  flat = {(c, p): v for c in template
          for p, v in _flatten(template[c]).items()}
  wanted = {torch_name(c, p): (c, p) for (c, p) in flat}
  missing = sorted(set(wanted) - set(state))
  if missing:
    raise DistillError(f"teacher checkpoint lacks {missing[0]!r} (and {len(missing) - 1} more) "
                       f"for {arch['name']}")
  extra = sorted(set(state) - set(wanted))
  if extra:
    raise DistillError(f"teacher checkpoint has {extra[0]!r} (and {len(extra) - 1} more) that "
                       f"{arch['name']} does not; is it another architecture?")
  out: dict = {}
  for name, (collection, path) in wanted.items():
    value = np.asarray(state[name], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)   # (out, in, kh, kw) -> (kh, kw, in, out)
    expected = flat[(collection, path)].shape
    if value.shape != expected:
      raise DistillError(f"teacher checkpoint {name!r} has shape {tuple(state[name].shape)}; "
                         f"{arch['name']} needs {_torch_shape(expected)}")
    node = out.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


def from_variables(variables: dict) -> dict[str, np.ndarray]:
  """torchvision-named float32 tensors (torch layouts) of `TorchResNet` variables."""
  out = {}
  for collection in ("params", "batch_stats"):
    for path, value in _flatten(jax.device_get(variables.get(collection, {}))).items():
      if path[0] == "head":
        continue
      value = np.asarray(value, np.float32)
      out[torch_name(collection, path)] = (value.transpose(3, 2, 0, 1) if value.ndim == 4
                                           else value)
  return out


def save_safetensors(path: str, state: dict[str, np.ndarray]) -> None:
  """Writes tensors as `.safetensors` (contiguous float32)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, path)


def _flatten(tree: dict, prefix: tuple = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, (*prefix, k)))
    else:
      out[(*prefix, k)] = v
  return out


def _torch_shape(flax_shape: tuple) -> tuple:
  return (flax_shape[3], flax_shape[2], *flax_shape[:2]) if len(flax_shape) == 4 else flax_shape
