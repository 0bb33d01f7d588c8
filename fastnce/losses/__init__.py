"""fastnce.losses: contrastive and metric-learning losses as nn.Modules with functional forms.

Losses that are a logsumexp over pairs run on fastnce.ops.similarity_lse (memory O(N·D),
`backend=` passed through); the others are PyTorch, tiled over row blocks where their cost is
quadratic. Reference implementations used by the tests live in fastnce.losses.naive.

| module | paper | matches |
|---|---|---|
| NTXentLoss | Chen et al. 2020 (SimCLR) | fastnce.nt_xent; pml NTXentLoss with instance labels |
| DCLLoss, DCLWLoss | Yeh et al. 2022 (decoupled contrastive learning) | lightly DCLLoss / DCLWLoss |
| MoCoLoss | He et al. 2020 (MoCo) | InfoNCE against a queue |
| ClipLoss | Radford et al. 2021 (CLIP) | fastnce.clip_loss, learnable clamped logit scale |
| SigLipLoss | Zhai et al. 2023 (SigLIP) | OpenCLIP SigLipLoss; learnable scale and bias |
| CPCLoss, GRUContext | van den Oord et al. 2018 (CPC) | formula |
| DINOLoss | Caron et al. 2021 (DINO) | lightly DINOLoss |
| SwAVLoss, SwAVPrototypes | Caron et al. 2020 (SwAV) | lightly SwaVLoss |
| SupConLoss | Khosla et al. 2020 | pml SupConLoss |
| SoftNearestNeighborLoss | Frosst et al. 2019 | formula |
| NCELoss | Gutmann & Hyvärinen 2010 | formula |
| ContrastiveLoss | Hadsell et al. 2006 | pml ContrastiveLoss |
| TripletMarginLoss | Schroff et al. 2015; Hermans et al. 2017 | pml TripletMarginLoss (+ BatchHardMiner) |
| NPairsLoss | Sohn 2016 | pml NPairsLoss |
| LiftedStructureLoss | Oh Song et al. 2016 | pml LiftedStructureLoss |
"""
from ._common import momentum_update
from .contrastive import (
    ClipLoss, CPCLoss, DCLLoss, DCLWLoss, GRUContext, MoCoLoss, NTXentLoss, SigLipLoss, cpc_loss, dcl_loss,
    nt_xent_multiview, vmf_weights, zero_shot_logits, zero_shot_predict,
)
from .distillation import DINOLoss, SwAVLoss, SwAVPrototypes, dino_loss, sinkhorn, swav_loss, update_teacher
from .metric import (
    ContrastiveLoss, LiftedStructureLoss, NPairsLoss, SoftNearestNeighborLoss, SupConLoss, TripletMarginLoss,
    contrastive_loss, lifted_structure_loss, npairs_loss, soft_nearest_neighbor_loss, supcon_loss,
    triplet_margin_loss,
)
from .nce import NCELoss, nce_loss

__all__ = [
    "NTXentLoss", "nt_xent_multiview", "DCLLoss", "DCLWLoss", "dcl_loss", "vmf_weights", "MoCoLoss",
    "momentum_update", "ClipLoss", "SigLipLoss", "zero_shot_logits", "zero_shot_predict", "CPCLoss", "cpc_loss", "GRUContext", "DINOLoss", "dino_loss", "update_teacher",
    "SwAVLoss", "swav_loss", "sinkhorn", "SwAVPrototypes", "SupConLoss", "supcon_loss",
    "SoftNearestNeighborLoss", "soft_nearest_neighbor_loss", "NCELoss", "nce_loss", "ContrastiveLoss",
    "contrastive_loss", "TripletMarginLoss", "triplet_margin_loss", "NPairsLoss", "npairs_loss",
    "LiftedStructureLoss", "lifted_structure_loss",
]
