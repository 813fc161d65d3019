"""Data parallel over devices and processes gives what one device gives.

Each run is a fresh Python process (tests/parallel_worker.py): the number of
CPU devices is fixed when JAX starts (XLA_FLAGS), and `jax.distributed`
can start only once per process.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run(tmp_path, name, devices, *flags):
  out = tmp_path / f"{name}.npz"
  subprocess.run([sys.executable, WORKER, str(out), str(tmp_path / name), *flags],
                 env=_env(devices), check=True, capture_output=True, timeout=300)
  return np.load(out)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _initial_images():
  # The worker's initial images: its first 8 source images, normalised.
  r = np.random.default_rng(0)
  source = r.integers(0, 256, size=(64, 8, 8, 3)).astype(np.uint8)
  return (source[:8] / 255.0 - 0.5) / 0.25


def _assert_same_as_one_device(one, many):
  initial = _initial_images()
  moved = np.abs(one["images"] - initial).max()
  assert moved > 0.02, moved  # the images did move, so agreement means something
  # Float tolerance. Reductions are summed in another order across devices,
  # and Adam turns a tiny gradient difference into a visible update where a
  # pixel's gradient is near zero (a step of up to lr per step). So the
  # difference is measured against the distance moved, as a whole.
  difference = np.linalg.norm(many["images"] - one["images"])
  assert difference < 0.01 * np.linalg.norm(one["images"] - initial), difference
  assert np.abs(many["images"] - one["images"]).max() < 0.2 * moved
  np.testing.assert_allclose(many["targets"], one["targets"], atol=1e-4)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The reference runs on one device: (teacher run per step, cached teacher views)."""
  tmp = tmp_path_factory.mktemp("one")
  return _run(tmp, "plain", 1), _run(tmp, "cached", 1, "--cache")


def test_four_devices_match_one_with_the_batch_split(one_device, tmp_path):
  plain, _ = one_device
  four = _run(tmp_path, "four", 4)
  assert int(four["devices"]) == 4 and not bool(four["split"])
  _assert_same_as_one_device(plain, four)


def test_four_devices_match_one_with_the_synthetic_set_split_along_n(one_device, tmp_path):
  plain, _ = one_device
  four = _run(tmp_path, "four_split", 4, "--split-synthetic")
  assert int(four["devices"]) == 4 and bool(four["split"])
  _assert_same_as_one_device(plain, four)


def test_two_processes_match_one(one_device, tmp_path):
  """2 processes x 2 CPU devices on localhost (gloo), cached teacher views,
  synthetic set split along n, a checkpoint written midway."""
  _, cached = one_device
  port = _free_port()
  out = tmp_path / "mp.npz"
  common = [sys.executable, WORKER, str(out), str(tmp_path / "mp"), "--split-synthetic",
            "--cache", "--num-processes", "2", "--coordinator", f"localhost:{port}"]
  procs = [subprocess.Popen(common + ["--process-id", str(i)], env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in (1, 0)]
  for p in procs:
    output = p.communicate(timeout=300)[0]
    assert p.returncode == 0, output.decode()[-2000:]
  many = np.load(out)
  assert int(many["processes"]) == 2 and int(many["devices"]) == 4
  _assert_same_as_one_device(cached, many)
  # Both processes took part in the checkpoints (orbax writes one per step 3 and 6).
  assert sorted(os.listdir(tmp_path / "mp" / "krr_st" / "ckpt")) == ["3", "6"]
