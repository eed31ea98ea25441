"""Triton kernels of the LFA filter.

Activations are the model's [s, b, c] tensors viewed as rows r = t * b + i (no copy), so the
previous token of row r is row r - b and the next is row r + b. Every convolution of the filter,
forward and backward, is one "shifted GEMM":

    out[r, :] = in[r, :] @ W_cur + keep[r'] * in[r + shift, :] @ W_shift (+ bias) (+ res[r, :])

with shift = -b in the forward pass (the previous token, or the carried state for the first
token) and +b for input gradients (the next token's gradient flows back through W_prev). The
shift happens in the loads: no padded or concatenated copy of the input is ever made. Weights come
"K-major" ([N, K], contiguous along the reduction dimension): the autograd wrapper lays out both
taps once per forward and once per backward, so both operands of every GEMM are read with vector
loads inside the cp.async/TMA pipeline (a strided view of the Conv2d-form weight was read with
scalar loads outside it).

Row offsets are computed in int64: tokens x hidden reaches 2^31 (e.g. 262144 tokens at h = 8192).
Tiles: small fixed ones under the interpreter; on a GPU, triton.autotune over a few
configurations that fit the shared memory of the architecture being compiled for.

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
    W_CUR,  # [N, K], contiguous along K
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
    # int64 row offsets (tokens x hidden overflows int32); masked rows never dereference.
    in_row = rm.to(tl.int64)[:, None] * K
    in_row_s = rs.to(tl.int64)[:, None] * K
    w_col = rn.to(tl.int64)[None, :] * K
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
        a = tl.load(IN + in_row + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_s = tl.load(
            IN + in_row_s + kk[None, :], mask=shift_ok[:, None] & k_ok[None, :], other=0.0
        )
        if HAS_PREV:
            first = rm < B
            a_s += tl.load(
                PREV + in_row + kk[None, :], mask=first[:, None] & k_ok[None, :], other=0.0
            )
        w_off = w_col + kk[:, None]  # [BLOCK_K, BLOCK_N] tile of the K-major weight
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
    out_off = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(ACC)[None, :]
    if HAS_RES:
        acc += tl.load(RES + out_off, mask=out_ok, other=0.0).to(ACC)
    tl.store(OUT + out_off, acc.to(OUT.dtype.element_ty), mask=out_ok)


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
        rm64 = rm.to(tl.int64)  # tokens x hidden overflows int32
        g_t = tl.load(
            GRAD + rm64[None, :] * N + rn[:, None], mask=n_ok[:, None] & row_ok[None, :], other=0.0
        )
        a = tl.load(
            IN + rm64[:, None] * K + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        rs = rm - B
        shift_ok = (rs >= 0) & row_ok
        a_s = tl.load(
            IN + (rm64 - B)[:, None] * K + rk[None, :],
            mask=shift_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if HAS_PREV:
            first = rm < B
            a_s += tl.load(
                PREV + rm64[:, None] * K + rk[None, :],
                mask=first[:, None] & k_ok[None, :],
                other=0.0,
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
    off = rows.to(tl.int64)[:, None] * H + cols[None, :]
    r = tl.load(R + off, mask=ok, other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / H + eps)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(ACC)
    out = r * rstd[:, None] * w[None, :]
    tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=ok)
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
    rows_per_program,  # a multiple of ROWS
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_H,), dtype=ACC)
    first_row = pid * rows_per_program
    # Each program walks its own block of rows in a fixed order: the weight gradient needs a
    # buffer of [programs, H] (bounded), not [M, H], and stays deterministic.
    for r0 in range(0, rows_per_program, ROWS):
        rows = first_row + r0 + tl.arange(0, ROWS)
        ok = (rows[:, None] < M) & (cols[None, :] < H)
        off = rows.to(tl.int64)[:, None] * H + cols[None, :]
        r = tl.load(R + off, mask=ok, other=0.0).to(ACC)
        g = tl.load(DOUT + off, mask=ok, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0).to(ACC)
        r_hat = r * rstd[:, None]
        wg = w[None, :] * g
        mean = tl.sum(r_hat * wg, axis=1) / H
        dr = (wg - r_hat * mean[:, None]) * rstd[:, None]
        tl.store(DR + off, dr.to(DR.dtype.element_ty), mask=ok)
        dw += tl.sum(g * r_hat, axis=0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * H + cols, dw, mask=cols < H)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _flags(dtype: torch.dtype) -> dict:
    return {
        "UPCAST": INTERPRET and dtype in (torch.bfloat16, torch.float16),
        # fp32 in, fp32 math: no TF32, so the kernels match torch's default fp32 matmuls.
        "IEEE": dtype == torch.float32 and not INTERPRET,
        "ACC": _acc_dtype(dtype),
    }


# ---- GPU tile configurations ------------------------------------------------------------------
# Shared memory per block that a kernel may use (opt-in maximum), by compute capability major.minor.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 120: 99 * 1024}
_SMEM_DEFAULT = 99 * 1024


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages
    )


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). 16-bit operands: tensor-core tiles, pruned to what
# fits the target's shared memory (the 3-stage 128 x 128 x 64 tile needs ~210 KB: sm_90 only);
# the 64 x 64 one also serves decoding (M <= 64). fp32 (IEEE, FMA) and fp64 keep one moderate tile.
_GEMM_CONFIGS_16 = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 32, 8, 4),
    _cfg(128, 64, 64, 4, 3),
    _cfg(64, 64, 64, 4, 3),
]
_GEMM_CONFIGS_32 = [_cfg(64, 64, 32, 4, 2)]
_WGRAD_CONFIGS_16 = [_cfg(64, 128, 64, 8, 3), _cfg(32, 64, 64, 4, 3)]
_WGRAD_CONFIGS_32 = [_cfg(32, 64, 64, 4, 2)]


def _target_arch() -> int:
    """Compute capability of the device being compiled for (the active triton driver's target)."""
    target = triton.runtime.driver.active.get_current_target()
    return int(target.arch) if isinstance(target.arch, int) else 0


def _smem_bytes(cfg: triton.Config, elem: int, tiles: tuple[int, int]) -> int:
    """Shared memory of the pipelined operand tiles: ``tiles`` [BLOCK_M x BLOCK_K] and
    [BLOCK_K x BLOCK_N] tiles per stage, times the stages (an estimate; the compile test reads
    the real figure)."""
    kw = cfg.kwargs
    a = tiles[0] * kw["BLOCK_M"] * kw["BLOCK_K"]
    b = tiles[1] * kw["BLOCK_K"] * kw["BLOCK_N"]
    return cfg.num_stages * (a + b) * elem


def _pool(configs: list, low: list, elem: int) -> list:
    """The configs meant for this operand width (16-bit tensor-core tiles, or the fp32/64 one)."""
    return [c for c in configs if any(c is x for x in low) == (elem <= 2)]


def _prune_gemm(configs, named_args, **kwargs):
    elem = named_args["IN"].element_size()
    pool = _pool(configs, _GEMM_CONFIGS_16, elem)
    limit = SMEM_LIMIT.get(_target_arch(), _SMEM_DEFAULT)
    # per stage: the input and the shifted input [M x K], both weight taps [K x N]
    keep = [c for c in pool if _smem_bytes(c, elem, (2, 2)) <= limit]
    small = [c for c in keep if c.kwargs["BLOCK_M"] == 64]
    # Decoding (a few rows): a 128-row tile would mostly compute padding.
    return (small if named_args["M"] <= 64 and small else keep) or pool[-1:]


def _prune_wgrad(configs, named_args, **kwargs):
    elem = named_args["GRAD"].element_size()
    pool = _pool(configs, _WGRAD_CONFIGS_16, elem)
    limit = SMEM_LIMIT.get(_target_arch(), _SMEM_DEFAULT)

    def smem(c: triton.Config) -> int:
        # per stage: grad^T [N x M], the input and the shifted input [M x K]
        kw = c.kwargs
        return c.num_stages * elem * kw["BLOCK_M"] * (kw["BLOCK_N"] + 2 * kw["BLOCK_K"])

    return [c for c in pool if smem(c) <= limit] or pool[-1:]


# A timed choice differs between runs and between ranks, and a tile changes the order of the
# sums: ranks that replicate the filter (tp without sequence parallelism) would drift apart and a
# rerun would not repeat a loss curve. So the first config that fits the target is used (the
# lists are best first), and timing picks among all of them only with YUANLFA_TRITON_AUTOTUNE=1
# (single-process benchmarks). Triton benchmarks only when more than one config is left.
AUTOTUNE = os.environ.get("YUANLFA_TRITON_AUTOTUNE") == "1"


def _first_unless_autotune(prune):
    def chosen(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs)
        return kept if AUTOTUNE else kept[:1]

    return chosen


if INTERPRET:
    _shifted_gemm = _shifted_gemm_kernel
    _weight_grad = _weight_grad_kernel
else:
    # The key holds the shape; the autotuner adds the tensors' dtypes. Every config is safe to
    # benchmark: the kernels only write their outputs.
    _shifted_gemm = triton.autotune(
        configs=_GEMM_CONFIGS_16 + _GEMM_CONFIGS_32,
        key=["M", "N", "K", "B"],
        prune_configs_by={"early_config_prune": _first_unless_autotune(_prune_gemm)},
    )(_shifted_gemm_kernel)
    _weight_grad = triton.autotune(
        configs=_WGRAD_CONFIGS_16 + _WGRAD_CONFIGS_32,
        key=["M", "N", "K", "B"],
        prune_configs_by={"early_config_prune": _first_unless_autotune(_prune_wgrad)},
    )(_weight_grad_kernel)


def _interpreter_gemm_blocks(m: int, n: int, k: int) -> dict:
    # ~0.5 ms per program instance in the interpreter: few, large programs.
    return {
        "BLOCK_M": _pow2(m, 16, 128),
        "BLOCK_N": _pow2(n, 16, 256),
        "BLOCK_K": _pow2(k, 16, 256),
    }


def k_major(weight: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(current, previous) taps of a Conv2d-form weight [out, in, 2, 1] as contiguous [N, K].

    transpose=False: [out, in] (the forward GEMMs, x @ W^T); True: [in, out] (input gradients,
    g @ W). One copy of the weight per call, made once per forward or backward.
    """
    order = (2, 1, 0) if transpose else (2, 0, 1)
    both = weight[..., 0].permute(*order).contiguous()  # [2, N, K]
    return both[1], both[0]


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
    """out[r] = inp[r] @ w_cur^T + keep * inp[r -/+ batch] @ w_shift^T (+ bias) (+ res).

    inp: [M, K] contiguous; w_cur, w_shift: [N, K] contiguous (K-major, see ``k_major``);
    prev: [batch, K]; keep: [M]; res: [M, N]. Returns [M, N].
    """
    m, k = inp.shape
    n = w_cur.shape[0]
    for name, w in (("w_cur", w_cur), ("w_shift", w_shift)):
        if tuple(w.shape) != (n, k) or not w.is_contiguous() or w.dtype != inp.dtype:
            raise ValueError(
                f"shifted_gemm {name} must be a contiguous [{n}, {k}] {inp.dtype} tensor, got "
                f"{w.dtype} {tuple(w.shape)} strides {w.stride()}"
            )
    out = torch.empty((m, n), device=inp.device, dtype=out_dtype or inp.dtype)
    dummy = inp
    args = (
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
    )
    flags = dict(
        SHIFT_FORWARD=shift_forward,
        HAS_BIAS=bias is not None,
        HAS_PREV=prev is not None,
        HAS_KEEP=keep is not None,
        HAS_RES=res is not None,
        **_flags(inp.dtype),
    )
    if INTERPRET:
        blocks = _interpreter_gemm_blocks(m, n, k)
        grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n, blocks["BLOCK_N"]))
        _shifted_gemm[grid](*args, **flags, **blocks)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _shifted_gemm[grid](*args, **flags)
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
    if inp.dtype != grad.dtype:
        raise ValueError(f"weight_grad operands differ in dtype: {grad.dtype} and {inp.dtype}")
    dw_cur, dw_prev = dweight[:, :, 1, 0], dweight[:, :, 0, 0]
    args = (
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
    )
    flags = dict(HAS_PREV=prev is not None, HAS_KEEP=keep is not None, **_flags(grad.dtype))
    if INTERPRET:
        bm, bn, bk = _pow2(m, 16, 256), _pow2(n, 16, 128), _pow2(k, 16, 128)
        grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
        _weight_grad[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
        _weight_grad[grid](*args, **flags)
    return dweight


def _norm_blocks(m: int, h: int) -> tuple[int, int]:
    block_h = triton.next_power_of_2(h)
    rows = _pow2(m, 1, max(1, 8192 // block_h)) if INTERPRET else 1
    return rows, block_h


# The RMSNorm backward's weight-gradient buffer has at most this many rows ([programs, H]).
MAX_NORM_BWD_PROGRAMS = 1024


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

    Each program sums the weight gradient over its block of rows into one row of a
    [programs <= MAX_NORM_BWD_PROGRAMS, H] buffer, which torch reduces afterwards: deterministic
    (the split depends only on M), and bounded (a [M, H] buffer was 128 MB per layer at 2B).
    """
    m, h = r.shape
    acc = rstd.dtype
    rows, block_h = _norm_blocks(m, h)
    per_program = triton.cdiv(triton.cdiv(m, MAX_NORM_BWD_PROGRAMS), rows) * rows
    programs = triton.cdiv(m, per_program)
    dr = torch.empty((m, h), device=r.device, dtype=acc)
    partial = torch.empty((programs, h), device=r.device, dtype=acc)
    _rmsnorm_bwd_kernel[(programs,)](
        r, weight, rstd, dout, dr, partial, m, h, per_program,
        ACC=_acc_dtype(r.dtype), ROWS=rows, BLOCK_H=block_h,
        num_warps=min(16, max(1, block_h // 256)),
    )  # fmt: skip
    return dr, partial.sum(0)
