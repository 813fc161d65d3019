"""Every stage by name, and `run`: teacher -> KRR-ST -> the results table."""

from __future__ import annotations

import os
import time

from distill import files
from distill.stages.artefacts import prepare_workdir
from distill.stages.krr_st import run_krr_st
from distill.stages.param_match import run_experts, run_param_match
from distill.stages.selection import run_influence, run_prune_source
from distill.stages.table import run_table
from distill.stages.teacher import run_export_teacher, run_import_teacher, run_teacher


def run(config, workdir: str) -> dict:
  """All stages: teacher -> KRR-ST -> export -> the results table."""
  prepare_workdir(config, workdir)
  timings = files.read_json(os.path.join(workdir, "timings.json"), default={})
  for stage, fn in (("teacher", run_teacher), ("krr_st", run_krr_st), ("table", run_table)):
    t0 = time.perf_counter()
    out = fn(config, workdir)
    timings.setdefault(stage, time.perf_counter() - t0)
    files.write_json(os.path.join(workdir, "timings.json"), timings)
  return out


# The `distill` subcommands: each is `(config, workdir) -> artefact`.
STAGES = {"run": run, "teacher": run_teacher, "import-teacher": run_import_teacher,
          "export-teacher": run_export_teacher, "krr-st": run_krr_st,
          "experts": run_experts, "param-match": run_param_match, "table": run_table,
          "transfer": run_table, "prune-source": run_prune_source, "influence": run_influence}
