"""Helpers shared by the losses: label grouping, row-block loops with recomputation, EMA."""
from __future__ import annotations

from numbers import Integral
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._checks import check_features, check_labels
from ..ops import lse_dtype

# Entries of one (rows × N) block of distances in the blockwise (non-primitive) losses.
BLOCK_ELEMS = 1 << 20


def embeddings_and_labels(embeddings, labels):
    """pytorch-metric-learning's call convention: embeddings (N, D), labels (N,) integers."""
    check_features("embeddings", embeddings)
    labels = check_labels("labels", labels, embeddings.shape[0], "embeddings", embeddings.device)
    return embeddings, labels


def check_views(name: str, views, like: Optional[Tensor] = None, like_name: str = "") -> list:
    """views (a list / tuple of (N, D) tensors, or one (V, N, D) or (N, D) tensor) as a list of
    V ≥ 1 floating-point (N, D) tensors of one shape: views[0]'s, or like's (named like_name)."""
    if isinstance(views, Tensor):
        views = list(views) if views.dim() == 3 else [views]
    if not isinstance(views, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of (N, D) tensors or a (V, N, D) tensor, "
                        f"got {type(views).__name__}")
    if len(views) == 0:
        raise ValueError(f"{name} must hold at least one view")
    if like is None:
        like, like_name = check_features(f"{name}[0]", views[0]), f"{name}[0]"
    for i, v in enumerate(views):
        check_features(f"{name}[{i}]", v)
        if v.shape != like.shape:
            raise ValueError(f"{name}[{i}] must have the shape of {like_name} {tuple(like.shape)}, got {tuple(v.shape)}")
    return list(views)


def check_count(n, name: str, least: int) -> None:
    """An int (a Python or numpy integer, not a bool) of at least `least`."""
    if isinstance(n, bool) or not isinstance(n, Integral):
        raise TypeError(f"{name} must be an int >= {least}, got {n!r}")
    if n < least:
        raise ValueError(f"{name} must be an int >= {least}, got {n!r}")


def describe(module: nn.Module, *names: str) -> str:
    """A loss module's extra_repr: `name=value` for its hyperparameters, a one-element tensor (a
    learnable temperature) as its number; `distributed` and `group` only where set."""
    parts = []
    for name in names:
        value = getattr(module, name)
        if name in ("distributed", "group") and (value is None or value is False):
            continue
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(f"{value.item():.6g}")  # float32's digits
        parts.append(f"{name}={value!r}")
    return ", ".join(parts)


def zero_loss(embeddings: Tensor) -> Tensor:
    """0 connected to the graph (pml's zero loss: sum(embeddings * 0))."""
    return (embeddings * 0).sum().to(lse_dtype(embeddings.dtype))


def class_index(labels: Tensor):
    """(inverse (N,), counts (C,)): labels mapped to 0..C-1 and the size of each class."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return inverse, counts


def row_blocks(n_rows: int, n_cols: int):
    """(start, stop) of row blocks holding about BLOCK_ELEMS entries of an (n_rows, n_cols) matrix."""
    step = max(1, min(n_rows, BLOCK_ELEMS // max(n_cols, 1)))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def blockwise(fn: Callable, n_rows: int, n_cols: int, *tensors: Tensor) -> list:
    """[fn(i0, i1, *tensors) for each row block], each block recomputed in the backward.

    With gradients on, every block runs under non-reentrant activation checkpointing, so
    autograd keeps only the inputs (shared, O(N·D)) and fn's small outputs, never the
    blocks of the distance matrix: memory O(N·D + block) instead of O(N²).
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    out = []
    for i0, i1 in row_blocks(n_rows, n_cols):
        if grad:
            out.append(checkpoint(fn, i0, i1, *tensors, use_reentrant=False))
        else:
            out.append(fn(i0, i1, *tensors))
    return out


def block_distances(xb: Tensor, x: Tensor, sqb: Tensor, sq: Tensor) -> Tensor:
    """Euclidean distances (B, N) of the rows xb to the rows of x, given squared norms.

    ‖a‖² + ‖b‖² − 2a·b clamped at 0, square root with a zero gradient at 0 (as torch.cdist);
    a NaN stays NaN (a NaN embedding must not pass for one at distance 0). In the inputs'
    dtype, autocast off: a 16-bit product would cancel in ‖a‖² + ‖b‖² − 2a·b.
    """
    with torch.autocast(xb.device.type, enabled=False):
        d2 = torch.addmm(sqb[:, None] + sq[None, :], xb, x.T, alpha=-2).clamp_min_(0)
    tiny = torch.finfo(d2.dtype).tiny
    return torch.where(d2 == 0, torch.zeros_like(d2), d2.clamp_min(tiny).sqrt())


def pair_masks(lb: Tensor, labels: Tensor, i0: int):
    """(positives, negatives) (B, N) for rows i0.. : same label without self, different label."""
    same = lb[:, None] == labels[None, :]
    rows = torch.arange(i0, i0 + lb.shape[0], device=labels.device)
    cols = torch.arange(labels.shape[0], device=labels.device)
    return same & (cols[None, :] != rows[:, None]), ~same


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, m: float = 0.999) -> None:
    """EMA of parameters: key ← m·key + (1 − m)·query, parameter by parameter.

    MoCo's momentum encoder (He et al. 2020) and the DINO / BYOL teacher: call after each
    optimiser step. The two modules must have the same parameters' shapes, in order. Buffers
    (BatchNorm statistics) are left alone, as in MoCo's, DINO's and lightly's updates: the key
    encoder keeps the statistics of its own batches.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"m must be in [0, 1], got {m}")
    k_params, q_params = list(key_encoder.parameters()), list(query_encoder.parameters())
    if len(k_params) != len(q_params):
        raise ValueError(
            f"key_encoder has {len(k_params)} parameters, query_encoder {len(q_params)}: they must match"
        )
    for i, (pk, pq) in enumerate(zip(k_params, q_params)):
        if pk.shape != pq.shape:
            raise ValueError(f"key_encoder's parameter {i} has shape {tuple(pk.shape)}, query_encoder's "
                             f"{tuple(pq.shape)}: they must match")
        pk.mul_(m).add_(pq.detach().to(pk.dtype), alpha=1.0 - m)
