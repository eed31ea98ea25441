"""What each filter and core attention costs, declared per component: the planner sums these
declarations (params, flops, activations, comm) instead of assuming every layer is LFA's.

A decoder layer is the fixed part the planner counts itself (two norms, the V/QK/O projections,
the SwiGLU MLP) plus two components chosen by name: the filter (``model.filter``) between the
input norm and the Q/K projection, and the core attention (``model.attention``) between RoPE
and the output projection. Each component declares a :class:`ComponentCost`:

- ``params``: its parameters per layer (the whole model's, before tensor parallelism), of which
  ``sharded_params`` are split over tp (the rest every tp rank holds whole);
- ``forward_flops``: forward FLOPs per token before tp, plus ``context_flops`` times the tokens
  each token attends to (softmax attention's QK^T and AV; a causal mask halves it);
- ``saved_bytes(spec)``: the bytes it keeps for backward for one microbatch on one rank
  (``spec`` is an :class:`~yuanlfa.planner.activations.ActivationSpec`), BESIDES what the layer
  keeps anyway and the planner counts: a filter's output (the Q/K projection's input), and
  without sequence parallelism a filter's input (the normed layer input, which V's projection
  keeps); an attention's output (the output projection's input). Under sequence parallelism a
  filter sees its shard with ``halo_tokens`` rows of the previous shard prepended (or the whole
  gathered sequence), and counts that input when it keeps it. Under selective recompute the
  planner replaces an attention's saved bytes by its checkpointed inputs q, k, v; under full
  recompute a layer keeps its input only;
- tensor-parallel communication: ``halo_tokens`` (under sequence parallelism, rows received
  from the previous shard; None: the whole sequence gathered), ``column_inputs`` and
  ``row_outputs`` (activations [s, b, h] its own column-parallel layers take in and row-parallel
  layers sum, as multiples of [s, b, h]).

``None`` marks a cost nobody declared (a plug-in registered without ``cost=``): the planner
counts it as zero and :func:`unknown_costs` lists it, so reports say so instead of pretending.

The library's own filters and attention are declared here (torch-free). A plug-in declares its
costs where it registers (``register_filter(name, cost=fn)`` with ``fn(model_cfg) ->
ComponentCost``); the command-line tools, which may import the model, hand them to the planner
with :func:`declare_cost` before planning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from yuanlfa.config import ConfigError, ModelConfig
from yuanlfa.planner.spec import ActivationSpec

Kind = Literal["filter", "attention"]
SavedBytes = Callable[[ActivationSpec], int]


@dataclass(frozen=True)
class ComponentCost:
    """One layer's filter or core attention as the planner sees it (see the module doc)."""

    params: int
    sharded_params: int = 0
    forward_flops: float | None = 0.0
    context_flops: float = 0.0
    saved_bytes: SavedBytes | None = None
    halo_tokens: int | None = 0
    column_inputs: float | None = 0.0
    row_outputs: float | None = 0.0

    @property
    def replicated_params(self) -> int:
        return self.params - self.sharded_params

    @property
    def unknown(self) -> tuple[str, ...]:
        """The costs left undeclared (counted as zero)."""
        names = ("forward_flops", "saved_bytes", "column_inputs", "row_outputs")
        return tuple(name for name in names if getattr(self, name) is None)

    def saved(self, spec: ActivationSpec) -> int:
        return self.saved_bytes(spec) if self.saved_bytes is not None else 0


def norm_saved_bytes(spec: ActivationSpec, h: int, tokens: int) -> int:
    """Bytes an RMSNorm over ``tokens`` keeps, its output excluded (the consumer saves that):
    its fp32 input, input * rstd (unfused only), rstd, and, when the activations are narrower
    than fp32, the fp32 copy of its weight."""
    n = spec.norm_bytes
    per_token = (1 if spec.fused_norm else 2) * n * h + n
    return per_token * tokens + (n * h if spec.dtype_bytes < n else 0)


def filter_tokens(spec: ActivationSpec, halo: int | None) -> int:
    """Tokens a filter runs on for one microbatch: all of them, or under sequence parallelism
    its shard plus the previous shard's last ``halo`` rows (the whole sequence for None)."""
    if not spec.sequence_parallel or halo is None:
        return spec.tokens
    return spec.shard_tokens + halo * spec.micro_batch


def _conv_params(c_out: int, c_in: int, kernel: int) -> int:
    return c_out * c_in * kernel + c_out


def _lfa(cfg: ModelConfig, norm: bool) -> ComponentCost:
    """LFA (two causal convolutions of kernel 2, h -> h/2 -> h, residual, RMSNorm) or LFA
    without its norm. The reference keeps conv1's input x and output y, the norm's input
    (its own z + x) and statistics; the Triton kernel keeps y and one rstd per token. Under
    sequence parallelism LFA takes its halo as a state (not a concatenated input)."""
    h, half = cfg.hidden_size, cfg.hidden_size // 2
    params = _conv_params(half, h, 2) + _conv_params(h, half, 2) + (h if norm else 0)
    reset = cfg.lfa_reset_at_doc_start

    def saved_lfa(spec: ActivationSpec) -> int:
        a, n, Tq = spec.dtype_bytes, spec.norm_bytes, spec.shard_tokens
        reference = spec.lfa_impl == "reference"
        total = a * half * Tq  # y = conv1(x), kept for conv2's weight gradient
        total += norm_saved_bytes(spec, h, Tq) if reference else n * Tq
        if reset:
            total += (a if reference else n) * Tq  # the keep mask
        if spec.sequence_parallel:
            total += a * h * Tq  # the local shard x (conv1's input)
            # The 2-token halo and the conv1 state entering this shard (ranks > 0), and the
            # halo's document-start mask.
            total += a * spec.micro_batch * (2 * h + half)
            total += a * spec.micro_batch if reset else 0
        return total

    def saved_no_norm(spec: ActivationSpec) -> int:
        # Plain causal convolutions (ops/causal_conv): conv1's input (the shard with its halo
        # under sequence parallelism), y, and per tap a document mask when resetting.
        a, tokens = spec.dtype_bytes, filter_tokens(spec, 2)
        total = a * half * tokens
        if spec.sequence_parallel:
            total += a * h * tokens
        return total + (2 * a * tokens if reset else 0)

    return ComponentCost(
        params=params,
        forward_flops=2.0 * (2 * h * h),  # two GEMMs with K = 2h and 2(h/2)
        saved_bytes=saved_lfa if norm else saved_no_norm,
        halo_tokens=2,
    )


def _conv(cfg: ModelConfig) -> ComponentCost:
    """One causal convolution h -> h of ``filter_kernel`` taps, residual, RMSNorm: keeps its
    input (the shard with its halo under sequence parallelism), the norm's input and
    statistics, and per tap a document mask when resetting."""
    h, k = cfg.hidden_size, cfg.filter_kernel
    reset = cfg.lfa_reset_at_doc_start

    def saved(spec: ActivationSpec) -> int:
        a, tokens = spec.dtype_bytes, filter_tokens(spec, k - 1)
        total = norm_saved_bytes(spec, h, tokens)
        if spec.sequence_parallel:
            total += a * h * tokens
        return total + ((k - 1) * a * tokens if reset else 0)

    return ComponentCost(
        params=_conv_params(h, h, k) + h,
        forward_flops=2.0 * k * h * h,
        saved_bytes=saved,
        halo_tokens=k - 1,
    )


def _causal(cfg: ModelConfig) -> ComponentCost:
    """Softmax attention through SDPA or flash attention: keeps q, k (after RoPE) and v and the
    fp32 softmax log-sum-exp, never the score matrix."""
    h, heads = cfg.hidden_size, cfg.num_heads

    def saved(spec: ActivationSpec) -> int:
        tp, T = spec.tp, spec.tokens
        return 3 * spec.dtype_bytes * (h // tp) * T + 4 * (heads // tp) * T

    # QK^T and AV: 2 * 2 * s * h per token when every token attends to all s.
    return ComponentCost(params=0, context_flops=4.0 * h, saved_bytes=saved)


BUILTIN: dict[Kind, dict[str, Callable[[ModelConfig], ComponentCost]]] = {
    "filter": {
        "lfa": lambda cfg: _lfa(cfg, norm=True),
        "lfa_no_norm": lambda cfg: _lfa(cfg, norm=False),
        "conv": _conv,
    },
    "attention": {"causal": _causal},
}
_DECLARED: dict[Kind, dict[str, Callable[[ModelConfig], ComponentCost]]] = {
    "filter": {},
    "attention": {},
}


def is_builtin(kind: Kind, name: str) -> bool:
    return name in BUILTIN[kind] or (kind == "filter" and name == "none")


def declare_cost(kind: Kind, name: str, cost: Callable[[ModelConfig], ComponentCost]) -> None:
    """Give the planner a plug-in's costs (``cost(model_cfg) -> ComponentCost``)."""
    if is_builtin(kind, name):
        raise ConfigError(f"{kind} {name!r} is the library's own; its costs are declared here")
    _DECLARED[kind][name] = cost


def component_cost(kind: Kind, cfg: ModelConfig) -> ComponentCost | None:
    """The layer's filter (None for ``none``) or core attention per ``cfg``."""
    name = cfg.filter_name if kind == "filter" else cfg.attention
    if kind == "filter" and name == "none":
        return None
    found = BUILTIN[kind].get(name) or _DECLARED[kind].get(name)
    if found is None:
        raise ConfigError(
            f"model.{'filter' if kind == 'filter' else 'attention'}: {name!r} is a plug-in whose "
            "costs the planner was not given; yuanlfa-info and yuanlfa-plan load model.plugins "
            "and pass them (declare_cost from code)"
        )
    cost = found(cfg)
    if not isinstance(cost, ComponentCost):
        raise ConfigError(
            f"{kind} {name!r}: its cost declaration returned {type(cost).__name__}, not a "
            "yuanlfa.planner.ComponentCost"
        )
    return cost


def unknown_costs(cfg: ModelConfig) -> list[str]:
    """One line per component whose costs are (partly) undeclared, for the reports."""
    lines = []
    for kind in ("filter", "attention"):
        cost = component_cost(kind, cfg)
        if cost is not None and cost.unknown:
            name = cfg.filter_name if kind == "filter" else cfg.attention
            lines.append(
                f"{kind} {name!r} declares no {', '.join(cost.unknown)} (counted as zero); "
                f"declare them with register_{kind}({name!r}, cost=...)"
            )
    return lines
