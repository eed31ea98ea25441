"""yuanlfa-info: sizes and costs of a config, without building or allocating the model.

The filter and core attention are costed as they declare (yuanlfa.planner.components); a
plug-in's declaration is read from its registration, and what a plug-in leaves undeclared is
listed under ``unknown_costs`` (and warned about on stderr), not costed as LFA."""

from __future__ import annotations

import argparse
import json

from yuanlfa.cli.common import add_config_args, add_debug_arg, run
from yuanlfa.cli.plugin_costs import load_plugin_costs
from yuanlfa.config import Config, ConfigError, load_config, resolve
from yuanlfa.config.preflight import preflight
from yuanlfa.data import build_tokenizer
from yuanlfa.model.registry import check_model_config
from yuanlfa.planner import (
    cost_model,
    flops_per_token,
    param_counts,
    stage_memory,
    unknown_costs,
)
from yuanlfa.planner.fit import fit_summary
from yuanlfa.planner.stages import config_blocks

GIB = 2**30


def summarize(cfg: Config, world_size: int | None = None) -> dict:
    check_model_config(cfg.model)
    p = cfg.parallel
    if world_size is None:
        world_size = p.tp * p.pp * p.cp * (p.dp or 1)
    tokenizer_vocab = None
    if cfg.model.vocab_size is None:
        tokenizer_vocab = build_tokenizer(cfg.data.tokenizer).vocab_size
    cfg = resolve(cfg, world_size, tokenizer_vocab)
    load_plugin_costs(cfg.model)
    dp = cfg.parallel.dp
    counts = param_counts(cfg.model)
    flops = flops_per_token(cfg.model, cfg.train.seq_length)
    blocks = config_blocks(cfg)
    stages = stage_memory(cfg, dp, blocks)
    # Activations at the schedule's peak and transient buffers, from the planner's cost model.
    ranks = cost_model(cfg).evaluate(blocks).ranks
    return {
        "filter": cfg.model.filter_name,
        "attention": cfg.model.attention,
        "unknown_costs": unknown_costs(cfg.model),
        "params_total": counts.total,
        "params_embedding": counts.embedding,
        "params_per_layer": counts.per_layer,
        "params_lfa_per_layer": counts.lfa_per_layer,
        "params_attention_per_layer": counts.attention_per_layer,
        "lfa_share": counts.lfa_share,
        "lfa_share_of_layer": counts.lfa_per_layer / counts.per_layer,
        "flops_per_token": flops,
        "seq_length": cfg.train.seq_length,
        "layout": {
            "tp": p.tp,
            "pp": p.pp,
            "dp": dp,
            "virtual_stages": p.virtual_stages,
            "world_size": world_size,
            "pipeline_blocks": [s.layers for s in stages],
            "distributed_optimizer": cfg.optim.distributed,
        },
        "per_rank": [
            {
                "pipeline_rank": s.stage,
                "layers": s.layers,
                "params": s.params,
                "weights_bytes": s.weights_bytes,
                "grads_bytes": s.grads_bytes,
                "optimizer_bytes": s.optimizer_bytes,
                "total_bytes": s.total_bytes,
                "activation_bytes": r.activation_bytes,
                "workspace_bytes": r.workspace_bytes,
                "in_flight_microbatches": r.in_flight,
                "total_with_activations_bytes": r.memory_bytes,
            }
            for s, r in zip(stages, ranks)
        ],
        "max_rank_bytes": max(s.total_bytes for s in stages),
        "max_rank_bytes_with_activations": max(r.memory_bytes for r in ranks),
        "fit": fit_summary(cfg),  # against train.device_memory_gb (None: unset)
    }


def _print_text(info: dict) -> None:
    lay = info["layout"]
    print(f"parameters      {info['params_total'] / 1e9:.3f} B")
    print(f"  embedding     {info['params_embedding'] / 1e6:.1f} M (tied with the head)")
    name = info["filter"]
    print(
        f"  per layer     {info['params_per_layer'] / 1e6:.2f} M, of which filter {name} "
        f"{info['params_lfa_per_layer'] / 1e6:.2f} M ({100 * info['lfa_share_of_layer']:.1f}%)"
    )
    print(f"  filter share  {100 * info['lfa_share']:.2f}% of the model")
    f = info["flops_per_token"]
    print(
        f"FLOPs/token     forward {f['forward'] / 1e9:.2f} G, train {f['train'] / 1e9:.2f} G "
        f"at seq {info['seq_length']} (filter {f['lfa'] / 1e9:.2f} G forward)"
    )
    for line in info["unknown_costs"]:
        print(f"unknown         {line}")
    print(
        f"layout          tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']} = {lay['world_size']} "
        f"ranks, distributed optimizer {'on' if lay['distributed_optimizer'] else 'off'}"
    )
    print(
        "pipeline rank   layers   params     weights   grads   optimizer   total   "
        "+activations (GiB)"
    )
    for r in info["per_rank"]:
        print(
            f"{r['pipeline_rank']:>13}   {r['layers']:>6}   {r['params'] / 1e9:6.3f} B  "
            f"{r['weights_bytes'] / GIB:7.2f}  {r['grads_bytes'] / GIB:6.2f}  "
            f"{r['optimizer_bytes'] / GIB:10.2f}  {r['total_bytes'] / GIB:6.2f}  "
            f"{r['total_with_activations_bytes'] / GIB:10.2f}"
        )
    print(
        f"fit             {info['fit']['verdict'] if info['fit'] else 'set train.device_memory_gb'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="yuanlfa-info", description=__doc__)
    add_config_args(parser)
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="number of ranks (default: tp * pp * dp from the config, dp=1 when unset)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    return run("yuanlfa-info", lambda: _run(parser, args), args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.world_size is not None and args.world_size < 1:
        raise ConfigError(
            f"--world-size: must be >= 1 (the number of ranks), got {args.world_size}"
        )
    cfg = load_config(args.config, args.overrides)
    # What a run of this config would write and read, before anything is built; the device
    # is not this one (yuanlfa-info runs on login nodes), so CUDA is not asked for.
    preflight(cfg, cuda=None)
    info = summarize(cfg, args.world_size)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_text(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
