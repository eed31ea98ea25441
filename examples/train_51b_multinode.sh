#!/usr/bin/env bash
# The 51B preset (PP16 with the released block list, tp 1) on NNODES nodes of 8 GPUs: dp is
# NNODES * 8 / 16. Run on every node with NODE_RANK and MASTER_ADDR set, e.g. 6 nodes (dp 3):
#   NNODES=6 NODE_RANK=0 MASTER_ADDR=10.0.0.1 TOKENIZER=/models/Yuan2-hf/tokenizer.model examples/train_51b_multinode.sh /data/mycorpus
set -euo pipefail
data=${1:?usage: $0 DATA_PREFIX [key=value ...]}
shift
exec "$(dirname "$0")/train_multinode_gpu.sh" configs/yuan2-51b.yaml "$data" "$@"
