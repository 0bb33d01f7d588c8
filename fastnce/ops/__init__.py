"""The primitive every loss is built on (DESIGN.md §1), and SigLIP's.

    S[i, j] = scale · q[i]·k[j] + bias[j],   masked pairs dropped
    row_lse[i] = log Σ_j exp S[i, j]         col_lse[j] = log Σ_i exp S[i, j]

`similarity_lse` is differentiable in q, k, scale and bias and never holds S whole except on
the `reference` backend. `lse_forward` / `lse_backward` are the same computation without
autograd, for code that combines partial LSEs itself (fastnce.distributed).

`similarity_sigmoid_nll` is the other reduction of the same S that a loss needs, a sum of
independent binary log-losses (SigLIP): Σ_j −log σ(±S[i, j]), tiled the same way.
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Optional, Union

import torch
from torch import Tensor

from .._checks import check_dim_match, check_features, check_labels, check_real_dtype, check_same
from .function import (
    BACKENDS,
    BackendUnavailable,
    resolve_backend,
    similarity_lse_backward_op,
    similarity_lse_op,
    unavailable_reason,
)
from .function import similarity_sigmoid_nll_backward_op, similarity_sigmoid_nll_op
from .naive import (
    MASK_DIFFERENT, MASK_NONE, MASK_SAME, lse_backward_naive, lse_dtype, sigmoid_nll_backward_naive,
    similarity_lse_naive, similarity_sigmoid_nll_naive,
)

__all__ = [
    "similarity_lse", "lse_forward", "lse_backward", "similarity_sigmoid_nll", "sigmoid_nll_forward",
    "sigmoid_nll_backward", "available_backends",
    "resolve_backend", "BackendUnavailable", "BACKENDS", "similarity_lse_naive", "similarity_sigmoid_nll_naive",
    "lse_dtype",
]

_LABEL_MODES = {None: MASK_NONE, "same": MASK_SAME, "different": MASK_DIFFERENT}


def available_backends(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                       op: str = "lse") -> list[str]:
    """Names of the backends that can run primitive op ("lse" or "sigmoid") on this device and
    dtype, 'reference' included."""
    device = torch.device(device)
    return ["reference"] + [b for b in BACKENDS if unavailable_reason(b, device, dtype, op) is None]


def _check_features(q, k) -> None:
    """q (M, D), and k (N, D) or None, floating point, on q's device and in q's dtype."""
    check_features("q", q)
    if k is not None:
        check_features("k", k)
        check_dim_match("q", q, "k", k)
    check_same({"q": q, "k": k})


def _scalar_arg(name: str, x, q: Tensor) -> Tensor:
    """x (a number, or a one-element tensor on q's device) as a 0-dim tensor; a number in the
    LSE dtype of q."""
    if not isinstance(x, Tensor):
        if not isinstance(x, Real) or isinstance(x, bool):
            raise TypeError(f"{name} must be a number or a one-element tensor, got {type(x).__name__}")
        # ones * x, not torch.tensor(x): under torch.compile a float that changes between calls
        # then stays symbolic (torch.tensor / torch.full guard on its value: a graph per value);
        # other numbers (an int past int64, a Fraction) as Python floats first
        x = torch.ones((), dtype=lse_dtype(q.dtype), device=q.device) * (x if isinstance(x, float) else float(x))
    else:
        check_real_dtype(name, x)
    if x.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"{name} must be on the same device as q ({q.device}), got {x.device}")
    return x.reshape(())


_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _check_offset(name: str, offset, what: str = "an int") -> int:
    """An int within int64 (the kernels' offsets), not a bool."""
    if not isinstance(offset, Integral) or isinstance(offset, bool):
        raise TypeError(f"{name} must be {what}, got {type(offset).__name__}")
    if not _INT64[0] <= offset <= _INT64[1]:
        raise ValueError(f"{name} must lie within int64, got {offset}")
    return int(offset)


def _check_vector(name: str, t, n: int, q: Tensor, per: str = "") -> None:
    """A floating-point (n,) tensor on q's device (a bias, an LSE or its upstream gradient)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({n},){per}, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor of shape ({n},){per}, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must be a floating-point tensor of shape ({n},){per}, got {tuple(t.shape)}")
    check_same({"q": q, name: t}, what=("device",))


def _prepare(q, k, scale, bias, labels, k_labels, label_mask, exclude_self, diag_offset):
    """Check arguments; return contiguous tensors and the kernel's mask arguments."""
    _check_features(q, k)
    N = q.shape[0] if k is None else k.shape[0]
    scale = _scalar_arg("scale", scale, q)
    if bias is not None:
        _check_vector("bias", bias, N, q, ", one entry per column")
        bias = bias.contiguous()
    if label_mask not in tuple(_LABEL_MODES):  # a tuple: an unhashable label_mask gets this error too
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
    diag_offset = _check_offset("diag_offset", diag_offset)
    exclude_offset = None
    if exclude_self:
        exclude_offset = diag_offset
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
                 need_bias=False, need_q=True, need_k=True, backend="auto"):
    """Unscaled gradients of one block given LSEs that may cover more keys than k holds.

    row_lse, grad_row (M,); col_lse, grad_col (N,) (grad_col needs col_lse; at least one of
    grad_row, grad_col).

    Returns G @ k (M, D) (None without need_q), Gᵀ @ q (N, D) (None without need_k, or when k
    is None: then the first holds (G + Gᵀ) @ q) and Σ_i G[i, :] (N,) or None, float32 (float64
    for float64 inputs), with
    G[i, j] = grad_row[i]·exp(S[i, j] − row_lse[i]) + grad_col[j]·exp(S[i, j] − col_lse[j]).
    Multiply by scale for the gradients of q and k.
    """
    if need_bias and bias is None:
        raise ValueError("need_bias=True needs a bias")
    if k is None and grad_col is not None:
        # The kernels' k = q path assumes col_lse = row_lse (its mirrored tiles share one LSE):
        # with other column LSEs, k = q as a separate block, and q's two roles added.
        dq, dk, dbias = lse_backward(q, q, scale, bias, row_lse=row_lse, grad_row=grad_row, col_lse=col_lse,
                                     grad_col=grad_col, labels=labels, k_labels=labels, label_mask=label_mask,
                                     exclude_self=exclude_self, diag_offset=diag_offset, need_bias=need_bias,
                                     need_q=need_q, need_k=need_q, backend=backend)
        return (dq + dk if need_q else None), None, dbias
    q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset = _prepare(
        q, k, scale, bias, labels, k_labels, label_mask, exclude_self, diag_offset
    )
    M, N = q.shape[0], q.shape[0] if k is None else k.shape[0]
    if grad_row is None and grad_col is None:
        raise ValueError("lse_backward needs grad_row or grad_col (the upstream gradients of the row / column LSEs)")
    _check_vector("row_lse", row_lse, M, q)
    if grad_row is not None:
        _check_vector("grad_row", grad_row, M, q)
    if grad_col is not None:
        if col_lse is None:
            raise ValueError("grad_col needs col_lse, the column LSEs it is the gradient of")
        _check_vector("col_lse", col_lse, N, q)
        _check_vector("grad_col", grad_col, N, q)
    name = resolve_backend(backend, q.device, q.dtype)
    need_k = need_k and k is not None
    if name == "reference":
        grads = lse_backward_naive(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset,
                                   row_lse, col_lse, grad_row, grad_col)
        return _asked(grads, need_q, need_k, need_bias)
    dt = lse_dtype(q.dtype)
    cont = lambda t: None if t is None else t.to(dt).contiguous()
    if bias is not None:
        bias = bias.to(dt)
    grads = similarity_lse_backward_op(
        q, k, scale.to(dt), bias, q_labels, k_labels, mask_mode, exclude_offset,
        cont(row_lse), cont(col_lse) if col_lse is not None else q.new_empty((0,), dtype=dt),
        cont(grad_row), cont(grad_col), need_bias, need_q, need_k, name,
    )
    return _asked(grads, need_q, need_k, need_bias)


def _asked(grads, need_q: bool, need_k: bool, need_bias: bool):
    """(dq, dk, dbias) with None for each gradient not asked for."""
    return tuple(g if need else None for g, need in zip(grads, (need_q, need_k, need_bias)))


def _prepare_sigmoid(q, k, scale, bias, positive_offset, backend):
    """Check arguments; return contiguous q, k, 0-dim scale and bias (or None) in the LSE dtype,
    the offset and the backend that will run."""
    if k is None:
        raise TypeError("k must be a torch.Tensor (the sigmoid primitive has no self-similarity form), got None")
    _check_features(q, k)
    scale = _scalar_arg("scale", scale, q)
    bias = None if bias is None else _scalar_arg("bias", bias, q)
    if positive_offset is not None:
        positive_offset = _check_offset("positive_offset", positive_offset, "an int or None")
    name = resolve_backend(backend, q.device, q.dtype, "sigmoid")
    return q.contiguous(), k.contiguous(), scale, bias, positive_offset, name


def similarity_sigmoid_nll(
    q: Tensor,
    k: Tensor,
    scale: Union[float, Tensor] = 1.0,
    bias: Union[None, float, Tensor] = None,
    *,
    positive_offset: Optional[int] = 0,
    backend: str = "auto",
) -> Tensor:
    """Row sums of the pairwise sigmoid log-loss of S = scale · q @ kᵀ + bias, never holding S.

        out[i] = Σ_j −log σ(z[i, j] · S[i, j]),   z = +1 where j == i + positive_offset, else −1

    q (M, D), k (N, D); scale and bias numbers or 0-dim tensors (learnable; bias is one scalar,
    as SigLIP's); positive_offset None makes every pair a negative. Returns (M,) float32
    (float64 for float64 inputs). The cuda backend has no kernel for it: 'auto' takes triton on
    CUDA tensors and the tiled torch path elsewhere.
    """
    q, k, scale, bias, positive_offset, name = _prepare_sigmoid(q, k, scale, bias, positive_offset, backend)
    if name == "reference":
        return similarity_sigmoid_nll_naive(q, k, scale, bias, positive_offset)
    acc = lse_dtype(q.dtype)
    return similarity_sigmoid_nll_op(q, k, scale.to(acc), None if bias is None else bias.to(acc),
                                     positive_offset, name)


def sigmoid_nll_forward(q, k, scale=1.0, bias=None, *, positive_offset=0, backend="auto") -> Tensor:
    """similarity_sigmoid_nll without autograd: the row sums over one block of keys."""
    with torch.no_grad():
        return similarity_sigmoid_nll(q, k, scale, bias, positive_offset=positive_offset, backend=backend)


def sigmoid_nll_backward(q, k, scale=1.0, bias=None, *, grad_row, positive_offset=0, need_bias=False,
                         need_q=True, need_k=True, backend="auto"):
    """Unscaled gradients of one block: G @ k (M, D), Gᵀ @ q (N, D) (each None unless needed)
    and Σ G (0-dim) or None,
    float32 (float64 for float64 inputs), G[i, j] = −grad_row[i]·z·σ(−z·S[i, j]). Multiply by
    scale for the gradients of q and k."""
    if need_bias and bias is None:
        raise ValueError("need_bias=True needs a bias")
    q, k, scale, bias, positive_offset, name = _prepare_sigmoid(q, k, scale, bias, positive_offset, backend)
    _check_vector("grad_row", grad_row, q.shape[0], q)
    if name == "reference":
        grads = sigmoid_nll_backward_naive(q, k, scale, bias, positive_offset, grad_row)
        return _asked(grads, need_q, need_k, need_bias)
    dt = lse_dtype(q.dtype)
    grads = similarity_sigmoid_nll_backward_op(
        q, k, scale.to(dt), None if bias is None else bias.to(dt), positive_offset,
        grad_row.to(dt).contiguous(), need_bias, need_q, need_k, name)
    return _asked(grads, need_q, need_k, need_bias)
