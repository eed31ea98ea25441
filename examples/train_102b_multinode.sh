#!/usr/bin/env bash
# The 102B preset as the paper trained it: PP32 (released block list) x TP1 x DP3 on 96 GPUs,
# 12 nodes of 8. Run on every node with NODE_RANK and MASTER_ADDR set:
#   NNODES=12 NODE_RANK=0 MASTER_ADDR=10.0.0.1 TOKENIZER=/models/Yuan2-hf/tokenizer.model examples/train_102b_multinode.sh /data/mycorpus
set -euo pipefail
data=${1:?usage: $0 DATA_PREFIX [key=value ...]}
shift
NNODES=${NNODES:-12} exec "$(dirname "$0")/train_multinode_gpu.sh" configs/yuan2-102b.yaml \
  "$data" "$@"
