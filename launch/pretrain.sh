#!/usr/bin/env bash
# Pretrain on one machine: every visible GPU, or 2 CPU ranks on a machine without one.
# Wraps `deepspeed --num_gpus N pretrain/train.py --config RUN.yaml ...` (python -m launch single).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/pretrain.sh [--gpus N] [--master-port P] [--dry-run] RUN.yaml [train args...]

  --gpus N         ranks to start (default: $NUM_GPUS, else all visible GPUs, else 2 CPU ranks)
  --master-port P  rendezvous port (default: a free one)
  --dry-run        print the exact deepspeed command and run nothing
  train args       passed to pretrain/train.py: --data DIR --run-dir DIR --max-steps N
                   --resume auto|none|PATH --allow-config-change KEY --set KEY=VALUE ...

Ctrl-C saves a checkpoint at the end of the current step and exits with code 130;
a second Ctrl-C stops every rank at once, without saving.

example:
  launch/pretrain.sh pretrain/configs/tiny-cpu.yaml --data shards/
See `python -m launch single --help` for every option.
USAGE
}

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/__main__.py" single "$@"
