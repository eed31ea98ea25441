#!/usr/bin/env bash
# Elastic restart on CPU: a 2-process pipeline run under `torchrun --max-restarts 1` loses a worker
# (SIGKILL) after its first checkpoint; torchrun restarts the job, which resumes from that
# checkpoint and finishes. The script then trains the same model without interruption on one
# process and compares the per-step losses. About 2 minutes.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=${1:-runs/elastic}
rm -rf "$out" && mkdir -p "$out"
yuanlfa-preprocess --default-corpus --output-prefix runs/data/stdlib_byte --skip-existing
common=(--config configs/tiny.yaml --quiet --set data.path=runs/data/stdlib_byte train.steps=40
  train.seq_length=64 train.micro_batch_size=2 train.global_batch_size=8 train.eval_iters=0)
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

python -m torch.distributed.run --nproc_per_node 2 --max-restarts 1 --rdzv_backend c10d \
  --rdzv_endpoint "127.0.0.1:$port" -m yuanlfa.cli.train "${common[@]}" \
  parallel.pp=2 "parallel.pipeline_blocks=[1,3]" checkpoint.dir="$out/ckpt" \
  checkpoint.interval=10 checkpoint.resume=true logging.jsonl="$out/elastic.jsonl" \
  > "$out/torchrun.log" 2>&1 &
job=$!
until [ -f "$out/ckpt/step_0000010/meta.json" ]; do
  kill -0 $job 2>/dev/null || { tail -20 "$out/torchrun.log"; exit 1; }
  sleep 0.2
done
victim=$(pgrep -n -f "yuanlfa.cli.train")   # the newest: a worker, not torchrun itself
echo "checkpoint at step 10 written; killing worker pid $victim"
kill -9 "$victim"
wait $job
grep -E "failed \(exitcode|resumed from" "$out/torchrun.log" || true   # the crash, then the resume

yuanlfa-train "${common[@]}" logging.jsonl="$out/uninterrupted.jsonl"
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
read = lambda name: [json.loads(line) for line in open(f"{out}/{name}")]
elastic, single = read("elastic.jsonl"), read("uninterrupted.jsonl")
assert [r["step"] for r in elastic] == list(range(1, 41)), "the restarted run is incomplete"
worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(elastic, single, strict=True))
print(f"step 40 loss: restarted {elastic[-1]['loss']:.6f}, uninterrupted {single[-1]['loss']:.6f}")
print(f"largest relative loss difference over 40 steps: {worst:.2e}")
sys.exit(0 if worst < 1e-5 else 1)
PY
