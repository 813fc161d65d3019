"""Multi-formation (IDC): tiles in, tiles out, and its storage arithmetic."""

import numpy as np
import pytest

from distill.data import multi_formation as mf
from distill.errors import DistillError


def _images(n, size=8, c=3, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, c)).astype(np.float32)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_mosaic_places_each_tile_and_round_trips(factor):
  tiles = _images(3 * factor * factor, size=4)
  slots = mf.mosaic(tiles, factor)
  assert slots.shape == (3, 4 * factor, 4 * factor, 3)
  k, i, j = 2, factor - 1, 0
  np.testing.assert_array_equal(slots[k, 4 * i:4 * i + 4, 4 * j:4 * j + 4],
                                tiles[k * factor * factor + i * factor + j])
  np.testing.assert_array_equal(mf.tiles_of(slots, factor), tiles)


def test_downsample_is_the_block_mean():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  np.testing.assert_allclose(mf.downsample(x, 2)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])


def test_upsample_reproduces_a_linear_ramp_inside_and_keeps_constants():
  # Bilinear interpolation is exact on linear functions away from the clamped
  # edges: output pixel u sits at tile coordinate (u + 0.5) / f - 0.5.
  f, h = 4, 6
  ramp = np.broadcast_to(np.arange(h, dtype=np.float32)[None, None, :, None], (1, h, h, 1))
  up = mf.upsample(ramp, f)[0, 0, :, 0]
  u = np.arange(h * f)
  inside = (u >= f // 2) & (u < h * f - f // 2)
  np.testing.assert_allclose(up[inside], ((u + 0.5) / f - 0.5)[inside], atol=1e-5)
  const = np.full((2, 8, 8, 3), 0.7, np.float32)
  np.testing.assert_allclose(mf.decode(mf.encode(np.concatenate([const, const]), 2), 2),
                             np.full((4, 8, 8, 3), 0.7), atol=1e-6)


def test_decode_of_encode_is_downsample_then_upsample_and_factor_one_is_identity():
  x = _images(8)
  np.testing.assert_allclose(mf.decode(mf.encode(x, 2), 2), mf.upsample(mf.downsample(x, 2), 2),
                             atol=1e-6)
  np.testing.assert_array_equal(mf.decode(mf.encode(x, 1), 1), x)
  # Lossy at f = 2, but it keeps the low frequencies: decoded smooth images are
  # closer to their own originals than to any other.
  smooth = mf.upsample(_images(8, size=4, seed=1), 2)
  d = mf.decode(mf.encode(smooth, 2), 2).reshape(8, -1)
  dist = ((d[:, None] - smooth.reshape(8, -1)[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(dist.argmin(1), np.arange(8))


def test_storage_counts_pixels_and_one_target_per_training_image():
  s = mf.storage(100, (32, 32, 3), 1024, 2)
  assert s["training_images"] == 400
  assert s["stored_numbers"] == 100 * 3072 + 400 * 1024
  assert s["equal_storage_images"] == pytest.approx(175.0)
  assert mf.storage(10, (32, 32, 3), 1024, 1)["equal_storage_images"] == pytest.approx(10.0)


def test_a_mixed_set_keeps_its_full_slots_as_they_are_and_forms_the_rest():
  x = _images(2 + 3 * 4)
  slots = mf.encode(x, 2, full=2)
  assert slots.shape == (5, 8, 8, 3)
  np.testing.assert_array_equal(slots[:2], x[:2])
  np.testing.assert_allclose(slots[2:], mf.encode(x[2:], 2))
  decoded = mf.decode(slots, 2, full=2)
  assert decoded.shape == x.shape
  np.testing.assert_array_equal(decoded[:2], x[:2])
  np.testing.assert_allclose(decoded[2:], mf.decode(mf.encode(x[2:], 2), 2), atol=1e-6)
  # Every slot full: the images themselves; no slot full: the plain formation.
  np.testing.assert_array_equal(mf.decode(mf.encode(x[:3], 2, 3), 2, 3), x[:3])
  np.testing.assert_array_equal(mf.encode(x[2:], 2, 0), mf.encode(x[2:], 2))


def test_storage_of_a_mixed_set_counts_one_target_per_full_slot():
  s = mf.storage(100, (32, 32, 3), 1024, 2, full=40)
  assert s["training_images"] == 40 + 60 * 4 and s["full_resolution_slots"] == 40
  assert s["stored_numbers"] == 100 * 3072 + 280 * 1024
  # All slots full: a plain set of real images.
  assert mf.storage(10, (32, 32, 3), 1024, 2, full=10)["equal_storage_images"] == \
      pytest.approx(10.0)


@pytest.mark.parametrize("call, message", [
    (lambda: mf.encode(_images(4), 2, full=5), "must be an integer in \\[0, 4\\], got 5"),
    (lambda: mf.decode(_images(4), 2, full=-1), "must be an integer in \\[0, 4\\], got -1"),
    (lambda: mf.encode(_images(4, size=6), 4), "does not divide the image size 6x6"),
    (lambda: mf.encode(_images(4), 0), "integer >= 1"),
    (lambda: mf.mosaic(_images(6, size=4), 2), "6 tiles do not fill slots of 2x2"),
    (lambda: mf.tiles_of(np.zeros((8, 8, 3)), 2), "expected \\(N, H, W, C\\)"),
])
def test_bad_input_is_refused_by_name(call, message):
  with pytest.raises(DistillError, match=message):
    call()
