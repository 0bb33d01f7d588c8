"""fastnce: contrastive losses whose softmax over all pairs runs tile by tile.

Memory O(N·D) instead of O(N²), forward and backward, on fused Triton / CUDA kernels on GPUs
and a tiled PyTorch path everywhere else.
"""
from . import distributed, losses, ops
from .functional import clip_loss, info_nce, nt_xent, siglip_loss
from .modules import InfoNCE

__version__ = "0.1.0"
__all__ = ["info_nce", "InfoNCE", "nt_xent", "clip_loss", "siglip_loss", "ops", "losses", "distributed"]
