"""End to end through the `distill` command, and its handling of bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from distill.cli import main
from distill.data import synthetic_set
from tests.conftest import ROOT, smoke_args



def _error(capsys):
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err, err
  return err


def test_end_to_end_run_writes_every_artefact(smoke_run):
  synthetic = synthetic_set.load_synthetic(str(smoke_run / "synthetic.npz"))
  assert synthetic.images.shape == (12, 16, 16, 3)
  assert synthetic.targets.shape == (12, 4 * 4 * 8)  # ConvNet width 8, depth 2 at 16px
  assert synthetic.method == "krr_st" and synthetic.step == 6
  assert synthetic.config["krr_st"]["num_synthetic"] == 12
  teacher = json.loads((smoke_run / "teacher" / "teacher.json").read_text())
  assert 0.0 <= teacher["info"]["probe"]["accuracy"] <= 1.0
  results = json.loads((smoke_run / "table.json").read_text())
  assert {(r["row"], r["readout"]) for r in results["runs"]} == {
      (row, readout) for row in ("none", "random", "krr_st", "teacher")
      for readout in ("linear_probe", "linear_probe_1pct")}
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["runs"])
  assert "krr_st" in (smoke_run / "table.md").read_text()
  for picture in ("synthetic_grid.png", "krr_st/loss.png", "teacher/loss.png"):
    assert (smoke_run / picture).stat().st_size > 0
  metrics = [json.loads(l) for l in (smoke_run / "krr_st" / "metrics.jsonl").open()]
  assert [m["step"] for m in metrics] == [2, 4, 6]


def test_rerun_skips_finished_stages_and_says_so(smoke_run, blobs_npz, capsys):
  before = (smoke_run / "synthetic.npz").stat().st_mtime_ns
  capsys.readouterr()
  assert main(smoke_args("run", smoke_run, blobs_npz)) == 0
  assert (smoke_run / "synthetic.npz").stat().st_mtime_ns == before
  out = capsys.readouterr().out
  entries = len(json.loads((smoke_run / "table.json").read_text())["runs"])
  for stage in ("[teacher] found", "[krr_st] found", f"[table] {entries} entries measured before"):
    assert stage in out, out[-2000:]


def test_inspect_prints_summary_and_grid(smoke_run, capsys, tmp_path):
  png = tmp_path / "grid.png"
  assert main(["inspect", str(smoke_run / "synthetic.npz"), "--png", str(png)]) == 0
  out = capsys.readouterr().out
  assert "12" in out and png.stat().st_size > 0


def test_other_config_on_same_workdir_is_refused_and_nothing_changes(smoke_run, blobs_npz,
                                                                     capsys):
  before = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()}
  assert main(smoke_args("run", smoke_run, blobs_npz, "--set", "krr_st.steps=7")) == 2
  err = _error(capsys)
  assert "different config" in err and "krr_st.steps" in err
  assert {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file()} == before


def test_synthetic_set_larger_than_source_is_refused(smoke_run, blobs_npz, tmp_path, capsys):
  workdir = tmp_path / "big"
  shutil.copytree(smoke_run / "teacher", workdir / "teacher")
  code = main(smoke_args("krr-st", workdir, blobs_npz, "--set", "krr_st.num_synthetic=500"))
  assert code == 2
  assert "num_synthetic=500 is larger than the source (96 images)" in _error(capsys)
  assert not (workdir / "synthetic.npz").exists()


@pytest.mark.parametrize("override,message", [
    ("krr_st.num_synthetc=5", "unknown config key"),
    ("data.source=/no/such/dir/data.npz", "does not exist"),
])
def test_bad_settings_exit_2_with_one_line(override, message, blobs_npz, tmp_path, capsys):
  args = smoke_args("teacher", tmp_path / "w", blobs_npz)
  assert main(args + ["--set", override]) == 2
  assert message in _error(capsys)


def test_bad_source_data_exit_2(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  nan = np.random.default_rng(0).uniform(size=(20, 8, 8, 3)).astype(np.float32)
  nan[3, 2, 2, 1] = np.nan
  np.savez(tmp_path / "nan.npz", images=nan)
  mixed = tmp_path / "mixed" / "train" / "a"
  mixed.mkdir(parents=True)
  from PIL import Image
  Image.new("RGB", (8, 8)).save(mixed / "0.png")
  Image.new("RGB", (9, 9)).save(mixed / "1.png")
  for source, message in ((empty, "empty"), (tmp_path / "nan.npz", "NaN"),
                          (tmp_path / "mixed", "size")):
    assert main(smoke_args("teacher", tmp_path / f"w_{source.name}", source)) == 2
    assert message.lower() in _error(capsys).lower()


def test_corrupt_artefact_exit_code_in_a_real_process(smoke_run, tmp_path):
  cut = tmp_path / "cut.npz"
  data = (smoke_run / "synthetic.npz").read_bytes()
  cut.write_bytes(data[: len(data) // 2])
  proc = subprocess.run([sys.executable, "-m", "distill.cli", "inspect", str(cut)],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: ") and "cut.npz" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_help_gives_examples_and_what_each_stage_needs(capsys):
  for argv, expected in ((["--help"], "examples:"),
                         (["krr-st", "--help"], "Needs a trained teacher"),
                         (["table", "--help"], "example:")):
    with pytest.raises(SystemExit) as info:
      main(argv)
    assert info.value.code == 0 and expected in capsys.readouterr().out
