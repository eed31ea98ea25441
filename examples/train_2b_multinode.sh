#!/usr/bin/env bash
# The 2B preset data-parallel over NNODES nodes of 8 GPUs (plain data parallelism, as Yuan's 2B
# script; add optim.distributed=true for the sharded optimizer), e.g. 4 nodes = dp 32:
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 TOKENIZER=/models/Yuan2-hf/tokenizer.model examples/train_2b_multinode.sh /data/mycorpus
set -euo pipefail
data=${1:?usage: $0 DATA_PREFIX [key=value ...]}
shift
exec "$(dirname "$0")/train_multinode_gpu.sh" configs/yuan2-2b.yaml "$data" "$@"
