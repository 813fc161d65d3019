"""Tests for distill.data.synthetic_set: the synthetic-set file format and its viewers."""

import os

import numpy as np
import pytest
from PIL import Image

from distill import files
from distill.data import synthetic_set
from distill.errors import DistillError

N, H, W, C, D = 6, 8, 8, 3, 5


def make_set(label_kind="hard", c=C, **overrides) -> synthetic_set.SyntheticSet:
  """A small valid set; `overrides` replace any field."""
  rng = np.random.default_rng(0)
  if label_kind == "hard":
    label_arr = rng.integers(0, 4, size=N).astype(np.int32)
  elif label_kind == "soft":
    label_arr = rng.random((N, 4)).astype(np.float32)
  else:
    label_arr = None
  fields = dict(
      images=rng.normal(size=(N, H, W, c)).astype(np.float32),
      targets=rng.normal(size=(N, D)).astype(np.float32),
      labels=label_arr,
      method="krr",
      source="cifar10",
      teacher="resnet18-barlow",
      image_mean=np.linspace(0.4, 0.5, c).astype(np.float32),
      image_std=np.linspace(0.2, 0.3, c).astype(np.float32),
      config={"lr": 0.01, "steps": 100, "model": {"width": 64, "depth": [1, 2]}},
      step=42,
      extra={"learned_step_size": 0.5},
  )
  fields.update(overrides)
  return synthetic_set.SyntheticSet(**fields)


def assert_same(a: synthetic_set.SyntheticSet, b: synthetic_set.SyntheticSet) -> None:
  for field in ("images", "targets", "image_mean", "image_std"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert getattr(b, field).dtype == np.float32
  if a.labels is None:
    assert b.labels is None
  else:
    np.testing.assert_array_equal(a.labels, b.labels)
    assert b.labels.dtype == a.labels.dtype
  for field in ("method", "source", "teacher", "config", "step", "extra", "version"):
    assert getattr(a, field) == getattr(b, field), field


def rewrite(path, **changes) -> None:
  """Rewrites the .npz at `path` with keys replaced (or removed, for None)."""
  with np.load(path) as npz:
    data = {k: npz[k] for k in npz.files}
  for key, value in changes.items():
    if value is None:
      data.pop(key)
    else:
      data[key] = value
  os.remove(path)
  np.savez(path, **data)


@pytest.mark.parametrize("labels", ["hard", "soft", "none"])
@pytest.mark.parametrize("c", [1, 3])
def test_round_trip_preserves_every_field(tmp_path, labels, c):
  original = make_set(labels, c=c)
  path = str(tmp_path / "sub" / "syn.npz")
  assert synthetic_set.save_synthetic(path, original) == path
  loaded = synthetic_set.load_synthetic(path)
  assert_same(original, loaded)
  text = synthetic_set.summary(loaded)
  assert "n=6" in text and "krr" in text and "labels:" in text


def test_extra_is_optional_in_file(tmp_path):
  path = str(tmp_path / "syn.npz")
  synthetic_set.save_synthetic(path, make_set())
  rewrite(path, extra=None)
  assert synthetic_set.load_synthetic(path).extra == {}


def test_numpy_values_in_config_are_stored_as_plain_json(tmp_path):
  path = str(tmp_path / "syn.npz")
  synthetic_set.save_synthetic(path, make_set(config={"lr": np.float32(0.5), "n": np.int64(3)}))
  assert synthetic_set.load_synthetic(path).config == {"lr": 0.5, "n": 3}


def test_crash_during_write_keeps_previous_file(tmp_path, monkeypatch):
  path = str(tmp_path / "syn.npz")
  old = make_set()
  synthetic_set.save_synthetic(path, old)

  def crash(f, **arrays):
    f.write(b"PK\x03\x04 half an archive")
    raise RuntimeError("power cut")

  monkeypatch.setattr(np, "savez", crash)
  with pytest.raises(RuntimeError, match="power cut"):
    synthetic_set.save_synthetic(path, make_set(step=99))
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["syn.npz"]
  assert_same(old, synthetic_set.load_synthetic(path))


def test_os_error_during_write_is_distill_error_and_cleans_up(tmp_path, monkeypatch):
  path = str(tmp_path / "syn.npz")

  def disk_full(f, **arrays):
    f.write(b"partial")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(np, "savez", disk_full)
  with pytest.raises(DistillError, match="cannot write.*No space left"):
    synthetic_set.save_synthetic(path, make_set())
  assert os.listdir(tmp_path) == []


def test_write_atomic_takes_text_bytes_or_a_writer_and_leaves_no_temp_file(tmp_path):
  path = str(tmp_path / "sub" / "f.txt")  # the folder is created
  files.write_atomic(path, "é\n")
  assert open(path, encoding="utf-8").read() == "é\n"
  files.write_atomic(path, b"\x00\x01")
  assert open(path, "rb").read() == b"\x00\x01"
  files.write_atomic(path, lambda f: f.write(b"abc"))
  assert open(path, "rb").read() == b"abc"
  with pytest.raises(ZeroDivisionError):
    files.write_atomic(path, lambda f: (f.write(b"half"), 1 / 0))
  assert open(path, "rb").read() == b"abc"
  assert os.listdir(tmp_path / "sub") == ["f.txt"]


def test_write_atomic_into_a_file_path_is_a_distill_error(tmp_path):
  (tmp_path / "plain").write_text("x")
  with pytest.raises(DistillError, match="plain/f.txt: cannot write"):
    files.write_atomic(str(tmp_path / "plain" / "f.txt"), "y")
  assert (tmp_path / "plain").read_text() == "x"


def test_overwrite_false_keeps_old_file(tmp_path):
  path = str(tmp_path / "syn.npz")
  old = make_set()
  synthetic_set.save_synthetic(path, old, overwrite=False)
  with pytest.raises(DistillError, match="already exists"):
    synthetic_set.save_synthetic(path, make_set(step=7), overwrite=False)
  assert_same(old, synthetic_set.load_synthetic(path))
  assert os.listdir(tmp_path) == ["syn.npz"]


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _flip_middle(path):
  """Zeroes bytes inside the first member, leaving the zip directory intact."""
  with open(path, "r+b") as f:
    f.seek(500)
    f.write(bytes(20))


def _write_npy(path):
  with open(path, "wb") as f:  # np.save(path) would append ".npy".
    np.save(f, _images)


def _random_bytes(path):
  with open(path, "wb") as f:
    f.write(np.random.default_rng(1).bytes(1000))


_images = make_set().images
_targets = make_set().targets


def _poke(arr, index, value):
  """A copy of `arr` with `value` written at each of `index`."""
  arr = arr.copy()
  for i in index:
    arr.flat[i] = value
  return arr


BAD_FILES = {
    "missing file": (lambda p: os.remove(p), "no such file"),
    "random bytes": (_random_bytes, "is not a valid .npz (truncated or corrupt)"),
    "truncated": (_truncate, "is not a valid .npz (truncated or corrupt)"),
    "empty file": (lambda p: open(p, "wb").close(), "not a zip archive (empty file)"),
    "npy file": (_write_npy, "expected a .npz archive"),
    "corrupt member": (_flip_middle, "key 'images': BadZipFile"),
    "missing key": (lambda p: rewrite(p, targets=None, teacher=None),
                    "missing required keys ['targets', 'teacher']"),
    "images 3-D": (lambda p: rewrite(p, images=_images[0]),
                   "images must be 4-D (n, H, W, C), got shape (8, 8, 3)"),
    "C=2": (lambda p: rewrite(p, images=_images[..., :2]), "got C=2"),
    "n mismatch": (lambda p: rewrite(p, targets=_targets[:4]),
                   "targets must have shape (6, d>0) to match images, got (4, 5)"),
    "int images": (lambda p: rewrite(p, images=_images.astype(np.int32)),
                   "images must be a float array, got dtype int32"),
    "NaN images": (lambda p: rewrite(p, images=_poke(_images, [0, 9, 99], np.nan)),
                   "images has 3 non-finite values (3 NaN, 0 Inf)"),
    "Inf targets": (lambda p: rewrite(p, targets=_poke(_targets, [4], -np.inf)),
                    "targets has 1 non-finite values (0 NaN, 1 Inf)"),
    "bad config": (lambda p: rewrite(p, config=np.array("{'lr': 0.1")),
                   "config is not valid JSON"),
    "config not object": (lambda p: rewrite(p, config=np.array("[1, 2]")),
                          "config must be a JSON object"),
    "mean length": (lambda p: rewrite(p, image_mean=np.zeros(2, np.float32)),
                    "image_mean must have shape (3,) to match C, got (2,)"),
    "future version": (lambda p: rewrite(p, version=np.array("2")), "newer"),
    "unknown version": (lambda p: rewrite(p, version=np.array("beta")),
                        "unknown format version"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_one_line_distill_error(tmp_path, case):
  corrupt, expected = BAD_FILES[case]
  path = str(tmp_path / "syn.npz")
  synthetic_set.save_synthetic(path, make_set())
  corrupt(path)
  with pytest.raises(DistillError) as info:
    synthetic_set.load_synthetic(path)
  message = str(info.value)
  assert expected in message
  assert path in message
  assert "\n" not in message


def test_nan_count_is_reported():
  images = make_set().images.copy()
  images[0, 0, 0, 0] = np.nan
  images[1, 0, 0, 0] = np.nan
  expected = r"images has 2 non-finite values \(2 NaN, 0 Inf\)"
  with pytest.raises(DistillError, match=expected):
    synthetic_set.validate(make_set(images=images))


BAD_SETS = {
    "NaN images": (dict(images=np.full((N, H, W, C), np.nan, np.float32)), "images has"),
    "C=2": (dict(images=np.zeros((N, H, W, 2), np.float32)), "C=2"),
    "int targets": (dict(targets=np.zeros((N, D), np.int32)), "targets must be a float"),
    "labels length": (dict(labels=np.zeros(N + 1, np.int32)), "labels must have shape"),
    "negative labels": (dict(labels=-np.ones(N, np.int32)), "hard labels must lie"),
    "zero std": (dict(image_std=np.zeros(C, np.float32)), "image_std must be positive"),
    "config object": (dict(config={"f": object()}), "config is not JSON-serialisable"),
    "negative step": (dict(step=-1), "step must be a non-negative int"),
    "future version": (dict(version="3"), "newer"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETS))
def test_save_refuses_invalid_set_and_writes_nothing(tmp_path, case):
  overrides, expected = BAD_SETS[case]
  path = str(tmp_path / "out" / "syn.npz")
  with pytest.raises(DistillError, match=expected.replace("(", r"\(")) as info:
    synthetic_set.save_synthetic(path, make_set(**overrides))
  assert path in str(info.value)
  assert not os.path.exists(path)
  assert os.listdir(tmp_path) == []
  with pytest.raises(DistillError, match="synthetic set: "):
    synthetic_set.validate(make_set(**overrides))


def test_image_grid_shape_and_placement():
  images = np.zeros((10, 5, 7, 3), np.float32)
  images[0] = 1.0
  images[5, ..., 0] = 0.5
  grid = synthetic_set.image_grid(images, ncols=4)
  assert grid.shape == (3 * (5 + 1) + 1, 4 * (7 + 1) + 1, 3)
  assert grid.dtype == np.uint8
  assert (grid[1:6, 1:8] == 255).all()  # image 0: white
  assert (grid[7:12, 9:16, 0] == 128).all()  # image 5: row 1, col 1
  assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()  # padding
  assert (grid[25:, 9:] == 255).all()  # the unused last two cells are blank


def test_image_grid_grey_default_columns_and_no_pad():
  grey = np.random.default_rng(0).random((10, 4, 4, 1)).astype(np.float32)
  grid = synthetic_set.image_grid(grey)  # ceil(sqrt(10)) = 4 columns, 3 rows
  assert grid.shape == (3 * 5 + 1, 4 * 5 + 1, 3)
  assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()
  assert synthetic_set.image_grid(grey[:3], ncols=8, pad=0).shape == (4, 12, 3)
  with pytest.raises(DistillError, match="image_grid"):
    synthetic_set.image_grid(grey[..., 0])


def test_save_image_grid_writes_png_of_expected_size(tmp_path):
  s = make_set()
  path = str(tmp_path / "png" / "grid.png")
  written = synthetic_set.save_image_grid(path, s.images, s.image_mean, s.image_std, scale=3)
  assert written == path
  with Image.open(path) as image:
    assert image.format == "PNG" and image.mode == "RGB"
    # 6 images -> 3 columns, 2 rows of 8px with 1px padding, then x3.
    assert image.size == ((3 * 9 + 1) * 3, (2 * 9 + 1) * 3)
  synthetic_set.save_image_grid(path, s.images, s.image_mean, s.image_std, max_images=4, scale=1)
  with Image.open(path) as image:
    assert image.size == (2 * 9 + 1, 2 * 9 + 1)
  assert os.listdir(tmp_path / "png") == ["grid.png"]


def test_inspect_summarises_and_writes_grid(tmp_path):
  path = str(tmp_path / "syn.npz")
  synthetic_set.save_synthetic(path, make_set("soft"))
  text = synthetic_set.inspect(path)
  png = str(tmp_path / "syn_grid.png")
  assert "n=6" in text and "resnet18-barlow" in text and png in text
  assert "labels: soft" in text and "config: 3 keys" in text
  assert os.path.exists(png)
  other = str(tmp_path / "other.png")
  assert other in synthetic_set.inspect(path, png_path=other)
  assert os.path.exists(other)
