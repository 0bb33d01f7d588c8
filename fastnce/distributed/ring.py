"""The ring scheme: row LSEs (and SigLIP's row sums) over the keys of every rank without any rank
holding them all.

Rank r holds its rows q_r and its key block k_r. Key blocks travel r → r+1 around the ring;
at step t rank r holds block s = r − t (mod W), computes the partial row LSE of q_r against
it with ops.lse_forward, and folds it in with logaddexp. After W steps every row has seen
every key. While block s is being computed, block s − 1 is already on the wire (the next
transfer is posted before the current block's compute), so communication hides behind work.

The backward (a custom autograd.Function, `_RingLSE`) sends the key blocks around again with
the now global LSEs; per block ops.lse_backward gives G@k_s (added into this rank's dq) and
Gᵀ@q_r, the share of block s's key gradient that this rank's rows produce. That share is
added into an accumulator for block s which travels with the ring one step behind the keys
and, after W hops, arrives at block s's owner holding Σ_over_ranks Gᵀ@q. Its transfer is
posted after the block's compute and received only after the *next* block's compute, so it
overlaps too.

Column LSEs (CLIP's text → image direction) use the same trip: why not a second ring pass?
The text rows' LSE over all images is the column LSE of the global image×text matrix. It
could be a second pass with images travelling for text rows, but that doubles both compute
(one more M×N×D product per block: the fused kernels give row and column LSE of a tile from
one product) and traffic (images *and* texts travel, and both gradient accumulators). Here
a column accumulator of only N_s floats travels with text block s, exactly like the key
gradient accumulator: lse_forward(col_lse=True) gives the block's column LSE over this
rank's image rows, logaddexp'd into the accumulator, which reaches the owner after W hops.
In the backward the block's global column LSE and the owner's upstream gradient for it (2
floats per key) travel with the keys, so lse_backward builds G with both the row and the
column terms of DESIGN.md §1. Cost per rank and step: one fused product forward, one fused
backward; traffic: D + 1 numbers per key forward, D + 2 plus the D-wide accumulator backward.

SigLIP's sigmoid rows (_RingSigmoidNLL) take the same trip: a row's sum over all keys is the
plain sum of its blocks' sums, the positives lie in the own block (t = 0), and the backward's
dk parts travel back to their owners as above. The walks themselves (_walk_forward,
_walk_backward) are shared; each loss gives the per-block computation.

Memory per rank: q_r, k_r, two key blocks in flight (current and next), the accumulators
(one D-wide in the backward, in the LSE dtype) and the backend's tiles: O((N/W)·D) for a
global batch of N rows, never O(N·D) and never O(N²).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops import lse_backward, lse_forward, sigmoid_nll_backward, sigmoid_nll_forward
from ..ops.function import _input_grads, _wanted_products, nan_grad_where_nan
from ._comm import RankInfo, RingTransfer, no_double_backward

_TAG_KEYS, _TAG_COL, _TAG_DK = 100, 200, 300


def _walk_forward(k: Tensor, info: RankInfo, block, combine, with_col: bool):
    """combine-folded block(cur, t) over every rank's key block: block gives this rank's rows'
    part against the keys cur (block info.block(t); t == 0 is our own) and, with_col, the keys'
    part over this rank's rows, which travels one hop behind the keys to their owner."""
    D = k.shape[1]
    row, col_x, cur = None, None, k
    for t in range(info.size):
        nxt = None
        if t < info.size - 1:  # post the next block before computing this one
            src = info.block(t + 1)
            nxt = RingTransfer(info, [cur], [((info.keys[src], D), k.dtype, k.device)], _TAG_KEYS)
        r_b, c_b = block(cur, t)
        row = r_b if row is None else combine(row, r_b)
        if with_col:
            if col_x is not None:  # the accumulator of block info.block(t), from the previous rank
                c_b = combine(col_x.wait()[0], c_b)
            nxt_rows = info.keys[info.block(t + 1)]
            col_x = RingTransfer(info, [c_b], [((nxt_rows,), c_b.dtype, c_b.device)], _TAG_COL)
        if nxt is not None:
            cur = nxt.wait()[0]
    # After W hops the column accumulator that arrives is this rank's own block's, complete.
    col = col_x.wait()[0] if with_col else None
    return row, col


def _walk_backward(k: Tensor, info: RankInfo, carried, block, need_k: bool):
    """(Σ_blocks dq part or None, Σ_ranks dk part of this rank's keys or None) of
    block(cur, carried_cur, t) -> (dq part (M, D) or None, dk part (N_s, D) or None) over every
    rank's key block. carried: a (c, N) tensor
    per key that travels with the keys (CLIP's column LSE and its gradient), or None; the dk
    parts travel one hop behind the keys, summed on the way, and reach their owner complete."""
    D = k.shape[1]
    dev = k.device
    cur_k, cur_c = k, carried
    dq, dk_x = None, None
    for t in range(info.size):
        nxt = None
        if t < info.size - 1:
            n_src = info.keys[info.block(t + 1)]
            send, like = [cur_k], [((n_src, D), k.dtype, dev)]
            if carried is not None:
                send.append(cur_c)
                like.append(((carried.shape[0], n_src), carried.dtype, dev))
            nxt = RingTransfer(info, send, like, _TAG_KEYS)
        dq_b, dk_b = block(cur_k, cur_c, t)
        if dq_b is not None:
            dq = dq_b if dq is None else dq.add_(dq_b)
        if need_k:
            if dk_x is not None:  # block info.block(t)'s accumulator: the ranks before us
                dk_b = dk_b.add_(dk_x.wait()[0])
            n_next = info.keys[info.block(t + 1)]
            dk_x = RingTransfer(info, [dk_b], [((n_next, D), dk_b.dtype, dev)], _TAG_DK)
        if nxt is not None:
            got = nxt.wait()
            cur_k = got[0]
            cur_c = got[1] if carried is not None else None
    dk = dk_x.wait()[0] if need_k else None  # this rank's block, back home with every rank's share
    return dq, dk


def ring_lse_forward(q: Tensor, k: Tensor, scale: Tensor, info: RankInfo, own_mask: dict, with_col: bool,
                     backend: str):
    """Row LSE of q over every rank's k (and, with_col, the column LSE of this rank's k over
    every rank's q). own_mask: the primitive's mask arguments where q meets this rank's own key
    block (NT-Xent: exclude_self; DCL: sample labels); the other blocks are unmasked."""
    def block(cur, t):
        return lse_forward(q, cur, scale, col_lse=with_col, backend=backend, **(own_mask if t == 0 else {}))
    return _walk_forward(k, info, block, torch.logaddexp, with_col)


def ring_lse_backward(q: Tensor, k: Tensor, scale: Tensor, row: Tensor, col, g_row: Tensor, g_col,
                      info: RankInfo, own_mask: dict, need_q: bool, need_k: bool, backend: str):
    """Unscaled (Σ_blocks G@k_s for this rank's rows or None, Σ_ranks Gᵀ@q for this rank's keys
    or None)."""
    with_col = col is not None

    def block(cur_k, cur_c, t):
        dq_b, dk_b, _ = lse_backward(
            q, cur_k, scale, row_lse=row, grad_row=g_row,
            col_lse=cur_c[0] if with_col else None, grad_col=cur_c[1] if with_col else None,
            need_q=need_q, need_k=need_k, backend=backend, **(own_mask if t == 0 else {}),
        )
        return dq_b, dk_b

    carried = torch.stack([col, g_col.to(col.dtype)]) if with_col else None  # global col LSE, its gradient
    return _walk_backward(k, info, carried, block, need_k)


class _RingLSE(torch.autograd.Function):
    """(row_lse, col_lse) of this rank's rows / keys against every rank's keys / rows.

    Differentiable in q, k and scale. The gradient of scale is this rank's rows' share,
    Σ_{i local, all j} G_ij q_i·k_j; summed over ranks it is the full Σ_ij G_ij q_i·k_j.
    """

    @staticmethod
    def forward(ctx, q, k, scale, info, own_mask, with_col, backend):
        row, col = ring_lse_forward(q, k, scale.detach(), info, own_mask, with_col, backend)
        ctx.save_for_backward(q, k, scale, row, col)
        ctx.cfg = (info, own_mask, backend)
        if col is None:
            col = row.new_empty((0,))
            ctx.mark_non_differentiable(col)
        return row, col

    @staticmethod
    def backward(ctx, g_row, g_col):
        no_double_backward()
        q, k, scale, row, col = ctx.saved_tensors
        info, own_mask, backend = ctx.cfg
        need_q, need_k, need_scale = ctx.needs_input_grad[:3]
        want_q, want_k = _wanted_products(False, need_q, need_k, need_scale)
        dq_u, dk_u = ring_lse_backward(
            q, k, scale.detach(), row, col, g_row.contiguous(), None if col is None else g_col.contiguous(),
            info, own_mask, want_q, want_k, backend,
        )
        # the scale's: this rank's share of Σ_ij G_ij q_i·k_j, its rows' (from dq) or its keys'
        dq, dk, dscale, _ = _input_grads(ctx, (dq_u, dk_u, None), q, k, scale, None)
        return dq, dk, dscale, None, None, None, None


def ring_lse(q: Tensor, k: Tensor, scale: Tensor, info: RankInfo, *, own_mask: Optional[dict] = None,
             with_col: bool = False, backend: str = "auto"):
    """Differentiable (row_lse, col_lse or None) over the ring; see the module docstring and
    ring_lse_forward for own_mask."""
    row, col = _RingLSE.apply(q, k, scale, info, own_mask or {}, with_col, backend)
    return row, (col if with_col else None)


# ------------------------------------------------------------------ SigLIP's sigmoid rows
class _RingSigmoidNLL(torch.autograd.Function):
    """SigLIP's row sums (ops.similarity_sigmoid_nll) of this rank's rows against every rank's
    keys, the positives on the own block's diagonal. The same trip as _RingLSE without column
    terms: the blocks' partial sums simply add. Differentiable in q, k, scale and bias; the
    scale's and bias's gradients are this rank's rows' shares (summed over ranks, the full ones).
    """

    @staticmethod
    def forward(ctx, q, k, scale, bias, info, backend):
        s, b = scale.detach(), None if bias is None else bias.detach()

        def block(cur, t):
            return sigmoid_nll_forward(q, cur, s, b, positive_offset=0 if t == 0 else None, backend=backend), None

        rows, _ = _walk_forward(k, info, block, torch.add, False)
        ctx.save_for_backward(q, k, scale, bias, rows)
        ctx.cfg = (info, backend)
        return rows

    @staticmethod
    def backward(ctx, g_row):
        no_double_backward()
        q, k, scale, bias, rows = ctx.saved_tensors
        info, backend = ctx.cfg
        need_q, need_k, need_scale, need_bias = ctx.needs_input_grad[:4]
        want_q, want_k = _wanted_products(False, need_q, need_k, need_scale)
        s, b = scale.detach(), None if bias is None else bias.detach()
        g_row = nan_grad_where_nan(g_row, rows)  # a non-finite block anywhere made the row NaN
        db = []

        def block(cur_k, _, t):
            dq_b, dk_b, db_b = sigmoid_nll_backward(q, cur_k, s, b, grad_row=g_row, positive_offset=0 if t == 0 else None,
                                                    need_bias=bool(need_bias), need_q=want_q, need_k=want_k,
                                                    backend=backend)
            db.append(db_b)
            return dq_b, dk_b

        dq_u, dk_u = _walk_backward(k, info, None, block, want_k)
        dbias_u = torch.stack(db).sum() if need_bias else None
        return *_input_grads(ctx, (dq_u, dk_u, dbias_u), q, k, scale, bias), None, None


def ring_sigmoid_nll(q: Tensor, k: Tensor, scale: Tensor, bias: Optional[Tensor], info: RankInfo, *,
                     backend: str = "auto") -> Tensor:
    """Differentiable SigLIP row sums of this rank's rows over the ring (see _RingSigmoidNLL)."""
    return _RingSigmoidNLL.apply(q, k, scale, bias, info, backend)
