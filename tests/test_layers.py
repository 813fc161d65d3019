"""The package's layering: the import-linter contracts of pyproject.toml hold."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


@pytest.mark.skipif(not os.path.exists(LINT), reason="import-linter is not installed")
def test_import_contracts_hold():
  proc = subprocess.run([LINT, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert "0 broken" in proc.stdout


def test_kernels_import_nothing_from_distill():
  code = ("import sys, kernels.ridge, kernels.ntk; "
          "print(sorted(m for m in sys.modules if m == 'distill' or m.startswith('distill.')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=True).stdout
  assert out.strip() == "[]"
