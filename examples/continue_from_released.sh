#!/usr/bin/env bash
# Continue pre-training Yuan 2.0's released weights, end to end, on CPU. No weights can be
# downloaded here, so step 1 builds a small random model in the released Hugging Face layout:
# Yuan's config.json fields, a tied head (no lm_head.weight), Yuan's tokenizer files. With the
# real thing (e.g. a downloaded Yuan2-2B-hf directory) skip step 1, point RELEASED at it and set
# the model overrides to its config (num_layers 24, hidden_size 2048, num_heads 32).
#   1. build the stand-in released directory (random weights)
#   2. import it (yuanlfa-reshard --to yuanlfa --verify)
#   3. tokenize the embedded corpus with Yuan's tokenizer (its ids, <eod> per document)
#   4. train a few steps in 3D (tp 2 x pp 2 x dp 2, 8 processes) from the imported weights,
#      fill-in-the-middle on (data.sft is the fine-tuning switch; the two exclude each other)
#   5. export to Hugging Face (config.json as Yuan's YuanForCausalLM reads it + tokenizer files)
#   6. check the exported model's logits, computed as Yuan's HF code computes them from
#      config.json and the weights alone, against the library's
# Usage: examples/continue_from_released.sh [PATH/TO/tokenizer.model] [overrides...]
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
tokenizer=tests/data/yuan_tokenizer/tokenizer.model
if [[ $# -gt 0 && $1 == *.model ]]; then tokenizer=$1; shift; fi
runs=${RUNS:-runs/continue_from_released}
RELEASED=${RELEASED:-$runs/released}
model=(model.num_layers=4 model.hidden_size=64 model.num_heads=4 model.vocab_size=135040)

if [[ ! -f $RELEASED/config.json ]]; then
  python - "$RELEASED" "$tokenizer" <<'PY'
import json, shutil, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from yuanlfa.checkpoint.convert.hf import hf_parts
from yuanlfa.config import ModelConfig
from yuanlfa.model import create_model

out, tokenizer = Path(sys.argv[1]), Path(sys.argv[2])
cfg = ModelConfig(num_layers=4, hidden_size=64, num_heads=4, vocab_size=135040)
tensors = {}
for name, param in create_model(cfg, seed=2024).named_parameters():
    start = 0
    for hf, rows in hf_parts(name, cfg):  # the public names and row splits
        rows = param.shape[0] if rows < 0 else rows
        tensors[hf] = param.detach()[start : start + rows].clone()
        start += rows
out.mkdir(parents=True)
save_file(tensors, str(out / "model.safetensors"))  # tied: no lm_head.weight
eod = 77185
(out / "config.json").write_text(json.dumps({  # the released files' fields, scaled down
    "architectures": ["YuanForCausalLM"], "model_type": "yuan",
    "auto_map": {"AutoConfig": "configuration_yuan.YuanConfig",
                 "AutoModelForCausalLM": "yuan_hf_model.YuanForCausalLM"},
    "tokenizer_class": "YuanTokenizer", "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 256, "max_position_embeddings": 8192,
    "num_attention_heads": 4, "num_hidden_layers": 4, "rms_norm_eps": 1e-06, "dropout": 0.1,
    "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True,
    "causal_mask": True, "use_flash_attention": True, "reset_attention_mask": True,
    "reset_position_ids": True, "use_loss_mask": False, "eod_token": eod, "sep_token": 77187,
    "eod_token_id": eod, "sep_token_id": eod, "pad_token_id": eod, "bos_token_id": eod,
    "eos_token_id": eod, "mask_token_id": eod, "vocab_size": 135040}, indent=2))
for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
    if (tokenizer.parent / name).is_file():
        shutil.copyfile(tokenizer.parent / name, out / name)
print(f"built a random stand-in for a released model in {out}")
PY
fi

yuanlfa-reshard --input "$RELEASED" --output "$runs/imported" --to yuanlfa --verify --force --quiet
yuanlfa-preprocess --default-corpus --tokenizer "sentencepiece:$tokenizer" \
  --output-prefix runs/data/stdlib_yuan --skip-existing --quiet
rm -rf "$runs/ckpt"
torchrun --standalone --nproc_per_node 8 -m yuanlfa.cli.train --config configs/tiny.yaml \
  --set "${model[@]}" data.path=runs/data/stdlib_yuan "data.tokenizer=sentencepiece:$tokenizer" \
  data.fim_rate=0.5 data.fim_spm_rate=0.5 \
  parallel.tp=2 parallel.sequence_parallel=true parallel.pp=2 "parallel.pipeline_blocks=[1,3]" \
  optim.distributed=true optim.warmup_steps=2 train.steps=6 train.micro_batch_size=2 \
  train.global_batch_size=8 train.seq_length=64 train.eval_interval=0 \
  "checkpoint.init_from=$runs/imported" "checkpoint.dir=$runs/ckpt" checkpoint.interval=6 \
  logging.log_interval=1 "$@"
yuanlfa-reshard --input "$runs/ckpt" --output "$runs/hf" --to hf --dtype fp32 --verify --force \
  --quiet
python - "$runs" <<'PY'
import sys
from pathlib import Path

import torch

from tests.checkpoint.yuan_reader import yuan_logits  # Yuan's HF forward, from config.json only
from yuanlfa.checkpoint import latest_checkpoint, manifest
from yuanlfa.checkpoint.storage import read_tensor
from yuanlfa.model import create_model

runs = Path(sys.argv[1])
ckpt = latest_checkpoint(runs / "ckpt")
cfg = manifest.model_config(manifest.read_meta(ckpt))
model = create_model(cfg, seed=0).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_(read_tensor(ckpt, manifest.model_key(name)))
    ids = torch.randint(0, 134958, (2, 32), generator=torch.Generator().manual_seed(0))
    ids[:, 10] = 77185  # a document boundary inside the sample
    ours, yuans = model(ids), yuan_logits(runs / "hf", ids)
diff = ((ours - yuans).abs().max() / ours.abs().max()).item()
print(f"exported model vs library: max relative logit difference {diff:.2e}")
assert diff < 1e-5, diff
PY
