"""The `torch` backend: the primitive tile by tile in plain PyTorch, on any device.

Holds at most a few tiles of S (TILE_ELEMS entries each); the backward recomputes them from
q, k and the saved LSE vectors. The launcher contract (shared by every backend) is in
fastnce/ops/function.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .naive import valid_mask

TILE_ELEMS = 1 << 21  # 8 MiB of float32 per tile
COL_BLOCK = 4096  # columns per tile; rows fill the rest of TILE_ELEMS
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in SUPPORTED_DTYPES:
        return f"the torch backend supports {SUPPORTED_DTYPES}, got {dtype}"
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(M: int, N: int):
    """Row and column block sizes: full-width row panels while they fit in a tile."""
    bn = min(N, COL_BLOCK)
    bm = max(1, min(M, TILE_ELEMS // bn))
    return bm, bn


def _tile(qi, kj, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, i0, j0):
    """S for rows i0.. and columns j0.., masked entries −inf."""
    S = qi @ kj.T
    S.mul_(scale)
    if bias is not None:
        S.add_(bias[j0 : j0 + kj.shape[0]])
    keep = valid_mask(
        qi.shape[0], kj.shape[0],
        None if q_labels is None else q_labels[i0 : i0 + qi.shape[0]],
        None if k_labels is None else k_labels[j0 : j0 + kj.shape[0]],
        mask_mode, exclude_offset, S.device, i0, j0,
    )
    if keep is not None:
        S.masked_fill_(~keep, float("-inf"))
    return S


def forward(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col, symmetric):
    acc = _acc_dtype(q.dtype)
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
             row_lse, col_lse, grad_row, grad_col, symmetric, need_bias):
    acc = _acc_dtype(q.dtype)
    M, N, D = q.shape[0], k.shape[0], q.shape[1]
    s = float(scale)
    bias = None if bias is None else bias.to(acc)
    # A fully masked line has lse −inf and only −inf entries: shifting by 0 gives exp() = 0.
    row_shift = None if grad_row is None else torch.nan_to_num(row_lse, neginf=0.0)
    col_shift = None if grad_col is None else torch.nan_to_num(col_lse, neginf=0.0)
    dq = torch.zeros((M, D), dtype=acc, device=q.device)
    dk = None if symmetric else torch.zeros((N, D), dtype=acc, device=q.device)
    dbias = torch.zeros((N,), dtype=acc, device=q.device) if need_bias else None
    bm, bn = _blocks(M, N)
    for j0 in range(0, N, bn):
        kj = k[j0 : j0 + bn].to(acc)
        for i0 in range(0, M, bm):
            qi = q[i0 : i0 + bm].to(acc)
            S = _tile(qi, kj, s, bias, q_labels, k_labels, mask_mode, exclude_offset, i0, j0)
            G = None
            if grad_row is not None:
                G = (S - row_shift[i0 : i0 + bm, None]).exp_().mul_(grad_row[i0 : i0 + bm, None])
            if grad_col is not None:
                Gc = S.sub_(col_shift[None, j0 : j0 + bn]).exp_().mul_(grad_col[None, j0 : j0 + bn])
                G = Gc if G is None else G.add_(Gc)
            dq[i0 : i0 + bm].addmm_(G, kj)
            if symmetric:
                dq[j0 : j0 + bn].addmm_(G.T, qi)
            else:
                dk[j0 : j0 + bn].addmm_(G.T, qi)
            if need_bias:
                dbias[j0 : j0 + bn] += G.sum(0)
    return dq, dk, dbias
