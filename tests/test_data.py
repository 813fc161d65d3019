"""Tests for distill.data: every source format, the cache, and bad input.

All fixtures are tiny files written into `tmp_path`; nothing needs the
network. The TFDS tests use `tfds.testing.mock_data`.
"""

import concurrent.futures
import gzip
import os
import tarfile
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from PIL import Image

from distill.data import datasets, sources
from distill.errors import DistillError

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _raises(match: str, fn, *args, **kwargs) -> str:
  """Asserts that fn raises a one-line DistillError containing `match`."""
  with pytest.raises(DistillError) as info:
    fn(*args, **kwargs)
  msg = str(info.value)
  assert match in msg, msg
  assert "\n" not in msg, msg
  return msg


def _rng_image(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _save(path, arr: np.ndarray, mode: str | None = None) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
  if mode is not None:
    img = img.convert(mode)
  img.save(path)


def _write_idx(path, arr: np.ndarray) -> None:
  """Writes a uint8 array in IDX format (gzipped when path ends in .gz)."""
  header = bytes([0, 0, 0x08, arr.ndim]) + np.array(
      arr.shape, ">u4").tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def folder(tmp_path):
  """<root>/{train,test}/{cat,dog}/*.png with 8x8 RGB images.

  Returns:
    (root, {split: (N, 8, 8, 3) images in class-then-file order}).
  """
  root = tmp_path / "pets"
  expected = {}
  for split, per_class in (("train", 2), ("test", 1)):
    imgs = []
    for c, cls in enumerate(("cat", "dog")):
      for i in range(per_class):
        img = _rng_image(100 * c + i + (0 if split == "train" else 50),
                         (8, 8, 3))
        _save(str(root / split / cls / f"{i:03d}.png"), img)
        imgs.append(img)
    expected[split] = np.stack(imgs)
  return root, expected


def _tar(folder_root, out_path, top: str | None) -> str:
  mode = "w:gz" if str(out_path).endswith(("gz", "tgz")) else "w"
  with tarfile.open(out_path, mode) as tar:
    for name in sorted(os.listdir(folder_root)):
      tar.add(os.path.join(folder_root, name),
              arcname=name if top is None else f"{top}/{name}")
  return str(out_path)


# ------------------------------------------------------------------- formats


@pytest.mark.parametrize("gz", [True, False])
def test_idx_train_and_test(tmp_path, gz):
  ext = ".gz" if gz else ""
  train = _rng_image(0, (5, 6, 7))
  test = _rng_image(1, (3, 6, 7))
  _write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", train)
  _write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", np.arange(5))
  _write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", test)
  _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", np.arange(3) + 1)
  ds = datasets.load_dataset(str(tmp_path), "train", cache_dir="")
  assert ds.images.shape == (5, 6, 7, 1) and ds.images.dtype == np.uint8
  np.testing.assert_array_equal(ds.images[..., 0], train)
  assert ds.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.labels, np.arange(5))
  ds = datasets.load_dataset(str(tmp_path), "test", cache_dir="")
  np.testing.assert_array_equal(ds.images[..., 0], test)
  np.testing.assert_array_equal(ds.labels, [1, 2, 3])
  _raises("split 'val'", datasets.load_dataset, str(tmp_path), "val")


def test_idx_prefix_equal_to_split_and_bad_files(tmp_path):
  _write_idx(tmp_path / "val-images-idx3-ubyte", _rng_image(0, (2, 4, 4)))
  ds = datasets.load_dataset(str(tmp_path), "val", cache_dir="")
  assert ds.images.shape == (2, 4, 4, 1) and ds.labels is None
  _write_idx(tmp_path / "val-labels-idx1-ubyte", np.arange(3))
  _raises("has 3 entries", datasets.load_dataset, str(tmp_path), "val")
  with open(tmp_path / "val-labels-idx1-ubyte", "r+b") as f:
    f.truncate(10)  # header says 3 labels, the file holds 2
  _raises("val-labels-idx1-ubyte has 10 bytes", datasets.load_dataset,
          str(tmp_path), "val")


def test_folder_split_selection(folder):
  root, expected = folder
  for split in ("train", "test"):
    ds = datasets.load_dataset(str(root), split, cache_dir="")
    assert ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images, expected[split])
    assert ds.class_names == ("cat", "dog")
    per_class = len(expected[split]) // 2
    np.testing.assert_array_equal(ds.labels, [0] * per_class + [1] * per_class)
    assert ds.name == f"pets:{split}"
  _raises("no images for split 'val'", datasets.load_dataset, str(root), "val",
          cache_dir="")


def test_folder_without_split_dirs_grey_and_palette(tmp_path):
  grey = _rng_image(0, (5, 4, 1))
  _save(str(tmp_path / "a" / "x.png"), grey)
  _save(str(tmp_path / "b" / "y.bmp"), grey)
  ds = datasets.load_dataset(str(tmp_path), "anything", cache_dir="")
  assert ds.images.shape == (2, 5, 4, 1)
  np.testing.assert_array_equal(ds.images[0], grey)
  # Palette and RGBA images both decode to RGB and so can share a dataset.
  rgb = _rng_image(1, (6, 6, 3))
  _save(str(tmp_path / "c" / "a" / "p.png"), rgb, mode="P")
  _save(str(tmp_path / "c" / "b" / "q.png"), rgb, mode="RGBA")
  _save(str(tmp_path / "c" / "b" / "r.jpg"), rgb)
  ds = datasets.load_dataset(str(tmp_path / "c"), "train", cache_dir="")
  assert ds.images.shape == (3, 6, 6, 3)
  np.testing.assert_array_equal(ds.images[1], rgb)  # RGBA keeps RGB exactly
  np.testing.assert_array_equal(ds.labels, [0, 1, 1])


@pytest.mark.parametrize("name,top", [("pets.tar.gz", "pets"),
                                      ("pets.tar", None)])
def test_archive_matches_folder(folder, tmp_path, name, top):
  root, expected = folder
  archive = _tar(root, tmp_path / name, top)
  for split in ("train", "test"):
    ds = datasets.load_dataset(archive, split, cache_dir="")
    np.testing.assert_array_equal(ds.images, expected[split])
    assert ds.class_names == ("cat", "dog")
    assert ds.name == f"{name}:{split}"
  _raises("no images for split 'val'", datasets.load_dataset, archive, "val",
          cache_dir="")


def test_archive_flat_layout(folder, tmp_path):
  root, expected = folder
  archive = _tar(root / "train", tmp_path / "flat.tgz", top="inner")
  ds = datasets.load_dataset(archive, "train", cache_dir="")
  np.testing.assert_array_equal(ds.images, expected["train"])
  np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])


def test_worker_pool_gives_the_same_result(folder, tmp_path, monkeypatch):
  root, expected = folder
  archive = _tar(root, tmp_path / "pets.tar.gz", "pets")
  monkeypatch.setattr(sources, "_CHUNK_SIZE", 1)
  monkeypatch.setattr(sources, "_num_workers", lambda: 2)
  for source in (str(root), archive):
    ds = datasets.load_dataset(source, "train", cache_dir="")
    np.testing.assert_array_equal(ds.images, expected["train"])
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])


def test_broken_worker_pool_falls_back(folder, tmp_path, monkeypatch):
  root, expected = folder
  archive = _tar(root, tmp_path / "pets.tar.gz", "pets")

  class BrokenPool:

    def __init__(self, *args, **kwargs):
      self.calls = 0

    def submit(self, fn, chunk):
      self.calls += 1
      if self.calls == 2:  # one chunk in flight, the rest not yet read
        raise BrokenProcessPool("worker died")
      future = concurrent.futures.Future()
      future.set_exception(
          BrokenProcessPool("worker died"))
      return future

    def shutdown(self, **kwargs):
      pass

  monkeypatch.setattr(sources, "_CHUNK_SIZE", 1)
  monkeypatch.setattr(sources, "_num_workers", lambda: 2)
  monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", BrokenPool)
  for source in (str(root), archive):
    ds = datasets.load_dataset(source, "train", cache_dir="")
    np.testing.assert_array_equal(ds.images, expected["train"])


def test_npz_formats(tmp_path):
  imgs = _rng_image(0, (4, 5, 5, 3))
  np.savez(tmp_path / "a.npz", images=imgs, labels=np.array([3, 1, 2, 0]))
  ds = datasets.load_dataset(str(tmp_path / "a.npz"), cache_dir="")
  np.testing.assert_array_equal(ds.images, imgs)
  assert ds.labels.dtype == np.int32 and ds.labels.tolist() == [3, 1, 2, 0]
  # Keras layout: x_<split> / y_<split>, grey (N, H, W), labels (N, 1).
  np.savez(tmp_path / "k.npz",
           x_train=imgs[:3, ..., 0], y_train=np.ones((3, 1), np.uint8),
           x_test=imgs[3:, ..., 0], y_test=np.zeros((1, 1), int))
  ds = datasets.load_dataset(str(tmp_path / "k.npz"), "test", cache_dir="")
  assert ds.images.shape == (1, 5, 5, 1) and ds.labels.tolist() == [0]
  ds = datasets.load_dataset(str(tmp_path / "k.npz"), "train", cache_dir="")
  assert ds.images.shape == (3, 5, 5, 1) and ds.labels.tolist() == [1, 1, 1]
  # Floats in [0, 1] are rounded to the nearest uint8 level; no labels.
  floats = np.array([0.0, 1.0, 0.5, 0.2 / 255, 0.7 / 255, 254.6 / 255])
  np.savez(tmp_path / "f.npz", images=floats.reshape(1, 2, 3).astype("f4"))
  ds = datasets.load_dataset(str(tmp_path / "f.npz"), cache_dir="")
  assert ds.labels is None
  assert ds.images.ravel().tolist() == [0, 255, 128, 0, 1, 255]


def test_real_fashion_mnist_test_split():
  if not os.path.exists(os.path.join(FASHION_MNIST,
                                     "t10k-images-idx3-ubyte.gz")):
    pytest.skip("Fashion-MNIST is not installed here")
  ds = datasets.load_dataset(FASHION_MNIST, "test", cache_dir="")
  assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (10000,)
  assert np.bincount(ds.labels).tolist() == [1000] * 10


# --------------------------------------------------------------------- cache


def test_cache_hit_rebuild_and_invalidation(folder, tmp_path, monkeypatch):
  root, expected = folder
  cache = tmp_path / "cache"
  first = datasets.load_dataset(str(root), "train", cache_dir=str(cache))
  files = [f for f in os.listdir(cache) if f.endswith(".npz")]
  assert len(files) == 1 and not [f for f in os.listdir(cache)
                                  if f.startswith(".tmp")]

  def broken(*args, **kwargs):
    raise AssertionError("decoded although the cache holds the dataset")

  with monkeypatch.context() as m:
    m.setattr(sources, "_decode_image", broken)
    again = datasets.load_dataset(str(root), "train", cache_dir=str(cache))
  np.testing.assert_array_equal(again.images, expected["train"])
  np.testing.assert_array_equal(again.labels, first.labels)
  assert again.class_names == first.class_names and again.name == first.name

  # A damaged cache file is ignored and rewritten.
  with open(cache / files[0], "wb") as f:
    f.write(b"not a zip file at all")
  rebuilt = datasets.load_dataset(str(root), "train", cache_dir=str(cache))
  np.testing.assert_array_equal(rebuilt.images, expected["train"])
  with monkeypatch.context() as m:
    m.setattr(sources, "_decode_image", broken)
    datasets.load_dataset(str(root), "train", cache_dir=str(cache))

  # A new image changes the key: the cache must not hide it.
  _save(str(root / "train" / "dog" / "new.png"), _rng_image(9, (8, 8, 3)))
  grown = datasets.load_dataset(str(root), "train", cache_dir=str(cache))
  assert len(grown) == 5


def test_cache_env_var_and_disabled(folder, tmp_path, monkeypatch):
  root, _ = folder
  archive = _tar(root, tmp_path / "pets.tar.gz", "pets")
  monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "env_cache"))
  datasets.load_dataset(archive, "test")
  assert len(os.listdir(tmp_path / "env_cache")) == 1
  datasets.load_dataset(archive, "test", cache_dir="")
  datasets.load_dataset(archive, "train", cache_dir="")
  assert len(os.listdir(tmp_path / "env_cache")) == 1


# ---------------------------------------------------------- array functions


def test_channel_stats_normalize_denormalize():
  images = _rng_image(0, (7, 5, 3, 3))
  mean, std = datasets.channel_stats(images)
  x = images.astype(np.float64) / 255
  assert mean.dtype == np.float32 and mean.shape == (3,)
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-6)
  z = datasets.normalize(images, mean, std)
  assert z.dtype == np.float32 and z.shape == images.shape
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, atol=1e-5)
  back = datasets.denormalize(z, mean, std)
  np.testing.assert_allclose(back * 255, images, atol=1e-3)
  assert datasets.denormalize(z + 100, mean, std).max() == 1.0
  _raises("std must be positive", datasets.normalize, images, mean, [1, 0, 1])
  _raises("got shape (2,)", datasets.normalize, images, mean, [1, 1])


def test_subsample():
  ds = datasets.ArrayDataset(images=_rng_image(0, (10, 2, 2, 1)),
                             labels=np.arange(10, dtype=np.int32), name="toy")
  a = datasets.subsample(ds, 4, seed=1)
  b = datasets.subsample(ds, 4, seed=1)
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(a.images, ds.images[a.labels])
  assert len(set(a.labels.tolist())) == 4
  assert any(not np.array_equal(datasets.subsample(ds, 4, seed=s).labels, a.labels)
             for s in range(2, 6))
  assert datasets.subsample(ds, 0, seed=0) is ds
  _raises("asked for 11 images but the dataset 'toy' has 10",
          datasets.subsample, ds, 11, seed=0)


def test_match_format():
  grey = _rng_image(0, (3, 8, 8, 1))
  rgb = datasets.match_format(grey, 8, 3)
  assert rgb.shape == (3, 8, 8, 3) and rgb.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], grey[..., 0])
  big = datasets.match_format(grey, 16, 3)
  assert big.shape == (3, 16, 16, 3)
  flat = np.full((1, 4, 4, 1), 77, np.uint8)
  np.testing.assert_array_equal(datasets.match_format(flat, 7, 1), 77)
  colour = _rng_image(1, (2, 6, 6, 3))
  want = np.stack([np.asarray(Image.fromarray(c).convert("L")) for c in colour])
  got = datasets.match_format(colour, 6, 1)
  assert got.shape == (2, 6, 6, 1)
  assert np.abs(got[..., 0].astype(int) - want).max() <= 1
  assert datasets.match_format(colour, 6, 3) is colour
  _raises("channels must be 1 or 3", datasets.match_format, colour, 6, 2)


# ----------------------------------------------------------------- bad input


def test_missing_paths_and_unsupported_files(tmp_path):
  for source in (str(tmp_path / "nope"), "missing.npz", "data/x.tar.gz"):
    _raises("dataset path does not exist", datasets.load_dataset, source)
  (tmp_path / "notes.txt").write_text("hello")
  _raises("unsupported dataset file", datasets.load_dataset,
          str(tmp_path / "notes.txt"))


def test_empty_folder(tmp_path):
  (tmp_path / "train" / "cat").mkdir(parents=True)
  (tmp_path / "train" / "cat" / "readme.txt").write_text("no images")
  msg = _raises("no images for split 'train'", datasets.load_dataset,
                str(tmp_path), "train", cache_dir="")
  assert str(tmp_path) in msg and "subfolders cat without such files" in msg
  bare = tmp_path / "bare"
  bare.mkdir()
  _raises("the folder is empty", datasets.load_dataset, str(bare), "train", cache_dir="")
  (bare / "a.txt").write_text("")
  _raises("found no subfolders, only a.txt", datasets.load_dataset, str(bare), "train",
          cache_dir="")


def test_mixed_sizes_and_channels(tmp_path):
  _save(str(tmp_path / "s" / "a" / "big.png"), _rng_image(0, (8, 8, 3)))
  _save(str(tmp_path / "s" / "b" / "small.png"), _rng_image(1, (6, 5, 3)))
  msg = _raises("small.png is 5x6 RGB", datasets.load_dataset,
                str(tmp_path / "s"), cache_dir="")
  assert "big.png is 8x8 RGB" in msg
  _save(str(tmp_path / "c" / "a" / "colour.png"), _rng_image(0, (8, 8, 3)))
  _save(str(tmp_path / "c" / "b" / "grey.png"), _rng_image(1, (8, 8, 1)))
  msg = _raises("grey.png is 8x8 L (1 channels)", datasets.load_dataset,
                str(tmp_path / "c"), cache_dir="")
  assert "colour.png is 8x8 RGB (3 channels)" in msg


def test_corrupt_image_and_archive(folder, tmp_path):
  root, _ = folder
  (root / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG broken")
  _raises("bad.png", datasets.load_dataset, str(root), "train", cache_dir="")
  archive = _tar(root, tmp_path / "pets.tar.gz", None)
  raw = open(archive, "rb").read()
  with open(archive, "wb") as f:
    f.write(raw[:len(raw) // 2])
  _raises(f"cannot read archive {archive}", datasets.load_dataset, archive,
          "test", cache_dir="")


def test_bad_npz_files(tmp_path):
  path = str(tmp_path / "x.npz")
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(1000))
  _raises(f"cannot read npz file {path}", datasets.load_dataset, path)
  np.savez(path, images=_rng_image(0, (50, 8, 8, 3)),
           labels=np.arange(50))
  raw = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // 2])
  _raises(f"cannot read npz file {path}", datasets.load_dataset, path)
  np.savez(path, pictures=_rng_image(0, (2, 8, 8, 3)))
  _raises("has no 'images' or 'x_train' array (keys: pictures)",
          datasets.load_dataset, path)
  np.savez(path, images=_rng_image(0, (2, 8)))
  _raises("got shape (2, 8)", datasets.load_dataset, path)
  np.savez(path, images=_rng_image(0, (2, 8, 8, 4)))
  _raises("got shape (2, 8, 8, 4)", datasets.load_dataset, path)
  np.savez(path, images=_rng_image(0, (2, 8, 8, 3)), labels=np.arange(3))
  _raises("2 images but 3 labels", datasets.load_dataset, path)
  for bad in (np.nan, np.inf, -np.inf):
    floats = np.zeros((2, 4, 4, 3), np.float32)
    floats[1, 2, 3, 0] = bad
    np.savez(path, images=floats)
    _raises("contains NaN or Inf", datasets.load_dataset, path)
  np.savez(path, images=np.full((1, 2, 2, 1), 2.0))
  _raises("must lie in [0, 1], got [2, 2]", datasets.load_dataset, path)


# ---------------------------------------------------------------------- TFDS


def test_tfds_mock_and_unknown_name(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # The pip package ships no dataset metadata, so the mock builds examples
  # from the dataset's code; its split sizes are then unknown.
  with tfds.testing.mock_data(num_examples=8,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    for source in ("mnist", "tfds:mnist"):
      ds = datasets.load_dataset(source, "train", cache_dir="")
      assert ds.images.shape == (8, 28, 28, 1) and ds.images.dtype == np.uint8
      assert ds.labels.shape == (8,) and ds.labels.dtype == np.int32
      assert ds.class_names == tuple(str(i) for i in range(10))
      assert ds.name == "mnist:train"
  assert not tf.config.get_visible_devices("GPU")
  _raises("cannot load TFDS dataset 'no_such_dataset_xyz' split 'train': "
          "DatasetNotFoundError", datasets.load_dataset, "no_such_dataset_xyz",
          data_dir=str(tmp_path))


def test_target_stats_is_the_closed_form_whatever_the_chunking():
  r = np.random.default_rng(0)
  targets = (5.0 + r.normal(size=(101, 7)) * np.arange(1, 8)).astype(np.float16)
  exact = targets.astype(np.float64)
  centre, scale = datasets.target_stats(targets, chunk=10)
  np.testing.assert_allclose(centre, exact.mean(0), rtol=1e-6)
  assert scale == pytest.approx(np.sqrt(np.mean((exact - exact.mean(0)) ** 2)), rel=1e-6)
  assert datasets.target_stats(targets, chunk=1000)[1] == pytest.approx(scale, rel=1e-12)
  with pytest.raises(DistillError, match=r"needs \(n, d\) targets"):
    datasets.target_stats(np.zeros((0, 3)))
