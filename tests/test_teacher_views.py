"""The teacher-view cache: exact agreement with running the teacher, resumption, use."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.config import base_config, load_config
from distill.data import augment, synthetic_set
from distill.methods import barlow_twins, teacher_views
from distill.methods import experts as experts_lib
from distill.methods.krr_st import KRRST
from distill.nn.models import build_model, init_model
from distill.stages import teacher_views as cache_stage
from distill.errors import DistillError
from distill.stages.krr_st import evaluate_held_out
from distill.stages.param_match import run_experts
from tests.conftest import SMOKE, smoke_args

SHAPE = (8, 8, 3)
MEAN, STD = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)


@pytest.fixture(scope="module")
def teacher():
  model = build_model(dict(name="convnet", width=4, depth=2))
  variables = init_model(model, jax.random.key(3), SHAPE)
  return barlow_twins.Teacher(model, variables, MEAN, STD, SHAPE, dim=16, info={},
                              representation="features")


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, size=(37, *SHAPE)).astype(np.uint8)


def test_view_table_starts_with_the_identity_and_covers_crops_and_flips():
  table = teacher_views.view_table(0, 500, 4)
  assert table.shape == (500, 4, 3) and table.dtype == np.uint8
  np.testing.assert_array_equal(table[:, 0], np.tile([4, 4, 0], (500, 1)))
  rest = table[:, 1:].reshape(-1, 3)
  assert rest[:, :2].min() == 0 and rest[:, :2].max() == 8  # every offset of pad 4
  assert 0.4 < rest[:, 2].mean() < 0.6
  np.testing.assert_array_equal(table, teacher_views.view_table(0, 500, 4))  # seeded
  assert not np.array_equal(table, teacher_views.view_table(1, 500, 4))


def test_identity_view_is_the_image_and_views_match_random_crop_flip():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, *SHAPE)), jnp.float32)
  identity = jnp.tile(jnp.asarray([[4, 4, 0]], jnp.uint8), (5, 1))
  np.testing.assert_array_equal(teacher_views.apply_views(x, identity), x)
  # random_crop_flip is crop_flip of its own draws: the same function.
  key = jax.random.key(5)
  k_crop, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_crop, (5, 2), 0, 9)
  flip = jax.random.bernoulli(k_flip, 0.5, (5, 1, 1, 1)).reshape(5)
  views = jnp.concatenate([offsets, flip[:, None].astype(jnp.int32)], 1).astype(jnp.uint8)
  np.testing.assert_array_equal(teacher_views.apply_views(x, views),
                                augment.random_crop_flip(key, x))


def test_cache_agrees_exactly_with_the_teacher_on_the_same_views(teacher, images, tmp_path):
  cache_stage.build(str(tmp_path / "f32"), images, teacher, 3, seed=0, dtype="float32",
                    chunk=10)
  table = np.load(tmp_path / "f32" / "views.npy")
  targets = np.load(tmp_path / "f32" / "targets.npy")
  assert targets.shape == (37, 3, 16) and targets.dtype == np.float32
  represent = teacher_views.represent_views_fn(teacher.model, "features")
  for v in range(3):
    for lo in range(0, 37, 10):
      # Same images, same views, same batch: bit for bit.
      direct = represent(teacher.variables, images[lo:lo + 10], table[lo:lo + 10, v], MEAN, STD)
      np.testing.assert_array_equal(targets[lo:lo + 10, v], np.asarray(direct))
    # The teacher itself on the views, made by hand from the table.
    x = augment.crop_flip(augment.normalize_batch(images, MEAN, STD),
                          jnp.asarray(table[:, v, :2], jnp.int32), jnp.asarray(table[:, v, 2] > 0))
    np.testing.assert_allclose(targets[:, v], teacher.features(np.asarray(x)), atol=1e-5)
  # float16 storage holds the float32 values rounded once.
  cache_stage.build(str(tmp_path / "f16"), images, teacher, 3, seed=0, chunk=10)
  np.testing.assert_array_equal(np.load(tmp_path / "f16" / "targets.npy"),
                                targets.astype(np.float16))
  card = json.load(open(tmp_path / "f16" / "card.json"))
  assert card["bytes"] == 37 * 3 * 16 * 2 and card["seconds"] > 0


def test_a_killed_build_resumes_where_it_stopped(teacher, images, tmp_path, monkeypatch):
  calls = {"n": 0}
  real = teacher_views.represent_views_fn(teacher.model, "features")

  def dying(*args):
    calls["n"] += 1
    if calls["n"] > 4:  # dies in the third chunk (2 views per chunk)
      raise KeyboardInterrupt
    return real(*args)

  monkeypatch.setattr(teacher_views, "represent_views_fn", lambda *a: dying)
  with pytest.raises(KeyboardInterrupt):
    cache_stage.build(str(tmp_path / "c"), images, teacher, 2, seed=0, chunk=10)
  progress = json.load(open(tmp_path / "c" / "progress.json"))
  assert progress["done"] == 2 and not (tmp_path / "c" / "card.json").exists()
  monkeypatch.setattr(teacher_views, "represent_views_fn", lambda *a: real)
  cache_stage.build(str(tmp_path / "c"), images, teacher, 2, seed=0, chunk=10)
  cache_stage.build(str(tmp_path / "whole"), images, teacher, 2, seed=0, chunk=10)
  np.testing.assert_array_equal(np.load(tmp_path / "c" / "targets.npy"),
                                np.load(tmp_path / "whole" / "targets.npy"))
  assert not (tmp_path / "c" / "progress.json").exists()


def test_krr_st_step_on_a_cache_batch_equals_the_step_running_the_teacher(teacher, images):
  cfg = base_config().krr_st
  with cfg.unlocked():
    cfg.update(dict(num_synthetic=6, steps=3, reg=1e-3, reg_scaling="trace_over_n",
                    augment_real=False))
    cfg.pool.update(dict(size=2, max_age=5))
    cfg.pool.arch.update(dict(width=8, depth=2, widths=(), norm="instance"))
  method = KRRST(cfg, SHAPE, 16, teacher.model, MEAN, STD)
  x0 = np.asarray(augment.normalize_batch(images[:6], MEAN, STD))
  state = method.init(jax.random.key(0), x0, teacher.features(x0))
  copy = jax.tree.map(jnp.array, state)
  batch = images[6:22]
  identity = np.tile(np.array([[4, 4, 0]], np.uint8), (16, 1))
  targets = teacher_views.represent_views_fn(teacher.model, "features")(
      teacher.variables, batch, identity, MEAN, STD)
  cached = {"images": batch, "views": identity, "targets": np.asarray(targets)}
  key = jax.random.key(1)
  a, ma = method.step(state, batch, key, teacher.variables)
  b, mb = method.step(copy, cached, key, None)  # no teacher at all
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
  np.testing.assert_allclose(a["synthetic"]["images"], b["synthetic"]["images"], atol=1e-6)


def test_krr_st_and_mse_experts_use_the_cache_through_the_cli(blobs_npz, tmp_path, capsys):
  from distill.cli import main
  assert main(smoke_args("teacher", tmp_path, blobs_npz, "--set", "teacher.views=2")) == 0
  assert main(smoke_args("krr-st", tmp_path, blobs_npz, "--set", "teacher.views=2")) == 0
  directory = tmp_path / "teacher_views_v2"
  card = json.load(open(directory / "card.json"))
  assert card["num_views"] == 2 and card["dtype"] == "float16"
  assert np.load(directory / "targets.npy", mmap_mode="r").shape[:2] == (card["num_images"], 2)
  assert "[teacher_views]" in capsys.readouterr().out
  synthetic = synthetic_set.load_synthetic(str(tmp_path / "synthetic.npz"))
  assert np.isfinite(synthetic.images).all()
  # KRR-ST's own held-out objective is recorded with the set, and recomputed
  # from the artefacts it is the same.
  held_out = synthetic.extra["held_out"]
  assert all(np.isfinite(held_out[k]) and held_out[k] > 0 for k in
             ("learned", "initial", "learned_views", "initial_views"))
  config = load_config(SMOKE, ["teacher.views=2", f"data.source={blobs_npz}",
                               f"data.target={blobs_npz}"])
  again = evaluate_held_out(config, str(tmp_path))
  assert again["learned"] == pytest.approx(held_out["learned"], rel=1e-5)
  # The experts find the cache built and do not rebuild it.
  mtime = os.path.getmtime(directory / "targets.npy")
  # Raw targets here (the standardised default has its own test below).
  experts = smoke_args("experts", tmp_path, blobs_npz, "--set", "teacher.views=2",
                       "--set", "experts.objective=mse", "--set", "experts.num_experts=1",
                       "--set", "experts.epochs=2", "--set", "experts.standardize_targets=False")
  assert main(experts) == 0
  assert os.path.getmtime(directory / "targets.npy") == mtime
  assert "[teacher_views]" not in capsys.readouterr().out
  # MKDT's high-loss start: the n source images the first expert, after its
  # last epoch, fits worst against the teacher's view of the image itself.
  match = smoke_args("param-match", tmp_path, blobs_npz, *experts[-10:],
                     "--set", "param_match.method=mtt", "--set", "param_match.init=high_loss",
                     "--set", "param_match.num_synthetic=8", "--set", "param_match.syn_batch=8",
                     "--set", "param_match.syn_steps=2", "--set", "param_match.steps=2",
                     "--set", "param_match.max_start=1", "--set", "param_match.expert_epochs=1")
  assert main(match) == 0
  synthetic = synthetic_set.load_synthetic(str(tmp_path / "synthetic_mtt.npz"))
  buffer = experts_lib.load_buffer(str(tmp_path / "experts_mse"))
  meta, final = buffer.meta, buffer.checkpoint(0, 2)
  source = np.load(blobs_npz)["x_train"]
  x = (source.astype(np.float32) / 255 - np.asarray(meta["mean"])) / np.asarray(meta["std"])
  outputs = experts_lib.expert_model(meta["arch"], meta["num_outputs"]).apply(
      {"params": final}, jnp.asarray(x, jnp.float32))[1]
  view0 = np.load(directory / "targets.npy")[:, 0].astype(np.float32)
  by_hand = np.mean((np.asarray(outputs, np.float64) - view0) ** 2, axis=1)
  worst = sorted(np.argsort(-by_hand)[:8].tolist())
  assert synthetic.extra["init"] == "high_loss" and synthetic.extra["init_indices"] == worst
  scores = synthetic.extra["init_scores"]
  assert scores["chosen_mean"] == pytest.approx(by_hand[worst].mean(), rel=1e-4)
  assert scores["chosen_min"] >= np.sort(by_hand)[-8] * (1 - 1e-4) > 0
  assert scores["source_mean"] == pytest.approx(by_hand.mean(), rel=1e-4)
  # Teacher targets (a variant of the parameter-matching section: its own
  # workdir, sharing the teacher, its cache and the buffer): the set is
  # exported with the teacher's view of its own moved images.
  variant = tmp_path / "teacher_targets"
  variant.mkdir()
  for name in ("teacher", "teacher_views_v2", "experts_mse"):
    os.symlink(tmp_path / name, variant / name)
  teacher_match = [*smoke_args("param-match", variant, blobs_npz), *match[9:],
                   "--set", "param_match.teacher_targets=True",
                   "--set", "param_match.lr_targets=0.0"]
  assert main(teacher_match) == 0
  synthetic = synthetic_set.load_synthetic(str(variant / "synthetic_mtt.npz"))
  teacher = barlow_twins.load_teacher(str(tmp_path / "teacher"), config.teacher.representation)
  start = (source[synthetic.extra["init_indices"]].astype(np.float32) / 255
           - np.asarray(meta["mean"])) / np.asarray(meta["std"])
  assert synthetic.extra["targets"] == "teacher" and synthetic.extra["init_indices"] == worst
  assert synthetic.extra["image_shift"]["rms"] > 0
  np.testing.assert_allclose(synthetic.targets, teacher.features(synthetic.images),
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(synthetic.targets, teacher.features(start.astype(np.float32)),
                         rtol=1e-4, atol=1e-5)


def test_expert_step_standardises_the_cached_targets_it_regresses(images):
  """(centre, scale) in the step is the same as regressing pre-mapped targets."""
  model = experts_lib.expert_model(dict(name="convnet", width=4, depth=2, norm="instance"), 16)
  step, optimizer = experts_lib.make_expert_step(model, "mse", 0.5, 0.0, False)
  state = experts_lib.init_expert_state(model, optimizer, jax.random.key(0), SHAPE, 1)
  r = np.random.default_rng(1)
  raw = (3.0 + 0.2 * r.normal(size=(8, 1, 16))).astype(np.float32)
  centre, scale = (3.0 + 0.05 * r.normal(size=16)).astype(np.float32), np.float32(0.2)
  identity = np.tile(np.array([[4, 4, 0]], np.uint8), (8, 1))
  batch = lambda t: (images[:8], {"views": identity, "targets": t[:, 0]}, np.int32(0))
  stats = lambda c, s: (jnp.asarray(MEAN), jnp.asarray(STD), jnp.asarray(c), jnp.asarray(s))
  copy = jax.tree.map(jnp.array, state)
  key = jax.random.key(2)
  a, ma = step(state, batch(raw), key, stats(centre, scale), None)
  b, mb = step(copy, batch((raw - centre) / scale), key, stats(np.zeros(16), 1.0), None)
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6),
               a["params"], b["params"])
  # Raw targets far from zero give a different, larger loss: the map is applied.
  c, mc = step(jax.tree.map(jnp.array, b), batch(raw), key, stats(np.zeros(16), 1.0), None)
  assert float(mc["loss"]) > 5 * float(mb["loss"])


def test_standardised_kd_experts_through_the_cli(blobs_npz, tmp_path):
  """The buffer stores its map, matching regresses in the experts' space, the set is
  exported in the teacher's, and a buffer of the other kind is refused."""
  from distill.cli import main
  views = ("--set", "teacher.views=2")
  assert main(smoke_args("teacher", tmp_path, blobs_npz, *views)) == 0
  experts = smoke_args("experts", tmp_path, blobs_npz, *views,
                       "--set", "experts.objective=mse", "--set", "experts.num_experts=1",
                       "--set", "experts.epochs=2", "--set", "experts.standardize_targets=True")
  assert main(experts) == 0
  buffer = experts_lib.load_buffer(str(tmp_path / "experts_mse"))
  meta = buffer.meta
  view0 = np.load(tmp_path / "teacher_views_v2" / "targets.npy")[:, 0].astype(np.float64)
  centre = view0.mean(0)
  scale = np.sqrt(np.mean((view0 - centre) ** 2))
  np.testing.assert_allclose(meta["target_centre"], centre, rtol=1e-5, atol=1e-6)
  assert meta["target_scale"] == pytest.approx(scale, rel=1e-5)
  mapped = experts_lib.to_expert_space(meta, view0.astype(np.float32))
  np.testing.assert_allclose(mapped.mean(0), 0.0, atol=1e-4)
  assert np.sqrt(np.mean(mapped ** 2)) == pytest.approx(1.0, rel=1e-4)
  np.testing.assert_allclose(experts_lib.from_expert_space(meta, mapped), view0, rtol=1e-4,
                             atol=1e-5)
  # MKDT's high-loss start scores the expert against the standardised targets.
  match = smoke_args("param-match", tmp_path, blobs_npz, *experts[-10:],
                     "--set", "param_match.method=mtt", "--set", "param_match.init=high_loss",
                     "--set", "param_match.lr_targets=0.0",
                     "--set", "param_match.num_synthetic=8", "--set", "param_match.syn_batch=8",
                     "--set", "param_match.syn_steps=2", "--set", "param_match.steps=2",
                     "--set", "param_match.max_start=1", "--set", "param_match.expert_epochs=1")
  assert main(match) == 0
  synthetic = synthetic_set.load_synthetic(str(tmp_path / "synthetic_mtt.npz"))
  source = np.load(blobs_npz)["x_train"]
  x = (source.astype(np.float32) / 255 - np.asarray(meta["mean"])) / np.asarray(meta["std"])
  outputs = experts_lib.expert_model(meta["arch"], meta["num_outputs"]).apply(
      {"params": buffer.checkpoint(0, 2)}, jnp.asarray(x, jnp.float32))[1]
  by_hand = np.mean((np.asarray(outputs, np.float64) - mapped) ** 2, axis=1)
  worst = sorted(np.argsort(-by_hand)[:8].tolist())
  assert synthetic.extra["init_indices"] == worst
  assert synthetic.extra["init_scores"]["chosen_mean"] == pytest.approx(by_hand[worst].mean(),
                                                                        rel=1e-4)
  # Fixed targets come back in the teacher's space: its view of the start images.
  config = load_config(SMOKE, ["teacher.views=2", f"data.source={blobs_npz}",
                               f"data.target={blobs_npz}"])
  teacher = barlow_twins.load_teacher(str(tmp_path / "teacher"), config.teacher.representation)
  np.testing.assert_allclose(synthetic.targets, teacher.features(x[worst]), rtol=1e-4,
                             atol=1e-4 * float(np.abs(view0).max()))
  # A raw-target config on this standardised buffer is refused by the stage
  # (the CLI's workdir check refuses it before that), naming the setting.
  raw = load_config(SMOKE, ["teacher.views=2", f"data.source={blobs_npz}",
                            f"data.target={blobs_npz}", "experts.objective='mse'",
                            "experts.num_experts=1", "experts.epochs=2",
                            "experts.standardize_targets=False"])
  with pytest.raises(DistillError, match="regressed standardised teacher representations.*"
                                         "standardize_targets=False"):
    run_experts(raw, str(tmp_path))
