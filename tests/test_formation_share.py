"""experiments/formation_share.py: one student per full-resolution share, chosen by held-out error."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import formation_share  # noqa: E402

NONE = dict(kind="none", readouts=dict(linear_probe_5pct=0.45, linear_probe=0.54))


def _student(name, steps, error, probe5, n=1000, images=None, **extra):
  return dict(kind="student", set=name, n=n, lr=0.1, steps=steps, training_images=images or n,
              held_out_rel_error=error, train_rel_error=0.2,
              readouts=dict(linear_probe_5pct=probe5, linear_probe=0.6), **extra)


def _write(path, points):
  with open(path, "w") as f:
    for p in points:
      f.write(json.dumps(p) + "\n")
  return str(path)


@pytest.mark.parametrize("name,k", [("random", 1000), ("random_mf2", 0),
                                    ("random_mf2_full250", 250), ("random_mf4_full250", None),
                                    ("kmeans", None), ("random_mf2_fullx", None)])
def test_full_resolution_share_of_each_set_name(name, k):
  assert formation_share.full_resolution_share(name, 1000, factor=2) == k


def test_chooses_the_least_held_out_error_not_the_best_probe(tmp_path, capsys):
  a = _write(tmp_path / "a.jsonl", [NONE, _student("random", 3000, 0.373, 0.556),
                                    _student("random_mf2_full500", 3006, 0.363, 0.566, images=2500),
                                    # Another length of K = 500 and another n: both skipped.
                                    _student("random_mf2_full500", 9000, 0.300, 0.580),
                                    _student("random", 3000, 0.100, 0.9, n=1375)])
  b = _write(tmp_path / "b.jsonl", [NONE, _student("random_mf2_full750", 3000, 0.355, 0.550,
                                                    held_out_rel_error_formed={"2": 0.339},
                                                    target="cifar10-jpg|train|test"),
                                    # The best probe, but the worst held-out error.
                                    _student("random_mf2", 3000, 0.443, 0.569, images=4000)])
  out = tmp_path / "share"
  assert formation_share.main(["--files", a, b, "--steps", "3000", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "chooses K = 750." in printed
  rows = [line for line in printed.splitlines() if line.startswith("| ") and "|---" not in line]
  ks = [line.split("|")[1].strip() for line in rows[2:]]  # past the header and `none`
  assert ks == ["0", "500", "750 (chosen)", "1000"]
  assert "| 3006 | 0.363 | - |" in printed and "| 3000 | 0.355 | 0.339 |" in printed
  assert "0.300" not in printed and "0.100" not in printed
  # The older points of a.jsonl record no target: the table says so.
  assert "target cifar10-jpg|train|test (not recorded by some older points)" in printed
  assert (tmp_path / "share.png").exists()
  assert "--steps 3000" in (tmp_path / "share.md").read_text()


def test_refuses_reports_of_different_seeds(tmp_path):
  other_none = dict(NONE, readouts=dict(linear_probe_5pct=0.44, linear_probe=0.54))
  a = _write(tmp_path / "a.jsonl", [NONE, _student("random", 3000, 0.37, 0.55)])
  b = _write(tmp_path / "b.jsonl", [other_none, _student("random_mf2", 3000, 0.44, 0.56)])
  with pytest.raises(SystemExit, match="not of one seed"):
    formation_share.main(["--files", a, b, "--steps", "3000"])


def test_refuses_a_single_share(tmp_path):
  a = _write(tmp_path / "a.jsonl", [NONE, _student("random", 3000, 0.37, 0.55)])
  with pytest.raises(SystemExit, match="1 share"):
    formation_share.main(["--files", a, "--steps", "3000"])
