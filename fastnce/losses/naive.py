"""Reference (naive) implementations of every loss in fastnce.losses.

Each one materialises the full similarity / distance matrix (or the full set of pairs and
triplets) and follows the paper's formula line by line, in the input dtype: the slow,
obviously-correct oracle the fast code in this package is tested against. None of them is
used on a fast path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _normalize(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def _cdist(x: Tensor) -> Tensor:
    """Euclidean distances of the rows of x (exact, no matrix-product shortcut)."""
    diff = x[:, None, :] - x[None, :, :]
    d2 = (diff * diff).sum(-1)
    return torch.where(d2 > 0, d2.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), torch.zeros_like(d2))


def _masks(labels: Tensor):
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positives (self excluded), negatives


def _avg_nonzero(losses: Tensor, like: Tensor) -> Tensor:
    keep = losses > 0
    return losses[keep].mean() if keep.any() else (like * 0).sum()


# ---------------------------------------------------------------- self-supervised

def nt_xent_multiview_naive(views: Tensor, temperature: float = 0.1) -> Tensor:
    """views (V, N, D). Mean over every (anchor, positive) pair of -log softmax over all other rows."""
    V, N, D = views.shape
    z = _normalize(views.reshape(V * N, D))
    logits = z @ z.T / temperature
    eye = torch.eye(V * N, dtype=torch.bool, device=z.device)
    log_prob = logits.masked_fill(eye, float("-inf")).log_softmax(1)
    sample = torch.arange(V * N, device=z.device) % N
    pos = (sample[:, None] == sample[None, :]) & ~eye
    return -(log_prob[pos]).mean()


def dcl_naive(z1: Tensor, z2: Tensor, temperature: float = 0.1, w1=None, w2=None) -> Tensor:
    """DCL (Yeh et al. 2022) per anchor of [z1; z2], (2N,): −w·(positive logit) + log Σ exp over
    the negatives, the rows of the other samples (own row and positive masked out)."""
    N = len(z1)
    z = _normalize(torch.cat([z1, z2]))
    logits = z @ z.T / temperature
    rows = torch.arange(2 * N, device=z.device)
    sample = rows % N
    positive = logits[rows, (rows + N) % (2 * N)]
    if w1 is not None:
        positive = positive * torch.cat([w1, w2])
    negatives = logits.masked_fill(sample[:, None] == sample[None, :], float("-inf"))
    return negatives.logsumexp(1) - positive


def moco_naive(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.07) -> Tensor:
    """MoCo (He et al. 2020): logits [q·k, q·queue] / T, cross-entropy with class 0."""
    q, k, queue = _normalize(query), _normalize(key), _normalize(queue)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def clip_naive(image: Tensor, text: Tensor, logit_scale) -> Tensor:
    logits = logit_scale * image @ text.T
    y = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def cpc_naive(context: Tensor, codes: Tensor, weights) -> Tensor:
    """CPC (van den Oord et al. 2018): for each offset k, logits (W_k c_t)·z over all B·T codes."""
    B, T, _ = codes.shape
    Z = codes.reshape(B * T, -1)
    losses = []
    for k, W in enumerate(weights, start=1):
        pred = (context[:, : T - k] @ W.T).reshape(-1, Z.shape[1])
        b = torch.arange(B, device=codes.device)[:, None]
        t = torch.arange(T - k, device=codes.device)[None, :]
        target = (b * T + t + k).reshape(-1)
        losses.append(F.cross_entropy(pred @ Z.T, target))
    return torch.stack(losses).mean()


def dino_naive(teacher_out, student_out, center: Tensor, teacher_temp: float, student_temp: float) -> Tensor:
    """DINO (Caron et al. 2021): mean over pairs (t, s), t != s, and the batch of
    -softmax((t_out - center) / T_t) · log_softmax(s_out / T_s)."""
    total, terms = 0.0, 0
    for i, t in enumerate(teacher_out):
        p = F.softmax((t - center.reshape(1, -1)) / teacher_temp, dim=-1)
        for j, s in enumerate(student_out):
            if i == j:
                continue
            total = total + (-(p * F.log_softmax(s / student_temp, dim=-1)).sum(-1)).mean()
            terms += 1
    return total / terms


def sinkhorn_naive(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """Sinkhorn-Knopp (SwAV, Caron et al. 2020): codes (B, K), each row sums to 1."""
    Q = torch.exp(scores.double() / epsilon).T  # (K, B)
    Q = Q / Q.sum()
    K, B = Q.shape
    for _ in range(iterations):
        Q = Q / Q.sum(1, keepdim=True) / K
        Q = Q / Q.sum(0, keepdim=True) / B
    return (Q * B).T.to(scores.dtype)


def swav_naive(high, low, temperature=0.1, iterations=3, epsilon=0.05) -> Tensor:
    views = list(high) + list(low)
    loss = 0.0
    for i, h in enumerate(high):
        q = sinkhorn_naive(h.detach(), iterations, epsilon)
        sub = 0.0
        for v, z in enumerate(views):
            if v != i:
                sub = sub + (-(q * F.log_softmax(z / temperature, 1)).sum(1)).mean()
        loss = loss + sub / (len(views) - 1)
    return loss / len(high)


def nce_naive(data_logits_model, data_log_noise, noise_logits_model, noise_log_noise) -> Tensor:
    """NCE (Gutmann & Hyvärinen 2010/2012), nu = k noise samples per data point:
    h(u) = p_m(u) / (p_m(u) + k p_n(u)); returns (N,) the negated terms of
    J = mean_i [ln h(x_i) + sum_j ln(1 - h(y_ij))]."""
    k = noise_logits_model.shape[-1]
    pm_d, pn_d = data_logits_model.exp(), data_log_noise.exp()
    pm_n, pn_n = noise_logits_model.exp(), noise_log_noise.exp()
    h_d = pm_d / (pm_d + k * pn_d)
    h_n = pm_n / (pm_n + k * pn_n)
    return -(torch.log(h_d) + torch.log(1 - h_n).sum(-1))


# ---------------------------------------------------------------- metric learning (pml conventions)

def supcon_naive(embeddings: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """SupCon 'out' (Khosla et al. 2020) with pytorch-metric-learning's reduction: per anchor
    -mean over positives of log softmax over all other rows; mean over anchors whose loss > 0;
    0 when the batch has no positive pair or no negative pair."""
    z = _normalize(embeddings)
    pos, neg = _masks(labels)
    if not pos.any() or not neg.any():
        return (embeddings * 0).sum()
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = (z @ z.T / temperature).masked_fill(eye, float("-inf")).log_softmax(1)
    per = -(log_prob.masked_fill(~pos, 0)).sum(1) / pos.sum(1).clamp_min(1)
    return _avg_nonzero(per, embeddings)


def soft_nearest_neighbor_naive(embeddings: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft nearest neighbour loss (Frosst et al. 2019), squared Euclidean distances:
    -mean_i log(sum_{j!=i, y_j=y_i} e^{-d_ij/T} / sum_{k!=i} e^{-d_ik/T}), over samples that
    have a same-class partner (0 when none has)."""
    sq = (embeddings * embeddings).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * embeddings @ embeddings.T).clamp_min(0)
    same, _ = _masks(labels)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = -d2 / temperature
    num = torch.logsumexp(logits.masked_fill(~same, float("-inf")), 1)
    den = torch.logsumexp(logits.masked_fill(eye, float("-inf")), 1)
    has = same.any(1)
    if not has.any():
        return (embeddings * 0).sum()
    return -(num[has] - den[has]).mean()


def contrastive_naive(embeddings, labels, pos_margin=0.0, neg_margin=1.0) -> Tensor:
    """Contrastive loss (Hadsell et al. 2006) as pml: normalised embeddings, Euclidean distance,
    relu(d - m_pos) over positive pairs + relu(m_neg - d) over negative pairs, each averaged
    over its nonzero terms."""
    d = _cdist(_normalize(embeddings))
    pos, neg = _masks(labels)
    zero = (embeddings * 0).sum()
    p = _avg_nonzero(F.relu(d[pos] - pos_margin), embeddings) if pos.any() else zero
    n = _avg_nonzero(F.relu(neg_margin - d[neg]), embeddings) if neg.any() else zero
    return p + n


def triplet_margin_naive(embeddings, labels, margin=0.05, mining="all") -> Tensor:
    """Triplet margin loss (Weinberger & Saul 2009; Schroff et al. 2015) as pml: relu(d_ap - d_an + m)
    over all triplets (or each anchor's hardest positive and negative with mining='batch_hard',
    Hermans et al. 2017), averaged over nonzero terms."""
    d = _cdist(_normalize(embeddings))
    pos, neg = _masks(labels)
    if mining == "all":
        trip = pos[:, :, None] & neg[:, None, :]
        losses = F.relu(d[:, :, None] - d[:, None, :] + margin)[trip]
    else:
        ok = pos.any(1) & neg.any(1)
        dap = d.masked_fill(~pos, float("-inf")).max(1).values
        dan = d.masked_fill(~neg, float("inf")).min(1).values
        losses = F.relu(dap - dan + margin)[ok]
    if losses.numel() == 0:
        return (embeddings * 0).sum()
    return _avg_nonzero(losses, embeddings)


def npairs_naive(embeddings, labels) -> Tensor:
    """N-pairs (Sohn 2016) as pml: one (anchor, positive) pair per class (first two members),
    cosine similarities, cross-entropy of each anchor against all pairs' positives."""
    anchors, positives = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) >= 2:
            anchors.append(idx[0])
            positives.append(idx[1])
    if not anchors:
        return (embeddings * 0).sum()
    z = _normalize(embeddings)
    a, p = z[torch.stack(anchors)], z[torch.stack(positives)]
    return F.cross_entropy(a @ p.T, torch.arange(len(a), device=z.device))


def lifted_structure_naive(embeddings, labels, neg_margin=1.0, pos_margin=0.0) -> Tensor:
    """Lifted structured loss (Oh Song et al. 2016) as pml's LiftedStructureLoss: per ordered positive
    pair (i, j): relu(log(sum_{n neg of i} e^{m - d_in} + sum_{n neg of j} e^{m - d_jn}) + d_ij - m_pos)^2 / 2,
    averaged over all positive pairs (pml's MeanReducer)."""
    d = _cdist(_normalize(embeddings))
    pos, neg = _masks(labels)
    if not pos.any() or not neg.any():
        return (embeddings * 0).sum()
    lse = torch.logsumexp((neg_margin - d).masked_fill(~neg, float("-inf")), 1)
    lse = torch.where(neg.any(1), lse, torch.zeros_like(lse))
    i, j = torch.nonzero(pos, as_tuple=True)
    per = F.relu(torch.logaddexp(lse[i], lse[j]) + d[i, j] - pos_margin) ** 2 / 2
    return per.mean()

