#!/usr/bin/env bash
# Pretrain on several machines from this one, over pdsh/ssh, with a DeepSpeed hostfile.
# Wraps `deepspeed --hostfile H --master_addr A --master_port P --launcher pdsh pretrain/train.py ...`
# (python -m launch pdsh) and first writes ./.deepspeed_env so that W&B, Hugging Face, cache,
# NCCL and ATMA_* settings reach every node.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/multinode.sh --hostfile H [--master-addr A] [--master-port P] [--no-env-file] [--dry-run]
                           RUN.yaml [train args...]

  --hostfile H     one `HOST slots=N` line per machine (see launch/hostfile.example)
  --master-addr A  address of the first host (default: $MASTER_ADDR, else the first host of H)
  --master-port P  rendezvous port (default: $MASTER_PORT, else 29500)
  --no-env-file    leave ./.deepspeed_env alone
  --dry-run        print the command, the nodes and .deepspeed_env; run nothing

example:
  launch/multinode.sh --hostfile hostfile pretrain/configs/atma-378m.yaml --data /shared/shards
See `python -m launch pdsh --help` for every option.
USAGE
}

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/__main__.py" pdsh "$@"
