#!/usr/bin/env bash
# Any preset on several GPU nodes with torchrun. Run the same command on every node:
#   NNODES=12 NODE_RANK=<0..11> MASTER_ADDR=<node 0's address> TOKENIZER=<tokenizer.model> \
#     examples/train_multinode_gpu.sh configs/yuan2-102b.yaml /data/mycorpus [key=value ...]
# TOKENIZER: Yuan 2.0's tokenizer.model (or a spec: sentencepiece:PATH, huggingface:DIR).
# The world size is NNODES * GPUS_PER_NODE (default 8); it must be a multiple of tp * pp of the
# config, and dp is derived from it (a config that fixes parallel.dp, like the 102B preset's
# dp 3 on 96 GPUs, needs exactly tp * pp * dp GPUs). Ranks are ordered tp fastest, then dp, then
# pp, so tensor-parallel groups stay inside a node and only pipeline activations and the data-
# parallel reduce-scatter/all-gather cross nodes. Check the per-rank memory first with
#   yuanlfa-plan --config CONFIG --device H100
set -euo pipefail
. "$(dirname "$0")/tokenizer_spec.sh"
config=${1:?usage: $0 CONFIG DATA_PREFIX [key=value ...]}
data=${2:?usage: $0 CONFIG DATA_PREFIX [key=value ...]}
shift 2
name=$(basename "$config" .yaml)
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RDZV_ID:-$name}" \
  -m yuanlfa.cli.train --config "$config" --set \
  data.path="$data" data.tokenizer="$tokenizer_spec" model.vocab_size=null \
  logging.jsonl="runs/$name/log.jsonl" logging.tensorboard_dir="runs/$name/tb" \
  "$@"
