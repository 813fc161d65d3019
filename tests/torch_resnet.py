"""torchvision's ResNet in plain torch (same module names, layouts and padding),
for tests that compare imported weights with torch; needs torch."""

import torch
from torch import nn


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _downsample(inplanes, planes, stride)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = _downsample(inplanes, planes * 4, stride, expanded=True)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _downsample(inplanes, out, stride, expanded=False):
  if stride == 1 and inplanes == out:
    return None
  return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))


class ResNet(nn.Module):
  """torchvision.models.ResNet; `cifar` swaps in the 3x3 stride-1 stem without max-pool."""

  def __init__(self, block, layers, width=64, cifar=False, num_classes=10, in_channels=3):
    super().__init__()
    self.conv1 = (nn.Conv2d(in_channels, width, 3, 1, 1, bias=False) if cifar else
                  nn.Conv2d(in_channels, width, 7, 2, 3, bias=False))
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for i, blocks in enumerate(layers):
      stage = []
      for j in range(blocks):
        stage.append(block(inplanes, width * 2**i, 2 if i > 0 and j == 0 else 1))
        inplanes = width * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
    self.fc = nn.Linear(inplanes, num_classes)

  def features(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return x.mean((2, 3))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random batch-norm statistics and affines, so eval-mode BN is not the identity."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
      m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
      m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
      m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
  return model.eval()
