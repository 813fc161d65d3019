#!/usr/bin/env bash
# The effect table on one GPU under a wall-clock budget: experts, knowledge-
# distillation-trajectory matching, KRR-ST with the paper's pool, then the
# table (seed by seed, every entry saved as it is measured), then the
# fixed-target matching ablation with what time is left.
#
# Usage (from anywhere; a CUDA build of jax in the pinned range, ../shared/data
# beside the repository):
#   bash experiments/cifar10_effect_gpu.sh [CONFIG] [WORKDIR] [BUDGET_SECONDS]
# Defaults: experiments/configs/cifar10_effect_gpu.py, runs/cifar10_effect_gpu,
# 540 s. Each stage gets at most its own cap and what is left of the budget,
# and is interrupted (SIGINT) when either runs out: a stage whose set does
# not exist by then leaves its row out of the table. DISTILL overrides the
# command (default: `python -m distill.cli`). Rerunning continues: the
# stages skip what their workdirs already hold.
# The CPU check of this script: bash experiments/cifar10_effect_gpu.sh \
#     experiments/configs/cifar10_effect_gpu.py:smoke runs/effect_gpu_smoke 900
set -uo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-experiments/configs/cifar10_effect_gpu.py}
WORK=${2:-runs/cifar10_effect_gpu}
BUDGET=${3:-540}
PY=${PYTHON:-python}
read -r -a DISTILL <<< "${DISTILL:-$PY -m distill.cli}"
START=$SECONDS

stage() {  # stage NAME CAP COMMAND...: runs COMMAND for at most min(CAP, budget left) s
  local name=$1 cap=$2 left=$((BUDGET - (SECONDS - START)))
  shift 2
  (( left < cap )) && cap=$left
  if (( cap < 30 )); then
    echo "[effect_gpu] $name skipped: ${left}s of the budget left"
    return 1
  fi
  local t0=$SECONDS
  echo "[effect_gpu] $name: at most ${cap}s"
  timeout --signal=INT --kill-after=20 "$cap" "$@"
  local rc=$?
  echo "[effect_gpu] $name: exit $rc after $((SECONDS - t0))s (total $((SECONDS - START))s)"
  return $rc
}

"$PY" - <<'EOF'
import jax, flax, optax, platform
print(f"[effect_gpu] jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
      f"python {platform.python_version()}, devices {jax.devices()}")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader

stage experts 150 "${DISTILL[@]}" experts --config "$CONFIG" --workdir "$WORK"
stage param-match 150 "${DISTILL[@]}" param-match --config "$CONFIG" --workdir "$WORK"
stage krr-st 200 "${DISTILL[@]}" krr-st --config "$CONFIG" --workdir "$WORK"

# Rows whose set could not be built in time stay out of the table.
ROWS=$("$PY" - "$CONFIG" "$WORK" <<'EOF'
import os, sys
from distill.config import load_config
from distill.stages.artefacts import SYNTHETIC
rows = load_config(sys.argv[1]).eval.rows
missing = {"mtt": "synthetic_mtt.npz", "krr_st": SYNTHETIC}
print(",".join(f'"{r}"' for r in rows
               if r not in missing or os.path.exists(os.path.join(sys.argv[2], missing[r]))))
EOF
)
echo "[effect_gpu] table rows: $ROWS"
stage table $((BUDGET - 60)) "${DISTILL[@]}" table --config "$CONFIG" --workdir "$WORK" \
    --set "eval.rows=($ROWS,)"

# Ablation, label-free: the same matching with the targets fixed to the
# teacher's view of the start images; its held-out matching loss stands
# beside the row's (the table's mtt uses the teacher's view of the current images).
FIXED="${WORK}_fixed_targets"
mkdir -p "$FIXED"
for src in "$WORK"/teacher "$WORK"/teacher_views_v* "$WORK"/experts_mse; do
  d=$(basename "$src")
  [[ -e "$src" && ! -e "$FIXED/$d" ]] && ln -s "$(cd "$WORK" && pwd)/$d" "$FIXED/$d"
done
stage param-match-fixed-targets 150 "${DISTILL[@]}" param-match --config "$CONFIG" \
    --workdir "$FIXED" --set param_match.teacher_targets=False

"$PY" - "$WORK" "$FIXED" <<'EOF'
import os, sys
from distill.data import synthetic_set
from distill.stages.artefacts import SYNTHETIC
for workdir in sys.argv[1:]:
  for name in ("synthetic_mtt.npz", SYNTHETIC):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      s = synthetic_set.load_synthetic(path)
      held = s.extra.get("held_out") or {}
      print(f"[effect_gpu] {path}: step {s.step}, image shift {s.extra.get('image_shift')}, "
            f"held-out {held}")
EOF
echo "[effect_gpu] done in $((SECONDS - START))s"
