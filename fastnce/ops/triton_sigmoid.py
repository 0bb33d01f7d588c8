"""The `triton` backend of the sigmoid primitive (fastnce.ops.similarity_sigmoid_nll, SigLIP).

    out[i] = Σ_j −log σ(z[i, j]·S[i, j]),   S = scale·x[i]·y[j] + bias,
    z = +1 on the positive pairs j == i + offset, −1 elsewhere

Unlike a logsumexp the terms are independent, so a row needs no running maximum: the forward
adds softplus(−z·S) tile by tile. The backward's
    G[i, j] = g[i] · ∂/∂S (−log σ(z·S)) = −g[i]·z·σ(−z·S)
is recomputed from S with the two plans of the LSE backend's non-symmetric backward, chosen the
same way (timed per shape class on a GPU, FASTNCE_TRITON_BACKWARD fixes it, deterministic mode
takes two-pass; see _PLANS in triton_lse.py):
* "two-pass": dq = G @ k (`_sig_bwd_kernel`, one program per BM rows × BDV features), then
  dk = Gᵀ @ q (the same kernel on the transposed problem, g indexed by column, offset negated),
  which also writes the row sums of Gᵀ for the bias gradient. No atomics, bit-for-bit
  reproducible; five products of 2·M·N·D per step with the forward's.
* "atomic": `_sig_bwd_atomic_kernel`, one program per key block, one recompute of S giving
  dk (in registers) and dq (fp32 atomics): four products per step.
One exponential and one logarithm per entry in the forward, one exponential and one reciprocal
per entry per recompute.

Tiles, pipelining (ONE_K), configs, autotuning and the float16 scaling of G are those of
fastnce/ops/triton_lse.py, whose jit helpers this module uses.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .triton_lse import SUPPORTED_DTYPES, triton, tl, unavailable_reason  # noqa: F401  (the launcher contract)

if triton is not None:
    from .triton_lse import (
        _ATOMIC_CFGS, AUTOTUNE, _add_tile, _cfgs, _check, _default_meta, _dot_args, _dummy, _features,
        _g_operand, _ginv, _held, _key, _one_k, _one_side, _plan, _s_step, _scalar, _store_grad, _tune_on_slice,
        _tuned, deterministic,
    )

    @triton.jit
    def _signed(b_raw, b_scale, b_bias, o_i, o_j, offset, POSITIVE: tl.constexpr):
        """(T, b_pos): T = z·S with z = +1 on the positive pairs (j == i + offset), −1 elsewhere."""
        b_s = b_raw * b_scale + b_bias
        b_pos = (o_j[None, :] == o_i[:, None] + offset) & POSITIVE
        return tl.where(b_pos, b_s, -b_s), b_pos

    @triton.jit
    def _softplus(x):
        """log(1 + eˣ) to fp32's precision: max(x, 0) + log1p(e^−|x|), log1p by its series where
        e^−|x| < 0.1 (there log(1 + e) would lose the low bits of e: a negative's term at S = −10
        is 4.5e-5, and 1 + 4.5e-5 keeps 3 of its digits)."""
        b_e = tl.exp(-tl.abs(x))
        b_series = b_e * (1.0 - b_e * (0.5 - b_e * (1.0 / 3.0 - b_e * (0.25 - b_e * (0.2 - b_e * (1.0 / 6.0))))))
        return tl.maximum(x, 0.0) + tl.where(b_e < 0.1, b_series, tl.log(1.0 + b_e))

    @triton.jit
    def _sigmoid(x):
        """σ(x) without overflow: one exponential of −|x|."""
        b_e = tl.exp(-tl.abs(x))
        b_r = 1.0 / (1.0 + b_e)
        return tl.where(x >= 0, b_r, b_e * b_r)

    @triton.jit
    def _sig_g_tile(b_raw, b_scale, b_bias, o_i, o_j, m_i, m_j, offset, b_gi, b_gj, POSITIVE: tl.constexpr):
        """G = −g·z·σ(−z·S) of a (rows i, columns j) tile, 0 outside the problem; g per row
        (b_gi) or per column (b_gj): the other one is a vector of ones."""
        b_t, b_pos = _signed(b_raw, b_scale, b_bias, o_i, o_j, offset, POSITIVE)
        b_G = _sigmoid(-b_t)
        b_G = tl.where(b_pos, -b_G, b_G) * b_gi[:, None] * b_gj[None, :]
        return tl.where(m_i[:, None] & m_j[None, :], b_G, 0.0)

    @triton.jit
    def _sig_fwd_kernel(p_x, p_y, p_scale, p_bias, p_out,
                        M, N, D, offset, KEY_M, KEY_N,
                        HAS_BIAS: tl.constexpr, POSITIVE: tl.constexpr,
                        DOT_F32: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ONE_K: tl.constexpr):
        """out[i] = Σ_j softplus(−z·S[i, j]); x (M, D), y (N, D), out (M,) fp32."""
        i_m = tl.program_id(0)
        o_i = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
        m_i = o_i < M
        b_scale = tl.load(p_scale)
        b_bias = _scalar(p_bias, HAS_BIAS, 0.0)
        b_acc = tl.zeros([BM], dtype=tl.float32)
        b_xi = _held(p_x, o_i, m_i, D, BK, DOT_F32, ONE_K)
        for j0 in range(0, N, BN):
            o_j = (j0 + tl.arange(0, BN)).to(tl.int64)
            m_j = o_j < N
            b_raw, _ = _s_step(b_xi, p_x, p_y, o_i, o_j, m_i, m_j, D, BM, BN, BK, DOT_F32, PREC, ONE_K, True)
            b_t, _ = _signed(b_raw, b_scale, b_bias, o_i, o_j, offset, POSITIVE)
            b_v = m_i[:, None] & m_j[None, :]
            b_acc += tl.sum(tl.where(b_v, _softplus(-b_t), 0.0), 1)
        tl.store(p_out + o_i, b_acc, mask=m_i)

    @triton.jit
    def _sig_bwd_kernel(p_x, p_y, p_scale, p_bias, p_g, p_ginv, p_dx, p_db,
                        M, N, D, offset, KEY_M, KEY_N,
                        HAS_BIAS: tl.constexpr, POSITIVE: tl.constexpr, G_ON_ROW: tl.constexpr,
                        WRITE_DB: tl.constexpr, G_NORM: tl.constexpr,
                        DOT_F32: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
                        ONE_K: tl.constexpr):
        """dx = G @ y (M, D) fp32 with G[i, j] = −g·z·σ(−z·S[i, j]), g = g[i] (G_ON_ROW) or g[j];
        db[i] = Σ_j G[i, j] when WRITE_DB (written by the feature block 0)."""
        i_m = tl.program_id(0)
        i_d = tl.program_id(1)
        o_i = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
        m_i = o_i < M
        o_v = i_d * BDV + tl.arange(0, BDV)
        m_v = o_v < D
        b_scale = tl.load(p_scale)
        b_bias = _scalar(p_bias, HAS_BIAS, 0.0)
        b_ginv = _scalar(p_ginv, G_NORM, 1.0)
        b_gi = tl.full([BM], 1.0, dtype=tl.float32)
        if G_ON_ROW:
            b_gi = tl.load(p_g + o_i, mask=m_i, other=0.0)
        b_acc = tl.zeros([BM, BDV], dtype=tl.float32)
        b_db = tl.zeros([BM], dtype=tl.float32)
        b_xi = _held(p_x, o_i, m_i, D, BK, DOT_F32, ONE_K)
        for j0 in range(0, N, BN):
            o_j = (j0 + tl.arange(0, BN)).to(tl.int64)
            m_j = o_j < N
            b_raw, b_yt = _s_step(b_xi, p_x, p_y, o_i, o_j, m_i, m_j, D, BM, BN, BK, DOT_F32, PREC, ONE_K, True)
            b_gj = tl.full([BN], 1.0, dtype=tl.float32)
            if not G_ON_ROW:
                b_gj = tl.load(p_g + o_j, mask=m_j, other=0.0)
            b_G = _sig_g_tile(b_raw, b_scale, b_bias, o_i, o_j, m_i, m_j, offset, b_gi, b_gj, POSITIVE)
            if WRITE_DB:
                b_db += tl.sum(b_G, 1)
            b_yv = _features(p_y, o_j, m_j, o_v, m_v, D, b_yt, ONE_K and BDV == BK, DOT_F32)
            b_acc += tl.dot(_g_operand(b_G, b_yv, b_ginv, G_NORM), b_yv, input_precision=PREC)
        _store_grad(p_dx, p_db, o_i, m_i, o_v, m_v, D, b_acc, b_db, b_ginv, i_d, G_NORM, WRITE_DB)

    @triton.jit
    def _sig_bwd_atomic_kernel(p_q, p_k, p_scale, p_bias, p_g, p_ginv, p_dq, p_dk, p_db,
                               M, N, D, offset, KEY_M, KEY_N,
                               HAS_BIAS: tl.constexpr, POSITIVE: tl.constexpr,
                               WRITE_DB: tl.constexpr, G_NORM: tl.constexpr,
                               DOT_F32: tl.constexpr, PREC: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
                               DQC: tl.constexpr, ONE_K: tl.constexpr):
        """dq and dk from one recompute of S; grid (⌈N/BN⌉, ⌈D/BDV⌉), as triton_lse's
        _bwd_atomic_kernel: program (J, d) walks every row block I, dk[J, d] += Gᵀ @ q[I, d] in
        registers, db[J] += Σ_i G[i, J] (feature block 0), dq[I, d] += G @ k[J, d] by fp32
        atomics into p_dq (zeroed)."""
        i_n = tl.program_id(0)
        i_d = tl.program_id(1)
        o_j = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_j = o_j < N
        o_v = i_d * BDV + tl.arange(0, BDV)
        m_v = o_v < D
        b_scale = tl.load(p_scale)
        b_bias = _scalar(p_bias, HAS_BIAS, 0.0)
        b_ginv = _scalar(p_ginv, G_NORM, 1.0)
        b_ones = tl.full([BN], 1.0, dtype=tl.float32)
        b_acc = tl.zeros([BN, BDV], dtype=tl.float32)
        b_db = tl.zeros([BN], dtype=tl.float32)
        b_kj = _held(p_k, o_j, m_j, D, BK, DOT_F32, ONE_K)
        for i0 in range(0, M, BM):
            o_i = (i0 + tl.arange(0, BM)).to(tl.int64)
            m_i = o_i < M
            b_raw, b_qi = _s_step(b_kj, p_k, p_q, o_j, o_i, m_j, m_i, D, BN, BM, BK, DOT_F32, PREC, ONE_K, False)
            b_gi = tl.load(p_g + o_i, mask=m_i, other=0.0)
            b_G = _sig_g_tile(b_raw, b_scale, b_bias, o_i, o_j, m_i, m_j, offset, b_gi, b_ones, POSITIVE)
            if WRITE_DB:
                b_db += tl.sum(b_G, 0)
            b_qv = _features(p_q, o_i, m_i, o_v, m_v, D, b_qi, ONE_K and BDV == BK, DOT_F32)
            b_Gc = _g_operand(b_G, b_qv, b_ginv, G_NORM)
            b_acc += tl.dot(tl.trans(b_Gc), b_qv, input_precision=PREC)
            for c0 in tl.static_range(0, BDV, DQC):  # dq in feature chunks, as the LSE kernel (registers)
                o_c = i_d * BDV + c0 + tl.arange(0, DQC)
                m_c = o_c < D
                b_kc = _features(p_k, o_j, m_j, o_c, m_c, D, b_kj, ONE_K and DQC == BK, DOT_F32)
                _add_tile(p_dq, o_i, m_i, o_c, m_c, D, tl.dot(b_Gc, b_kc, input_precision=PREC), b_ginv, G_NORM)
        _store_grad(p_dk, p_db, o_j, m_j, o_v, m_v, D, b_acc, b_db, b_ginv, i_d, G_NORM, WRITE_DB)

    _KEY = ["KEY_M", "KEY_N", "D", "HAS_BIAS", "POSITIVE"]
    _fwd, _bwd, _atomic = (_one_k(k) for k in (_sig_fwd_kernel, _sig_bwd_kernel, _sig_bwd_atomic_kernel))
    _KERNELS = {  # kind -> (kernel, autotuned kernel, the LSE kernel whose default config it takes)
        "fwd": (_fwd, _tuned(_fwd, _cfgs(True), _KEY), "fwd"),
        "bwd": (_bwd, _tuned(_bwd, _cfgs(False), _KEY + ["G_ON_ROW"]), "bwd"),
        # reset_to_zero: the autotuner reruns the kernel, and dq is accumulated with atomics
        "atomic": (_atomic, _tuned(_atomic, _ATOMIC_CFGS, _KEY, reset_to_zero=["p_dq"]), "atomic"),
    }


def _launch(kind: str, grid, D: int, *args, **kwargs):
    kernel, tuned, like = _KERNELS[kind]
    if AUTOTUNE:
        tuned[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs, **_default_meta(like, D))


def _offset(positive_offset) -> tuple[int, bool]:
    return (0, False) if positive_offset is None else (int(positive_offset), True)


def _lse_layout(q, k, scale, bias, positive_offset, g=None, need_bias=False) -> tuple:
    """The arguments in the order of triton_lse's launchers (no labels, mask mode 0, the offset
    where the LSE's exclusion offset goes, g where its row gradient goes), so that its plan
    timing (_plan) and autotuning on a slice (_tune_on_slice, _leading) serve these kernels."""
    return (q, k, scale, bias, None, None, 0, positive_offset, g, None, None, None, need_bias)


def _rows(q, k, scale, bias, _lq, _lk, _mode, positive_offset) -> Tensor:
    M, D = q.shape
    N = k.shape[0]
    out = torch.empty((M,), dtype=torch.float32, device=q.device)
    dot_f32, prec = _dot_args(q.dtype)
    offset, positive = _offset(positive_offset)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]),)
    _launch("fwd", grid, D, q, k, scale, _dummy(q) if bias is None else bias, out,
            M, N, D, offset, _key(M), _key(N),
            HAS_BIAS=bias is not None, POSITIVE=positive, DOT_F32=dot_f32, PREC=prec)
    return out


def sigmoid_forward(q: Tensor, k: Tensor, scale: Tensor, bias, positive_offset) -> Tensor:
    """(M,) fp32 row sums of −log σ(z·S); the launcher contract of fastnce/ops/function.py."""
    _check(q, k)
    args = _lse_layout(q, k, scale, bias, positive_offset)[:8]
    run = lambda a: _rows(*a)
    _tune_on_slice(("sigmoid-fwd",), run, args)
    return run(args)


def _grad(x, y, scale, bias, offset, positive, g, g_on_row, write_db):
    """(G @ y (M, D) fp32, row sums of G (M,) or None) for rows x against columns y."""
    M, D = x.shape
    N = y.shape[0]
    dx = torch.empty((M, D), dtype=torch.float32, device=x.device)
    db = torch.empty((M,), dtype=torch.float32, device=x.device) if write_db else None
    dot_f32, prec = _dot_args(x.dtype)
    f = _dummy(x)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(D, meta["BDV"]))
    _launch("bwd", grid, D, x, y, scale, f if bias is None else bias, g, _ginv(x.dtype, g, None),
            dx, f if db is None else db, M, N, D, offset, _key(M), _key(N),
            HAS_BIAS=bias is not None, POSITIVE=positive, G_ON_ROW=g_on_row, WRITE_DB=write_db,
            G_NORM=x.dtype == torch.float16, DOT_F32=dot_f32, PREC=prec)
    return dx, db


def _dq_pass(q, k, scale, bias, _lq, _lk, _mode, positive_offset, g, _r, _h, _c, need_bias):
    offset, positive = _offset(positive_offset)
    return _grad(q, k, scale, bias, offset, positive, g, True, False)[0]


def _dk_pass(q, k, scale, bias, _lq, _lk, _mode, positive_offset, g, _r, _h, _c, need_bias):
    offset, positive = _offset(positive_offset)
    # Gᵀ: k's rows against q's columns; the positive pair (i, i + offset) is (j − offset, j) there
    return _grad(k, q, scale, bias, -offset, positive, g, False, need_bias)


def _grad_two_pass(*args):
    return (_dq_pass(*args),) + _dk_pass(*args)


def _grad_atomic(q, k, scale, bias, _lq, _lk, _mode, positive_offset, g, _r, _h, _c, need_bias):
    M, D = q.shape
    N = k.shape[0]
    offset, positive = _offset(positive_offset)
    dq = torch.zeros((M, D), dtype=torch.float32, device=q.device)  # accumulated with atomics
    dk = torch.empty((N, D), dtype=torch.float32, device=q.device)
    db = torch.empty((N,), dtype=torch.float32, device=q.device) if need_bias else None
    dot_f32, prec = _dot_args(q.dtype)
    f = _dummy(q)
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), triton.cdiv(D, meta["BDV"]))
    _launch("atomic", grid, D, q, k, scale, f if bias is None else bias, g, _ginv(q.dtype, g, None),
            dq, dk, f if db is None else db, M, N, D, offset, _key(M), _key(N),
            HAS_BIAS=bias is not None, POSITIVE=positive, WRITE_DB=need_bias,
            G_NORM=q.dtype == torch.float16, DOT_F32=dot_f32, PREC=prec)
    return dq, dk, db


def _run_plan(plan: str, args: tuple):
    return _grad_atomic(*args) if plan == "atomic" else _grad_two_pass(*args)


def sigmoid_backward(q, k, scale, bias, positive_offset, grad_row, need_bias, need_q=True, need_k=True):
    """Unscaled (G @ k, Gᵀ @ q, Σ G or None), fp32; the launcher contract of fastnce/ops/function.py.
    A side not needed costs no pass."""
    _check(q, k)
    args = _lse_layout(q, k, scale, bias, positive_offset, grad_row.float().contiguous(), need_bias)
    one = _one_side("sigmoid-backward", args, need_q, need_k or need_bias, _dq_pass, _dk_pass)
    if one is not None:
        dq, dk, db = one
        return dq, dk, (db.sum() if need_bias else None)
    if deterministic():
        plan = "two-pass"
    else:  # untimed as the LSE's: atomic up to D = 256
        plan = _plan("sigmoid-backward", args, _run_plan, "atomic" if q.shape[1] <= 256 else "two-pass")
    dq, dk, db = _run_plan(plan, args)
    return dq, dk, (db.sum() if need_bias else None)
