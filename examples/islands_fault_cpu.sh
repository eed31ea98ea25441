#!/usr/bin/env bash
# Losing an island on CPU (docs/islands.md): two islands, each its own torchrun of one process,
# joined by DiLoCo every 4 steps through torchft. Island 0 is launched first and its worker
# starts the lighthouse (outer.lighthouse auto: a process of its own, its address published in
# checkpoint.dir); then island 1. Island 0's worker is SIGKILLed mid-run: the lighthouse lives
# on, island 1 keeps training alone (islands_alive 1); island 0's torchrun (--max-restarts 1)
# restarts it, it is healed at the next quorum from island 1 (its first step is island 1's) and
# both end with the same parameters; then the lighthouse exits. A minute or two.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=${1:-runs/islands_fault}
rm -rf "$out" && mkdir -p "$out"
yuanlfa-preprocess --default-corpus --output-prefix runs/data/stdlib_byte --skip-existing
common=(-m yuanlfa.cli.train --config configs/tiny.yaml --quiet)
# Enough steps that island 1, training alone, is still running when island 0 is back.
sets=(data.path=runs/data/stdlib_byte train.steps=300 train.eval_iters=0 parallel.islands=2 outer.algorithm=diloco outer.sync_every=4 checkpoint.dir="$out/ckpt"
  logging.jsonl="$out/losses.jsonl")
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Island 0's torchrun looks at its worker every 8 s, so that its restart comes after island 1
# has gone on alone for a while (with the default 0.1 s the restarted island is often back
# before the lighthouse has given up on the dead one); leave it short in real runs.
for island in 0 1; do
  monitor=$([ $island = 0 ] && echo 8 || echo 0.1)
  python -m torch.distributed.run --nproc_per_node 1 --max-restarts 1 --rdzv_backend c10d \
    --rdzv_endpoint "127.0.0.1:$(free_port)" --monitor-interval "$monitor" \
    "${common[@]}" --island $island --set "${sets[@]}" \
    > "$out/island$island.log" 2>&1 &
  eval "job$island=$!"
  # Island 1 after the lighthouse is up, so that island 0's worker is the one that started it.
  until [ $island = 1 ] || [ -s "$out/ckpt/lighthouse" ]; do
    kill -0 "$job0" || { tail -20 "$out/island0.log"; exit 1; }
    sleep 0.2
  done
done
lighthouse=$(sed -n 2p "$out/ckpt/lighthouse" | cut -d' ' -f1)
records() { cat "$out/losses.island$1.jsonl" 2>/dev/null || true; }
# After a joint outer step (island 0 logs islands_alive 2 with outer_sync true), kill island 0.
until records 0 | grep -q '"outer_sync": true.*"islands_alive": 2'; do
  kill -0 "$job0" && kill -0 "$job1" || { tail -20 "$out"/island*.log; exit 1; }
  sleep 0.2
done
victim=$(pgrep -P "$job0" -f yuanlfa.cli.train)   # torchrun's worker (not its data workers)
echo "island 0 at step $(records 0 | tail -1 | python -c 'import json,sys; print(json.load(sys.stdin)["step"])'); killing its worker (pid $victim), which started the lighthouse (pid $lighthouse)"
kill -9 "$victim"
wait "$job0" "$job1"
# Both islands done: the lighthouse exits within a second or so (a zombie nobody reaped has).
running() { [ -r "/proc/$1/stat" ] && ! grep -q ') Z ' "/proc/$1/stat"; }
for _ in $(seq 50); do running "$lighthouse" || break; sleep 0.2; done
if running "$lighthouse"; then echo "the lighthouse (pid $lighthouse) is still up"; exit 1; fi

python - "$out" <<'PY'
import json, sys
import torch
out = sys.argv[1]
read = lambda i: [json.loads(line) for line in open(f"{out}/losses.island{i}.jsonl")]
zero, one = read(0), read(1)   # island 0's log: its first life, then the restarted one
print("step  island1 loss  alive | island0 loss  alive")
zero_by_step = {r["step"]: r for r in zero}
for r in one:
    if r["step"] % 20 == 0 or r["islands_alive"] == 1 and r["outer_sync"]:
        o = zero_by_step.get(r["step"])
        right = f"{o['loss']:.4f}  {o['islands_alive']}" if o else "(down)"
        print(f"{r['step']:4d}  {r['loss']:.4f}       {r['islands_alive']}     | {right}")
alone = [r["step"] for r in one if r["islands_alive"] == 1 and r["step"] > 4] or [0]
steps = [r["step"] for r in zero]
lost, back = next(((a, b) for a, b in zip(steps, steps[1:]) if b != a + 1), (0, 0))
print(f"island 0 lost after step {lost}; island 1 trained alone at steps {alone[0]}..{alone[-1]}; "
      f"island 0 came back at step {back} with island 1's weights; the lighthouse has exited")
step = f"step_{one[-1]['step']:07d}"
a, b = (torch.load(f"{out}/ckpt/island{i}/islands/{step}/rank0.pt", weights_only=True)
        for i in (0, 1))
same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
print(f"both islands hold the same parameters at the end: {same}")
sys.exit(0 if same and alone[0] and back > lost + 1 else 1)
PY
