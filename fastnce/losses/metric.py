"""Supervised metric-learning losses in pytorch-metric-learning's call convention.

loss(embeddings (N, D), labels (N,)) with pml's defaults (distances, margins, normalisation,
reducers). SupCon, soft nearest neighbours and N-pairs are logsumexps over pairs and run on
fastnce.ops.similarity_lse; contrastive, triplet and lifted structured are functions of the
Euclidean distance and run as tiled PyTorch over row blocks, each block recomputed in the
backward (O(N·D + block) memory, never the N×N matrix).

Not supported from pml: indices_tuple / miners (TripletMarginLoss has mining='batch_hard'
built in), ref_emb, custom distances (only pml's default distance with its
normalize_embeddings flag), custom reducers, embedding regularisers.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_finite_scalar, check_reduction, check_temperature, reciprocal_temperature, reduce
from ..functional import cross_entropy_rows, l2_normalize, paired_logits
from ..ops import lse_dtype, similarity_lse
from ._common import (
    block_distances, blockwise, class_index, describe, embeddings_and_labels, pair_masks, zero_loss,
)

__all__ = [
    "supcon_loss", "SupConLoss", "soft_nearest_neighbor_loss", "SoftNearestNeighborLoss",
    "contrastive_loss", "ContrastiveLoss", "triplet_margin_loss", "TripletMarginLoss",
    "npairs_loss", "NPairsLoss", "lifted_structure_loss", "LiftedStructureLoss",
]


def _avg_nonzero(total: Tensor, count: Tensor, embeddings: Tensor) -> Tensor:
    """pml's AvgNonZeroReducer from a sum over the terms > 0 and their number."""
    if int(count) == 0:
        return zero_loss(embeddings)
    return total / count


# ------------------------------------------------------------------------------ SupCon

def supcon_loss(embeddings: Tensor, labels: Tensor, temperature: Union[float, Tensor] = 0.1,
                reduction: str = "mean", *, backend: str = "auto") -> Tensor:
    """Supervised contrastive loss, L^sup_out (Khosla et al. 2020, "Supervised Contrastive
    Learning", eq. 2), as pytorch-metric-learning's SupConLoss (cosine similarity, T = 0.1).

    Per anchor i with P(i) ≠ ∅ (same label, i excluded):
        ℓ_i = row_lse_i − (1/|P(i)|) Σ_{p∈P(i)} z_i·z_p / T,   row_lse over all j ≠ i,
    z = normalize(embeddings). row_lse from the primitive; the positives' sum from per-class
    sums of z, z_i·(Σ_{y_j = y_i} z_j − z_i): O(N·D).
    Anchors without positives get 0 (as pml). reduction='mean' is pml's AvgNonZeroReducer:
    the mean over anchors with ℓ_i > 0, i.e. those with a positive (ℓ_i > 0 exactly then, when
    the batch has a negative; counted by their positives, since float32 rounds the ℓ_i of a
    well-separated anchor, ~1e-7 beside terms of 1/T, to 0); the batch loss is 0 (connected to
    the graph) when it has no positive pair or no negative pair.
    'sum' / 'none' give the sum / (N,) of ℓ_i.
    """
    embeddings, labels = embeddings_and_labels(embeddings, labels)
    check_temperature(temperature)
    check_reduction(reduction)
    # before the data-dependent branch below, where torch.compile breaks the graph: the part
    # after it then gets the scale as a tensor, not a float that it would specialise on
    scale = reciprocal_temperature(temperature, embeddings)
    inverse, counts = class_index(labels)
    n_pos = counts[inverse] - 1
    if reduction == "mean" and (not bool((n_pos > 0).any()) or counts.numel() < 2):
        return zero_loss(embeddings)
    z = l2_normalize(embeddings)
    row_lse, _ = similarity_lse(z, None, scale, exclude_self=True, backend=backend)
    zf = z.to(row_lse.dtype)
    class_sum = zf.new_zeros(counts.numel(), zf.shape[1]).index_add_(0, inverse, zf)
    pos_mean = paired_logits(zf, class_sum[inverse] - zf, scale) / n_pos.clamp_min(1)
    per_row = torch.where(n_pos > 0, cross_entropy_rows(row_lse, pos_mean), torch.zeros_like(row_lse))
    if reduction == "mean":
        return per_row.sum() / (n_pos > 0).sum()
    return reduce(per_row, reduction)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020); drop-in for
    pytorch_metric_learning.losses.SupConLoss(temperature=0.1): loss(embeddings, labels).
    See supcon_loss."""

    def __init__(self, temperature: float = 0.1, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        check_temperature(temperature)
        check_reduction(reduction)
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return supcon_loss(embeddings, labels, self.temperature, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return describe(self, "temperature", "reduction", "backend")


# ------------------------------------------------------------------------------ Soft nearest neighbours

def soft_nearest_neighbor_loss(embeddings: Tensor, labels: Tensor, temperature: Union[float, Tensor] = 1.0,
                               reduction: str = "mean", *, backend: str = "auto") -> Tensor:
    """Soft nearest neighbour loss (Frosst, Papernot & Hinton 2019, "Analyzing and Improving
    Representations with the Soft Nearest Neighbor Loss"), squared Euclidean distance:

        ℓ_i = −log( Σ_{j≠i, y_j=y_i} e^{−‖x_i−x_j‖²/T} / Σ_{k≠i} e^{−‖x_i−x_k‖²/T} )

    Embeddings are used as given (no normalisation). Via the primitive with scale 2/T and
    column bias −‖x_j‖²/T (the −‖x_i‖²/T term cancels in the ratio): ℓ_i = lse_all − lse_same.
    A learnable temperature may be a 0-dim tensor.
    Convention: a sample with no same-class partner has an undefined (infinite) ℓ_i; it gets
    0 and is left out of the 'mean' (the mean over samples that have a partner; 0, connected
    to the graph, when none has). 'sum' / 'none' give the sum / (N,) with those zeros.
    """
    embeddings, labels = embeddings_and_labels(embeddings, labels)
    check_temperature(temperature)
    check_reduction(reduction)
    inverse, counts = class_index(labels)
    has_partner = counts[inverse] > 1
    if reduction == "mean" and not bool(has_partner.any()):
        return zero_loss(embeddings)
    acc = lse_dtype(embeddings.dtype)
    sq = embeddings.to(acc).pow(2).sum(1)
    scale = reciprocal_temperature(temperature, embeddings, 2.0)
    bias = -sq / temperature
    lse_all, _ = similarity_lse(embeddings, None, scale, bias, exclude_self=True, backend=backend)
    lse_same, _ = similarity_lse(embeddings, None, scale, bias, labels=labels, label_mask="same",
                                 exclude_self=True, backend=backend)
    per_row = torch.where(has_partner, cross_entropy_rows(lse_all, lse_same.masked_fill(~has_partner, 0.0)),
                          torch.zeros_like(lse_all))
    if reduction == "mean":
        return per_row[has_partner].mean()
    return reduce(per_row, reduction)


class SoftNearestNeighborLoss(nn.Module):
    """Soft nearest neighbour loss (Frosst et al. 2019): loss(embeddings, labels); see
    soft_nearest_neighbor_loss. temperature=1.0 by default (the paper tunes or learns it)."""

    def __init__(self, temperature: float = 1.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        check_temperature(temperature)
        check_reduction(reduction)
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return soft_nearest_neighbor_loss(embeddings, labels, self.temperature, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return describe(self, "temperature", "reduction", "backend")


# ------------------------------------------------------------------------------ distance-based (tiled)

def _prepared(embeddings, labels, normalize_embeddings):
    embeddings, labels = embeddings_and_labels(embeddings, labels)
    x = embeddings.to(lse_dtype(embeddings.dtype))
    if normalize_embeddings:
        x = l2_normalize(x)
    return embeddings, labels, x, x.pow(2).sum(1)


def contrastive_loss(embeddings: Tensor, labels: Tensor, pos_margin: float = 0.0, neg_margin: float = 1.0,
                     normalize_embeddings: bool = True) -> Tensor:
    """Contrastive loss (Hadsell, Chopra & LeCun 2006) as pytorch-metric-learning's
    ContrastiveLoss: Euclidean distance of L2-normalised embeddings,
    mean_{nonzero} relu(d_ij − pos_margin) over ordered positive pairs (i ≠ j) +
    mean_{nonzero} relu(neg_margin − d_ij) over ordered negative pairs (AvgNonZeroReducer each,
    summed). Tiled over row blocks, recomputed in the backward.
    """
    check_finite_scalar(pos_margin, "pos_margin")
    check_finite_scalar(neg_margin, "neg_margin")
    embeddings, labels, x, sq = _prepared(embeddings, labels, normalize_embeddings)

    def block(i0, i1, x, sq):
        d = block_distances(x[i0:i1], x, sq[i0:i1], sq)
        pos, neg = pair_masks(labels[i0:i1], labels, i0)
        lp = F.relu(d - pos_margin).masked_fill(~pos, 0)
        ln = F.relu(neg_margin - d).masked_fill(~neg, 0)
        return lp.sum(), (lp > 0).sum(), ln.sum(), (ln > 0).sum()

    parts = blockwise(block, x.shape[0], x.shape[0], x, sq)
    sp, cp, sn, cn = (torch.stack(p).sum() for p in zip(*parts))
    return _avg_nonzero(sp, cp, embeddings) + _avg_nonzero(sn, cn, embeddings)


class ContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell et al. 2006); drop-in for pytorch_metric_learning's
    ContrastiveLoss(pos_margin=0, neg_margin=1) with its defaults (LpDistance on normalised
    embeddings, AvgNonZeroReducer). See contrastive_loss."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, normalize_embeddings: bool = True):
        super().__init__()
        check_finite_scalar(pos_margin, "pos_margin")
        check_finite_scalar(neg_margin, "neg_margin")
        self.pos_margin, self.neg_margin, self.normalize_embeddings = pos_margin, neg_margin, normalize_embeddings

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return contrastive_loss(embeddings, labels, self.pos_margin, self.neg_margin, self.normalize_embeddings)

    def extra_repr(self) -> str:
        return describe(self, "pos_margin", "neg_margin", "normalize_embeddings")


def triplet_margin_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.05, mining: str = "all",
                        normalize_embeddings: bool = True) -> Tensor:
    """Triplet margin loss (Weinberger & Saul 2009; Schroff et al. 2015, FaceNet) as
    pytorch-metric-learning's TripletMarginLoss: relu(d_ap − d_an + margin), Euclidean
    distance of L2-normalised embeddings, mean over the nonzero terms (AvgNonZeroReducer).

    mining='all': every triplet (a, p, n), y_p = y_a, p ≠ a, y_n ≠ y_a (pml's
    triplets_per_anchor='all'). Per row block, each anchor's negative distances are sorted once
    and, for each positive, the sum over negatives with d_an < d_ap + margin is
    count·(d_ap + margin) − (prefix sum of the sorted d_an): O(N² log N) time, O(block) memory,
    no N³ triplet tensor.
    mining='batch_hard' (Hermans et al. 2017): per anchor, its farthest positive and nearest
    negative (blockwise max / min), anchors lacking either skipped: equals pml's
    TripletMarginLoss with BatchHardMiner's triplets.
    """
    if mining not in ("all", "batch_hard"):
        raise ValueError(f"mining must be 'all' or 'batch_hard', got {mining!r}")
    check_finite_scalar(margin, "margin")
    embeddings, labels, x, sq = _prepared(embeddings, labels, normalize_embeddings)
    N = x.shape[0]

    if mining == "batch_hard":
        def block(i0, i1, x, sq):
            d = block_distances(x[i0:i1], x, sq[i0:i1], sq)
            pos, neg = pair_masks(labels[i0:i1], labels, i0)
            d_ap = d.masked_fill(~pos, float("-inf")).max(1).values
            d_an = d.masked_fill(~neg, float("inf")).min(1).values
            ok = pos.any(1) & neg.any(1)
            per = torch.where(ok, F.relu(d_ap.masked_fill(~ok, 0) - d_an.masked_fill(~ok, 0) + margin),
                              torch.zeros_like(d_ap))
            return per.sum(), (per > 0).sum()
    else:
        def block(i0, i1, x, sq):
            d = block_distances(x[i0:i1], x, sq[i0:i1], sq)
            pos, neg = pair_masks(labels[i0:i1], labels, i0)
            # in float64, where d_ap + margin is exact: which terms are non-zero is decided as in
            # exact arithmetic (a rounded float32 threshold miscounted at large distances, and
            # the count divides the loss)
            sorted_neg = d.masked_fill(~neg, float("inf")).sort(1).values.to(torch.float64).contiguous()
            prefix = sorted_neg.cumsum(1)
            threshold = (d.to(torch.float64) + margin).masked_fill(~pos, float("-inf")).contiguous()
            count = torch.searchsorted(sorted_neg.detach(), threshold.detach())  # #{n: d_an < d_ap + m}
            below = prefix.gather(1, (count - 1).clamp_min(0))
            per = torch.where(count > 0, count * threshold - below, torch.zeros_like(below))
            return per.sum().to(x.dtype), count.sum()

    parts = blockwise(block, N, N, x, sq)
    total, count = (torch.stack(p).sum() for p in zip(*parts))
    return _avg_nonzero(total, count, embeddings)


class TripletMarginLoss(nn.Module):
    """Triplet margin loss; drop-in for pytorch_metric_learning's TripletMarginLoss(margin=0.05)
    with triplets_per_anchor='all' (mining='all') or with BatchHardMiner (mining='batch_hard').
    swap and smooth_loss are not supported. See triplet_margin_loss."""

    def __init__(self, margin: float = 0.05, mining: str = "all", normalize_embeddings: bool = True):
        super().__init__()
        check_finite_scalar(margin, "margin")
        if mining not in ("all", "batch_hard"):
            raise ValueError(f"mining must be 'all' or 'batch_hard', got {mining!r}")
        self.margin, self.mining, self.normalize_embeddings = margin, mining, normalize_embeddings

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return triplet_margin_loss(embeddings, labels, self.margin, self.mining, self.normalize_embeddings)

    def extra_repr(self) -> str:
        return describe(self, "margin", "mining", "normalize_embeddings")


def lifted_structure_loss(embeddings: Tensor, labels: Tensor, neg_margin: float = 1.0, pos_margin: float = 0.0,
                          normalize_embeddings: bool = True) -> Tensor:
    """Lifted structured loss (Oh Song et al. 2016, "Deep Metric Learning via Lifted Structured
    Feature Embedding") as pytorch-metric-learning's LiftedStructureLoss: per ordered positive
    pair (i, j),
        ½ relu( log(Σ_{n: y_n≠y_i} e^{m_neg − d_in} + Σ_{n: y_n≠y_j} e^{m_neg − d_jn}) + d_ij − m_pos )²,
    Euclidean distance of L2-normalised embeddings, mean over all ordered positive pairs (pml's
    default MeanReducer: pairs whose term is 0 count). Two tiled passes: the per-row negative
    logsumexp L_i, then the positive pairs with logaddexp(L_i, L_j).
    """
    check_finite_scalar(neg_margin, "neg_margin")
    check_finite_scalar(pos_margin, "pos_margin")
    embeddings, labels, x, sq = _prepared(embeddings, labels, normalize_embeddings)
    N = x.shape[0]
    inverse, counts = class_index(labels)
    if counts.numel() < 2 or not bool((counts > 1).any()):
        return zero_loss(embeddings)

    def neg_lse(i0, i1, x, sq):
        d = block_distances(x[i0:i1], x, sq[i0:i1], sq)
        _, neg = pair_masks(labels[i0:i1], labels, i0)
        return torch.logsumexp((neg_margin - d).masked_fill(~neg, float("-inf")), 1)

    L = torch.cat(blockwise(neg_lse, N, N, x, sq))  # every row has a negative: ≥ 2 classes

    def pos_pairs(i0, i1, x, sq, L):
        d = block_distances(x[i0:i1], x, sq[i0:i1], sq)
        pos, _ = pair_masks(labels[i0:i1], labels, i0)
        per = F.relu(torch.logaddexp(L[i0:i1, None], L[None, :]) + d - pos_margin).pow(2).mul(0.5)
        per = per.masked_fill(~pos, 0)
        return per.sum(), pos.sum()

    parts = blockwise(pos_pairs, N, N, x, sq, L)
    total, count = (torch.stack(p).sum() for p in zip(*parts))
    return total / count  # count > 0: some class has two members


class LiftedStructureLoss(nn.Module):
    """Lifted structured loss; drop-in for pytorch_metric_learning's
    LiftedStructureLoss(neg_margin=1, pos_margin=0). See lifted_structure_loss."""

    def __init__(self, neg_margin: float = 1.0, pos_margin: float = 0.0, normalize_embeddings: bool = True):
        super().__init__()
        check_finite_scalar(neg_margin, "neg_margin")
        check_finite_scalar(pos_margin, "pos_margin")
        self.neg_margin, self.pos_margin, self.normalize_embeddings = neg_margin, pos_margin, normalize_embeddings

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return lifted_structure_loss(embeddings, labels, self.neg_margin, self.pos_margin, self.normalize_embeddings)

    def extra_repr(self) -> str:
        return describe(self, "neg_margin", "pos_margin", "normalize_embeddings")


# ------------------------------------------------------------------------------ N-pairs

def npairs_loss(embeddings: Tensor, labels: Tensor, normalize_embeddings: bool = True, *,
                backend: str = "auto") -> Tensor:
    """N-pair loss (Sohn 2016, "Improved Deep Metric Learning with Multi-class N-pair Loss
    Objective") as pytorch-metric-learning's NPairsLoss: one (anchor, positive) pair per class
    with at least two members (its first and second member in batch order), dot products of
    L2-normalised embeddings (pml's default DotProductSimilarity normalises), cross-entropy of
    each anchor over all pairs' positives: row_lse(anchors · positivesᵀ) − a_i·p_i through the
    primitive, mean over pairs (MeanReducer). No L2 regulariser (pml has none by default).
    """
    embeddings, labels = embeddings_and_labels(embeddings, labels)
    order = torch.sort(labels, stable=True).indices          # by label, then batch position
    sorted_labels = labels[order]
    first = torch.ones_like(sorted_labels, dtype=torch.bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    has_second = torch.zeros_like(first)
    has_second[:-1] = first[:-1] & ~first[1:]
    starts = torch.nonzero(has_second).flatten()
    if starts.numel() == 0:
        return zero_loss(embeddings)
    x = l2_normalize(embeddings) if normalize_embeddings else embeddings
    anchors, positives = x[order[starts]], x[order[starts + 1]]
    row_lse, _ = similarity_lse(anchors, positives, 1.0, backend=backend)
    return cross_entropy_rows(row_lse, paired_logits(anchors, positives, 1.0)).mean()


class NPairsLoss(nn.Module):
    """N-pair loss (Sohn 2016); drop-in for pytorch_metric_learning's NPairsLoss(). See npairs_loss."""

    def __init__(self, normalize_embeddings: bool = True, backend: str = "auto"):
        super().__init__()
        self.normalize_embeddings, self.backend = normalize_embeddings, backend

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return npairs_loss(embeddings, labels, self.normalize_embeddings, backend=self.backend)

    def extra_repr(self) -> str:
        return describe(self, "normalize_embeddings", "backend")
