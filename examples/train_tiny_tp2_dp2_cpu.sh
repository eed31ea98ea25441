#!/usr/bin/env bash
# The tiny config on 4 CPU processes: tensor parallelism 2 (with sequence parallelism) x data
# parallelism 2, on the embedded corpus. Its losses equal a single-process run's.
# Multi-node: run this on every node with NNODES, NODE_RANK and MASTER_ADDR set.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
yuanlfa-preprocess --default-corpus --output-prefix runs/data/stdlib_byte --skip-existing
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node 4 \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  -m yuanlfa.cli.train --config configs/tiny.yaml --set \
  data.path=runs/data/stdlib_byte parallel.tp=2 parallel.sequence_parallel=true \
  train.micro_batch_size=4 train.global_batch_size=32 \
  logging.jsonl=runs/tiny_tp2_dp2/log.jsonl "$@"
