"""The `torch` backend: the primitive tile by tile in plain PyTorch, on any device.

Holds at most a few tiles of S (TILE_ELEMS entries each); the backward recomputes them from
q, k and the saved LSE vectors. The launcher contract (shared by every backend) is in
fastnce/ops/function.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .naive import MASK_NONE, MASK_SAME, lse_dtype

TILE_ELEMS = 1 << 20  # 4 MiB of float32 per tile
COL_BLOCK = 4096  # columns per tile; rows fill the rest of TILE_ELEMS
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in SUPPORTED_DTYPES:
        return f"the torch backend supports {SUPPORTED_DTYPES}, got {dtype}"
    return None


def _blocks(M: int, N: int):
    """Row and column block sizes: full-width row panels while they fit in a tile."""
    bn = min(N, COL_BLOCK)
    bm = max(1, min(M, TILE_ELEMS // bn))
    return bm, bn


def _tile(qi, kj, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, i0, j0):
    """S for rows i0.. and columns j0.., masked entries −inf (the masks of naive.valid_mask,
    written into S with one boolean tile at most)."""
    S = qi @ kj.T
    S.mul_(scale)
    if bias is not None:
        S.add_(bias[j0 : j0 + kj.shape[0]])
    if mask_mode != MASK_NONE:
        same = k_labels[None, j0 : j0 + kj.shape[0]] == q_labels[i0 : i0 + qi.shape[0], None]
        S.masked_fill_(same.logical_not_() if mask_mode == MASK_SAME else same, float("-inf"))
    excluded = _pairs(S, exclude_offset, i0, j0)
    if excluded is not None:
        excluded.fill_(float("-inf"))
    return S


def _pairs(T: Tensor, offset, i0: int, j0: int):
    """The entries of the pairs j == i + offset in the tile T of rows i0.. and columns j0.. (a
    view of one of its diagonals), or None when offset is None or the tile does not cross them."""
    if offset is None:
        return None
    d = i0 + offset - j0
    return T.diagonal(d) if -T.shape[0] < d < T.shape[1] else None


def _shift(lse: Tensor) -> Tensor:
    """The shift of exp(S − lse): a fully masked line has lse −inf and only −inf entries, its
    shift is 0 so that exp() = 0 (not nan_to_num: a NaN lse stays NaN)."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _line_weights(*weights):
    """(factor, weights): factor None and the weights as given, or, when every given weight
    vector holds one and the same value c (the gradient of any mean or sum of the rows), c and
    Nones: the tiles then form G / c without a multiplication per entry, and the products are
    scaled by c once. (Folding a weight into the shift as lse − log(w) would save it too, but
    at |lse| ~ 1e4 that rounding alone moved every entry of G by ~1e-3 relative.)"""
    given = [w for w in weights if w is not None]
    c = given[0].reshape(-1)[0]
    if all(bool((w == c).all()) for w in given):
        return c, tuple(None for _ in weights)
    return None, weights


def _weighted_exp(S: Tensor, shift: Tensor, w) -> Tensor:
    """w·exp(S − shift) (w None: 1), in place in S."""
    S.sub_(shift).exp_()
    return S if w is None else S.mul_(w)


def _scaled(factor, *accumulators):
    """The accumulators times the weights' common factor (None: 1), in place."""
    if factor is not None:
        for a in accumulators:
            if a is not None:
                a.mul_(factor)


def _mirrored(symmetric, bias, exclude_offset) -> bool:
    """S is a symmetric matrix: the tile (J, I) is the transpose of (I, J) and is not computed."""
    return symmetric and bias is None and exclude_offset in (None, 0)


def _square_blocks(M: int):
    b = max(1, int(TILE_ELEMS**0.5))
    return [(i0, min(i0 + b, M)) for i0 in range(0, M, b)]


def _forward_mirrored(q, scale, labels, mask_mode, exclude_offset, with_col):
    """Row LSE of a symmetric S from the tiles on and above the diagonal: half the products."""
    acc = lse_dtype(q.dtype)
    row = torch.full((q.shape[0],), float("-inf"), dtype=acc, device=q.device)
    blocks = _square_blocks(q.shape[0])
    for bi, (i0, i1) in enumerate(blocks):
        qi = q[i0:i1].to(acc)
        for j0, j1 in blocks[bi:]:
            S = _tile(qi, q[j0:j1].to(acc), scale, None, labels, labels, mask_mode, exclude_offset, i0, j0)
            torch.logaddexp(row[i0:i1], torch.logsumexp(S, 1), out=row[i0:i1])
            if j0 != i0:
                torch.logaddexp(row[j0:j1], torch.logsumexp(S, 0), out=row[j0:j1])
    return row, (row.clone() if with_col else None)


def _backward_mirrored(q, scale, labels, mask_mode, exclude_offset, row_lse, grad_row, grad_col):
    """(G + Gᵀ) @ q from the tiles on and above the diagonal.

    With col_lse = row_lse, the (I, J) block of G + Gᵀ is
    w_I·exp(S_IJ − r_I) + w_J·exp(S_IJ − r_J) with w = grad_row + grad_col.
    """
    acc = lse_dtype(q.dtype)
    w = grad_row if grad_col is None else (grad_col if grad_row is None else grad_row + grad_col)
    shift = _shift(row_lse)
    factor, (w,) = _line_weights(w)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    blocks = _square_blocks(q.shape[0])
    for bi, (i0, i1) in enumerate(blocks):
        qi = q[i0:i1].to(acc)
        for j0, j1 in blocks[bi:]:
            qj = q[j0:j1].to(acc)
            S = _tile(qi, qj, scale, None, labels, labels, mask_mode, exclude_offset, i0, j0)
            H = _weighted_exp(S.clone(), shift[i0:i1, None], None if w is None else w[i0:i1, None])
            H.add_(_weighted_exp(S, shift[None, j0:j1], None if w is None else w[None, j0:j1]))
            if j0 == i0:
                dq[i0:i1].addmm_(H, qj)
            else:
                dq[i0:i1].addmm_(H, qj)
                dq[j0:j1].addmm_(H.T, qi)
    _scaled(factor, dq)
    return dq


def forward(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col, symmetric):
    if _mirrored(symmetric, bias, exclude_offset):
        return _forward_mirrored(q, float(scale), q_labels, mask_mode, exclude_offset, with_col)
    acc = lse_dtype(q.dtype)
    M, N = q.shape[0], k.shape[0]
    s = float(scale)
    bias = None if bias is None else bias.to(acc)
    row = torch.full((M,), float("-inf"), dtype=acc, device=q.device)
    col = torch.full((N,), float("-inf"), dtype=acc, device=q.device) if with_col else None
    bm, bn = _blocks(M, N)
    for j0 in range(0, N, bn):
        kj = k[j0 : j0 + bn].to(acc)
        for i0 in range(0, M, bm):
            qi = q[i0 : i0 + bm].to(acc)
            S = _tile(qi, kj, s, bias, q_labels, k_labels, mask_mode, exclude_offset, i0, j0)
            torch.logaddexp(row[i0 : i0 + bm], torch.logsumexp(S, 1), out=row[i0 : i0 + bm])
            if with_col:
                torch.logaddexp(col[j0 : j0 + bn], torch.logsumexp(S, 0), out=col[j0 : j0 + bn])
    return row, col


def backward(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset,
             row_lse, col_lse, grad_row, grad_col, symmetric, need_bias, need_q=True, need_k=True):
    if _mirrored(symmetric, bias, exclude_offset):
        dq = _backward_mirrored(q, float(scale), q_labels, mask_mode, exclude_offset, row_lse, grad_row, grad_col)
        return dq, None, None
    acc = lse_dtype(q.dtype)
    M, N, D = q.shape[0], k.shape[0], q.shape[1]
    s = float(scale)
    bias = None if bias is None else bias.to(acc)
    row_shift = None if grad_row is None else _shift(row_lse)
    col_shift = None if grad_col is None else _shift(col_lse)
    factor, (row_w, col_w) = _line_weights(grad_row, grad_col)
    need_q = need_q or symmetric
    need_k = need_k and not symmetric
    dq = torch.zeros((M, D), dtype=acc, device=q.device) if need_q else None
    dk = torch.zeros((N, D), dtype=acc, device=q.device) if need_k else None
    dbias = torch.zeros((N,), dtype=acc, device=q.device) if need_bias else None
    bm, bn = _blocks(M, N)
    for j0 in range(0, N, bn):
        kj = k[j0 : j0 + bn].to(acc)
        for i0 in range(0, M, bm):
            qi = q[i0 : i0 + bm].to(acc)
            S = _tile(qi, kj, s, bias, q_labels, k_labels, mask_mode, exclude_offset, i0, j0)
            G = None
            if grad_row is not None:
                G = _weighted_exp(S if grad_col is None else S.clone(), row_shift[i0 : i0 + bm, None],
                                  None if row_w is None else row_w[i0 : i0 + bm, None])
            if grad_col is not None:
                Gc = _weighted_exp(S, col_shift[None, j0 : j0 + bn], None if col_w is None else col_w[None, j0 : j0 + bn])
                G = Gc if G is None else G.add_(Gc)
            if need_q:
                dq[i0 : i0 + bm].addmm_(G, kj)
            if symmetric:
                dq[j0 : j0 + bn].addmm_(G.T, qi)
            elif need_k:
                dk[j0 : j0 + bn].addmm_(G.T, qi)
            if need_bias:
                dbias[j0 : j0 + bn] += G.sum(0)
    _scaled(factor, dq, dk, dbias)
    return dq, dk, dbias


# ---------------------------------------------------------------------- the sigmoid primitive
def _signed_tile(qi, kj, scale, bias, positive_offset, i0, j0):
    """T = z·S for rows i0.. and columns j0..: S = scale·qi@kjᵀ + bias with its sign flipped
    everywhere but on the positive pairs j == i + positive_offset (naive.positive_signs)."""
    T = qi @ kj.T
    T.mul_(-scale)
    if bias is not None:
        T.sub_(bias)
    positives = _pairs(T, positive_offset, i0, j0)
    if positives is not None:
        positives.neg_()
    return T


def sigmoid_forward(q, k, scale, bias, positive_offset):
    """(M,) row sums of −log σ(z·S) (naive.similarity_sigmoid_nll_naive), tile by tile."""
    acc = lse_dtype(q.dtype)
    M, N = q.shape[0], k.shape[0]
    s = float(scale)
    bias = None if bias is None else bias.to(acc)
    row = torch.zeros((M,), dtype=acc, device=q.device)
    bm, bn = _blocks(M, N)
    for j0 in range(0, N, bn):
        kj = k[j0 : j0 + bn].to(acc)
        for i0 in range(0, M, bm):
            T = _signed_tile(q[i0 : i0 + bm].to(acc), kj, s, bias, positive_offset, i0, j0)
            row[i0 : i0 + bm] -= torch.nn.functional.logsigmoid(T).sum(1)
    return row


def sigmoid_backward(q, k, scale, bias, positive_offset, grad_row, need_bias, need_q=True, need_k=True):
    """Unscaled gradients of the sigmoid rows: G @ k (M, D), Gᵀ @ q (N, D), Σ G (0-dim) or None,
    with G[i, j] = grad_row[i] · ∂(−log σ(z·S))/∂S = −grad_row[i] · z · σ(−z·S)."""
    acc = lse_dtype(q.dtype)
    M, N, D = q.shape[0], k.shape[0], q.shape[1]
    s = float(scale)
    bias = None if bias is None else bias.to(acc)
    dq = torch.zeros((M, D), dtype=acc, device=q.device) if need_q else None
    dk = torch.zeros((N, D), dtype=acc, device=q.device) if need_k else None
    dbias = torch.zeros((), dtype=acc, device=q.device) if need_bias else None
    bm, bn = _blocks(M, N)
    for j0 in range(0, N, bn):
        kj = k[j0 : j0 + bn].to(acc)
        for i0 in range(0, M, bm):
            qi = q[i0 : i0 + bm].to(acc)
            G = _signed_tile(qi, kj, s, bias, positive_offset, i0, j0).neg_().sigmoid_()
            G.mul_(grad_row[i0 : i0 + bm, None])
            positives = _pairs(G, positive_offset, i0, j0)  # −z: +1 on the negatives, −1 on the positives
            if positives is not None:
                positives.neg_()
            if need_q:
                dq[i0 : i0 + bm].addmm_(G, kj)
            if need_k:
                dk[j0 : j0 + bn].addmm_(G.T, qi)
            if need_bias:
                dbias += G.sum()
    return dq, dk, dbias
