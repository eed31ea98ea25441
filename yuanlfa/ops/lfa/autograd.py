"""The autograd wrapper around the Triton LFA kernels.

Saved for backward: the input x (autograd keeps it alive for the projections anyway), conv1's
output y (h/2 per token, cheaper to keep than to recompute with a GEMM) and one rstd per token.
The pre-norm sum r = conv2(y) + x is not saved: it is recomputed with one shifted GEMM, which
saves h values per token.

The GEMMs read their weights K-major: forward and backward each lay out both taps of both
convolutions once (``triton_kernels.k_major``, 1.5 h^2 values per layer, small next to the
GEMMs' tokens x h^2 work), so no GEMM reads a strided view of the Conv2d-form parameter.
"""

from __future__ import annotations

import torch

from yuanlfa.ops.lfa import triton_kernels as tk


class LFAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, g, eps, prev_x, prev_y, keep):
        s, b, h = x.shape
        m = s * b
        x2 = x.reshape(m, h)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        w1c, w1p = tk.k_major(w1, transpose=False)
        w2c, w2p = tk.k_major(w2, transpose=False)
        y = tk.shifted_gemm(x2, w1c, w1p, b, shift_forward=False, bias=b1, prev=prev_x, keep=keep)
        r = tk.shifted_gemm(
            y, w2c, w2p, b, shift_forward=False, bias=b2, prev=prev_y, keep=keep, res=x2,
            out_dtype=acc,
        )  # fmt: skip
        out, rstd = tk.rmsnorm_forward(r, g, eps, x.dtype)
        ctx.save_for_backward(x2, y, rstd, w1, b1, w2, b2, g, prev_x, prev_y, keep)
        ctx.shape = (s, b, h)
        return out.view(s, b, h), y.view(s, b, h // 2)

    @staticmethod
    def backward(ctx, dout, dy_out):
        x2, y, rstd, w1, b1, w2, b2, g, prev_x, prev_y, keep = ctx.saved_tensors
        s, b, h = ctx.shape
        m = s * b
        acc = rstd.dtype
        w2c, w2p = tk.k_major(w2, transpose=False)
        r = tk.shifted_gemm(
            y, w2c, w2p, b, shift_forward=False, bias=b2, prev=prev_y, keep=keep, res=x2,
            out_dtype=acc,
        )  # fmt: skip
        del w2c, w2p
        w1t, w1tp = tk.k_major(w1, transpose=True)  # [in, out]: g @ W reads W along "out"
        w2t, w2tp = tk.k_major(w2, transpose=True)
        dr, dg = tk.rmsnorm_backward(r, g, rstd, dout.reshape(m, h).contiguous())
        dr_c = dr.to(x2.dtype)  # GEMM operands in the activation dtype, accumulation in acc
        dy_res = dy_out.reshape(m, h // 2).contiguous() if dy_out is not None else None
        dy = tk.shifted_gemm(dr_c, w2t, w2tp, b, shift_forward=True, keep=keep, res=dy_res)
        dx = tk.shifted_gemm(
            dy, w1t, w1tp, b, shift_forward=True, keep=keep, res=dr, out_dtype=x2.dtype
        )
        need = ctx.needs_input_grad
        dw1 = dw2 = db1 = db2 = dprev_x = dprev_y = None
        if need[3]:
            dw2 = tk.weight_grad(dr_c, y, b, torch.empty_like(w2), prev=prev_y, keep=keep)
        if need[4]:
            db2 = dr.sum(0).to(b2.dtype)
        if need[1]:
            dw1 = tk.weight_grad(dy, x2, b, torch.empty_like(w1), prev=prev_x, keep=keep)
        if need[2]:
            db1 = dy.to(acc).sum(0).to(b1.dtype)
        first_keep = keep[:b, None].to(acc) if keep is not None else 1.0
        if prev_y is not None and need[8]:
            dprev_y = ((dr[:b] @ w2[:, :, 0, 0].to(acc)) * first_keep).to(prev_y.dtype)
        if prev_x is not None and need[7]:
            dprev_x = ((dy[:b].to(acc) @ w1[:, :, 0, 0].to(acc)) * first_keep).to(prev_x.dtype)
        return (dx.view(s, b, h), dw1, db1, dw2, db2, dg.to(g.dtype), None, dprev_x, dprev_y, None)


def lfa_triton(
    x: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    prev_x: torch.Tensor | None,
    prev_y: torch.Tensor | None,
    doc_start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton filter: returns (out [s, b, h], y [s, b, h/2]). Inputs as in the reference."""
    if torch.is_autocast_enabled(x.device.type):
        # Behave like F.linear under autocast: compute in the autocast dtype (gradients flow back
        # to the fp32 parameters through the casts), with autocast off inside the kernels.
        dtype = torch.get_autocast_dtype(x.device.type)
        cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
        with torch.autocast(x.device.type, enabled=False):
            return lfa_triton(
                cast(x), cast(conv1_weight), cast(conv1_bias), cast(conv2_weight),
                cast(conv2_bias), cast(norm_weight), eps, cast(prev_x), cast(prev_y), doc_start,
            )  # fmt: skip
    tensors = (conv1_weight, conv1_bias, conv2_weight, conv2_bias, norm_weight, prev_x, prev_y)
    if any(t is not None and t.dtype != x.dtype for t in tensors):
        # Mixed dtypes (e.g. bf16 activations, fp32 parameters) never reach the kernels: a GPU
        # tl.dot needs equal operand dtypes (the interpreter would silently upcast). Compute in
        # the activations' dtype, like autocast; gradients flow back through the casts.
        cast = lambda t: t.to(x.dtype) if t is not None else None  # noqa: E731
        return lfa_triton(
            x, *(cast(t) for t in tensors[:5]), eps, *(cast(t) for t in tensors[5:]), doc_start
        )
    keep = None
    if doc_start is not None:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        keep = (~doc_start).reshape(-1).to(acc)
    contiguous = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    return LFAFunction.apply(
        x.contiguous(),
        conv1_weight,
        conv1_bias.contiguous(),
        conv2_weight,
        conv2_bias.contiguous(),
        norm_weight.contiguous(),
        eps,
        contiguous(prev_x),
        contiguous(prev_y),
        keep,
    )
