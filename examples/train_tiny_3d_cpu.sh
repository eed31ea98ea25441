#!/usr/bin/env bash
# The tiny config in 3D on CPU: tp 2 (sequence parallel) x pp 2 (non-uniform split) x dp 2 with
# the sharded optimizer, 8 processes on one machine, or NNODES machines of 8 / NNODES processes
# each (set NNODES, NODE_RANK and MASTER_ADDR on every node). Its losses equal one process's.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
nnodes=${NNODES:-1}
yuanlfa-preprocess --default-corpus --output-prefix runs/data/stdlib_byte --skip-existing
exec torchrun --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" --nproc_per_node $((8 / nnodes)) \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RDZV_ID:-tiny3d}" \
  -m yuanlfa.cli.train --config configs/tiny.yaml --set \
  data.path=runs/data/stdlib_byte parallel.tp=2 parallel.sequence_parallel=true \
  parallel.pp=2 "parallel.pipeline_blocks=[1,3]" optim.distributed=true \
  train.micro_batch_size=4 logging.jsonl=runs/tiny_3d/log.jsonl "$@"
