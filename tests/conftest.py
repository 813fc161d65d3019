"""Shared fixtures: a tiny labelled image dataset with real structure."""

import os

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMOKE = os.path.join(ROOT, "experiments", "configs", "fashion_mnist_quickstart.py") + ":smoke"

# Tests run on the CPU, and TF must not take a GPU where one exists.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def make_blobs(n, size=16, seed=0):
  """Three classes of coloured blobs at random positions on noisy backgrounds."""
  r = np.random.default_rng(seed)
  labels = r.integers(0, 3, n).astype(np.int32)
  colours = np.array([[230, 40, 40], [40, 200, 40], [40, 60, 230]], np.float32)
  yy, xx = np.mgrid[:size, :size]
  images = r.uniform(0, 90, size=(n, size, size, 3)).astype(np.float32)
  for i, c in enumerate(labels):
    cy, cx = r.uniform(4, size - 4, 2)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r.uniform(6, 14))[..., None]
    images[i] = np.where(mask, colours[c], images[i])
  return images.clip(0, 255).astype(np.uint8), labels


@pytest.fixture(scope="session")
def blobs_npz(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "blobs.npz"
  x_train, y_train = make_blobs(96, seed=0)
  x_test, y_test = make_blobs(60, seed=1)
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return str(path)


def smoke_args(command, workdir, data, *extra):
  """`distill` arguments of the smoke config on a given dataset."""
  return [command, "--config", SMOKE, "--workdir", str(workdir),
          "--set", f"data.source={data}", "--set", f"data.target={data}", *extra]


@pytest.fixture(scope="session")
def smoke_run(blobs_npz, tmp_path_factory):
  """One full smoke run: teacher -> KRR-ST -> export -> pretrain -> probe."""
  from distill.cli import main
  workdir = tmp_path_factory.mktemp("run")
  assert main(smoke_args("run", workdir, blobs_npz)) == 0
  return workdir
