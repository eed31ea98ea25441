#!/usr/bin/env bash
# The README's main job: the tiny config on 4 CPU processes (tensor parallel 2 with sequence
# parallelism x data parallel 2, sharded optimizer) on the embedded corpus, 300 steps.
# Extra arguments are passed on as overrides, e.g.: examples/quickstart.sh train.steps=50
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
yuanlfa-preprocess --default-corpus --output-prefix runs/data/stdlib_byte --skip-existing
exec torchrun --standalone --nproc_per_node 4 -m yuanlfa.cli.train --config configs/tiny.yaml \
  --set data.path=runs/data/stdlib_byte parallel.tp=2 parallel.sequence_parallel=true \
  optim.distributed=true train.micro_batch_size=4 logging.jsonl=runs/quickstart/log.jsonl "$@"
