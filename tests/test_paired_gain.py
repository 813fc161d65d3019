"""experiments/paired_gain.py: per-seed pairs of recorded students and their summary."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import paired_gain  # noqa: E402


def _student(name, n, steps, probe5, probe, error=0.4, **extra):
  return dict(kind="student", set=name, n=n, lr=0.1, steps=steps, held_out_rel_error=error,
              readouts=dict(linear_probe_5pct=probe5, linear_probe=probe), **extra)


def _write(path, points):
  with open(path, "w") as f:
    for p in points:
      f.write(json.dumps(p) + "\n")
  return str(path)


def test_pairs_each_seed_and_summarises_with_the_sample_std(tmp_path, capsys):
  rng = np.random.default_rng(0)
  row_5 = rng.uniform(0.5, 0.6, 3)
  base_5 = rng.uniform(0.5, 0.6, 3)
  specs = []
  for seed in range(3):
    points = [dict(kind="none", readouts=dict(linear_probe_5pct=0.4, linear_probe=0.5)),
              # A shorter run of the row, which the default (longest run) must skip.
              _student("mixed", 1000, 1000, 0.0, 0.0),
              _student("mixed", 1000, 3006, row_5[seed], 0.6),
              _student("random", 1000, 3000, base_5[seed], 0.6),
              _student("random", 1375, 3000, 0.9, 0.9)]
    specs.append(f"{seed}=" + _write(tmp_path / f"s{seed}.jsonl", points))
  assert paired_gain.main(["--row", "mixed:1000", "--against", "random:1000",
                           "--files", *specs]) == 0
  out = capsys.readouterr().out
  diff = 100 * (row_5 - base_5)
  assert f"{diff.mean():+.2f} ± {diff.std(ddof=1):.2f} / +0.00 ± 0.00" in out
  assert "| 3006 / 3000 |" in out and "(3 seeds)" in out
  # One named length instead of the longest: the 1,000-step run, 0% read-outs.
  files = {str(s): paired_gain.read_points(str(tmp_path / f"s{s}.jsonl")) for s in range(3)}
  pairs, missing = paired_gain.paired(files, ("mixed", 1000), ("random", 1000),
                                      ["linear_probe_5pct"], row_steps=1000)
  assert missing == []
  np.testing.assert_allclose([p["diff"]["linear_probe_5pct"] for p in pairs], -100 * base_5)


def test_a_seed_without_both_rows_is_listed_not_paired(tmp_path):
  full = [_student("mixed", 1000, 3006, 0.57, 0.64), _student("random", 1000, 3000, 0.55, 0.63)]
  files = {"0": [full[0]], "1": full, "2": list(full)}
  pairs, missing = paired_gain.paired(files, ("mixed", 1000), ("random", 1000),
                                      ["linear_probe_5pct"])
  assert missing == ["0"] and [p["seed"] for p in pairs] == ["1", "2"]
  np.testing.assert_allclose(paired_gain.summary(pairs, "linear_probe_5pct"), (2.0, 0.0),
                             atol=1e-9)
  # One seed has no spread: nan, not a misleading 0.
  assert np.isnan(paired_gain.summary(pairs[:1], "linear_probe_5pct")[1])
  text = paired_gain.report(pairs[:1], [], ("mixed", 1000), ("random", 1000),
                            ["linear_probe_5pct"], "")
  assert "| one seed, no spread | | | +2.00 |" in text and "nan" not in text


@pytest.mark.parametrize("case, message", [
    ("targets", "different targets"),
    ("row", "expected SET:N"),
    ("seed", "given twice"),
    ("absent", "does not exist"),
    ("nothing", "no seed holds both"),
])
def test_refuses_what_it_cannot_pair(tmp_path, case, message):
  a = _write(tmp_path / "a.jsonl", [_student("mixed", 1000, 3006, 0.5, 0.6, target="x|train|test"),
                                    _student("random", 1000, 3000, 0.5, 0.6, target="x|train|test")])
  b = _write(tmp_path / "b.jsonl", [_student("mixed", 1000, 3006, 0.5, 0.6, target="y|train|test"),
                                    _student("random", 1000, 3000, 0.5, 0.6, target="y|train|test")])
  args = {"targets": ["--row", "mixed:1000", "--files", f"0={a}", f"1={b}"],
          "row": ["--row", "mixed", "--files", f"0={a}"],
          "seed": ["--row", "mixed:1000", "--files", f"0={a}", f"0={a}"],
          "absent": ["--row", "mixed:1000", "--files", f"0={tmp_path / 'none.jsonl'}"],
          "nothing": ["--row", "kmeans:1000", "--files", f"0={a}"]}[case]
  with pytest.raises(SystemExit, match=message):
    paired_gain.main(args + ["--against", "random:1000"])


def test_a_report_that_predates_the_target_field_pairs_with_a_named_one(tmp_path, capsys):
  old = _write(tmp_path / "old.jsonl", [_student("mixed", 1000, 3006, 0.5, 0.6),
                                        _student("random", 1000, 3000, 0.5, 0.6)])
  new = _write(tmp_path / "new.jsonl", [_student("mixed", 1000, 3006, 0.5, 0.6, target="x|a|b"),
                                        _student("random", 1000, 3000, 0.5, 0.6, target="x|a|b")])
  assert paired_gain.main(["--row", "mixed:1000", "--against", "random:1000",
                           "--files", f"1={old}", f"2={new}"]) == 0
  assert "Target: x|a|b (not recorded in the report of seed 1)" in capsys.readouterr().out
  # Older points beside newer ones in one report (a resumed run) read as its target.
  assert paired_gain.target_of(paired_gain.read_points(old) + paired_gain.read_points(new)) \
      == "x|a|b"


def test_a_seed_may_name_several_reports_of_its_own(tmp_path, capsys):
  none = dict(kind="none", readouts=dict(linear_probe_5pct=0.4, linear_probe=0.5))
  a = _write(tmp_path / "a.jsonl", [none, _student("random", 1000, 3000, 0.55, 0.62)])
  b = _write(tmp_path / "b.jsonl", [none, _student("mixed", 1000, 3000, 0.565, 0.63)])
  assert paired_gain.main(["--row", "mixed:1000", "--against", "random:1000",
                           "--files", f"0={a},{b}"]) == 0
  assert "+1.50 / +1.00" in capsys.readouterr().out
  # Another seed's `none` (another initialisation, other label draws) is refused.
  other = _write(tmp_path / "c.jsonl", [dict(none, readouts=dict(linear_probe_5pct=0.41,
                                                                 linear_probe=0.5)),
                                        _student("mixed", 1000, 3000, 0.565, 0.63)])
  with pytest.raises(SystemExit, match="not of one seed"):
    paired_gain.main(["--row", "mixed:1000", "--against", "random:1000",
                      "--files", f"0={a},{other}"])


def test_a_pair_from_a_merged_older_report_is_flagged_as_unrecorded(tmp_path, capsys):
  # Seed 1's `random` sits in a report that predates the target field, its `mixed` in
  # a newer one: the seed as a whole names a target, yet one point of its pair does not.
  old = _write(tmp_path / "old.jsonl", [_student("random", 1000, 3000, 0.55, 0.62)])
  new = _write(tmp_path / "new.jsonl", [_student("mixed", 1000, 3000, 0.56, 0.63,
                                                 target="x|a|b")])
  both = _write(tmp_path / "both.jsonl", [
      _student("mixed", 1000, 3000, 0.56, 0.63, target="x|a|b"),
      _student("random", 1000, 3000, 0.55, 0.62, target="x|a|b")])
  assert paired_gain.main(["--row", "mixed:1000", "--against", "random:1000",
                           "--files", f"1={old},{new}", f"2={both}"]) == 0
  assert "Target: x|a|b (not recorded in the report of seed 1)" in capsys.readouterr().out
  assert paired_gain.main(["--row", "mixed:1000", "--against", "random:1000",
                           "--files", f"2={both}"]) == 0
  assert "Target: x|a|b; " in capsys.readouterr().out
