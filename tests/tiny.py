"""A tiny training config over a given corpus, shared by training tests.

It says ``train.device: cpu``: with ``auto`` a machine with a visible GPU would switch the tests
to CUDA and bf16, where their fp32 tolerances and CPU-only comparisons do not hold."""

from __future__ import annotations


def tiny_overrides(data_path: str, **extra: object) -> dict:
    cfg: dict = {
        "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": None},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5},
        "data": {"path": data_path, "split": "90,10,0"},
        "train": {
            "steps": 30,
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "seq_length": 64,
            "seed": 7,
            "eval_iters": 1,
            "device": "cpu",
        },
        "logging": {"log_interval": 10},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    return cfg
