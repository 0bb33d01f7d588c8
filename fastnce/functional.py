"""The public losses of DESIGN.md §3: info_nce (drop-in for info-nce-pytorch), nt_xent, clip_loss;
dcl_loss (NT-Xent's decoupled variant, also fastnce.losses.DCLLoss); siglip_loss.

Each is a logsumexp from fastnce.ops.similarity_lse minus the positive logits, which cost
O(N·D); siglip_loss is fastnce.ops.similarity_sigmoid_nll. Losses come out in float32 for float16/bfloat16 inputs (as F.cross_entropy under
autocast) and float64 for float64 inputs.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._checks import (
    cast_under_autocast, check_dim_match, check_features, check_finite_scalar, check_reduction, check_same, check_temperature,
    reciprocal_temperature, reduce,
)
from .ops import lse_dtype, resolve_backend, similarity_lse, similarity_sigmoid_nll

__all__ = ["info_nce", "nt_xent", "clip_loss", "siglip_loss", "dcl_loss", "vmf_weights", "l2_normalize",
           "paired_logits"]


ARGS_DOC = """
    Common arguments:
    temperature / logit_scale: a positive finite number, or a one-element tensor (learnable:
        it gets its gradient); the losses divide by the temperature, multiply by logit_scale.
    reduction: 'mean' | 'sum' | 'none' (the per-row losses).
    backend: 'auto' (on CUDA tensors a fused GPU kernel, else the tiled 'torch' path), 'torch',
        'triton', 'cuda' or 'reference' (the slow, obviously-correct one); a backend named but
        unable to run raises fastnce.ops.BackendUnavailable saying why.
"""


def with_args_doc(fn: Callable, extra: str = "") -> Callable:
    """fn with ARGS_DOC (and extra) appended to its docstring: one text for every loss's help()."""
    if fn.__doc__ is not None:  # None under python -OO
        fn.__doc__ = fn.__doc__.rstrip() + "\n" + ARGS_DOC + extra
    return fn


class _L2Normalize(torch.autograd.Function):
    """x / ‖x‖ row by row in float32 (at least), saving only x: autograd through the formula
    would keep float32 copies of x (2× a 16-bit input) to the backward, which recomputes ‖x‖."""

    @staticmethod
    def forward(x, eps):
        safe, keep = _safe_norm(x, eps)
        y = torch.where(keep, x.to(safe.dtype) / safe, 0.0)
        # no .to() that returns y itself: torch 2.11's compile then traced through the forward
        # instead of calling backward below (wrong gradients; torch 2.13 is fine)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.eps = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors  # differentiable ops below: a double backward works
        safe, keep = _safe_norm(x, ctx.eps)
        y, g = x.to(safe.dtype) / safe, grad.to(safe.dtype)
        dx = (g - y * (g * y).sum(-1, keepdim=True)) / safe
        return torch.where(keep, dx, 0.0).to(x.dtype), None

    generate_vmap_rule = True


def _safe_norm(x: Tensor, eps: float):
    """(‖x‖ where it is > eps else 1, the mask of those rows), (…, 1), in float32 at least; NaN
    norms stay NaN (and kept)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=lse_dtype(x.dtype))
    keep = ~(norm <= eps)
    return torch.where(keep, norm, 1.0), keep


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """x / ‖x‖₂ along the last dim, the norm taken in float32 at least; rows with ‖x‖ ≤ eps → 0.

    Equal to F.normalize wherever ‖x‖ > eps. A (near-)zero row has no direction: it becomes
    zero with a zero gradient, where F.normalize's gradient is 1/eps (inf in float16, and in
    float16 its eps rounds to zero and the row becomes NaN).
    """
    return _L2Normalize.apply(x, eps)


class _PairedDot(torch.autograd.Function):
    """a[i]·b[i] for every row, in float32 (float64 for float64), saving a and b as given:
    autograd through (a.float() * b.float()).sum(-1) would keep both float32 copies."""

    @staticmethod
    def forward(a, b):
        acc = lse_dtype(a.dtype)
        return (a.to(acc) * b.to(acc)).sum(-1)  # elementwise: autocast leaves it in acc

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        da = (g * b.to(g.dtype)).to(a.dtype) if ctx.needs_input_grad[0] else None
        db = (g * a.to(g.dtype)).to(b.dtype) if ctx.needs_input_grad[1] else None
        return da, db

    generate_vmap_rule = True


def paired_logits(a: Tensor, b: Tensor, scale: Union[float, Tensor]) -> Tensor:
    """scale · a[i]·b[i] for every row, in the LSE dtype (float32, float64 for float64)."""
    return scale * _PairedDot.apply(a, b)


def cross_entropy_rows(row_lse: Tensor, positive: Tensor) -> Tensor:
    """row_lse − positive, each row's cross-entropy, where row_lse's terms include the positive
    logit(s): ≥ 0, and clamped there. The LSE's copy of a positive logit comes from a matrix
    product and `positive` from an elementwise one; their roundings differ by an ulp of the
    logit, which gave a batch of one −1e-7 instead of 0 (and logits of 1e16, −4)."""
    return (row_lse - positive).clamp_min(0)


def _check_info_nce_args(query, positive_key, negative_keys, negative_mode):
    """info-nce-pytorch 0.1.4's checks, in its order and with its messages."""
    if query.dim() != 2:
        raise ValueError('<query> must have 2 dimensions.')
    if positive_key.dim() != 2:
        raise ValueError('<positive_key> must have 2 dimensions.')
    if negative_keys is not None:
        if negative_mode == 'unpaired' and negative_keys.dim() != 2:
            raise ValueError("<negative_keys> must have 2 dimensions if <negative_mode> == 'unpaired'.")
        if negative_mode == 'paired' and negative_keys.dim() != 3:
            raise ValueError("<negative_keys> must have 3 dimensions if <negative_mode> == 'paired'.")
    if len(query) != len(positive_key):
        raise ValueError('<query> and <positive_key> must must have the same number of samples.')
    if negative_keys is not None:
        if negative_mode == 'paired' and len(query) != len(negative_keys):
            raise ValueError("If negative_mode == 'paired', then <negative_keys> must have the same number of samples as <query>.")
    if query.shape[-1] != positive_key.shape[-1]:
        raise ValueError('Vectors of <query> and <positive_key> should have the same number of components.')
    if negative_keys is not None:
        if query.shape[-1] != negative_keys.shape[-1]:
            raise ValueError('Vectors of <query> and <negative_keys> should have the same number of components.')


def check_info_nce_inputs(query, positive_key, negative_keys, temperature, reduction, negative_mode) -> None:
    """Every check of info_nce: info-nce-pytorch's own (same order, same messages) and ours."""
    for name, x in (("query", query), ("positive_key", positive_key), ("negative_keys", negative_keys)):
        if x is not None and not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if negative_keys is not None and negative_mode not in ("unpaired", "paired"):
        raise ValueError(f"negative_mode must be 'unpaired' or 'paired', got {negative_mode!r}")
    _check_info_nce_args(query, positive_key, negative_keys, negative_mode)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")  # F.cross_entropy's words
    check_temperature(temperature)
    check_features("query", query)
    check_features("positive_key", positive_key)
    if negative_keys is not None:
        check_features("negative_keys", negative_keys, ndim=negative_keys.dim())
        if negative_keys.dim() == 3 and negative_keys.shape[1] == 0:  # paired: (N, 0, D)
            raise ValueError(f"negative_keys holds no negatives for each row (shape {tuple(negative_keys.shape)}): "
                             "at least one is needed")
    check_same({"query": query, "positive_key": positive_key, "negative_keys": negative_keys})


@with_args_doc
def info_nce(
    query: Tensor,
    positive_key: Tensor,
    negative_keys: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    negative_mode: str = "unpaired",
    *,
    backend: str = "auto",
) -> Tensor:
    """InfoNCE of info-nce-pytorch 0.1.4, same arguments and results, without the N×M logits.

    query, positive_key (N, D); negative_keys None (the other rows' positives are the
    negatives), (M, D) with negative_mode='unpaired', or (N, M, D) with 'paired'. Inputs are
    L2-normalised; logits are cosines / temperature; cross-entropy with the positive as class.
    Returns a scalar, or (N,) with reduction='none'.
    Beyond the original: a bad temperature, negative_mode, dtype, device or an empty batch
    raise ValueError/TypeError instead of returning NaN or failing later.
    """
    query, positive_key, negative_keys = cast_under_autocast(query, positive_key, negative_keys)
    check_info_nce_inputs(query, positive_key, negative_keys, temperature, reduction, negative_mode)
    query, positive_key = l2_normalize(query), l2_normalize(positive_key)
    scale = reciprocal_temperature(temperature, query)
    positive = paired_logits(query, positive_key, scale)
    if negative_keys is None:
        row_lse, _ = similarity_lse(query, positive_key, scale, backend=backend)
        per_row = cross_entropy_rows(row_lse, positive)
    elif negative_mode == "unpaired":
        row_lse, _ = similarity_lse(query, l2_normalize(negative_keys), scale, backend=backend)
        per_row = torch.logaddexp(positive, row_lse) - positive
    else:
        # (N, M) logits against each row's own negatives: a batched product, O(N·M) by nature;
        # no primitive, but a backend named that could not run is still an error
        resolve_backend(backend, query.device, query.dtype)
        acc = positive.dtype
        with torch.autocast(query.device.type, enabled=False):
            negative = scale * torch.einsum("nd,nmd->nm", query.to(acc), l2_normalize(negative_keys).to(acc))
        per_row = torch.logsumexp(torch.cat([positive[:, None], negative], 1), 1) - positive
    return reduce(per_row, reduction)


def check_nt_xent_inputs(z1, z2, temperature, reduction) -> None:
    check_features("z1", z1)
    check_features("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z2 must have the same shape as z1 {tuple(z1.shape)}, got {tuple(z2.shape)}")
    check_same({"z1": z1, "z2": z2})
    check_temperature(temperature)
    check_reduction(reduction)


def check_clip_inputs(image_features, text_features, logit_scale, reduction) -> None:
    check_features("image_features", image_features)
    check_features("text_features", text_features)
    check_same({"image_features": image_features, "text_features": text_features})
    check_dim_match("image_features", image_features, "text_features", text_features, 0, 0, what="number of rows")
    check_dim_match("image_features", image_features, "text_features", text_features)
    check_temperature(logit_scale, name="logit_scale")
    check_reduction(reduction)


@with_args_doc
def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> Tensor:
    """SimCLR's NT-Xent over the 2N×2N similarities of two views (Chen et al., 2020).

    z1, z2 (N, D), row i of each a view of sample i; both L2-normalised inside. Every row
    of Z = [z1; z2] is an anchor, its other view the positive, the 2N − 2 other rows the
    negatives, itself excluded. Returns the mean over the 2N anchors, or (2N,) with 'none'.
    """
    z1, z2 = cast_under_autocast(z1, z2)
    check_nt_xent_inputs(z1, z2, temperature, reduction)
    z = l2_normalize(torch.cat([z1, z2]))
    scale = reciprocal_temperature(temperature, z)
    # The positives first: their backward then runs after the LSE's, whose buffers are freed.
    positive = two_view_positives(z, scale)
    row_lse, _ = similarity_lse(z, None, scale, exclude_self=True, backend=backend)
    return reduce(cross_entropy_rows(row_lse, positive), reduction)


def vmf_weights(z1: Tensor, z2: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's weights of the positive pairs (Yeh et al. 2022, the negative von Mises-Fisher
    weighting): 2 − N·softmax over i of z1[i]·z2[i] / sigma, for z1, z2 (N, D) normalised rows.
    Computed from detached inputs (a weight, not a path for the gradient). Returns (N,)."""
    return 2 - z1.shape[0] * torch.softmax(paired_logits(z1.detach(), z2.detach(), 1.0 / sigma), 0)


def two_view_weights(z: Tensor, weight_fn=None) -> Optional[Tensor]:
    """(2n,) weights of the positives of z = [z1; z2] (normalised): weight_fn(z1, z2) for the
    rows of z1, weight_fn(z2, z1) for those of z2, their shapes checked; None without weight_fn."""
    if weight_fn is None:
        return None
    n = z.shape[0] // 2
    weights = [weight_fn(a, b) for a, b in ((z[:n], z[n:]), (z[n:], z[:n]))]
    for w in weights:
        if not isinstance(w, Tensor) or w.shape != (n,):
            raise ValueError(f"weight_fn must return a tensor of shape ({n},), one weight per positive pair, "
                             f"got {tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    return torch.cat(weights)


def two_view_positives(z: Tensor, scale, weights: Optional[Tensor] = None) -> Tensor:
    """scale · z[i]·z[p] for the 2n rows of z = [z1; z2] (normalised), p the other view of row i,
    each times its weight (two_view_weights) when given."""
    n = z.shape[0] // 2
    # z1[i]·z2[i] is both views' positive: one product of views of z (no rolled copy), twice
    positive = paired_logits(z[:n], z[n:], scale).repeat(2)
    return positive if weights is None else positive * weights.to(positive.dtype)


def two_view_samples(n: int, offset: int = 0, device=None) -> Tensor:
    """The sample of each row of [z1; z2] with n rows a view: offset + (0..n−1), twice."""
    return torch.arange(offset, offset + n, device=device).repeat(2)


@with_args_doc
def dcl_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: Union[float, Tensor] = 0.1,
    reduction: str = "mean",
    *,
    weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    backend: str = "auto",
) -> Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022, "Decoupled Contrastive Learning"): NT-Xent
    with the positive taken out of the denominator.

    z1, z2 (N, D), N ≥ 2, row i of each a view of sample i; both L2-normalised inside. Every row
    of Z = [z1; z2] is an anchor; its loss is log Σ exp(Z_i·Z_j / T) over its 2N − 2 negatives
    (the rows of the other samples, both views) minus w_i·Z_i·Z_p / T, p its other view.
    weight_fn(a, b) → (N,): the weights w of the positives of a's rows (b their positives),
    called with the normalised (z1, z2) and then (z2, z1); None: w = 1 (DCL); `vmf_weights`:
    DCLW. Returns the mean over the 2N anchors, or (2N,) with reduction='none'.
    """
    z1, z2 = cast_under_autocast(z1, z2)
    check_nt_xent_inputs(z1, z2, temperature, reduction)
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"z1 must hold at least 2 samples (an anchor's negatives are the other samples' rows), "
                         f"got shape {tuple(z1.shape)}")
    z = l2_normalize(torch.cat([z1, z2]))
    scale = reciprocal_temperature(temperature, z)
    positive = two_view_positives(z, scale, two_view_weights(z, weight_fn))  # first: see nt_xent
    # The label mask drops an anchor's own row and its positive: the denominator's decoupling.
    sample = two_view_samples(n, device=z.device)
    row_lse, _ = similarity_lse(z, None, scale, labels=sample, label_mask="different", backend=backend)
    return reduce(row_lse - positive, reduction)


@with_args_doc
def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> Tensor:
    """CLIP's symmetric loss (Radford et al., 2021) in the OpenCLIP convention.

    image_features, text_features (N, D), used as given (normalise them first, as OpenCLIP
    does); logit_scale the multiplier (e.g. model.logit_scale.exp()), learnable.
    ½[CE(logit_scale·A Bᵀ, diag) + CE(logit_scale·B Aᵀ, diag)] from one pass giving row and
    column LSEs. Returns a scalar, or with 'none' the per-pair (N,) ½(image loss + text loss).
    """
    image_features, text_features = cast_under_autocast(image_features, text_features)
    check_clip_inputs(image_features, text_features, logit_scale, reduction)
    positive = paired_logits(image_features, text_features, logit_scale)  # first: see nt_xent
    row_lse, col_lse = similarity_lse(image_features, text_features, logit_scale, col_lse=True, backend=backend)
    return reduce(0.5 * (cross_entropy_rows(row_lse, positive) + cross_entropy_rows(col_lse, positive)), reduction)


def check_siglip_inputs(image_features, text_features, logit_scale, logit_bias, reduction) -> None:
    check_clip_inputs(image_features, text_features, logit_scale, reduction)
    if logit_bias is not None:
        check_finite_scalar(logit_bias, "logit_bias")


@with_args_doc
def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    logit_bias: Union[None, float, Tensor] = None,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
    Pre-Training") in OpenCLIP's SigLipLoss convention, without the N×N logits.

    image_features, text_features (N, D), used as given (normalise them first); logit_scale the
    multiplier (e.g. model.logit_scale.exp()) and logit_bias the scalar bias, both learnable.
    Every pair (i, j) is a binary classification of logit_scale·a_i·b_j + logit_bias, positive
    where i == j: Σ_ij −log σ(±logit). 'mean' divides that sum by N, as OpenCLIP does (the mean
    over images of their row sums); 'sum' returns it; 'none' the (N,) row sums, one per image.
    """
    image_features, text_features = cast_under_autocast(image_features, text_features)
    check_siglip_inputs(image_features, text_features, logit_scale, logit_bias, reduction)
    per_image = similarity_sigmoid_nll(image_features, text_features, logit_scale, logit_bias, backend=backend)
    return reduce(per_image, reduction)
