"""Noise-contrastive estimation (Gutmann & Hyvärinen 2010, 2012): logistic regression of data
against k noise samples with known noise log-probabilities. Elementwise, O(N·k): plain PyTorch."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_reduction, check_same, reduce
from ..ops import lse_dtype
from ._common import describe

__all__ = ["nce_loss", "NCELoss"]


def nce_loss(data_logits_model: Tensor, data_log_noise: Tensor, noise_logits_model: Tensor,
             noise_log_noise: Tensor, reduction: str = "mean") -> Tensor:
    """NCE (Gutmann & Hyvärinen, "Noise-contrastive estimation: A new estimation principle for
    unnormalized statistical models", AISTATS 2010; JMLR 2012) with ν = k noise samples per
    data point.

    data_logits_model (N,): log p_m(x_i), the model's unnormalised log-density of each data
    point (normalising constant learnt or ignored, as NCE allows); data_log_noise (N,):
    log p_n(x_i); noise_logits_model (N, k) and noise_log_noise (N, k): the same for the k
    noise samples y_ij drawn from p_n for data point i ((k,) or anything broadcastable to
    (N, k) is accepted for noise shared by all rows).
    With G(u) = log p_m(u) − log p_n(u) − log k and h = σ(G):
        ℓ_i = −log σ(G(x_i)) − Σ_j log(1 − σ(G(y_ij)))      (stable: log-sigmoids)
    Returns the mean over i (the negative of the paper's J_T), the sum, or (N,) with 'none'.
    Computed in float32 (float64 when data_logits_model is float64), whatever the other
    arguments' dtypes (bfloat16 model logits beside float32 noise log-probabilities, say).
    """
    check_reduction(reduction)
    tensors = {"data_logits_model": data_logits_model, "data_log_noise": data_log_noise,
               "noise_logits_model": noise_logits_model, "noise_log_noise": noise_log_noise}
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    check_same(tensors, what=("device",))  # dtypes may differ: all is computed in acc below
    if data_logits_model.dim() != 1 or data_log_noise.shape != data_logits_model.shape:
        raise ValueError(f"data_logits_model and data_log_noise must have the same shape (N,), got "
                         f"{tuple(data_logits_model.shape)} and {tuple(data_log_noise.shape)}")
    if data_logits_model.shape[0] == 0:
        raise ValueError("data_logits_model is an empty batch (shape (0,)): at least one data point is needed")
    if noise_logits_model.dim() not in (1, 2) or noise_logits_model.shape[-1] == 0:
        raise ValueError(f"noise_logits_model must have shape (N, k) or (k,) with k >= 1, got {tuple(noise_logits_model.shape)}")
    N = data_logits_model.shape[0]
    try:
        shape = torch.broadcast_shapes(noise_logits_model.shape, noise_log_noise.shape, (N, noise_logits_model.shape[-1]))
    except RuntimeError:
        shape = None
    if shape != (N, noise_logits_model.shape[-1]):
        raise ValueError(f"noise_logits_model {tuple(noise_logits_model.shape)} and noise_log_noise "
                         f"{tuple(noise_log_noise.shape)} must broadcast to (N, k) = ({N}, {noise_logits_model.shape[-1]})")
    acc = lse_dtype(data_logits_model.dtype)
    log_k = math.log(noise_logits_model.shape[-1])
    g_data = data_logits_model.to(acc) - data_log_noise.to(acc) - log_k
    g_noise = noise_logits_model.to(acc) - noise_log_noise.to(acc) - log_k
    per_row = -F.logsigmoid(g_data) - F.logsigmoid(-g_noise).expand(shape).sum(-1)
    return reduce(per_row, reduction)


class NCELoss(nn.Module):
    """Noise-contrastive estimation loss (Gutmann & Hyvärinen 2010); see nce_loss.

    forward(data_logits_model (N,), data_log_noise (N,), noise_logits_model (N, k),
    noise_log_noise (N, k)) → scalar, or (N,) with reduction='none'.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, data_logits_model, data_log_noise, noise_logits_model, noise_log_noise) -> Tensor:
        return nce_loss(data_logits_model, data_log_noise, noise_logits_model, noise_log_noise, self.reduction)

    def extra_repr(self) -> str:
        return describe(self, "reduction")
