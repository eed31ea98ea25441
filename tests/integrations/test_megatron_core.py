"""LFA in megatron-core (optional extra): the layer spec builds on CPU; megatron-core's own
tensor-parallel layers run the LFA decoder at tp=2 on gloo, and its state dict, converted to
yuanlfa's names, gives our model the same logits. GPTModel.forward and megatron-core's
DotProductAttention need CUDA: the CPU runs use the embedding, the decoder block and
SDPACoreAttention; the CUDA test runs the whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core", reason="megatron-core is not installed (yuanlfa[megatron])")

from tests.distributed.launcher import run_distributed  # noqa: E402
from yuanlfa.config import ModelConfig  # noqa: E402

CFG = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=128)
SEQ, BATCH = 8, 2
# megatron-core 0.16's sequence-parallel scatter/gather allocate their outputs on CUDA, so the
# gloo (CPU) run is plain tensor parallelism only, also on a machine with a GPU; the gate's
# sequence-parallel path is yuanlfa's halo (tested in tests/parallel/test_tensor_parallel.py).
SEQUENCE_PARALLEL = (False,)


def _megatron():
    from yuanlfa.integrations import megatron_core

    return megatron_core


def test_spec_names_lfa_submodules() -> None:
    mc = _megatron()
    spec = mc.get_lfa_gpt_layer_spec()
    attn = spec.submodules.self_attention
    assert attn.module is mc.LFASelfAttention
    assert attn.submodules.lf_gate is mc.LFAGate
    assert attn.submodules.linear_qk is not None and attn.submodules.linear_v is not None
    config = mc.transformer_config(CFG, use_cpu_initialization=True)
    assert config.gated_linear_unit and config.normalization == "RMSNorm"
    block = mc.get_lfa_gpt_block_spec(config, core_attention=mc.SDPACoreAttention)
    assert len(block.layer_specs) == CFG.num_layers and block.layer_norm is mc.RMSNorm
    with pytest.raises(ValueError, match="only the default LFA model"):
        mc.transformer_config(ModelConfig(filter="conv"))


def test_gate_uses_megatrons_init_method_dtype_and_device(monkeypatch) -> None:
    mc = _megatron()
    drawn = []

    def init_method(weight: torch.Tensor) -> None:
        drawn.append(tuple(weight.shape))
        torch.nn.init.constant_(weight, 0.25)

    config = mc.transformer_config(
        CFG, use_cpu_initialization=True, init_method=init_method, params_dtype=torch.bfloat16
    )
    gate = mc.LFAGate(CFG.hidden_size, config=config)
    h = CFG.hidden_size
    assert drawn == [(h // 2, h, 2, 1), (h, h // 2, 2, 1)]
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in gate.parameters())
    assert bool((gate.conv1.weight == 0.25).all()) and not gate.conv1.bias.any()
    assert bool((gate.norm.weight == 1).all())
    # Without CPU initialization megatron-core builds on the current GPU: so does the gate.
    built_on = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(mc.LFAGate, "to", lambda self, **kw: built_on.append(kw) or self)
    mc.LFAGate(h, config=mc.transformer_config(CFG, use_cpu_initialization=False))
    assert built_on == [{"device": 0, "dtype": torch.float32}]


def _rope(seq: int, dim: int, base: float) -> torch.Tensor:
    """megatron-core's rotary embedding tensor [s, 1, 1, d] (its RotaryEmbedding needs CUDA)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def _build(mc, sequence_parallel: bool, tp: int):
    from megatron.core.models.gpt import GPTModel

    config = mc.transformer_config(
        CFG,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
    )
    spec = mc.get_lfa_gpt_block_spec(config, core_attention=mc.SDPACoreAttention)
    torch.manual_seed(0)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=CFG.vocab_size,
        max_sequence_length=64,
        position_embedding_type="rope",
        rotary_base=int(CFG.rope_base),
        share_embeddings_and_output_weights=True,
    )
    # O(1) weights (the 0.02 init would hide mistakes in rounding), the same on every rank for
    # replicated tensors.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else noise * 0.3)
    return model


def _megatron_tp_run(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
        # megatron-core's gather helpers allocate on CUDA.
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)

    mc = _megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        out = {}
        ids = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=torch.Generator())
        pos = torch.arange(SEQ).expand(BATCH, SEQ)
        for sp in SEQUENCE_PARALLEL:
            model = _build(mc, sp, world)
            with torch.no_grad():
                hidden = model.embedding(input_ids=ids, position_ids=pos)
                hidden = model.decoder(
                    hidden_states=hidden,
                    attention_mask=None,
                    rotary_pos_emb=_rope(SEQ, CFG.head_dim, CFG.rope_base),
                )
                if sp:
                    hidden = gather(hidden, 0)
                logits = F.linear(hidden, model.shared_embedding_or_output_weight())
                logits = gather(logits, -1)
            out[sp] = {
                "logits": logits.transpose(0, 1),
                "ids": ids,
                "state": {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)},
            }
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_megatron_core_tp2_logits_equal_ours_after_conversion() -> None:
    from yuanlfa.model import YuanModel

    mc = _megatron()
    torch.manual_seed(5)
    ranks = run_distributed(_megatron_tp_run, 2, timeout=300)
    for sp in SEQUENCE_PARALLEL:
        shards = [r[sp]["state"] for r in ranks]
        ours = mc.megatron_core_to_yuanlfa(shards, CFG)
        model = YuanModel(CFG)
        model.load_state_dict(ours, strict=True)
        with torch.no_grad():
            logits = model(ranks[0][sp]["ids"])
        torch.testing.assert_close(
            logits,
            ranks[0][sp]["logits"],
            rtol=1e-4,
            atol=1e-4,
            msg=lambda m, sp=sp: f"sp={sp}: {m}",
        )
        # Back to megatron-core's names (tp 1) and again to ours: the same tensors.
        back = mc.megatron_core_to_yuanlfa(mc.yuanlfa_to_megatron_core(ours), CFG)
        assert back.keys() == ours.keys()
        assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_conversion_names_unknown_and_missing_tensors() -> None:
    mc = _megatron()
    with pytest.raises(KeyError, match="no yuanlfa counterpart"):
        mc.megatron_core_to_yuanlfa({"decoder.layers.0.foo.weight": torch.zeros(1)}, CFG)
    with pytest.raises(KeyError, match="lacks"):
        mc.megatron_core_to_yuanlfa({"decoder.final_layernorm.weight": torch.zeros(64)}, CFG)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPTModel.forward)")
def test_gpt_model_forward_on_cuda_equals_ours() -> None:
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from yuanlfa.model import YuanModel

    mc = _megatron()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
        config = mc.transformer_config(CFG)
        model = GPTModel(
            config=config,
            transformer_layer_spec=mc.get_lfa_gpt_block_spec(config),
            vocab_size=CFG.vocab_size,
            max_sequence_length=64,
            position_embedding_type="rope",
            rotary_base=int(CFG.rope_base),
            share_embeddings_and_output_weights=True,
        ).cuda()
        ids = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), device="cuda")
        pos = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
        with torch.no_grad():
            theirs = model(ids, pos, attention_mask=None)
        ours = YuanModel(CFG).cuda()
        ours.load_state_dict(mc.megatron_core_to_yuanlfa(model.state_dict(), CFG))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), theirs, rtol=2e-3, atol=2e-3)
    finally:
        parallel_state.destroy_model_parallel()
