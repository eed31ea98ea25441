#!/usr/bin/env bash
# The README's main job: the tiny config trained in 3D on 8 CPU processes on the embedded
# corpus, 300 steps: tensor parallel 2 (with sequence parallelism) x pipeline parallel 2 with a
# non-uniform split in the Yuan 2.0 manner (1 layer on the first stage, which holds the most
# microbatches in flight under 1F1B, then 3 layers + the head and loss) x data parallel 2 with
# the sharded optimizer. The text is tokenized by a SentencePiece model (2000 pieces, Yuan 2.0's
# special tokens) trained on the corpus first. Extra arguments are passed on as overrides, e.g.
#   examples/quickstart.sh train.steps=50 parallel.schedule=gpipe
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
tokenizer=runs/tokenizer/stdlib_spm.model
yuanlfa-train-tokenizer --default-corpus --vocab-size 2000 \
  --output-prefix "${tokenizer%.model}" --skip-existing
yuanlfa-preprocess --default-corpus --tokenizer "sentencepiece:$tokenizer" \
  --output-prefix runs/data/stdlib_spm --skip-existing
exec torchrun --standalone --nproc_per_node 8 -m yuanlfa.cli.train --config configs/tiny.yaml \
  --set data.path=runs/data/stdlib_spm "data.tokenizer=sentencepiece:$tokenizer" \
  parallel.tp=2 parallel.sequence_parallel=true \
  parallel.pp=2 "parallel.pipeline_blocks=[1,3]" optim.distributed=true \
  train.micro_batch_size=4 logging.jsonl=runs/quickstart/log.jsonl "$@"
