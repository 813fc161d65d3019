"""Networks: the distillation ConvNet and CIFAR-stem ResNets.

Every model maps NHWC float images to `(features, outputs)`: `features` is
the penultimate representation (what KRR-ST regresses on and what linear
probes read), `outputs` the linear head (`num_outputs` wide) or `None` when
`num_outputs == 0`.

Normalisation layers:
  * "instance" (default of the ConvNet, as in the distillation literature):
    per-sample, per-channel; no state.
  * "batch": flax BatchNorm with running statistics in the `batch_stats`
    collection (the ResNets' default); `apply_model` threads it.
  * "layer", "none".
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill.errors import DistillError
from distill.nn import conv as conv_lib

NORMS = ("instance", "batch", "layer", "none")


def _norm_layer(norm: str, train: bool) -> Callable[[jax.Array], jax.Array]:
  if norm == "instance":
    # GroupNorm with one channel per group normalises each (sample, channel)
    # over space: instance norm with a learnable affine.
    return lambda x: nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5)(x)
  if norm == "batch":
    return lambda x: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                  epsilon=1e-5)(x)
  if norm == "layer":
    return lambda x: nn.LayerNorm(epsilon=1e-5)(x)
  if norm == "none":
    return lambda x: x
  raise DistillError(f"unknown norm {norm!r}; expected one of {NORMS}")


class ConvNet(nn.Module):
  """conv3x3 - norm - relu - avgpool2x2 blocks, then flatten.

  Block b has `widths[b]` channels, or `width` channels in each of `depth`
  blocks when `widths` is empty. With width 128 and depth 3 at 32x32 the
  features are 4*4*128 = 2048 wide; the paper's KRR-ST pool net
  (convnet_128_256_512_bn) is widths=(128, 256, 512), norm "batch":
  4*4*512 = 8192 features at 32x32.

  Input (B, H, W, C); features (B, (H/2^D) * (W/2^D) * widths[-1]) with D
  blocks; outputs (B, num_outputs) or None.
  """
  width: int = 128
  depth: int = 3
  norm: str = "instance"
  num_outputs: int = 0
  # Last, so positional construction is unchanged; the layers keep their
  # auto-names (Conv_0, ...), so existing checkpoints still load.
  widths: tuple = ()
  # What the head reads (FEATURE_KINDS): the flattened map, or its spatial
  # mean. A student whose probe reads "gap" must be trained through "gap":
  # a head on the flattened map can fit the targets with spatial detail that
  # the mean discards.
  head_input: str = "features"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    for channels in self.widths or (self.width,) * self.depth:
      # Same convolution; its weight gradient as matrix products (nn/conv.py).
      x = nn.Conv(channels, (3, 3), padding="SAME",
                  conv_general_dilated=conv_lib.conv_general_dilated)(x)
      x = _norm_layer(self.norm, train)(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    features = x.reshape((x.shape[0], -1))
    head_in = x.mean((1, 2)) if self.head_input == "gap" else features
    outputs = nn.Dense(self.num_outputs, name="head")(head_in) if self.num_outputs else None
    return features, outputs


class _BasicBlock(nn.Module):
  channels: int
  stride: int
  norm: str

  @nn.compact
  def __call__(self, x, train):
    residual = x
    y = nn.Conv(self.channels, (3, 3), strides=self.stride, padding="SAME",
                use_bias=False)(x)
    y = nn.relu(_norm_layer(self.norm, train)(y))
    y = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)(y)
    y = _norm_layer(self.norm, train)(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.channels, (1, 1), strides=self.stride,
                         use_bias=False)(residual)
      residual = _norm_layer(self.norm, train)(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """ResNet with the CIFAR stem (3x3 conv, no max-pool); global-average features."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  norm: str = "batch"
  num_outputs: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False)(x)
    x = nn.relu(_norm_layer(self.norm, train)(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = _BasicBlock(self.width * 2**i, stride, self.norm)(x, train)
    features = jnp.mean(x, axis=(1, 2))
    outputs = nn.Dense(self.num_outputs, name="head")(features) if self.num_outputs else None
    return features, outputs


class _TorchBasicBlock(nn.Module):
  """torchvision's BasicBlock: conv3x3-bn-relu-conv3x3-bn + shortcut, torch padding."""
  channels: int
  stride: int
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(_torch_batch_norm, train)
    y = nn.Conv(self.channels, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = nn.Conv(self.channels, (3, 3), padding=1, use_bias=False, name="conv2")(y)
    y = bn("bn2")(y)
    return nn.relu(y + _torch_shortcut(x, y.shape[-1], self.stride, bn))


class _TorchBottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: the stride on the 3x3 conv), expansion 4."""
  channels: int
  stride: int
  expansion = 4

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(_torch_batch_norm, train)
    y = nn.relu(bn("bn1")(nn.Conv(self.channels, (1, 1), use_bias=False, name="conv1")(x)))
    y = nn.Conv(self.channels, (3, 3), self.stride, padding=1, use_bias=False, name="conv2")(y)
    y = nn.relu(bn("bn2")(y))
    y = nn.Conv(self.channels * 4, (1, 1), use_bias=False, name="conv3")(y)
    y = bn("bn3")(y)
    return nn.relu(y + _torch_shortcut(x, y.shape[-1], self.stride, bn))


def _torch_batch_norm(train: bool, name: str) -> nn.BatchNorm:
  """torch's BatchNorm2d defaults (momentum 0.1 = flax's 0.9, eps 1e-5), named as torch's."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _torch_shortcut(x, channels: int, stride: int, bn):
  if x.shape[-1] == channels and stride == 1:
    return x
  x = nn.Conv(channels, (1, 1), stride, padding=0, use_bias=False, name="downsample_0")(x)
  return bn("downsample_1")(x)


class TorchResNet(nn.Module):
  """A ResNet laid out and padded as torchvision's, so its weights import exactly.

  Layer names follow torchvision's state dict ("layer2.0.downsample.0" is
  `layer2_0/downsample_0`, see `distill.nn.torch_layout`); convolutions pad
  as torch does (explicitly, symmetric), which differs from "SAME" at
  stride 2. `stem` "imagenet" is torchvision's (7x7 stride-2 conv, 3x3
  stride-2 max-pool); "cifar" is the 3x3 stride-1 conv without max-pool of
  CIFAR checkpoints (solo-learn, the official KRR-ST teacher).
  Features: global-average-pooled, 512 wide (2048 for ResNet-50).
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  stem: str = "cifar"
  width: int = 64
  num_outputs: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    bn = _torch_batch_norm(train, "bn1")
    if self.stem == "imagenet":
      x = nn.Conv(self.width, (7, 7), 2, padding=3, use_bias=False, name="conv1")(x)
      x = nn.relu(bn(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == "cifar":
      x = nn.relu(bn(nn.Conv(self.width, (3, 3), padding=1, use_bias=False, name="conv1")(x)))
    else:
      raise DistillError(f"unknown ResNet stem {self.stem!r}; expected 'imagenet' or 'cifar'")
    block = _TorchBottleneck if self.bottleneck else _TorchBasicBlock
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        x = block(self.width * 2**i, 2 if i > 0 and j == 0 else 1,
                  name=f"layer{i + 1}_{j}")(x, train)
    features = jnp.mean(x, axis=(1, 2))
    outputs = nn.Dense(self.num_outputs, name="head")(features) if self.num_outputs else None
    return features, outputs


# torchvision-layout ResNets: (stage sizes, bottleneck blocks).
TORCH_RESNETS = {"tv_resnet18": ((2, 2, 2, 2), False), "tv_resnet34": ((3, 4, 6, 3), False),
                 "tv_resnet50": ((3, 4, 6, 3), True)}
ARCHS = ("convnet", "resnet10", "resnet18", *TORCH_RESNETS)


def build_model(arch: ml_collections.ConfigDict | dict, num_outputs: int = 0) -> nn.Module:
  """Builds a model from an architecture config.

  Args:
    arch: mapping with `name` in ARCHS, `width`, `norm` and (ConvNet) `depth`
      and `widths` (per-block channels, a tuple or list; when non-empty it
      replaces `width` and `depth`). A `norm` of "default" picks instance for
      the ConvNet, batch for ResNets.
    num_outputs: width of the linear head; 0 for features only.
      `head_input` (optional, FEATURE_KINDS, default "features") says what a
      ConvNet's head reads; a ResNet's features are pooled already.
  """
  name = arch["name"]
  norm = arch.get("norm", "default")
  head_input = arch.get("head_input", "features")
  if head_input not in FEATURE_KINDS:
    raise DistillError(f"arch head_input {head_input!r}: expected one of {FEATURE_KINDS}")
  if name == "convnet":
    # A tuple of ints, and width/depth made to agree with it: flax modules
    # hash by their fields (jit caches key on them), so one net is one module.
    widths = tuple(int(w) for w in (arch.get("widths", ()) or ()))
    width, depth = (widths[-1], len(widths)) if widths else (arch["width"],
                                                             arch.get("depth", 3))
    return ConvNet(width=width, depth=depth,
                   norm="instance" if norm == "default" else norm,
                   num_outputs=num_outputs, widths=widths, head_input=head_input)
  if name in ("resnet10", "resnet18"):
    stages = (1, 1, 1, 1) if name == "resnet10" else (2, 2, 2, 2)
    return ResNet(stage_sizes=stages, width=arch["width"],
                  norm="batch" if norm == "default" else norm,
                  num_outputs=num_outputs)
  if name in TORCH_RESNETS:
    stages, bottleneck = TORCH_RESNETS[name]
    return TorchResNet(stage_sizes=stages, bottleneck=bottleneck,
                       stem=arch.get("stem", "cifar"), width=arch.get("width", 64),
                       num_outputs=num_outputs)
  raise DistillError(f"unknown architecture {name!r}; expected one of {ARCHS}")


def init_model(model: nn.Module, rng: jax.Array, image_shape: Sequence[int]) -> dict:
  """Variables ({'params', maybe 'batch_stats'}) for (H, W, C) images."""
  return dict(_jitted_init(model)(rng, jnp.zeros((1, *image_shape), jnp.float32)))


@functools.lru_cache(maxsize=None)
def _jitted_init(model: nn.Module):
  # Jitted (op-by-op initialisation compiles every primitive separately) and
  # cached per architecture, so the table's many runs compile it once.
  return jax.jit(functools.partial(model.init, train=False))


def apply_model(model: nn.Module, variables: dict, x: jax.Array, train: bool):
  """Runs the model, threading BatchNorm statistics when there are any.

  Returns:
    (features (B, p), outputs (B, k) or None), updated variables.
  """
  if train and "batch_stats" in variables:
    (features, outputs), updates = model.apply(variables, x, train=True,
                                               mutable=["batch_stats"])
    return (features, outputs), {**variables, **updates}
  return model.apply(variables, x, train=train), variables


def gradient_step(model: nn.Module, optimizer, state: dict, x: jax.Array,
                  objective: Callable[[jax.Array, jax.Array], jax.Array],
                  has_aux: bool = False):
  """One optimiser step on `objective(features, outputs)` of a batch.

  The shared skeleton of every supervised-style train step (teacher,
  pretraining, fine-tuning): BatchNorm statistics are threaded, gradients are
  taken with respect to `params` only.

  Args:
    model: the network. optimizer: an optax transformation.
    state: {"variables": {...}, "opt_state": ...}.
    x: (B, H, W, C) inputs. objective: (features, outputs) -> scalar loss,
      or (loss, aux) with `has_aux`.

  Returns:
    (new state, {"loss", "grad_norm"}), plus `aux` as a third item with `has_aux`.
  """
  def loss_fn(params):
    variables = {**state["variables"], "params": params}
    (features, outputs), variables = apply_model(model, variables, x, train=True)
    value = objective(features, outputs)
    loss, aux = value if has_aux else (value, None)
    return loss, (variables, aux)

  params = state["variables"]["params"]
  (loss, (variables, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = optimizer.update(grads, state["opt_state"], params)
  variables = {**variables, "params": optax.apply_updates(params, updates)}
  out = ({"variables": variables, "opt_state": opt_state},
         {"loss": loss, "grad_norm": optax.global_norm(grads)})
  return (*out, aux) if has_aux else out


# What a backbone hands on: "features" as they are (a ResNet's are pooled
# already; a ConvNet's are its flattened (h, w, c) map); "gap" the last feature
# map averaged over space (for ResNets the same as "features").
FEATURE_KINDS = ("features", "gap")


def feature_view(model: nn.Module, features: jax.Array, kind: str) -> jax.Array:
  """A backbone's (B, p) features seen as `kind` (FEATURE_KINDS) -> (B, d).

  A ConvNet's "gap" averages its h * w positions: (B, h * w * c) -> (B, c).
  """
  if kind not in FEATURE_KINDS:
    raise DistillError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")
  if kind == "features" or not hasattr(model, "depth"):
    return features
  channels = (model.widths or (model.width,))[-1]
  return features.reshape(features.shape[0], -1, channels).mean(1)


@functools.lru_cache(maxsize=None)
def _jitted_features(model: nn.Module, kind: str):
  # One executable per architecture and kind (flax modules hash by their
  # fields), reused across calls instead of re-tracing a fresh lambda each time.
  return jax.jit(lambda variables, x: feature_view(
      model, model.apply(variables, x, train=False)[0], kind))


def extract_features(model: nn.Module, variables: dict, images, batch_size: int = 500,
                     kind: str = "features"):
  """Frozen features of a whole array, in chunks to bound memory.

  Args:
    model: a network of this module. variables: its variables.
    images: (N, H, W, C) normalised float32 images (numpy or jax).
    kind: which view of the features (FEATURE_KINDS).

  Returns:
    (N, p) float32 numpy array.
  """
  apply = _jitted_features(model, kind)  # feature_view refuses an unknown kind
  chunks = [np.asarray(apply(variables, jnp.asarray(images[i:i + batch_size])))
            for i in range(0, len(images), batch_size)]
  return np.concatenate(chunks).astype(np.float32)
