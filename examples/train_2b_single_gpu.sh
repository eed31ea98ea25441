#!/usr/bin/env bash
# The 2B preset on one GPU (bf16). Give your own tokenized data (yuanlfa-preprocess output prefix,
# made with Yuan's tokenizer) and the tokenizer, and shorten the run for a smoke test, e.g.:
#   TOKENIZER=/models/Yuan2-2B-hf/tokenizer.model \
#     examples/train_2b_single_gpu.sh /data/mycorpus train.steps=50 train.global_batch_size=16
# The full 8192-token sequence at micro batch 2 needs about 40 GB; lower train.seq_length or
# train.micro_batch_size on smaller GPUs (yuanlfa-info shows the static memory per rank).
set -euo pipefail
. "$(dirname "$0")/tokenizer_spec.sh"
data=${1:?usage: $0 DATA_PREFIX [key=value ...]}
shift
exec yuanlfa-train --config configs/yuan2-2b.yaml --set \
  data.path="$data" data.tokenizer="$tokenizer_spec" model.vocab_size=null \
  logging.jsonl=runs/2b/log.jsonl logging.tensorboard_dir=runs/2b/tb \
  checkpoint.dir=runs/2b/checkpoints checkpoint.resume=true checkpoint.interval=1000 \
  "$@"
