"""LM head + cross entropy computed block by block over the sequence, optionally vocab-parallel.

The plain head materializes the logits [s, b, V] in the activation dtype, upcasts them to fp32
for the loss and keeps what the backward needs: at Yuan 2.0's vocabulary (135040) and 8192 tokens
that is several GB per micro-batch, on the stage that already holds the head. The Yuan 2.0 paper
describes computing the loss block by block so that the full fp32 logits never exist; this module
does that, and also handles an output embedding sharded by vocabulary over a tensor-parallel group
(Megatron's vocab-parallel cross entropy, with the same softmax statistics).

Per block of ``block_size`` tokens the forward computes the block's logits, the row's log-sum-exp
over this rank's vocabulary rows and the target logit (on the rank owning the label). Only these
per-token numbers are kept; the backward recomputes each block's logits (one extra GEMM of the
size of the forward one) instead of storing them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 at least; fp64 stays fp64 so that fp64 tests compare exactly.
    return torch.promote_types(dtype, torch.float32)


# torch.mm(out_dtype=) is recent; older torch rounds the product to bf16 first, like F.linear.
_MM_OUT_DTYPE = "out_dtype" in (torch.mm.__doc__ or "")


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b returned in ``acc``. On CUDA, fp16/bf16 GEMMs can write their fp32 accumulator
    directly (no rounding of the logits to 16 bits); elsewhere the product is rounded to the
    input dtype and then upcast, exactly as the plain head does."""
    if a.dtype in _LOW_PRECISION and a.is_cuda and acc == torch.float32 and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(acc)


def _local_targets(
    labels: torch.Tensor, vocab_start: int, v_local: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each label in this rank's shard (clamped so it is always a valid index) and
    whether this rank owns it. Masks instead of boolean indexing: no host-device sync."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), owned


class _BlockwiseLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, vocab_start, block_size):
        s, b, h = hidden.shape
        n, v_local = s * b, weight.shape[0]
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        acc = _acc_dtype(mm_dtype)
        x = hidden.reshape(n, h)
        w = weight.to(mm_dtype)
        col, owned = _local_targets(labels.reshape(n), vocab_start, v_local)

        lse = torch.empty(n, dtype=acc, device=hidden.device)  # this rank's log-sum-exp
        target = torch.empty(n, dtype=acc, device=hidden.device)
        for start in range(0, n, block_size):
            rows = slice(start, min(start + block_size, n))
            logits = _mm_acc(x[rows].to(mm_dtype), w.t(), acc)  # [blk, V_local]
            picked = logits.gather(1, col[rows, None]).squeeze(1)
            target[rows] = torch.where(owned[rows], picked, 0.0)
            m = logits.amax(dim=1)
            # In place: the block's logits are not needed again in the forward.
            lse[rows] = m + logits.sub_(m[:, None]).exp_().sum(dim=1).log_()
            del logits

        if group is not None:
            # Combining the ranks' log-sum-exps once for all tokens costs two small collectives
            # per call instead of two per block, and gives the same statistics as reducing each
            # block's max and sum of exponentials.
            m = lse.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            stats = torch.stack([(lse - m).exp_(), target])  # [2, n]
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            lse = m + stats[0].log()
            target = stats[1]

        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.vocab_start = vocab_start
        ctx.block_size = block_size
        return (lse - target).view(s, b)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        s, b, h = hidden.shape
        n, v_local = s * b, weight.shape[0]
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        acc = lse.dtype
        x = hidden.reshape(n, h)
        w = weight.to(mm_dtype)
        col, owned = _local_targets(labels.reshape(n), ctx.vocab_start, v_local)
        dloss = grad_loss.reshape(n).to(acc)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        grad_x = torch.empty((n, h), dtype=mm_dtype, device=x.device) if want_x else None
        # fp32 accumulator over blocks: summing many bf16 partial products in bf16 loses bits.
        grad_w = torch.zeros((v_local, h), dtype=acc, device=x.device) if want_w else None
        for start in range(0, n, ctx.block_size):
            rows = slice(start, min(start + ctx.block_size, n))
            xb = x[rows].to(mm_dtype)
            logits = _mm_acc(xb, w.t(), acc)  # [blk, V_local]
            # softmax - onehot(label), times the upstream gradient, all in the logits' buffer.
            g = logits.sub_(lse[rows, None]).exp_()
            g.scatter_add_(1, col[rows, None], -owned[rows, None].to(acc))
            g.mul_(dloss[rows, None])
            g = g.to(mm_dtype)
            if want_x:
                grad_x[rows] = g @ w
            if want_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.t(), xb)
                else:
                    grad_w.add_(_mm_acc(g.t(), xb, acc))
            del logits, g

        grad_hidden = grad_x.view(s, b, h).to(hidden.dtype) if want_x else None
        grad_weight = grad_w.to(weight.dtype) if want_w else None
        return grad_hidden, grad_weight, None, None, None, None


def _check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group,
    vocab_start: int,
    block_size: int,
) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [s, b, h], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V_local, h], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"hidden size mismatch: hidden has {hidden.shape[2]} features, weight "
            f"{tuple(weight.shape)} has {weight.shape[1]}"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight holds no vocabulary rows")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"labels must be [s, b] = {tuple(hidden.shape[:2])} to match hidden "
            f"{tuple(hidden.shape)}, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if group is None:
        if vocab_start != 0:
            raise ValueError(
                f"vocab_start={vocab_start} without a group: an unsharded weight starts at id 0"
            )
        # Only here is the global vocabulary known; a sharded run would silently give such a
        # token a target logit of 0.
        if labels.numel() and labels.device.type == "cpu":
            lo, hi = torch.aminmax(labels)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= weight.shape[0]:
                raise ValueError(
                    f"labels must lie in [0, {weight.shape[0]}), the vocabulary of weight; "
                    f"found ids in [{lo}, {hi}] (mask padding by weighting the returned "
                    "per-token losses, not with ignore ids)"
                )
        elif labels.numel():
            # On an accelerator, reading the min/max back would stall the host every
            # micro-batch: the device checks instead and fails the next synchronizing call.
            in_range = ((labels >= 0) & (labels < weight.shape[0])).all()
            torch._assert_async(
                in_range, f"labels must lie in [0, {weight.shape[0]}), the vocabulary of weight"
            )


def blockwise_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    block_size: int = 1024,
) -> torch.Tensor:
    """Per-token cross entropy of ``hidden @ weight.T`` without materializing the full logits.

    Args:
        hidden: [s, b, h] final-normed hidden states, the full sequence on every rank of
            ``group``.
        weight: [V_local, h] this rank's rows of the (tied) output embedding, global ids
            ``[vocab_start, vocab_start + V_local)``; the whole matrix when ``group`` is None.
        labels: [s, b] global token ids, each in ``[0, V)``.
        group: the tensor-parallel group the vocabulary is sharded over, or None.
        vocab_start: first global id held by this rank.
        block_size: tokens (rows of the flattened [s*b] sequence) per block; the largest
            temporary is one block's fp32 logits, [block_size, V_local].

    Returns:
        [s, b] per-token losses in fp32 (fp64 for fp64 inputs), identical on every rank.

    Logits are formed in fp32 from each block (on CUDA straight from the bf16 GEMM's fp32
    accumulator). Saved for backward: hidden, weight, labels and the per-token log-sum-exp, never
    the logits; the backward recomputes each block. The weight gradient is accumulated over blocks
    in fp32 and returned in weight's dtype.

    Gradient of ``hidden`` under a sharded vocabulary: each rank returns only the partial sum
    over its own vocabulary rows, and this function does NOT reduce it. The caller must feed
    ``hidden`` through an op whose backward sums over ``group``: Megatron's copy-to-tensor-
    parallel region (identity forward, all-reduce backward), or, with sequence parallelism, the
    sequence all-gather (whose backward is a reduce-scatter). Forward needs two small
    all-reduces over ``group`` per call; backward needs none.

    Labels outside the vocabulary raise ValueError when unsharded (on an accelerator a
    device-side assertion, which fails the next synchronizing call instead of stalling the host
    every micro-batch); under a sharded vocabulary they cannot be checked cheaply and give a
    target logit of 0.
    """
    _check(hidden, weight, labels, group, vocab_start, block_size)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast does not reach into the backward's recomputation; cast once here (as F.linear
        # would) so forward and backward form the logits in the same precision.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _BlockwiseLMLoss.apply(
                hidden.to(dtype), weight.to(dtype), labels.long(), group, vocab_start, block_size
            )
    return _BlockwiseLMLoss.apply(hidden, weight, labels.long(), group, vocab_start, block_size)


def plain_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The straightforward head: full logits [s, b, V], upcast, cross entropy -> [s, b] losses.

    The reference for :func:`blockwise_lm_loss` (unsharded) and the baseline of its memory
    benchmark. Upcasts to fp32 (fp64 stays fp64).
    """
    s, b = labels.shape
    logits = F.linear(hidden, weight)  # [s, b, V]
    logits = logits.to(_acc_dtype(logits.dtype)).reshape(s * b, -1)
    return F.cross_entropy(logits, labels.reshape(-1), reduction="none").view(s, b)
