#!/usr/bin/env bash
# Train the tiny config on this machine's CPU from the embedded corpus (Python's standard library).
# Extra arguments are passed on as overrides, e.g.: examples/train_tiny_cpu.sh train.steps=50
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
yuanlfa-preprocess --default-corpus --output-prefix runs/data/stdlib_byte --skip-existing
exec yuanlfa-train --config configs/tiny.yaml --set \
  data.path=runs/data/stdlib_byte \
  logging.jsonl=runs/tiny/log.jsonl \
  checkpoint.dir=runs/tiny/checkpoints checkpoint.resume=true \
  "$@"
