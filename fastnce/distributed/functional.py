"""nt_xent, clip_loss, info_nce, dcl_loss and siglip_loss over the global batch of every rank.

Conventions (every loss, both schemes):

* Each rank passes its local rows; the global batch is their concatenation in rank order
  (unpaired negative_keys likewise: the global negative set is every rank's negatives).
  Ranks may hold different numbers of rows, at least one each. Every call begins with one
  small all-gather (_comm.exchange) in which the ranks check that they agree (shapes, dtype,
  scheme, reduction, scalars) and that none rejected its arguments: an error is raised on
  every rank, never on one while the others wait.
* The returned loss (reduction='mean', the default) is this rank's share of the global mean:
  Σ_{own rows} loss_i · W / N (N rows in the global batch, W ranks), which is the rank's own
  mean when local batches are equal. The mean over ranks is the single-process loss on the
  concatenated batch. reduction='sum' returns Σ_{own rows} loss_i · W (the mean over ranks is
  the single-process sum); 'none' this rank's per-row losses (the single-process per-row
  losses of its rows; nt_xent: its z1 anchors, then its z2 anchors).
* The backward is collective: every rank must call it (as with DDP), and runs once: the
  gradients that cross ranks are not differentiated again (create_graph=True raises). Each
  rank's input gradient is W × the single-process gradient of its rows (it holds every rank's
  contribution to them), so DDP's averaging gives the parameters exactly the
  single-process gradient: neither lightly #1528 (gather backward not summed over ranks)
  nor lightly #1977 (a raw all_reduce in the forward: gradient off by 1/W).
* A learnable temperature, logit_scale or logit_bias (a tensor with requires_grad, the same value on
  every rank) gets the *single-process* gradient on every rank: W × its 1/W share, i.e.
  the sum over ranks of each rank's local gradient divided by W (one all-reduce of a scalar
  in the backward). The ranks' copies get identical gradients, and DDP's averaging of
  identical values leaves the single-process gradient.
* With torch.distributed not initialised, or a group of one rank, each call is the
  single-process loss of fastnce.functional.

Schemes:
* 'gather' (OpenCLIP's local loss): the keys are all-gathered with gradient, each rank
  computes its rows against all keys. Memory per rank O(N·D) for the gathered keys and their
  gradient; one all-gather forward and one reduce-scatter backward per gathered tensor.
* 'ring': key blocks travel around the ranks by point-to-point transfers (fastnce.distributed.ring),
  no rank holds all keys: memory per rank O((N/W)·D).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .. import functional as F
from .._checks import cast_under_autocast, reciprocal_temperature
from ..functional import l2_normalize, paired_logits, two_view_positives, two_view_samples, two_view_weights
from ..ops import lse_dtype, resolve_backend, similarity_lse, similarity_sigmoid_nll
from ._comm import (
    RankInfo, _comm_device, all_gather_with_grad, exchange, is_active, mean_grad_over_ranks, raising_on_every_rank,
)
from .ring import ring_lse, ring_sigmoid_nll

__all__ = ["nt_xent", "clip_loss", "info_nce", "dcl_loss", "siglip_loss"]

SCHEMES = ("ring", "gather")


_SCHEME_DOC = """    scheme: 'ring' (keys passed around the ranks, memory O((N/W)·D) a rank) or 'gather'
        (all-gathered keys, OpenCLIP's local loss); see the module docstring.
    group: the process group (None: the default one).
"""


def _with_args_doc(fn):
    return F.with_args_doc(fn, _SCHEME_DOC)


def _check_scheme(scheme: str) -> int:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return SCHEMES.index(scheme) + 1


def _checked(what: str, group, scheme: str, backend: str, check, *args, op: str = "lse") -> Optional[int]:
    """Runs the call's argument checks, check(*args), the scheme's and the backend's (for
    primitive op, on args[0]'s device and dtype); returns None for a single-process call
    (torch.distributed not initialised, or a group of one), else the scheme's code. In a group,
    a rank whose checks fail tells the others before raising (raising_on_every_rank), so every
    rank raises instead of some waiting in a collective."""
    active = is_active(group)
    with raising_on_every_rank(what, group, args[0]):
        check(*args)
        code = _check_scheme(scheme)
        resolve_backend(backend, args[0].device, args[0].dtype, op)
    return code if active else None


def _reduce(per_row: Tensor, reduction: str, info: RankInfo) -> Tensor:
    """'mean': this rank's share of the global mean, Σ_own · W / N; 'sum': of the global sum,
    Σ_own · W (the ranks' values average to the single-process loss either way, and DDP's
    gradient averaging gives the single-process gradient); 'none': this rank's per-row losses
    (equal to the single-process per-row losses of its rows)."""
    if reduction == "mean":
        return per_row.sum() * info.mean_factor
    if reduction == "sum":
        return per_row.sum() * info.size
    return per_row


def _needs_grad(x) -> bool:
    return isinstance(x, Tensor) and x.requires_grad


def _scale_tensor(scale, like: Tensor) -> Tensor:
    """The scale as a 0-dim tensor for the ring Function (a number becomes a constant)."""
    if isinstance(scale, Tensor):
        return scale.reshape(())
    return torch.tensor(float(scale), device=like.device,
                        dtype=lse_dtype(like.dtype))


def _row_lse(scheme: str, q: Tensor, k: Tensor, scale, info: RankInfo, backend: str, own: Optional[str] = None):
    """Row LSE of this rank's rows q over every rank's keys k.

    own: what is dropped where q meets this rank's own key block (q is k = [z1; z2] there):
    None nothing; "self" the pairs (i, i) (NT-Xent); "sample" every pair of one sample's
    views, (i, i) and (i, i ± n) (DCL: the positive leaves the denominator).
    """
    if scheme == "ring":
        own_mask = {}
        if own == "self":
            own_mask = dict(exclude_self=True)
        elif own == "sample":
            ids = two_view_samples(q.shape[0] // 2, 0, q.device)
            own_mask = dict(labels=ids, k_labels=ids, label_mask="different")
        row, _ = ring_lse(q, k, _scale_tensor(scale, q), info, own_mask=own_mask, backend=backend)
        return row
    keys = all_gather_with_grad(k, info, info.keys)
    if own == "self":  # q is this rank's block of keys: global row i is key i + key_offset
        row, _ = similarity_lse(q, keys, scale, exclude_self=True, diag_offset=info.key_offset, backend=backend)
    elif own == "sample":  # global sample ids: rank s's n_s samples follow those of the ranks before it
        counts = [c // 2 for c in info.keys]
        ids = torch.cat([two_view_samples(c, sum(counts[:s]), q.device) for s, c in enumerate(counts)])
        mine = ids[info.key_offset:info.key_offset + q.shape[0]]
        row, _ = similarity_lse(q, keys, scale, labels=mine, k_labels=ids, label_mask="different", backend=backend)
    else:
        row, _ = similarity_lse(q, keys, scale, backend=backend)
    return row


# ----------------------------------------------------------------------------- nt_xent

@_with_args_doc
def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    *,
    scheme: str = "ring",
    group=None,
    backend: str = "auto",
) -> Tensor:
    """SimCLR's NT-Xent over the views of every rank (fastnce.nt_xent on the global batch).

    z1, z2 (n, D): this rank's two views; the global Z is every rank's z1 then every
    rank's z2, 2N anchors, each contrasted with the 2N − 2 others. Returns this rank's share
    of the global mean (see the module docstring).
    """
    z1, z2 = cast_under_autocast(z1, z2)
    code = _checked("nt_xent", group, scheme, backend, F.check_nt_xent_inputs, z1, z2, temperature, reduction)
    if code is None:
        return F.nt_xent(z1, z2, temperature, reduction, backend=backend)
    z = l2_normalize(torch.cat([z1, z2]))  # this rank's 2n anchors, and its 2n keys
    return _nt_xent(z, temperature, scheme, code, group, backend, reduction)


def _nt_xent(z, temperature, scheme, code, group, backend, reduction="mean", decoupled=False, weights=None):
    """NT-Xent, or with decoupled=True DCL (its positive out of the denominator, its positives
    times weights), over every rank's views; z = this rank's [z1; z2], normalised."""
    info = exchange("dcl_loss" if decoupled else "nt_xent", group, _comm_device(z, group), rows=z.shape[0], keys=z.shape[0],
                    dim=z.shape[1], dtype=z.dtype, mode=code, reduction=reduction,
                    flags={"z1/z2": z.requires_grad, "temperature": _needs_grad(temperature)},
                    scalars={"temperature": temperature})
    temperature = mean_grad_over_ranks(temperature, info)
    scale = reciprocal_temperature(temperature, z)
    # Positives first: autograd runs the later node's backward first, so the ring's backward
    # then runs before the positives' and their O(n·D) gradients are not held through it.
    positive = two_view_positives(z, scale, weights)  # a local row's other view is local too
    row = _row_lse(scheme, z, z, scale, info, backend, own="sample" if decoupled else "self")
    # DCL's denominator leaves the positive out: its loss may be negative
    return _reduce(row - positive if decoupled else F.cross_entropy_rows(row, positive), reduction, info)


# ----------------------------------------------------------------------------- dcl_loss

@_with_args_doc
def dcl_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    *,
    weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    scheme: str = "ring",
    group=None,
    backend: str = "auto",
) -> Tensor:
    """Decoupled contrastive loss (fastnce.functional.dcl_loss) over the views of every rank.

    z1, z2 (n, D): this rank's two views, as in nt_xent. weight_fn sees this rank's rows (as
    lightly's DCLLoss with gather_distributed): a per-pair weight gives the single-process
    loss, a batch-wide one such as vmf_weights (a softmax over the batch) this rank's version.
    Returns this rank's share of the global mean (see the module docstring).
    """
    z1, z2 = cast_under_autocast(z1, z2)
    code = _checked("dcl_loss", group, scheme, backend, F.check_nt_xent_inputs, z1, z2, temperature, reduction)
    if code is None:
        return F.dcl_loss(z1, z2, temperature, reduction, weight_fn=weight_fn, backend=backend)
    z = l2_normalize(torch.cat([z1, z2]))
    with raising_on_every_rank("dcl_loss", group, z):  # weight_fn's output is checked as an argument
        weights = two_view_weights(z, weight_fn)
    return _nt_xent(z, temperature, scheme, code, group, backend, reduction, decoupled=True, weights=weights)


# ----------------------------------------------------------------------------- clip_loss

@_with_args_doc
def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    reduction: str = "mean",
    *,
    scheme: str = "ring",
    group=None,
    backend: str = "auto",
) -> Tensor:
    """CLIP's symmetric loss over the pairs of every rank (fastnce.clip_loss on the global batch).

    image_features, text_features (n, D): this rank's pairs, used as given; logit_scale the
    multiplier, the same on every rank (learnable: it gets the single-process gradient on
    every rank). Returns this rank's share of the global mean (see the module docstring).
    """
    image_features, text_features = cast_under_autocast(image_features, text_features)
    code = _checked("clip_loss", group, scheme, backend, F.check_clip_inputs, image_features, text_features, logit_scale,
                    reduction)
    if code is None:
        return F.clip_loss(image_features, text_features, logit_scale, reduction, backend=backend)
    return _clip_loss(image_features, text_features, logit_scale, scheme, code, group, backend, reduction)


def _clip_loss(a, b, logit_scale, scheme, code, group, backend, reduction="mean"):
    n = a.shape[0]
    info = exchange("clip_loss", group, _comm_device(a, group), rows=n, keys=n, dim=a.shape[1], dtype=a.dtype,
                    mode=code, reduction=reduction,
                    flags={"image_features": a.requires_grad, "text_features": b.requires_grad,
                           "logit_scale": _needs_grad(logit_scale)},
                    scalars={"logit_scale": logit_scale})
    scale = mean_grad_over_ranks(logit_scale, info)
    positive = paired_logits(a, b, scale)  # first, so that its backward runs last (see _nt_xent)
    if scheme == "ring":
        # Texts travel; images stay. Image rows' LSE over all texts is the row LSE; text rows'
        # LSE over all images is the column LSE, accumulated on the same trip (ring.py says why).
        img_lse, txt_lse = ring_lse(a, b, _scale_tensor(scale, a), info, with_col=True, backend=backend)
    else:
        img_lse, _ = similarity_lse(a, all_gather_with_grad(b, info, info.keys), scale, backend=backend)
        txt_lse, _ = similarity_lse(b, all_gather_with_grad(a, info, info.rows), scale, backend=backend)
    return _reduce(0.5 * (F.cross_entropy_rows(img_lse, positive) + F.cross_entropy_rows(txt_lse, positive)),
                   reduction, info)


# ----------------------------------------------------------------------------- siglip_loss

@_with_args_doc
def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    logit_bias: Union[None, float, Tensor] = None,
    reduction: str = "mean",
    *,
    scheme: str = "ring",
    group=None,
    backend: str = "auto",
) -> Tensor:
    """SigLIP's sigmoid loss over the pairs of every rank (fastnce.siglip_loss on the global batch).

    image_features, text_features (n, D): this rank's pairs, used as given; logit_scale and
    logit_bias the same on every rank (learnable: each gets the single-process gradient on
    every rank). This rank's images meet every rank's texts ('ring': the texts travel, as
    OpenCLIP's neighbour exchange; 'gather': all-gathered). Returns this rank's share of the
    global loss Σ_ij −log σ(±logit_ij) / N (see the module docstring): with equal local
    batches, OpenCLIP's SigLipLoss(rank, world_size) value.
    """
    image_features, text_features = cast_under_autocast(image_features, text_features)
    code = _checked("siglip_loss", group, scheme, backend, F.check_siglip_inputs, image_features, text_features,
                    logit_scale, logit_bias, reduction, op="sigmoid")
    if code is None:
        return F.siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction, backend=backend)
    return _siglip_loss(image_features, text_features, logit_scale, logit_bias, scheme, code, group, backend,
                        reduction)


def _siglip_loss(a, b, logit_scale, logit_bias, scheme, code, group, backend, reduction="mean"):
    n = a.shape[0]
    info = exchange("siglip_loss", group, _comm_device(a, group), rows=n, keys=n, dim=a.shape[1], dtype=a.dtype,
                    mode=10 * code + (logit_bias is None), mode_names="the scheme, and logit_bias given or None,",
                    reduction=reduction,
                    flags={"image_features": a.requires_grad, "text_features": b.requires_grad,
                           "logit_scale": _needs_grad(logit_scale), "logit_bias": _needs_grad(logit_bias)},
                    scalars={"logit_scale": logit_scale, "logit_bias": logit_bias})
    scale = _scale_tensor(mean_grad_over_ranks(logit_scale, info), a)
    bias = None if logit_bias is None else _scale_tensor(mean_grad_over_ranks(logit_bias, info), a)
    if scheme == "ring":
        per_image = ring_sigmoid_nll(a, b, scale, bias, info, backend=backend)
    else:  # image i (global row_offset + i) is paired with global text key_offset + i
        per_image = similarity_sigmoid_nll(a, all_gather_with_grad(b, info, info.keys), scale, bias,
                                           positive_offset=info.key_offset, backend=backend)
    return _reduce(per_image, reduction, info)


# ----------------------------------------------------------------------------- info_nce

_INFO_MODES = {None: 0, "unpaired": 1, "paired": 2}


@_with_args_doc
def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
    *,
    scheme: str = "ring",
    group=None,
    backend: str = "auto",
) -> Tensor:
    """InfoNCE (fastnce.info_nce) over the global batch of every rank.

    query, positive_key (n, D): this rank's rows. negative_keys None: every rank's positive
    keys are the candidates; (m, D) with 'unpaired': this rank's negatives, the global set
    being every rank's (m may differ across ranks); (n, M, D) with 'paired': each row's own
    negatives (nothing crosses ranks but the normalisation). Returns this rank's share of
    the global mean (see the module docstring).
    """
    query, positive_key, negative_keys = cast_under_autocast(query, positive_key, negative_keys)
    code = _checked("info_nce", group, scheme, backend, F.check_info_nce_inputs, query, positive_key, negative_keys,
                    temperature, reduction, negative_mode)
    if code is None:
        return F.info_nce(query, positive_key, negative_keys, temperature, reduction, negative_mode,
                          backend=backend)
    return _info_nce(query, positive_key, negative_keys, temperature, negative_mode, scheme, code, group, backend,
                     reduction)


def _info_nce(query, positive_key, negative_keys, temperature, negative_mode, scheme, code, group, backend,
              reduction="mean"):
    mode = _INFO_MODES[None if negative_keys is None else negative_mode]
    n = query.shape[0]
    unpaired = mode == 1
    keys_in = negative_keys if unpaired else positive_key
    info = exchange("info_nce", group, _comm_device(query, group), rows=n,
                    keys=keys_in.shape[0] if mode != 2 else n, dim=query.shape[-1], dtype=query.dtype,
                    mode=10 * code + mode, reduction=reduction,
                    flags={"query": query.requires_grad, "positive_key": positive_key.requires_grad,
                           "negative_keys": _needs_grad(negative_keys), "temperature": _needs_grad(temperature)},
                    scalars={"temperature": temperature})
    temperature = mean_grad_over_ranks(temperature, info)
    if mode == 2:  # each row's own negatives: a local loss, only the normalisation is global
        per_row = F.info_nce(query, positive_key, negative_keys, temperature, reduction="none",
                             negative_mode="paired", backend=backend)
        return _reduce(per_row, reduction, info)
    q, p = l2_normalize(query), l2_normalize(positive_key)
    scale = reciprocal_temperature(temperature, q)
    positive = paired_logits(q, p, scale)
    if unpaired:
        row = _row_lse(scheme, q, l2_normalize(negative_keys), scale, info, backend)
        per_row = torch.logaddexp(positive, row) - positive
    else:
        row = _row_lse(scheme, q, p, scale, info, backend)
        per_row = F.cross_entropy_rows(row, positive)
    return _reduce(per_row, reduction, info)
