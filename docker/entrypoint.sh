#!/usr/bin/env bash
# lctrain container entrypoint.
#   train ARGS...    torchrun "$LCTRAIN_HOME/launch/train.py" ARGS; one process per GPU of this node.
#                    Single node by default; with NNODES>1 it joins a c10d rendezvous at
#                    MASTER_ADDR:MASTER_PORT (RDZV_ID names the job; the same on every node).
#   ray-job ARGS...  python "$LCTRAIN_HOME/launch/ray_job.py" ARGS (a driver on a Ray cluster).
#   help             this text.
#   anything else    run as given, e.g. `ray start --head`, `bash`, `python -m pytest`.
# Environment: NPROC_PER_NODE (default: gpu = every visible GPU), NNODES (1), MASTER_ADDR,
# MASTER_PORT (29500), RDZV_ID (lctrain), MAX_RESTARTS (0: torchrun restarts of the worker group).
set -euo pipefail

LCTRAIN_HOME="${LCTRAIN_HOME:-/opt/lctrain}"
cmd="${1:-help}"
if [[ $# -gt 0 ]]; then shift; fi

case "$cmd" in
  train)
    nnodes="${NNODES:-1}"
    if [[ "$nnodes" == "1" ]]; then
      rdzv=(--standalone)
    else
      : "${MASTER_ADDR:?MASTER_ADDR must name the first node for a multi-node run}"
      rdzv=(--rdzv_backend=c10d "--rdzv_endpoint=${MASTER_ADDR}:${MASTER_PORT:-29500}" "--rdzv_id=${RDZV_ID:-lctrain}")
    fi
    exec torchrun "--nnodes=${nnodes}" "--nproc_per_node=${NPROC_PER_NODE:-gpu}" "${rdzv[@]}" \
      "--max_restarts=${MAX_RESTARTS:-0}" "${LCTRAIN_HOME}/launch/train.py" "$@"
    ;;
  ray-job)
    exec python "${LCTRAIN_HOME}/launch/ray_job.py" "$@"
    ;;
  help | -h | --help)
    # the usage block above, without the comment markers
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    exec "$cmd" "$@"
    ;;
esac
