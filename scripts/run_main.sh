#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: online CTR training on the built-in synthetic click log,
# 2 processes under torchrun. Extra arguments go to the job (see `python -m torch_psembed.train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --nproc-per-node 2 -m torch_psembed.train "$@"
