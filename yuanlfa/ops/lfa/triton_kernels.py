"""Triton kernels of the LFA filter.

Activations are the model's [s, b, c] tensors viewed as rows r = t * b + i (no copy), so the
previous token of row r is row r - b and the next is row r + b. Every convolution of the filter,
forward and backward, is one "shifted GEMM":

    out[r, :] = in[r, :] @ W_cur + keep[r'] * in[r + shift, :] @ W_shift (+ bias) (+ res[r, :])

with shift = -b in the forward pass (the previous token, or the carried state for the first
token) and +b for input gradients (the next token's gradient flows back through W_prev). The
shift happens in the loads: no padded or concatenated copy of the input is ever made. Weights are
read in place from the Conv2d-form parameters through strides.

Weight gradients are reduced over all rows inside one program per output tile, in a fixed order,
so they are deterministic (no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _shifted_gemm_kernel(
    IN,  # [M, K]
    W_CUR,  # element (k, n) at k * stride_wk + n * stride_wn
    W_SHIFT,
    BIAS,  # [N]
    PREV,  # [B, K]: stands for in[r - B] when r < B (forward only)
    KEEP,  # [M]: 0 where the shifted term must be dropped (document starts)
    RES,  # [M, N]
    OUT,  # [M, N]
    M,
    N,
    K,
    B,
    stride_wk,
    stride_wn,
    SHIFT_FORWARD: tl.constexpr,  # True: in[r + B] (input gradients); False: in[r - B]
    HAS_BIAS: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    if SHIFT_FORWARD:
        rs = rm + B
        shift_ok = rs < M
    else:
        rs = rm - B
        shift_ok = (rs >= 0) & row_ok
    if HAS_KEEP:
        # The term that crosses from row rs into row r exists only if the later of the two rows
        # does not start a document.
        if SHIFT_FORWARD:
            keep = tl.load(KEEP + rs, mask=shift_ok, other=0.0).to(ACC)
        else:
            # Row r's own flag also gates the carried state for the first token.
            keep = tl.load(KEEP + rm, mask=row_ok, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(
            IN + rm[:, None] * K + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        a_s = tl.load(
            IN + rs[:, None] * K + kk[None, :], mask=shift_ok[:, None] & k_ok[None, :], other=0.0
        )
        if HAS_PREV:
            first = rm < B
            a_s += tl.load(
                PREV + rm[:, None] * K + kk[None, :], mask=first[:, None] & k_ok[None, :], other=0.0
            )
        w_off = kk[:, None] * stride_wk + rn[None, :] * stride_wn
        w_ok = k_ok[:, None] & (rn[None, :] < N)
        w_c = tl.load(W_CUR + w_off, mask=w_ok, other=0.0)
        w_s = tl.load(W_SHIFT + w_off, mask=w_ok, other=0.0)
        if UPCAST:
            # The interpreter multiplies bf16 bit patterns in tl.dot; compute in ACC there.
            a, a_s, w_c, w_s = a.to(ACC), a_s.to(ACC), w_c.to(ACC), w_s.to(ACC)
        if HAS_KEEP:
            a_s = (a_s.to(ACC) * keep[:, None]).to(a_s.dtype)
        if IEEE:
            acc += tl.dot(a, w_c, input_precision="ieee", out_dtype=ACC)
            acc += tl.dot(a_s, w_s, input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.dot(a, w_c, out_dtype=ACC)
            acc += tl.dot(a_s, w_s, out_dtype=ACC)
    out_ok = row_ok[:, None] & (rn[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(ACC)[None, :]
    if HAS_RES:
        acc += tl.load(RES + rm[:, None] * N + rn[None, :], mask=out_ok, other=0.0).to(ACC)
    tl.store(OUT + rm[:, None] * N + rn[None, :], acc.to(OUT.dtype.element_ty), mask=out_ok)


@triton.jit
def _weight_grad_kernel(
    GRAD,  # [M, N]: gradient of the convolution's output
    IN,  # [M, K]: the convolution's input
    PREV,  # [B, K]
    KEEP,  # [M]
    DW_CUR,  # element (n, k) at n * stride_dn + k * stride_dk
    DW_PREV,
    M,
    N,
    K,
    B,
    stride_dn,
    stride_dk,
    HAS_PREV: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dW_cur = GRAD^T @ IN and dW_prev = GRAD^T @ (keep * IN shifted down by one token)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    acc_c = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    acc_p = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < M
        g_t = tl.load(
            GRAD + rm[None, :] * N + rn[:, None], mask=n_ok[:, None] & row_ok[None, :], other=0.0
        )
        a = tl.load(
            IN + rm[:, None] * K + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        rs = rm - B
        shift_ok = (rs >= 0) & row_ok
        a_s = tl.load(
            IN + rs[:, None] * K + rk[None, :], mask=shift_ok[:, None] & k_ok[None, :], other=0.0
        )
        if HAS_PREV:
            first = rm < B
            a_s += tl.load(
                PREV + rm[:, None] * K + rk[None, :], mask=first[:, None] & k_ok[None, :], other=0.0
            )
        if UPCAST:
            g_t, a, a_s = g_t.to(ACC), a.to(ACC), a_s.to(ACC)
        if HAS_KEEP:
            keep = tl.load(KEEP + rm, mask=row_ok, other=0.0).to(ACC)
            a_s = (a_s.to(ACC) * keep[:, None]).to(a_s.dtype)
        if IEEE:
            acc_c += tl.dot(g_t, a, input_precision="ieee", out_dtype=ACC)
            acc_p += tl.dot(g_t, a_s, input_precision="ieee", out_dtype=ACC)
        else:
            acc_c += tl.dot(g_t, a, out_dtype=ACC)
            acc_p += tl.dot(g_t, a_s, out_dtype=ACC)
    off = rn[:, None] * stride_dn + rk[None, :] * stride_dk
    ok = n_ok[:, None] & k_ok[None, :]
    tl.store(DW_CUR + off, acc_c.to(DW_CUR.dtype.element_ty), mask=ok)
    tl.store(DW_PREV + off, acc_p.to(DW_PREV.dtype.element_ty), mask=ok)


@triton.jit
def _rmsnorm_fwd_kernel(
    R,  # [M, H] (the residual sum z + x)
    W,
    OUT,
    RSTD,  # [M] fp32/fp64
    M,
    H,
    eps,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    ok = (rows[:, None] < M) & (cols[None, :] < H)
    r = tl.load(R + rows[:, None] * H + cols[None, :], mask=ok, other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / H + eps)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(ACC)
    out = r * rstd[:, None] * w[None, :]
    tl.store(OUT + rows[:, None] * H + cols[None, :], out.to(OUT.dtype.element_ty), mask=ok)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _rmsnorm_bwd_kernel(
    R,
    W,
    RSTD,
    DOUT,
    DR,  # [M, H]: gradient of the residual sum (ACC dtype)
    DW_PARTIAL,  # [programs, H]: this program's share of the norm weight's gradient
    M,
    H,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    ok = (rows[:, None] < M) & (cols[None, :] < H)
    r = tl.load(R + rows[:, None] * H + cols[None, :], mask=ok, other=0.0).to(ACC)
    g = tl.load(DOUT + rows[:, None] * H + cols[None, :], mask=ok, other=0.0).to(ACC)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(ACC)
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0).to(ACC)
    r_hat = r * rstd[:, None]
    wg = w[None, :] * g
    mean = tl.sum(r_hat * wg, axis=1) / H
    dr = (wg - r_hat * mean[:, None]) * rstd[:, None]
    tl.store(DR + rows[:, None] * H + cols[None, :], dr.to(DR.dtype.element_ty), mask=ok)
    tl.store(DW_PARTIAL + pid * H + cols, tl.sum(g * r_hat, axis=0), mask=cols < H)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _gemm_blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    if INTERPRET:
        # ~0.5 ms per program instance in the interpreter: few, large programs.
        return _pow2(m, 16, 128), _pow2(n, 16, 256), _pow2(k, 16, 256)
    return 64, 64, 32


def _flags(dtype: torch.dtype) -> dict:
    return {
        "UPCAST": INTERPRET and dtype in (torch.bfloat16, torch.float16),
        # fp32 in, fp32 math: no TF32, so the kernels match torch's default fp32 matmuls.
        "IEEE": dtype == torch.float32 and not INTERPRET,
        "ACC": _acc_dtype(dtype),
    }


def shifted_gemm(
    inp: torch.Tensor,
    w_cur: torch.Tensor,
    w_shift: torch.Tensor,
    batch: int,
    *,
    shift_forward: bool,
    bias: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    res: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out[r] = inp[r] @ w_cur + keep * inp[r -/+ batch] @ w_shift (+ bias) (+ res).

    inp: [M, K] contiguous; w_cur, w_shift: [K, N] views (any strides); prev: [batch, K];
    keep: [M]; res: [M, N]. Returns [M, N].
    """
    m, k = inp.shape
    n = w_cur.shape[1]
    out = torch.empty((m, n), device=inp.device, dtype=out_dtype or inp.dtype)
    bm, bn, bk = _gemm_blocks(m, n, k)
    dummy = inp
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _shifted_gemm_kernel[grid](
        inp,
        w_cur,
        w_shift,
        bias if bias is not None else dummy,
        prev if prev is not None else dummy,
        keep if keep is not None else dummy,
        res if res is not None else dummy,
        out,
        m,
        n,
        k,
        batch,
        w_cur.stride(0),
        w_cur.stride(1),
        SHIFT_FORWARD=shift_forward,
        HAS_BIAS=bias is not None,
        HAS_PREV=prev is not None,
        HAS_KEEP=keep is not None,
        HAS_RES=res is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        **_flags(inp.dtype),
    )
    return out


def weight_grad(
    grad: torch.Tensor,
    inp: torch.Tensor,
    batch: int,
    dweight: torch.Tensor,
    *,
    prev: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill dweight [N, K, 2, 1] (Conv2d form) from grad [M, N] and the conv input [M, K]."""
    m, n = grad.shape
    k = inp.shape[1]
    if INTERPRET:
        bm, bn, bk = _pow2(m, 16, 256), _pow2(n, 16, 128), _pow2(k, 16, 128)
    else:
        bm, bn, bk = 32, 64, 64
    dw_cur, dw_prev = dweight[:, :, 1, 0], dweight[:, :, 0, 0]
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _weight_grad_kernel[grid](
        grad,
        inp,
        prev if prev is not None else inp,
        keep if keep is not None else inp,
        dw_cur,
        dw_prev,
        m,
        n,
        k,
        batch,
        dw_cur.stride(0),
        dw_cur.stride(1),
        HAS_PREV=prev is not None,
        HAS_KEEP=keep is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        **_flags(grad.dtype),
    )
    return dweight


def _norm_blocks(m: int, h: int) -> tuple[int, int]:
    block_h = triton.next_power_of_2(h)
    rows = _pow2(m, 1, max(1, 8192 // block_h)) if INTERPRET else 1
    return rows, block_h


def rmsnorm_forward(
    r: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """r: [M, H] -> (RMSNorm(r) * weight in out_dtype, rstd [M] in the accumulation dtype)."""
    m, h = r.shape
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32
    out = torch.empty((m, h), device=r.device, dtype=out_dtype)
    rstd = torch.empty(m, device=r.device, dtype=acc)
    rows, block_h = _norm_blocks(m, h)
    _rmsnorm_fwd_kernel[(triton.cdiv(m, rows),)](
        r, weight, out, rstd, m, h, eps,
        ACC=_acc_dtype(r.dtype), ROWS=rows, BLOCK_H=block_h,
        num_warps=min(16, max(1, block_h // 256)),
    )  # fmt: skip
    return out, rstd


def rmsnorm_backward(
    r: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dout: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of RMSNorm: (d r [M, H] in the accumulation dtype, d weight [H] fp32/fp64).

    The weight gradient is summed per program into a buffer and reduced by torch afterwards,
    which keeps it deterministic.
    """
    m, h = r.shape
    acc = rstd.dtype
    rows, block_h = _norm_blocks(m, h)
    programs = triton.cdiv(m, rows)
    dr = torch.empty((m, h), device=r.device, dtype=acc)
    partial = torch.empty((programs, h), device=r.device, dtype=acc)
    _rmsnorm_bwd_kernel[(programs,)](
        r, weight, rstd, dout, dr, partial, m, h,
        ACC=_acc_dtype(r.dtype), ROWS=rows, BLOCK_H=block_h,
        num_warps=min(16, max(1, block_h // 256)),
    )  # fmt: skip
    return dr, partial.sum(0)
