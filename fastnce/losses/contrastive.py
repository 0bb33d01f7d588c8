"""Self-supervised contrastive losses on the primitive: SimCLR (any number of views), DCL, MoCo,
CLIP, SigLIP, CPC.

Each is `fastnce.ops.similarity_lse` (row logsumexp over all pairs, tile by tile) minus
positive logits that cost O(N·D); SigLIP is `fastnce.ops.similarity_sigmoid_nll`. `backend` is
passed through to the primitive.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._checks import (
    cast_under_autocast,
    check_features, check_finite_scalar, check_reduction, check_same, check_temperature, reciprocal_temperature, reduce,
)
from ..functional import (
    clip_loss, cross_entropy_rows, dcl_loss, info_nce, l2_normalize, nt_xent, paired_logits, siglip_loss, vmf_weights,
)
from .. import distributed as fd
from ..distributed._comm import raising_on_every_rank
from ..ops import lse_dtype, similarity_lse
from ._common import check_count, check_views, describe, momentum_update

__all__ = [
    "nt_xent_multiview", "NTXentLoss", "dcl_loss", "vmf_weights", "DCLLoss", "DCLWLoss", "MoCoLoss",
    "momentum_update", "ClipLoss", "SigLipLoss", "zero_shot_logits", "zero_shot_predict", "cpc_loss", "CPCLoss", "GRUContext",
]


def _check_scheme(distributed) -> None:
    if distributed is not None and distributed not in fd.SCHEMES:
        raise ValueError(f"distributed must be None or one of {fd.SCHEMES}, got {distributed!r}")


# ------------------------------------------------------------------------------ SimCLR

def _stack_views(views) -> Tensor:
    if isinstance(views, Tensor):
        if views.dim() != 3:
            raise ValueError(f"views as a tensor must have shape (V, N, D), got {tuple(views.shape)}")
        if views.shape[1] == 0 or views.shape[2] == 0:
            raise ValueError(f"views must have at least one sample and one feature, got shape {tuple(views.shape)}")
        return views
    views = cast_under_autocast(*check_views("views", views))
    check_same({f"views[{i}]": v for i, v in enumerate(views)})
    return torch.stack(list(views))


def nt_xent_multiview(views, temperature: Union[float, Tensor] = 0.1, reduction: str = "mean", *,
                      backend: str = "auto") -> Tensor:
    """NT-Xent over V ≥ 2 views (SimCLR, Chen et al. 2020; multi-view as in Khosla et al. 2020 §3.2).

    views: (V, N, D) tensor or list/tuple of V tensors (N, D), row n of each a view of sample n.
    Z = normalize([views[0]; …; views[V−1]]) (V·N rows). Every row is an anchor, every other
    view of the same sample a positive; the loss of a pair (i, p) is
    row_lse_i (all V·N − 1 other rows, self excluded) − Z_i·Z_p/T, averaged over all pairs.
    Positive logits come from per-sample sums of the views: O(N·V·D).
    Returns a scalar, or with reduction='none' (V·N,) per anchor (mean over its V − 1 positives),
    view-major. For V = 2 equal to fastnce.nt_xent.

    Differs from pytorch-metric-learning's NTXentLoss for V > 2: pml leaves the other positives
    out of each pair's denominator; here they stay in (SimCLR's denominator, all other rows).
    """
    check_temperature(temperature)
    check_reduction(reduction)
    views = _stack_views(views)
    check_features("views", views, ndim=3)
    V, N, D = views.shape
    if V < 2:
        raise ValueError(f"at least two views are needed, got {V}")
    z = l2_normalize(views.reshape(V * N, D))
    scale = reciprocal_temperature(temperature, z)
    row_lse, _ = similarity_lse(z, None, scale, exclude_self=True, backend=backend)
    acc = row_lse.dtype
    zf = z.to(acc)
    per_sample = zf.reshape(V, N, D).sum(0)                # Σ_v z_{v,n}
    others = per_sample.repeat(V, 1) - zf                 # Σ_{v' ≠ v} z_{v',n}
    positive = paired_logits(zf, others, scale) / (V - 1)  # the positives' mean: ≤ their LSE
    return reduce(cross_entropy_rows(row_lse, positive), reduction)


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
    Visual Representations"), two or more views.

    forward(z1, z2): z1, z2 (N, D) → fastnce.nt_xent (2N anchors).
    forward(views): a (V, N, D) tensor or a list/tuple of V tensors (N, D) → nt_xent_multiview.
    Returns a scalar ('mean', 'sum') or per-anchor losses ('none', (V·N,)).
    distributed='ring' or 'gather': two views over the global batch of all ranks of `group`
    (None: the default group; fastnce.distributed.nt_xent).
    """

    def __init__(self, temperature: float = 0.1, reduction: str = "mean", backend: str = "auto",
                 distributed: Optional[str] = None, group=None):
        super().__init__()
        check_temperature(temperature)
        check_reduction(reduction)
        _check_scheme(distributed)
        self.temperature, self.reduction, self.backend = temperature, reduction, backend
        self.distributed, self.group = distributed, group

    def forward(self, z1, z2: Optional[Tensor] = None) -> Tensor:
        if z2 is not None:
            if self.distributed:
                return fd.nt_xent(z1, z2, self.temperature, reduction=self.reduction,
                                  scheme=self.distributed, group=self.group, backend=self.backend)
            return nt_xent(z1, z2, self.temperature, self.reduction, backend=self.backend)
        if self.distributed:
            raise ValueError("distributed NT-Xent takes two views, forward(z1, z2); got a multi-view input")
        return nt_xent_multiview(z1, self.temperature, self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return describe(self, "temperature", "reduction", "backend", "distributed", "group")


# ------------------------------------------------------------------------------ DCL

class DCLLoss(nn.Module):
    """Decoupled contrastive learning (Yeh et al. 2022): forward(z1, z2) → `dcl_loss`.

    Drop-in for lightly's DCLLoss(temperature, weight_fn): the same values and gradients.
    Returns a scalar, or (2N,) with reduction='none'. distributed='ring' or 'gather': over the
    global batch of all ranks of `group` (fastnce.distributed.dcl_loss; lightly's
    gather_distributed=True is 'gather').
    """

    def __init__(self, temperature: float = 0.1, weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 reduction: str = "mean", backend: str = "auto", distributed: Optional[str] = None, group=None):
        super().__init__()
        check_temperature(temperature)
        check_reduction(reduction)
        _check_scheme(distributed)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be None or a callable (z1, z2) -> (N,) weights, got {type(weight_fn).__name__}")
        self.temperature, self.weight_fn, self.reduction, self.backend = temperature, weight_fn, reduction, backend
        self.distributed, self.group = distributed, group

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.distributed:
            return fd.dcl_loss(z1, z2, self.temperature, self.reduction, weight_fn=self.weight_fn,
                               scheme=self.distributed, group=self.group, backend=self.backend)
        return dcl_loss(z1, z2, self.temperature, self.reduction, weight_fn=self.weight_fn, backend=self.backend)

    def extra_repr(self) -> str:
        return describe(self, "temperature", "weight_fn", "reduction", "backend", "distributed", "group")


class DCLWLoss(DCLLoss):
    """Weighted DCL (Yeh et al. 2022): DCLLoss with `vmf_weights`(sigma) on the positives.
    Drop-in for lightly's DCLWLoss(temperature, sigma)."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, reduction: str = "mean", backend: str = "auto",
                 distributed: Optional[str] = None, group=None):
        check_temperature(sigma, "sigma")  # a positive finite number, as a temperature
        super().__init__(temperature, partial(vmf_weights, sigma=sigma), reduction, backend, distributed, group)
        self.sigma = sigma

    def extra_repr(self) -> str:
        return describe(self, "sigma", "temperature", "reduction", "backend", "distributed", "group")


# ------------------------------------------------------------------------------ MoCo

class MoCoLoss(nn.Module):
    """MoCo's InfoNCE against a queue of keys (He et al. 2020, "Momentum Contrast for
    Unsupervised Visual Representation Learning"). Defaults: the official code's (queue 65536,
    temperature 0.07, MoCo v1's; the MoCo v2 recipe trains with temperature=0.2).

    Buffers: `queue` (queue_size, dim), L2-normalised keys, random normalised at start as in
    MoCo; `queue_ptr` () int64, next slot. Both are in the state_dict.
    forward(query, key): query, key (N, dim), normalised inside; key is the momentum encoder's
    output (compute it under torch.no_grad(): it is used as given). Loss per row
    logaddexp(pos, row_lse over the queue) − pos with pos = q·k/T (the primitive holds no N×K
    matrix). Then the keys are enqueued (detached, normalised, wrap-around) if update_queue,
    which by default (None) is the module's training mode: a validation loss under .eval()
    leaves the queue alone. Returns a scalar, or (N,) with reduction='none'.
    Use `momentum_update(key_encoder, query_encoder, m)` for the key encoder.
    distributed=True: the keys of every rank of `group` (None: the default group) are enqueued
    (fastnce.distributed.gather_keys), so the queue stays the same on every rank; the loss
    itself is each rank's own rows.
    """

    def __init__(self, dim: int, queue_size: int = 65536, temperature: float = 0.07,
                 reduction: str = "mean", backend: str = "auto", distributed: bool = False, group=None):
        super().__init__()
        check_count(dim, "dim", 1)
        check_count(queue_size, "queue_size", 1)
        dim, queue_size = int(dim), int(queue_size)  # a numpy integer too
        check_temperature(temperature)
        check_reduction(reduction)
        self.dim, self.queue_size = dim, queue_size
        self.temperature, self.reduction, self.backend = temperature, reduction, backend
        self.distributed, self.group = bool(distributed), group
        self.register_buffer("queue", l2_normalize(torch.randn(queue_size, dim)))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write keys (n, dim) into the queue at the pointer, wrapping around (the oldest go)."""
        check_features("keys", keys)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must have {self.dim} columns, got shape {tuple(keys.shape)}")
        keys = l2_normalize(keys.detach()).to(self.queue.dtype)
        if keys.shape[0] > self.queue_size:
            keys = keys[-self.queue_size:]
        # The pointer stays a tensor: no device-to-host sync per step, and torch.compile keeps
        # the enqueue in its graph.
        n = keys.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % self.queue_size
        self.queue.index_copy_(0, idx, keys.to(self.queue.device))
        self.queue_ptr.add_(n).remainder_(self.queue_size)

    def forward(self, query: Tensor, key: Tensor, update_queue: Optional[bool] = None) -> Tensor:
        enqueue = self.training if update_queue is None else update_queue
        # Distributed, the enqueue is collective: a rank whose arguments are rejected tells the others.
        with raising_on_every_rank("gather_keys", self.group, key) if self.distributed and enqueue else nullcontext():
            for name, x in (("query", query), ("key", key)):
                if not isinstance(x, Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
                if x.shape[-1:] != (self.dim,):
                    raise ValueError(f"{name} must have dim = {self.dim} features (the queue's), got shape {tuple(x.shape)}")
            queue = self.queue.to(query.dtype) if self.queue.dtype != query.dtype else self.queue
            loss = info_nce(query, key, queue.detach(), self.temperature, self.reduction,
                            "unpaired", backend=self.backend)
        if enqueue:
            self.enqueue(fd.gather_keys(key, self.group) if self.distributed else key)
        return loss

    def extra_repr(self) -> str:
        return describe(self, "dim", "queue_size", "temperature", "reduction", "backend", "distributed", "group")


# ------------------------------------------------------------------------------ CLIP

class _ImageTextLoss(nn.Module):
    """What CLIP's and SigLIP's modules share: the learnable temperature as CLIP keeps it
    (`logit_scale` = log(1 / init_temperature), a buffer if learnable=False, never above
    log(max_logit_scale): see scale()), optional L2 normalisation, reduction, backend,
    distributed scheme and group."""

    def __init__(self, init_temperature, learnable, max_logit_scale, normalize, reduction, backend, distributed,
                 group):
        super().__init__()
        check_temperature(init_temperature, "init_temperature")
        check_temperature(max_logit_scale, "max_logit_scale")
        check_reduction(reduction)
        self._add_scalar("logit_scale", min(math.log(1.0 / init_temperature), math.log(max_logit_scale)), learnable)
        self.max_logit_scale, self.normalize = max_logit_scale, normalize
        _check_scheme(distributed)
        self.reduction, self.backend, self.distributed, self.group = reduction, backend, distributed, group

    def _add_scalar(self, name: str, value: float, learnable: bool) -> None:
        value = torch.tensor(float(value))
        if learnable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def scale(self) -> Tensor:
        """The multiplier exp(logit_scale), at most max_logit_scale.

        A learnable logit_scale is clamped in place first, as OpenCLIP's training loop clamps it
        after every optimiser step: at the cap its gradient still flows, so the scale can come
        back down (a clamp in the graph would zero its gradient above the cap, for good). exp's
        backward keeps its output, not the parameter: two calls before one backward are fine.
        """
        cap = math.log(self.max_logit_scale)
        if self.logit_scale.requires_grad:
            with torch.no_grad():
                self.logit_scale.clamp_(max=cap)
            return self.logit_scale.exp()
        return self.logit_scale.clamp(max=cap).exp()

    def _features(self, image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor]:
        if self.normalize:
            return l2_normalize(image_features), l2_normalize(text_features)
        return image_features, text_features

    def extra_repr(self) -> str:
        return describe(self, "max_logit_scale", "normalize", "reduction", "backend", "distributed", "group")


class ClipLoss(_ImageTextLoss):
    """CLIP's symmetric contrastive loss with its learnable temperature (Radford et al. 2021,
    "Learning Transferable Visual Models From Natural Language Supervision").

    Parameter `logit_scale` = log(1 / init_temperature) (a buffer if learnable=False); the
    multiplier is exp(logit_scale), at most max_logit_scale (100, as CLIP): each forward clamps
    the parameter in place at log(max_logit_scale), where OpenCLIP's training loop clamps it
    after each optimiser step, so its gradient flows at the cap (see scale()).
    forward(image_features, text_features): (N, D) each; L2-normalised inside when
    normalize=True (CLIP's model does it before the loss), then fastnce.clip_loss.
    Returns a scalar, or (N,) with reduction='none'.
    distributed='ring' or 'gather': over the global batch of all ranks of `group`
    (fastnce.distributed.clip_loss).
    """

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 distributed: Optional[str] = None, group=None):
        super().__init__(init_temperature, learnable, max_logit_scale, normalize, reduction, backend, distributed,
                         group)

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        image_features, text_features = self._features(image_features, text_features)
        scale = self.scale().to(lse_dtype(image_features.dtype))
        if self.distributed:
            return fd.clip_loss(image_features, text_features, scale, reduction=self.reduction,
                                scheme=self.distributed, group=self.group, backend=self.backend)
        return clip_loss(image_features, text_features, scale, self.reduction, backend=self.backend)


class SigLipLoss(_ImageTextLoss):
    """SigLIP's pairwise sigmoid loss with its learnable temperature and bias (Zhai et al. 2023,
    "Sigmoid Loss for Language Image Pre-Training").

    Parameters `logit_scale` = log(1 / init_temperature) and `logit_bias` = init_bias (the
    paper's initialisation: temperature 0.1, i.e. a multiplier of 10, and bias −10; buffers if
    learnable=False); the multiplier is clamped at max_logit_scale as in ClipLoss.
    forward(image_features, text_features): (N, D) each, L2-normalised inside when normalize=True,
    then fastnce.siglip_loss. Returns Σ_ij −log σ(±logit_ij) / N (OpenCLIP's SigLipLoss), the
    sum with reduction='sum', or the (N,) per-image sums with 'none'.
    distributed='ring' or 'gather': over the global batch of all ranks of `group`
    (fastnce.distributed.siglip_loss).
    """

    def __init__(self, init_temperature: float = 0.1, init_bias: float = -10.0, learnable: bool = True,
                 max_logit_scale: float = 100.0, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", distributed: Optional[str] = None, group=None):
        super().__init__(init_temperature, learnable, max_logit_scale, normalize, reduction, backend, distributed,
                         group)
        check_finite_scalar(init_bias, "init_bias")
        self._add_scalar("logit_bias", init_bias, learnable)

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        image_features, text_features = self._features(image_features, text_features)
        acc = lse_dtype(image_features.dtype)
        scale, bias = self.scale().to(acc), self.logit_bias.to(acc)
        if self.distributed:
            return fd.siglip_loss(image_features, text_features, scale, bias, reduction=self.reduction,
                                  scheme=self.distributed, group=self.group, backend=self.backend)
        return siglip_loss(image_features, text_features, scale, bias, self.reduction, backend=self.backend)


def zero_shot_logits(image_features: Tensor, class_text_features: Tensor, logit_scale=100.0) -> Tensor:
    """CLIP zero-shot logits (N, C): logit_scale · normalize(image) @ normalize(class text)ᵀ.

    class_text_features (C, D): one embedding per class (e.g. the mean of its prompt embeddings).
    Small (N × C) by nature: computed directly.
    """
    check_features("image_features", image_features)
    check_features("class_text_features", class_text_features)
    acc = lse_dtype(image_features.dtype)
    return logit_scale * (l2_normalize(image_features).to(acc) @ l2_normalize(class_text_features).to(acc).T)


def zero_shot_predict(image_features: Tensor, class_text_features: Tensor, logit_scale=100.0) -> Tensor:
    """Predicted class index (N,) of each image: argmax of zero_shot_logits."""
    return zero_shot_logits(image_features, class_text_features, logit_scale).argmax(1)


# ------------------------------------------------------------------------------ CPC

def cpc_loss(context: Tensor, codes: Tensor, weights: Sequence[Tensor], *, backend: str = "auto") -> Tensor:
    """InfoNCE of Contrastive Predictive Coding (van den Oord et al. 2018, "Representation
    Learning with Contrastive Predictive Coding").

    context (B, T, C): c_t; codes (B, T, Dz): z_t; weights: K matrices W_k (Dz, C) (nn.Linear
    weights), k = 1..K, K < T. Score f_k(z, c_t) = z·W_k c_t (no normalisation, no temperature).
    For offset k and every (b, t < T − k): the positive is z[b, t+k], the candidates are all
    B·T codes of the batch (other sequences and other positions: the negatives), so the loss
    is row_lse over all codes − the positive's score, from one primitive call for all offsets.
    Returns the mean over offsets of each offset's mean over (b, t).
    """
    check_features("context", context, ndim=3)
    check_features("codes", codes, ndim=3)
    context, codes = cast_under_autocast(context, codes)
    check_same({"context": context, "codes": codes})
    B, T, Dz = codes.shape
    if context.shape[:2] != (B, T):
        raise ValueError(f"context must have shape ({B}, {T}, C) like codes' first two dims, got {tuple(context.shape)}")
    K = len(weights)
    if K < 1 or K >= T:
        raise ValueError(f"need 1 <= number of offsets < T={T}, got {K}")
    preds, positives, sizes = [], [], []
    for k, W in enumerate(weights, start=1):
        if not isinstance(W, Tensor):
            raise TypeError(f"weights[{k - 1}] must be a torch.Tensor, got {type(W).__name__}")
        check_same({"context": context, f"weights[{k - 1}]": W}, what=("device",))
        if W.shape != (Dz, context.shape[2]):
            raise ValueError(f"weights[{k - 1}] must have shape ({Dz}, {context.shape[2]}), got {tuple(W.shape)}")
        p = (context[:, : T - k] @ W.T.to(context.dtype)).reshape(-1, Dz)   # W_k c_t, (B·(T−k), Dz)
        preds.append(p)
        positives.append(codes[:, k:].reshape(-1, Dz))
        sizes.append(p.shape[0])
    q = torch.cat(preds).to(codes.dtype)  # under autocast the products come out in its dtype
    row_lse, _ = similarity_lse(q, codes.reshape(B * T, Dz), 1.0, backend=backend)
    per_row = cross_entropy_rows(row_lse, paired_logits(q, torch.cat(positives), 1.0))
    per_offset = torch.stack([part.mean() for part in per_row.split(sizes)])
    return per_offset.mean()


class CPCLoss(nn.Module):
    """CPC's InfoNCE with its per-offset bilinear predictors W_k (see cpc_loss).

    forward(context (B, T, context_dim), codes (B, T, code_dim)) → scalar.
    `predictors[k-1]` is nn.Linear(context_dim, code_dim, bias=False), k = 1..num_steps.
    """

    def __init__(self, context_dim: int, code_dim: int, num_steps: int, backend: str = "auto"):
        super().__init__()
        check_count(num_steps, "num_steps", 1)
        self.predictors = nn.ModuleList(nn.Linear(context_dim, code_dim, bias=False) for _ in range(num_steps))
        self.backend = backend

    def forward(self, context: Tensor, codes: Tensor) -> Tensor:
        return cpc_loss(context, codes, [p.weight for p in self.predictors], backend=self.backend)

    def extra_repr(self) -> str:
        return describe(self, "backend")


class GRUContext(nn.Module):
    """CPC's autoregressive context network g_ar: a GRU over the codes, (B, T, code_dim) → (B, T, context_dim)."""

    def __init__(self, code_dim: int, context_dim: int, num_layers: int = 1):
        super().__init__()
        self.gru = nn.GRU(code_dim, context_dim, num_layers=num_layers, batch_first=True)

    def forward(self, codes: Tensor) -> Tensor:
        out, _ = self.gru(codes)
        return out
