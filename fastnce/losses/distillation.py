"""Self-distillation and clustering losses: DINO and SwAV.

Neither is a logsumexp over pairs of samples (each sample is compared with its own other
views through a softmax over output_dim / prototypes), so both are plain PyTorch:
O(V²·B·D) time, O(V·B·D) memory, nothing quadratic in the batch.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_dim_match, check_features, check_same, check_temperature
from ..functional import l2_normalize
from ..ops import lse_dtype
from ._common import check_count, check_views, describe, momentum_update

__all__ = ["dino_loss", "DINOLoss", "update_teacher", "sinkhorn", "swav_loss", "SwAVLoss", "SwAVPrototypes"]


def _stack(name: str, outs: Sequence[Tensor]) -> Tensor:
    return torch.stack(check_views(name, outs))


# ------------------------------------------------------------------------------ DINO

def dino_loss(teacher_out: Sequence[Tensor], student_out: Sequence[Tensor], center: Tensor,
              teacher_temp: float = 0.04, student_temp: float = 0.1) -> Tensor:
    """DINO's cross-entropy (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
    Transformers"), lightly's DINOLoss formula, without the centre update.

    teacher_out: Vt tensors (B, D) (or one (Vt, B, D) tensor); student_out: Vs tensors (B, D) (or
    (Vs, B, D)); center (D,) or (1, 1, D).
    P_t = softmax((teacher_t − center) / teacher_temp) (detached: the teacher is a target),
    the loss of a pair (t, s) is −Σ_d P_t · log_softmax(student_s / student_temp), summed over
    the Vt·Vs − min(Vt, Vs) pairs with t ≠ s (view i of the teacher is view i of the student)
    and the batch, divided by their number and B.
    """
    check_temperature(teacher_temp, "teacher_temp")
    check_temperature(student_temp, "student_temp")
    t = _stack("teacher_out", teacher_out)
    s = _stack("student_out", student_out)
    check_same({"teacher_out": t, "student_out": s}, what=("device",))  # dtypes may differ: see acc
    if t.shape[1:] != s.shape[1:]:
        raise ValueError(f"student views must have the teacher views' shape {tuple(t.shape[1:])}, got {tuple(s.shape[1:])}")
    if not isinstance(center, Tensor):
        raise TypeError(f"center must be a torch.Tensor of shape (D,) or (1, 1, D), got {type(center).__name__}")
    if center.numel() != t.shape[-1]:
        raise ValueError(f"center must hold one value per output dimension ({t.shape[-1]}), got shape {tuple(center.shape)}")
    Vt, Vs, B = t.shape[0], s.shape[0], t.shape[1]
    n_terms = Vt * Vs - min(Vt, Vs)
    if n_terms == 0:
        raise ValueError(f"DINO needs two views in total that differ, got {Vt} teacher and {Vs} student view(s)")
    # A float16 teacher beside a float32 student (lightly's formula promotes): both in the wider
    # dtype, at least float32, and autocast off (its bfloat16 products would round the loss).
    acc = lse_dtype(torch.promote_types(t.dtype, s.dtype))
    if isinstance(teacher_temp, Tensor):  # a target's temperature: no gradient; (1,) as ()
        teacher_temp = teacher_temp.detach().reshape(())
    with torch.autocast(t.device.type, enabled=False):
        p_t = F.softmax((t.detach().to(acc) - center.reshape(1, 1, -1).to(acc)) / teacher_temp, dim=-1)
        log_s = F.log_softmax(s.to(acc) / student_temp, dim=-1)
        # every pair's Σ_b P_t·log S_s from one product; the pairs t = s are left out, not
        # subtracted from a total (large same-view terms would cancel the others' digits)
        pairs = p_t.reshape(Vt, -1) @ log_s.reshape(Vs, -1).T  # (Vt, Vs)
        same_view = torch.eye(Vt, Vs, dtype=torch.bool, device=pairs.device)
        return -pairs.masked_fill(same_view, 0.0).sum() / (n_terms * B)


class DINOLoss(nn.Module):
    """DINO loss with lightly's (1.6) arguments, defaults and semantics (lightly.loss.DINOLoss).

    Buffer `center` (1, 1, output_dim), updated after each forward by an EMA of the teacher
    outputs' batch mean: center ← m·center + (1 − m)·mean (no gradient). It keeps the module's
    dtype, float32 unless converted (`.double()` for float64 training, as any buffer).
    forward(teacher_out: list of (B, D) or (Vt, B, D), student_out: list of (B, D) or (Vs, B, D),
    teacher_temp=None, epoch=None):
    teacher temperature = teacher_temp if given, else the linear warm-up schedule from
    warmup_teacher_temp to teacher_temp over warmup_teacher_temp_epochs when epoch is given,
    else teacher_temp (epoch: an int >= 0). Loss as dino_loss. Returns a scalar.
    Differs from lightly: the teacher outputs are detached (lightly lets a gradient reach a
    teacher that requires one); no distributed all-reduce of the centre.
    Update the teacher with `update_teacher(teacher, student, m)` (an EMA of parameters).
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean"):
        super().__init__()
        check_count(output_dim, "output_dim", 1)
        if center_mode != "mean":
            raise ValueError(f"center_mode must be 'mean' (the only mode lightly has), got {center_mode!r}")
        for name, v in (("warmup_teacher_temp", warmup_teacher_temp), ("teacher_temp", teacher_temp),
                        ("student_temp", student_temp)):
            check_temperature(v, name)
        check_count(warmup_teacher_temp_epochs, "warmup_teacher_temp_epochs", 0)
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.output_dim = output_dim
        self.teacher_temp, self.student_temp = teacher_temp, student_temp
        self.center_momentum = center_momentum
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.register_buffer("center", torch.zeros(1, 1, output_dim))

    def _teacher_temperature(self, teacher_temp, epoch):
        # numbers or 0-dim tensors, never read with float(): under torch.compile that would be a
        # data-dependent guard (no single graph)
        if isinstance(epoch, Tensor):  # lightly indexes its schedule with it: an integer scalar
            if epoch.numel() != 1 or epoch.dtype.is_floating_point or epoch.dtype.is_complex or epoch.dtype == torch.bool:
                raise TypeError(f"epoch must be an int >= 0 or an integer tensor of one element, got {epoch!r}")
            epoch = int(epoch)
        if epoch is not None:
            check_count(epoch, "epoch", 0)
        if teacher_temp is not None:
            check_temperature(teacher_temp, "teacher_temp")
            return teacher_temp
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return self.teacher_temp_schedule[epoch]
        return self.teacher_temp

    def forward(self, teacher_out: Sequence[Tensor], student_out: Sequence[Tensor],
                teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> Tensor:
        t = _stack("teacher_out", teacher_out)
        if t.shape[-1] != self.output_dim:
            raise ValueError(f"teacher_out must have output_dim = {self.output_dim} features, got views of shape "
                             f"{tuple(t.shape[1:])}")
        loss = dino_loss(t, student_out, self.center, self._teacher_temperature(teacher_temp, epoch),
                         self.student_temp)
        self.update_center(t)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[Tensor]) -> None:
        """center ← m·center + (1 − m)·(mean of teacher_out: Vt views (B, output_dim), or (Vt, B, output_dim))."""
        batch_center = _stack("teacher_out", teacher_out).to(self.center.dtype).mean(dim=(0, 1), keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def extra_repr(self) -> str:
        return describe(self, "output_dim", "teacher_temp", "student_temp", "center_momentum",
                        "warmup_teacher_temp_epochs")


def update_teacher(teacher: nn.Module, student: nn.Module, m: float = 0.996) -> None:
    """DINO / BYOL EMA teacher: teacher ← m·teacher + (1 − m)·student (see momentum_update)."""
    momentum_update(teacher, student, m)


# ------------------------------------------------------------------------------ SwAV

@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """Sinkhorn-Knopp codes (SwAV, Caron et al. 2020), lightly's / the authors' algorithm.

    scores (B, K) → codes (B, K): Q = exp(scores/ε) normalised to equal prototype mass and
    equal sample mass, `iterations` rounds; after one or more, each row of the result sums to 1
    (0 rounds, as lightly allows: exp(scores/ε) scaled to total mass B, unbalanced). Run in the log
    domain: the same result as the authors' exp-then-divide loop, without overflow or an
    all-zero row when scores/ε spans more than float range.
    """
    check_features("scores", scores)
    check_count(iterations, "iterations", 0)
    check_temperature(epsilon, "epsilon")
    acc = lse_dtype(scores.dtype)
    log_q = (scores.to(acc) / epsilon).T  # (K, B)
    log_q = log_q - torch.logsumexp(log_q.reshape(-1), 0)
    # The authors' rounds divide the prototypes' rows by K·(row sum) and the samples' columns by
    # B·(column sum), and scale by B at the end. Each normalisation absorbs a constant factor
    # before it, so without the 1/K and 1/B (shape-free, no math.log of a shape: under
    # torch.compile one graph for every batch size) the columns end summing to 1, as theirs.
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True)
    q = torch.exp(log_q)
    return (q if iterations else q * scores.shape[0]).T


def swav_loss(high_resolution_outputs: Sequence[Tensor], low_resolution_outputs: Sequence[Tensor] = (),
              temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
              queue_outputs: Optional[Sequence[Tensor]] = None) -> Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, "Unsupervised Learning of Visual Features
    by Contrasting Cluster Assignments"), lightly's SwaVLoss semantics.

    high_resolution_outputs: list of (B, K) prototype scores (normalised features · normalised
    prototypes) of the global crops; low_resolution_outputs: the same for the small crops.
    For each global crop i: codes q_i = sinkhorn(scores_i) (no gradient; with queue_outputs[i]
    (Q, K) appended before Sinkhorn and cut off after; one per global crop); every other crop v
    predicts them (every crop must have high_resolution_outputs[0]'s shape (B, K)):
    −mean_b Σ_k q_i · log_softmax(scores_v / temperature). Sum over v divided by
    (number of crops − 1), mean over i. Returns a scalar (lightly returns shape (1,)).
    """
    check_temperature(temperature)
    high = check_views("high_resolution_outputs", high_resolution_outputs)
    low = [] if len(low_resolution_outputs) == 0 else check_views(
        "low_resolution_outputs", low_resolution_outputs, high[0], "high_resolution_outputs[0]")
    names = [f"high_resolution_outputs[{i}]" for i in range(len(high))]
    names += [f"low_resolution_outputs[{i}]" for i in range(len(low))]
    n_crops = len(high) + len(low)
    if n_crops < 2:
        raise ValueError("SwAV needs at least two crops")
    queued = [] if queue_outputs is None else list(queue_outputs)
    if queue_outputs is not None:
        if len(queued) != len(high):
            raise ValueError(f"queue_outputs must hold one (Q, K) tensor per high-resolution crop ({len(high)}), "
                             f"got {len(queued)}")
        for i, x in enumerate(queued):
            check_features(f"queue_outputs[{i}]", x)
            check_dim_match("high_resolution_outputs[0]", high[0], f"queue_outputs[{i}]", x, what="number of prototypes")
        names += [f"queue_outputs[{i}]" for i in range(len(queued))]
    check_same(dict(zip(names, high + low + queued)), what=("device",))
    acc = lse_dtype(functools.reduce(torch.promote_types, [x.dtype for x in high + low + queued]))
    log_p = [F.log_softmax(x.to(acc) / temperature, dim=1) for x in high + low]
    loss = 0.0
    for i, h in enumerate(high):
        scores = h.detach()
        if queued:  # in acc: a float32 queue beside float16 crops is not rounded
            scores = torch.cat([scores.to(acc), queued[i].detach().to(acc)])
        q = sinkhorn(scores, sinkhorn_iterations, sinkhorn_epsilon)[: h.shape[0]]
        sub = sum(-(q * lp).sum(1).mean() for v, lp in enumerate(log_p) if v != i)
        loss = loss + sub / (n_crops - 1)
    return loss / len(high)


class SwAVLoss(nn.Module):
    """SwAV loss with lightly's SwaVLoss arguments and defaults (see swav_loss).

    forward(high_resolution_outputs, low_resolution_outputs=(), queue_outputs=None) → scalar.
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05):
        super().__init__()
        check_temperature(temperature)
        check_temperature(sinkhorn_epsilon, "sinkhorn_epsilon")
        check_count(sinkhorn_iterations, "sinkhorn_iterations", 0)
        self.temperature, self.sinkhorn_iterations, self.sinkhorn_epsilon = temperature, sinkhorn_iterations, sinkhorn_epsilon

    def forward(self, high_resolution_outputs, low_resolution_outputs=(), queue_outputs=None) -> Tensor:
        return swav_loss(high_resolution_outputs, low_resolution_outputs, self.temperature,
                         self.sinkhorn_iterations, self.sinkhorn_epsilon, queue_outputs)

    def extra_repr(self) -> str:
        return describe(self, "temperature", "sinkhorn_iterations", "sinkhorn_epsilon")


class SwAVPrototypes(nn.Module):
    """SwAV's prototype layer: scores = normalize(features) @ normalize(prototypes)ᵀ, (…, K) for
    features (…, dim)."""

    def __init__(self, dim: int, n_prototypes: int = 3000):
        super().__init__()
        check_count(dim, "dim", 1)
        check_count(n_prototypes, "n_prototypes", 1)
        self.prototypes = nn.Parameter(l2_normalize(torch.randn(n_prototypes, dim)))

    def forward(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        check_dim_match("prototypes", self.prototypes, "features", features)
        return l2_normalize(features) @ l2_normalize(self.prototypes).to(features.dtype).T

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project the prototypes back onto the sphere (SwAV does it after each step)."""
        self.prototypes.copy_(l2_normalize(self.prototypes))
