#!/usr/bin/env bash
# Start this machine's part of a multi-node run without ssh (Kubernetes, any scheduler): run the
# same command on every host of the hostfile, each with its own node rank.
# Wraps `deepspeed --hostfile H --no_ssh --node_rank N --master_addr A --master_port P pretrain/train.py ...`
# (python -m launch no-ssh; DeepSpeed >= 0.14.5).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/node.sh --hostfile H [--node-rank N] [--master-addr A] [--master-port P] [--dry-run]
                      RUN.yaml [train args...]

  --hostfile H     one `HOST slots=N` line per machine, the same file on every machine
  --node-rank N    this machine's line in H, from 0 (default: $NODE_RANK)
  --master-addr A  address of node rank 0 (default: $MASTER_ADDR, else the first host of H)
  --master-port P  rendezvous port (default: $MASTER_PORT, else 29500)
  --dry-run        print the exact command (of every node when no rank is given); run nothing

example (on the second machine):
  launch/node.sh --hostfile hostfile --node-rank 1 --master-addr 10.0.0.1 pretrain/configs/atma-378m.yaml --data /shared/shards
See `python -m launch no-ssh --help` for every option.
USAGE
}

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/__main__.py" no-ssh "$@"
