"""The primitive every loss is built on (DESIGN.md §1).

    S[i, j] = scale · q[i]·k[j] + bias[j],   masked pairs dropped
    row_lse[i] = log Σ_j exp S[i, j]         col_lse[j] = log Σ_i exp S[i, j]

`similarity_lse` is differentiable in q, k, scale and bias and never holds S whole except on
the `reference` backend. `lse_forward` / `lse_backward` are the same computation without
autograd, for code that combines partial LSEs itself (fastnce.distributed).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._checks import check_features, check_labels, check_same, check_dim_match
from .function import (
    BACKENDS,
    BackendUnavailable,
    resolve_backend,
    similarity_lse_backward_op,
    similarity_lse_op,
    unavailable_reason,
)
from .naive import MASK_DIFFERENT, MASK_NONE, MASK_SAME, lse_dtype, similarity_lse_naive

__all__ = [
    "similarity_lse", "lse_forward", "lse_backward", "available_backends", "resolve_backend",
    "BackendUnavailable", "BACKENDS", "similarity_lse_naive", "lse_dtype",
]

_LABEL_MODES = {None: MASK_NONE, "same": MASK_SAME, "different": MASK_DIFFERENT}


def available_backends(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that can run on this device and dtype, 'reference' included."""
    device = torch.device(device)
    return ["reference"] + [b for b in BACKENDS if unavailable_reason(b, device, dtype) is None]


def _prepare(q, k, scale, bias, labels, k_labels, label_mask, exclude_self, diag_offset):
    """Check arguments; return contiguous tensors and the kernel's mask arguments."""
    check_features("q", q)
    if k is not None:
        check_features("k", k)
        check_dim_match("q", q, "k", k)
    check_same({"q": q, "k": k})
    N = q.shape[0] if k is None else k.shape[0]
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=lse_dtype(q.dtype), device=q.device)
    if scale.numel() != 1:
        raise ValueError(f"scale must be a scalar, got a tensor of shape {tuple(scale.shape)}")
    if scale.device != q.device:
        raise ValueError(f"scale must be on the same device as q ({q.device}), got {scale.device}")
    scale = scale.reshape(())
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (N,):
            raise ValueError(f"bias must be a tensor of shape ({N},), one entry per column, got {getattr(bias, 'shape', bias)}")
        check_same({"q": q, "bias": bias}, what=("device",))
        bias = bias.contiguous()
    if label_mask not in _LABEL_MODES:
        raise ValueError(f"label_mask must be None, 'same' or 'different', got {label_mask!r}")
    mask_mode = _LABEL_MODES[label_mask]
    if mask_mode == MASK_NONE:
        if labels is not None or k_labels is not None:
            raise ValueError("labels were given but label_mask is None: say 'same' or 'different'")
        q_labels = None
    else:
        if labels is None:
            raise ValueError(f"label_mask={label_mask!r} needs labels, one per row of q")
        q_labels = check_labels("labels", labels, q.shape[0], "q", q.device)
        if k is None:
            if k_labels is not None:
                raise ValueError("k_labels must be None when k is None (the labels of q are used)")
            k_labels = q_labels
        else:
            if k_labels is None:
                raise ValueError(f"label_mask={label_mask!r} with a separate k needs k_labels, one per row of k")
            k_labels = check_labels("k_labels", k_labels, N, "k", q.device)
    exclude_offset = None
    if exclude_self:
        exclude_offset = int(diag_offset)
    elif diag_offset != 0:
        raise ValueError("diag_offset only applies with exclude_self=True")
    return (q.contiguous(), None if k is None else k.contiguous(), scale, bias,
            q_labels, k_labels, mask_mode, exclude_offset)


def similarity_lse(
    q: Tensor,
    k: Optional[Tensor] = None,
    scale: Union[float, Tensor] = 1.0,
    bias: Optional[Tensor] = None,
    *,
    labels: Optional[Tensor] = None,
    k_labels: Optional[Tensor] = None,
    label_mask: Optional[str] = None,
    exclude_self: bool = False,
    diag_offset: int = 0,
    col_lse: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Optional[Tensor]]:
    """Row (and column) logsumexp of S = scale · q @ kᵀ + bias without materialising S.

    q (M, D); k (N, D), or None for k = q (self-similarity: the kernels use the symmetry);
    scale a number or 0-dim tensor (learnable); bias (N,) or None, added to every column.
    Masks: exclude_self drops j == i + diag_offset; label_mask='same' keeps only pairs with
    labels[i] == k_labels[j], 'different' only pairs with different labels.
    Returns row_lse (M,) and col_lse (N,) (None unless col_lse=True), float32 (float64 for
    float64 inputs); a row with no valid pair gets −inf and no gradient.
    """
    q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset = _prepare(
        q, k, scale, bias, labels, k_labels, label_mask, exclude_self, diag_offset
    )
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "reference":
        return similarity_lse_naive(
            q, q if k is None else k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, col_lse
        )
    if bias is not None and bias.dtype != torch.float64:
        bias = bias.float()  # kernels read bias in float32; autograd casts its gradient back
    row, col = similarity_lse_op(
        q, k, scale.to(lse_dtype(q.dtype)),
        bias, q_labels, k_labels, mask_mode, exclude_offset, col_lse, name,
    )
    return row, (col if col_lse else None)


def lse_forward(q, k=None, scale=1.0, bias=None, *, labels=None, k_labels=None, label_mask=None,
                exclude_self=False, diag_offset=0, col_lse=False, backend="auto"):
    """similarity_lse without autograd: (row_lse, col_lse or None) of one block of keys."""
    with torch.no_grad():
        return similarity_lse(q, k, scale, bias, labels=labels, k_labels=k_labels, label_mask=label_mask,
                              exclude_self=exclude_self, diag_offset=diag_offset, col_lse=col_lse,
                              backend=backend)


def lse_backward(q, k=None, scale=1.0, bias=None, *, row_lse, grad_row=None, col_lse=None, grad_col=None,
                 labels=None, k_labels=None, label_mask=None, exclude_self=False, diag_offset=0,
                 need_bias=False, backend="auto"):
    """Unscaled gradients of one block given LSEs that may cover more keys than k holds.

    Returns G @ k (M, D), Gᵀ @ q (N, D) (None when k is None: then the first holds
    (G + Gᵀ) @ q) and Σ_i G[i, :] (N,) or None, float32 (float64 for float64 inputs), with
    G[i, j] = grad_row[i]·exp(S[i, j] − row_lse[i]) + grad_col[j]·exp(S[i, j] − col_lse[j]).
    Multiply by scale for the gradients of q and k.
    """
    q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset = _prepare(
        q, k, scale, bias, labels, k_labels, label_mask, exclude_self, diag_offset
    )
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "reference":
        name = "torch"  # the reference has no separate backward; the tiled one is exact
    dt = lse_dtype(q.dtype)
    cont = lambda t: None if t is None else t.to(dt).contiguous()
    if bias is not None:
        bias = bias.to(dt)
    dq, dk, db = similarity_lse_backward_op(
        q, k, scale.to(dt), bias, q_labels, k_labels, mask_mode, exclude_offset,
        cont(row_lse), cont(col_lse) if col_lse is not None else q.new_empty((0,), dtype=dt),
        cont(grad_row), cont(grad_col), need_bias, name,
    )
    return dq, (dk if k is not None else None), (db if need_bias else None)
