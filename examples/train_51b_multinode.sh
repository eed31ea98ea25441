#!/usr/bin/env bash
# The 51B preset (PP16 with the released block list, tp 1, dp 3) on 6 nodes of 8 GPUs; for
# another node count add parallel.dp=null (dp is then NNODES * 8 / 16). Run on every node with
# NODE_RANK and MASTER_ADDR set:
#   NNODES=6 NODE_RANK=0 MASTER_ADDR=10.0.0.1 TOKENIZER=/models/Yuan2-hf/tokenizer.model \
#     examples/train_51b_multinode.sh /data/mycorpus
set -euo pipefail
data=${1:?usage: $0 DATA_PREFIX [key=value ...]}
shift
NNODES=${NNODES:-6} exec "$(dirname "$0")/train_multinode_gpu.sh" configs/yuan2-51b.yaml \
  "$data" "$@"
