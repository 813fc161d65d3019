#!/usr/bin/env bash
# KRR-ST outer step on one GPU at the paper's shapes, one command, a few minutes:
# real batch 1024, ResNet-18-w64 teacher (cached views), the paper's pool of 10
# ConvNets 128-256-512 with batch norm, n = 1,000 and 10,000, float32 and
# bfloat16 convolutions. Prints step time, multiply-adds per second, the share
# of the device's peak FLOP/s, memory, and the hours 160,000 outer steps take;
# writes experiments/results/benchmark_krr_st_gpu.md.
#
# Needs a CUDA build of jax in the pinned range, e.g.
#   pip install -e . "jax[cuda12]>=0.7,<0.13"
# Usage (from anywhere): bash experiments/benchmark_krr_st_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax, sys; d = jax.devices()[0]; print('device:', d.device_kind); \
sys.exit(0 if d.platform in ('gpu', 'cuda') else 'no GPU visible to jax: install jax[cuda12]')"
python experiments/benchmark_krr_st.py --preset gpu --repeats 5 \
    --out experiments/results/benchmark_krr_st_gpu.md
