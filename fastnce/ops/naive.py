"""The reference implementation of the primitive: materialises S, differentiated by autograd.

Slow, O(M·N) memory, obviously correct; works in every dtype including float64. Every fast
backend is tested against it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Label mask modes, shared by every backend.
MASK_NONE, MASK_SAME, MASK_DIFFERENT = 0, 1, 2


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes and returns LSEs in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tf32_allowed() -> bool:
    """Whether float32 products may run in tf32, as PyTorch's own CUDA matmuls decide.

    `torch.backends.cuda.matmul.fp32_precision` (torch >= 2.9) reflects both that API and the
    legacy ones (`allow_tf32`, `set_float32_matmul_precision`), while reading a legacy one after
    the new API was used raises."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return precision == "tf32"


def valid_mask(
    M: int,
    N: int,
    q_labels: Optional[Tensor],
    k_labels: Optional[Tensor],
    mask_mode: int,
    exclude_offset: Optional[int],
    device: torch.device,
    row_start: int = 0,
    col_start: int = 0,
) -> Optional[Tensor]:
    """(M, N) bool, True where S[i, j] takes part; None where every pair does.

    Rows are row_start..row_start+M and columns col_start..col_start+N of the full matrix, so a
    tiled backend can ask for one tile. Pair (i, j) is dropped when j == i + exclude_offset,
    or by labels: MASK_SAME keeps y_k[j] == y_q[i], MASK_DIFFERENT keeps y_k[j] != y_q[i].
    """
    keep = None
    if exclude_offset is not None:
        rows = torch.arange(row_start, row_start + M, device=device)
        cols = torch.arange(col_start, col_start + N, device=device)
        keep = cols[None, :] != rows[:, None] + exclude_offset
    if mask_mode != MASK_NONE:
        same = k_labels[None, :] == q_labels[:, None]
        by_label = same if mask_mode == MASK_SAME else ~same
        keep = by_label if keep is None else keep & by_label
    return keep


def similarity_matrix(q: Tensor, k: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                      products_in_input_dtype: bool = False) -> Tensor:
    """S = scale·q@kᵀ + bias (M, N), materialised, in the LSE dtype (float64 for float64 inputs,
    float32 otherwise); bias a column vector (N,) or a scalar. products_in_input_dtype: q@kᵀ
    (and so its gradients) in the inputs' dtype, as eager PyTorch under autocast computes it:
    the baseline error of DESIGN.md §6's criterion."""
    acc = lse_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        if products_in_input_dtype:
            S = scale.to(acc) * (q @ k.T).to(acc)
        else:
            S = scale.to(acc) * (q.to(acc) @ k.to(acc).T)
    return S if bias is None else S + bias.to(acc)


def similarity_lse_naive(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    bias: Optional[Tensor] = None,
    q_labels: Optional[Tensor] = None,
    k_labels: Optional[Tensor] = None,
    mask_mode: int = MASK_NONE,
    exclude_offset: Optional[int] = None,
    with_col: bool = False,
    products_in_input_dtype: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """row_lse (M,) and col_lse (N,) or None of S = scale·q@kᵀ + bias (similarity_matrix), masked.

    Computed in float64 for float64 inputs, float32 otherwise (the result dtype of every backend).
    """
    S = similarity_matrix(q, k, scale, bias, products_in_input_dtype)
    keep = _kept_pairs(q, k, bias, q_labels, k_labels, mask_mode, exclude_offset)
    if keep is None:
        row, col = torch.logsumexp(S, 1), (torch.logsumexp(S, 0) if with_col else None)
    else:
        S = S.masked_fill(~keep, float("-inf"))
        row = _masked_lse(S, keep, 1)
        col = _masked_lse(S, keep, 0) if with_col else None
    return nan_where_not_finite(row, q), (None if col is None else nan_where_not_finite(col, k))


def _kept_pairs(q, k, bias, q_labels, k_labels, mask_mode, exclude_offset) -> Optional[Tensor]:
    """The reference's valid_mask over all of S, where a −inf bias also drops its column, as a
    mask does (a NaN bias stays: != keeps it); None where every pair is kept."""
    keep = valid_mask(q.shape[0], k.shape[0], q_labels, k_labels, mask_mode, exclude_offset, q.device)
    if bias is not None:
        finite_bias = (bias != float("-inf"))[None, :]
        keep = finite_bias if keep is None else keep & finite_bias
    return keep


def nan_where_not_finite(lse: Tensor, x: Tensor) -> Tensor:
    """lse (L,) with NaN where the feature vector x[l] (x (L, D)) holds an inf or a NaN.

    Infinite features can leave a line of S with nothing but −inf, which would pass for a fully
    masked line (−inf, zero gradient) and give a finite gradient beside a NaN loss. Every
    backend applies this rule to its forward (the fused ones inside the op, so that their
    backward sees the NaN): a non-finite input never yields a finite-looking result.
    """
    bad = ~torch.isfinite(x).all(1)
    return lse + torch.where(bad, float("nan"), 0.0).to(device=lse.device, dtype=lse.dtype)


def nan_rows_where_not_finite(rows: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """The sigmoid primitive's form of nan_where_not_finite: rows (M,) of sums over k's rows,
    NaN where q[i] holds an inf or a NaN, and everywhere when k does (a logit of −inf adds 0 to
    such a sum, which would pass for finite). Multiplied in, so that the reference's gradient
    through a NaN row is NaN too, as the fused backends' backward makes it (function.py)."""
    bad = ~torch.isfinite(q).all(1) | ~torch.isfinite(k).all()
    return rows * torch.where(bad, float("nan"), 1.0).to(device=rows.device, dtype=rows.dtype)


def _masked_lse(S: Tensor, keep: Tensor, dim: int) -> Tensor:
    """logsumexp along dim; −inf with a zero gradient where every entry is masked.

    A plain logsumexp of an all −inf line gives a NaN gradient; the fully masked lines are
    computed on zeros instead and their result replaced, so no NaN reaches the other lines.
    """
    any_valid = keep.any(dim, keepdim=True)
    lse = torch.logsumexp(torch.where(any_valid, S, 0.0), dim)
    return torch.where(any_valid.squeeze(dim), lse, float("-inf"))


def positive_signs(M: int, N: int, positive_offset: Optional[int], device, dtype) -> Tensor:
    """(M, N) of ±1: +1 where j == i + positive_offset (the positive pairs), −1 elsewhere;
    positive_offset None: every pair is a negative."""
    sign = torch.full((M, N), -1.0, dtype=dtype, device=device)
    if positive_offset is not None and -M < positive_offset < N:
        sign.diagonal(positive_offset).fill_(1.0)
    return sign


def similarity_sigmoid_nll_naive(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    bias: Optional[Tensor] = None,
    positive_offset: Optional[int] = 0,
    products_in_input_dtype: bool = False,
) -> Tensor:
    """(M,) row sums of −log σ(z[i, j] · S[i, j]), S = scale·q@kᵀ + bias (a scalar), z from
    positive_signs: SigLIP's per-image loss. Materialises S; float64 for float64 inputs, else
    float32; products_in_input_dtype as in similarity_matrix."""
    S = similarity_matrix(q, k, scale, bias, products_in_input_dtype)
    z = positive_signs(q.shape[0], k.shape[0], positive_offset, q.device, S.dtype)
    return nan_rows_where_not_finite(-torch.nn.functional.logsigmoid(z * S).sum(1), q, k)


def lse_backward_naive(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset,
                       row_lse, col_lse, grad_row, grad_col):
    """The LSE primitive's backward from a materialised G (M, N), over valid pairs:
    G[i, j] = grad_row[i]·exp(S[i, j] − row_lse[i]) + grad_col[j]·exp(S[i, j] − col_lse[j]),
    the LSEs given (they may cover more keys than k holds). Returns G @ k, Gᵀ @ q, Σ_i G[i, :];
    for k None (k is q) (G + Gᵀ) @ q, None, Σ_i G[i, :]. Unscaled, in the LSE dtype."""
    kk = q if k is None else k
    S = similarity_matrix(q, kk, scale, bias)
    G = torch.zeros_like(S)
    if grad_row is not None:  # a fully masked line: lse −inf, entries −inf, no term (masked below)
        G = G + grad_row.to(S.dtype)[:, None] * torch.exp(S - row_lse.to(S.dtype)[:, None])
    if grad_col is not None:
        G = G + grad_col.to(S.dtype)[None, :] * torch.exp(S - col_lse.to(S.dtype)[None, :])
    keep = _kept_pairs(q, kk, bias, q_labels, k_labels, mask_mode, exclude_offset)
    if keep is not None:
        G = G.masked_fill(~keep, 0.0)
    dq, dk = G @ kk.to(S.dtype), G.T @ q.to(S.dtype)
    if k is None:
        return dq + dk, None, G.sum(0)
    return dq, dk, G.sum(0)


def sigmoid_nll_backward_naive(q, k, scale, bias, positive_offset, grad_row):
    """The sigmoid primitive's backward from a materialised G[i, j] = −grad_row[i]·z·σ(−z·S[i, j]):
    G @ k, Gᵀ @ q, Σ G (0-dim). Unscaled, in the LSE dtype."""
    S = similarity_matrix(q, k, scale, bias)
    z = positive_signs(q.shape[0], k.shape[0], positive_offset, q.device, S.dtype)
    G = -grad_row.to(S.dtype)[:, None] * z * torch.sigmoid(-z * S)
    return G @ k.to(S.dtype), G.T @ q.to(S.dtype), G.sum()
