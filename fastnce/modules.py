"""nn.Module forms of the functional losses of fastnce/functional.py."""
from __future__ import annotations

from torch import nn

from .functional import info_nce
from .losses._common import describe


class InfoNCE(nn.Module):
    """Drop-in for info_nce.InfoNCE (info-nce-pytorch 0.1.4); see fastnce.info_nce."""

    def __init__(self, temperature=0.1, reduction="mean", negative_mode="unpaired", *, backend="auto"):
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.negative_mode = negative_mode
        self.backend = backend

    def forward(self, query, positive_key, negative_keys=None):
        return info_nce(query, positive_key, negative_keys, temperature=self.temperature,
                        reduction=self.reduction, negative_mode=self.negative_mode, backend=self.backend)

    def extra_repr(self) -> str:
        return describe(self, "temperature", "reduction", "negative_mode", "backend")
