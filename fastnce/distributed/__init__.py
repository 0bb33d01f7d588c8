"""fastnce's losses across processes with torch.distributed (DESIGN.md §3).

    import fastnce.distributed as fd
    loss = fd.clip_loss(image_features, text_features, logit_scale)      # scheme='ring'
    loss = fd.nt_xent(z1, z2, temperature=0.1, scheme="gather")
    loss = fd.info_nce(query, positive_key, negative_keys)
    loss = fd.dcl_loss(z1, z2, temperature=0.1)                          # DCL (fastnce.losses.DCLLoss)
    loss = fd.siglip_loss(image_features, text_features, logit_scale, logit_bias)  # SigLIP

The arguments are those of fastnce.nt_xent / clip_loss / info_nce / siglip_loss / functional.dcl_loss, in
the same order, plus the keyword-only scheme and group. Each rank passes its local rows; the
loss is over the global batch (every rank's rows, in rank order). The returned value is this rank's share of the global mean, so the mean over
ranks is the single-process loss and DDP's gradient averaging gives the single-process
gradient. Two schemes: 'ring' (key blocks travel rank to rank, O(N/W·D) memory per rank) and
'gather' (all-gather with gradient, O(N·D) per rank). Details: fastnce/distributed/functional.py
and fastnce/distributed/ring.py.
"""
from __future__ import annotations

import math

import torch.distributed as dist
from torch import Tensor

from ._comm import _comm_device, all_gather_no_grad, exchange, initialized, is_active, raising_on_every_rank
from .functional import SCHEMES, clip_loss, dcl_loss, info_nce, nt_xent, siglip_loss

__all__ = ["nt_xent", "clip_loss", "info_nce", "dcl_loss", "siglip_loss", "gather_keys", "is_active", "world_size", "rank", "SCHEMES"]


def world_size(group=None) -> int:
    """Ranks in the group; 1 when torch.distributed is not initialised (a ValueError outside the group)."""
    return dist.get_world_size(group) if initialized(group) else 1


def rank(group=None) -> int:
    """This process's rank in the group; 0 when torch.distributed is not initialised (a ValueError
    outside the group)."""
    return dist.get_rank(group) if initialized(group) else 0


def gather_keys(x: Tensor, group=None) -> Tensor:
    """Every rank's x concatenated in rank order, without gradient (x.detach() on one rank).

    For MoCo's queue: enqueue the keys of the whole global batch, as MoCo's
    concat_all_gather does. Ranks may hold different numbers of rows; the trailing
    dimensions and the dtype must agree (a clear ValueError otherwise).
    """
    active = is_active(group)
    with raising_on_every_rank("gather_keys", group, x):
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError("x must have at least one dimension (rows)")
    if not active:
        return x.detach()
    info = exchange("gather_keys", group, _comm_device(x, group), rows=x.shape[0], keys=x.shape[0],
                    dim=math.prod(x.shape[1:]), dtype=x.dtype, layout=tuple(x.shape[1:]))
    return all_gather_no_grad(x, info, info.rows)
