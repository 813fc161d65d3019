"""The transfer protocol and the results table, on tiny shapes."""

import concurrent.futures
import json
import shutil
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from distill.cli import main
from distill.config import load_config
from distill.data import synthetic_set
from distill.errors import DistillError
from distill.eval import table, transfer
from distill.nn.models import build_model, init_model
from distill.stages import sets, table as table_stage
from tests.conftest import make_blobs, SMOKE, smoke_args


def _finetune_cfg(epochs):
  return ml_collections.ConfigDict(dict(epochs=epochs, batch_size=32, lr=0.05, momentum=0.9,
                                        weight_decay=5e-4, augment=False, num_train=0))


def _separable_task():
  """(arch, fresh backbone, x_train, y_train, x_test, y_test): 3 blob classes, 16x16."""
  norm = lambda a: (a.astype(np.float32) / 255.0 - 0.4) / 0.3
  (x, y), (xt, yt) = make_blobs(160, seed=5), make_blobs(90, seed=6)
  arch = dict(name="convnet", width=8, depth=2, norm="default")
  return arch, init_model(build_model(arch), jax.random.key(0), (16, 16, 3)), norm(x), y, \
      norm(xt), yt


def test_finetune_raises_accuracy_on_a_separable_task(tmp_path):
  task = _separable_task()
  before = transfer.finetune(_finetune_cfg(0), *task, 0, str(tmp_path), "ft0")
  after = transfer.finetune(_finetune_cfg(15), *task, 0, str(tmp_path), "ft15")
  assert after["accuracy"] > 0.9 > before["accuracy"] + 0.2, (before, after)


def test_infobatch_finetuning_prunes_and_still_learns(tmp_path):
  cfg = _finetune_cfg(15)
  with cfg.unlocked():
    cfg.infobatch = ml_collections.ConfigDict(dict(prune_ratio=0.5, delta=0.8))
  out = transfer.finetune(cfg, *_separable_task(), 0, str(tmp_path), "ib")
  assert out["accuracy"] > 0.9, out
  assert 0 < out["skipped_fraction"] < 0.5 and out["steps"] < 15 * (160 // 32), out
  plans = json.loads((tmp_path / "ib" / "plans.json").read_text())
  assert [p["epoch"] for p in plans] == list(range(15))
  assert plans[0]["pruned"] == 0 and all(p["pruned"] == 0 for p in plans[12:])  # annealing
  assert sum(p["pruned"] for p in plans[1:12]) > 0


def test_new_head_keeps_the_backbone_and_refuses_other_architectures():
  arch = dict(name="convnet", width=8, depth=2, norm="default")
  pretrained = init_model(build_model(arch, num_outputs=5), jax.random.key(1), (16, 16, 3))
  fresh = init_model(build_model(arch, num_outputs=3), jax.random.key(2), (16, 16, 3))
  merged = transfer.with_new_head(pretrained, fresh)
  np.testing.assert_array_equal(merged["params"]["Conv_0"]["kernel"],
                                pretrained["params"]["Conv_0"]["kernel"])
  assert merged["params"]["head"]["kernel"].shape == (128, 3)
  other = init_model(build_model(dict(arch, depth=1)), jax.random.key(3), (16, 16, 3))
  with pytest.raises(DistillError, match="architectures differ"):
    transfer.with_new_head(other, fresh)


# Four read-outs, as a table usually reports (table.READOUTS offers more).
FOUR_READOUTS = ("linear_probe", "linear_probe_5pct", "linear_probe_1pct", "finetune")


def _runs():
  r = np.random.default_rng(0)
  return [dict(row=row, arch="convnet-w8", target=t, readout=ro, n=12, seed=s,
               accuracy=float(r.uniform()), set_seconds=1.5, pretrain_seconds=float(s ** 3),
               readout_seconds=0.25)
          for row in ("none", "krr_st") for t in ("a", "b") for ro in FOUR_READOUTS
          for s in (0, 1, 2)]


def test_table_writer_round_trips_and_summarises():
  runs = _runs()
  assert table.read_csv(table.format_csv({"runs": runs})) == runs
  summary = table.summarize(runs)
  assert len(summary) == 2 * 2 * len(FOUR_READOUTS)
  for s in summary:
    acc = [r["accuracy"] for r in runs if (r["row"], r["target"], r["readout"])
           == (s["row"], s["target"], s["readout"])]
    assert s["mean"] == pytest.approx(np.mean(acc))
    assert s["std"] == pytest.approx(np.std(acc, ddof=1))
    assert s["seeds"] == 3 and s["pretrain_seconds"] == pytest.approx(1.0)  # median of 0, 1, 8


def test_published_tables_name_data_without_this_machines_prefix(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert table.shown_path("cifar10") == "cifar10"                    # a tfds name
  assert table.shown_path("../data/x.tar.gz") == "../data/x.tar.gz"  # relative: as given
  assert table.shown_path(str(tmp_path / "teachers" / "t1")) == "teachers/t1"
  assert table.shown_path("/elsewhere/data/cifar10-jpg.tar.gz/") == "cifar10-jpg.tar.gz"
  # The table file records an imported teacher's folder the same way; a trained one has none.
  imported = table_stage.teacher_record(
      {"probe": {"accuracy": 0.66}, "imported_from": str(tmp_path / "teachers" / "t1")})
  assert imported == {"probe": 0.66, "train_seconds": None, "imported_from": "teachers/t1"}
  assert table_stage.teacher_record({"train_seconds": 9.0})["imported_from"] is None


def test_table_figure_has_a_panel_per_target_and_readout(tmp_path):
  summary = table.summarize(_runs())
  path = table.save_table_figure(str(tmp_path / "t.png"), summary, n=12, rows=tuple(sets.ROWS))
  with Image.open(path) as png:
    width, height = png.size
  assert width > 2 * height   # 2 targets x 4 read-outs: panels in a wide grid
  assert table.save_table_figure(str(tmp_path / "none.png"), summary, n=99,
                                 rows=tuple(sets.ROWS)) is None
  assert not (tmp_path / "none.png").exists()


def test_add_runs_merges_without_duplicates_or_losses(tmp_path):
  path = str(tmp_path / "table.json")
  runs = _runs()
  assert table_stage.add_runs(path, runs[:5])["runs"] == runs[:5]
  merged = table_stage.add_runs(path, runs[3:] + runs[:2])   # overlapping keys are not added twice
  assert merged["runs"] == runs
  # Writers in parallel (one lock per open file, so threads contend like processes).
  extra = [dict(r, seed=100 + i) for i, r in enumerate(runs * 4)]
  chunks = [extra[i::4] for i in range(4)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda chunk: [table_stage.add_runs(path, [r]) for r in chunk], chunks))
  final = json.loads((tmp_path / "table.json").read_text())["runs"]
  assert len(final) == len(runs) + len(extra)
  assert sorted(map(table.run_key, final)) == sorted(map(table.run_key, runs + extra))


@pytest.mark.parametrize("override,message", [
    ("eval.rows=('none', 'nope')", "unknown eval.rows"),
    ("eval.readouts=('probe',)", "eval.readouts"),
    ("eval.archs=('vgg',)", "unknown architecture"),
    ("eval.archs=('resnet10:x',)", "not an integer"),
    ("eval.extra_targets=('a|b',)", "expected 'dataset'"),
    ("eval.seeds=()", "eval.seeds is empty"),
    ("probe.representation='pooled'", "unknown probe.representation"),
])
def test_plan_rejects_bad_settings(override, message):
  with pytest.raises(DistillError, match=message):
    table_stage.plan(load_config(SMOKE, [override]))


def test_plan_rejects_a_multi_formation_factor_below_one_only_where_random_mf_runs():
  with pytest.raises(DistillError, match="eval.multi_formation must be an integer >= 1"):
    table_stage.plan(load_config(SMOKE, ["eval.rows=('none', 'random_mf')",
                                         "eval.multi_formation=0"]))
  assert table_stage.plan(load_config(SMOKE, ["eval.rows=('none',)", "eval.multi_formation=0"]))
  with pytest.raises(DistillError, match="eval.multi_formation_full must be a share in"):
    table_stage.plan(load_config(SMOKE, ["eval.rows=('none', 'random_mf')",
                                         "eval.multi_formation_full=1.5"]))


def test_random_mf_row_with_a_full_resolution_share_builds_a_mixed_set(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
  source = SimpleNamespace(images=images, labels=None, name="blobs")
  teacher = SimpleNamespace(mean=np.zeros(3), std=np.ones(3),
                            features=lambda x: x.reshape(len(x), -1)[:, :5])
  config = load_config(SMOKE, ["eval.multi_formation=2", "eval.multi_formation_full=0.25"])
  s = sets.random_mf_set(config, str(tmp_path), 8, 0, source, teacher)
  # 8 stored images: 2 full-resolution ones, 6 of 4 tiles each.
  assert s.images.shape == (2 + 24, 8, 8, 3) and s.targets.shape == (26, 5)
  assert s.extra["full_resolution_slots"] == 2 and s.extra["training_images"] == 26
  first = np.asarray(s.extra["indices"][:2])
  np.testing.assert_allclose(s.images[:2], images[first] / 255.0, atol=1e-6)
  assert (tmp_path / "sets" / "random_mf2_full0.25_n8_seed0.npz").exists()


ROWS = ("none", "random", "random_mf", "kmeans", "kip", "frepo", "krr_st", "full", "teacher")


def _table_args(workdir, data, other, *extra):
  return smoke_args(
      "table", workdir, data, "--set", f"eval.rows={ROWS}",
      "--set", "eval.readouts=('linear_probe','linear_probe_1pct','finetune')",
      "--set", f"eval.extra_targets=('{other}',)", "--set", "eval.seeds=(0,)",
      "--set", "kip.steps=3", "--set", "kip.depth=1", "--set", "finetune.epochs=1",
      "--set", "eval.full_epochs=1", "--set", f"eval.results_path={workdir / 'out' / 'small'}",
      *extra)


@pytest.fixture(scope="module")
def small_table(smoke_run, blobs_npz, tmp_path_factory):
  """Every row, both read-outs, two targets, on the smoke run's teacher and set."""
  workdir = tmp_path_factory.mktemp("table")
  shutil.copytree(smoke_run / "teacher", workdir / "teacher")
  shutil.copy(smoke_run / "synthetic.npz", workdir / "synthetic.npz")
  x, y = make_blobs(60, size=12, seed=3)
  xt, yt = make_blobs(30, size=12, seed=4)
  other = workdir / "other.npz"
  np.savez(other, x_train=x, y_train=y, x_test=xt, y_test=yt)
  args = lambda *extra: _table_args(workdir, blobs_npz, other, *extra)
  assert main(args()) == 0
  return workdir, args


def test_table_has_every_entry_and_output(small_table):
  workdir, _ = small_table
  runs = json.loads((workdir / "table.json").read_text())["runs"]
  assert {(r["row"], r["target"], r["readout"], r["seed"], r["n"]) for r in runs} == {
      (row, t, ro, 0, 12) for row in ROWS for t in ("blobs", "other")
      for ro in ("linear_probe", "linear_probe_1pct", "finetune")}
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in runs)
  markdown = (workdir / "out" / "small.md").read_text()
  for row in ROWS:
    assert f"| {row} |" in markdown
  assert "### other, finetune" in markdown and "### Cost" in markdown
  assert len(table.read_csv((workdir / "out" / "small.csv").read_text())) == len(runs)
  with Image.open(workdir / "out" / "small.png") as png:   # the table as a dot plot
    assert png.format == "PNG" and png.size[0] > 500 and png.size[1] > 200
  for built in ("kip_n12", "frepo_n12", "kmeans_n12", "random_n12_seed0"):
    assert (workdir / "sets" / f"{built}.npz").exists()
  assert synthetic_set.load_synthetic(str(workdir / "sets" / "frepo_n12.npz")).targets.shape == (12, 3)
  # 12 stored images hold 48 real ones at half resolution, with a target each.
  mf = synthetic_set.load_synthetic(str(workdir / "sets" / "random_mf2_n12_seed0.npz"))
  assert mf.images.shape == (48, 16, 16, 3) and mf.targets.shape[0] == 48
  assert mf.extra["slots"] == 12 and mf.extra["training_images"] == 48
  assert len(set(mf.extra["indices"])) == 48


def test_table_resumes_without_redoing_work_and_accepts_a_new_seed(small_table):
  workdir, args = small_table
  before = json.loads((workdir / "table.json").read_text())["runs"]
  assert main(args()) == 0
  assert json.loads((workdir / "table.json").read_text())["runs"] == before
  # Rows and seeds only select entries; they may change on an existing workdir.
  assert main(args("--set", "eval.rows=('none',)", "--set", "eval.seeds=(0,1)")) == 0
  after = json.loads((workdir / "table.json").read_text())["runs"]
  assert after[:len(before)] == before
  assert {(r["row"], r["seed"]) for r in after[len(before):]} == {("none", 1)}


def test_a_changed_protocol_setting_is_refused(small_table, capsys):
  _, args = small_table
  assert main(args("--set", "finetune.epochs=2")) == 2
  assert "finetune.epochs" in capsys.readouterr().err


def test_a_factor_that_does_not_divide_the_images_is_refused_before_any_row(
    smoke_run, blobs_npz, tmp_path, capsys):
  shutil.copytree(smoke_run / "teacher", tmp_path / "teacher")
  args = smoke_args("table", tmp_path, blobs_npz, "--set", "eval.rows=('none', 'random_mf')",
                    "--set", "eval.multi_formation=3", "--set", "eval.seeds=(0,)")
  assert main(args) == 2
  err = capsys.readouterr().err
  assert "factor 3 does not divide the image size 16x16" in err, err
  assert not (tmp_path / "table.json").exists() and not (tmp_path / "sets").exists()


def test_size_sweep_plan_and_plot(tmp_path):
  config = load_config(SMOKE, ["eval.sizes=(6, 12, 24)", "eval.rows=('none','krr_st')",
                               f"eval.results_path={tmp_path / 'r'}"])
  jobs = table_stage.plan(config)
  assert [(j.n, j.rows, j.readouts) for j in jobs] == [
      (12, ("none", "krr_st"), tuple(config.eval.readouts)),
      (6, ("random", "krr_st"), ("linear_probe",)),
      (24, ("random", "krr_st"), ("linear_probe",))]
  runs = [dict(row=row, arch="convnet-w8", target="t", readout="linear_probe", n=n, seed=s,
               accuracy=0.5 + n / 100, set_seconds=0.0, pretrain_seconds=0.0,
               readout_seconds=0.0)
          for row in ("random", "krr_st") for n in (6, 12, 24) for s in (0, 1)]
  table_stage.write_outputs({"runs": runs}, config, str(tmp_path))
  assert (tmp_path / "r_size_sweep.png").stat().st_size > 0
  assert "| krr_st | 24 | 74.00 ± 0.00 |" in (tmp_path / "r.md").read_text()


def test_published_markdown_keeps_the_text_above_its_marker(tmp_path):
  config = load_config(SMOKE, ["eval.rows=('none','random')", f"eval.results_path={tmp_path / 'r'}"])
  run = dict(row="random", arch="convnet-w8", target="t", readout="linear_probe", n=12, seed=0,
             accuracy=0.5, set_seconds=0.0, pretrain_seconds=0.0, readout_seconds=0.0)
  table_stage.write_outputs({"runs": [run]}, config, str(tmp_path / "w"))
  published = tmp_path / "r.md"
  first = published.read_text()
  assert first.startswith(table_stage.MARKDOWN_MARKER)
  published.write_text("# Hand-written\n\nCommands and a reading.\n\n" + first)
  table_stage.write_outputs({"runs": [dict(run, seed=1, accuracy=0.7)]}, config,
                            str(tmp_path / "w"))
  second = published.read_text()
  assert second.startswith("# Hand-written\n\nCommands and a reading.\n\n"
                           + table_stage.MARKDOWN_MARKER)
  assert second.count(table_stage.MARKDOWN_MARKER) == 1
  assert "| random | 60.00 ± 14.14 (2) |" in second  # both seeds: the table itself was rewritten
  assert (tmp_path / "w" / "table.md").read_text().startswith("Source")
