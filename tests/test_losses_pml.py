"""fastnce.losses against pytorch-metric-learning: equal values and gradients (float32, rtol 1e-4)."""
import pytest
import torch

import fastnce
from fastnce import losses as L

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

BACKENDS = ["reference", "torch"]


def _data(N, D=16, seed=0):
    g = torch.Generator().manual_seed(seed + N)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    if N == 3:
        y = torch.tensor([0, 0, 1])
    else:
        y = torch.randint(0, max(1, N // 6), (N,), generator=g)
    return x, y


def _assert_same(ours, theirs, x, y, extra=()):
    a = ours(x, y)
    b = theirs(x, y, *extra)
    ga, = torch.autograd.grad(a, x, allow_unused=True)
    gb, = torch.autograd.grad(b, x, allow_unused=True)
    torch.testing.assert_close(a.float().reshape(()), b.float().reshape(()), rtol=1e-4, atol=1e-6)
    ga = torch.zeros_like(x) if ga is None else ga
    gb = torch.zeros_like(x) if gb is None else gb
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("N", [1, 3, 127])
@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_matches_pml(N, backend):
    x, y = _data(N)
    _assert_same(L.SupConLoss(backend=backend), pml_losses.SupConLoss(), x, y)
    _assert_same(L.SupConLoss(temperature=0.5, backend=backend), pml_losses.SupConLoss(temperature=0.5), x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_edge_batches_match_pml(backend):
    x = torch.randn(5, 8, requires_grad=True)
    for y in (torch.zeros(5, dtype=torch.long), torch.arange(5), torch.tensor([0, 0, 1, 2, 3])):
        _assert_same(L.SupConLoss(backend=backend), pml_losses.SupConLoss(), x, y)


@pytest.mark.parametrize("N", [1, 3, 127])
def test_contrastive_matches_pml(N):
    x, y = _data(N)
    _assert_same(L.ContrastiveLoss(), pml_losses.ContrastiveLoss(), x, y)
    _assert_same(L.ContrastiveLoss(pos_margin=0.3, neg_margin=1.2), pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=1.2), x, y)


@pytest.mark.parametrize("N", [1, 3, 127])
def test_triplet_all_matches_pml(N):
    x, y = _data(N)
    _assert_same(L.TripletMarginLoss(), pml_losses.TripletMarginLoss(), x, y)
    _assert_same(L.TripletMarginLoss(margin=0.3), pml_losses.TripletMarginLoss(margin=0.3), x, y)


def test_triplet_all_counts_its_terms_exactly_at_large_distances():
    """Unnormalised float32 embeddings a million apart: whether d_an < d_ap + margin is decided
    as in exact arithmetic (the count of non-zero terms divides the loss), as pml's float32 loss
    and both in float64 do; a float32 threshold d_ap + margin rounded to d_ap and dropped a
    term, doubling the loss."""
    from pytorch_metric_learning import distances

    x = torch.tensor([[1e6, 0.0], [0.0, 0.0], [-1.19, 0.0], [0.0, 5e6]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 2])
    theirs = pml_losses.TripletMarginLoss(margin=1.2, distance=distances.LpDistance(normalize_embeddings=False))
    ours = L.TripletMarginLoss(margin=1.2, normalize_embeddings=False)
    _assert_same(ours, theirs, x, y)
    torch.testing.assert_close(ours(x.double(), y), theirs(x.double(), y))


@pytest.mark.parametrize("loss,margin", [(L.contrastive_loss, "pos_margin"), (L.contrastive_loss, "neg_margin"),
                                         (L.triplet_margin_loss, "margin"), (L.lifted_structure_loss, "neg_margin"),
                                         (L.lifted_structure_loss, "pos_margin")])
def test_functional_losses_check_their_margins(loss, margin):
    """As the modules do: a NaN margin gave contrastive_loss a finite number (its NaN terms were
    not counted as non-zero), an inf one an inf loss."""
    x, y = _data(6)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{margin} must be a finite number"):
            loss(x, y, **{margin: bad})
    with pytest.raises(TypeError, match=margin):
        loss(x, y, **{margin: "0.1"})


@pytest.mark.parametrize("N", [1, 3, 127])
def test_triplet_batch_hard_matches_pml_miner(N):
    x, y = _data(N)
    miner = pml_miners.BatchHardMiner()
    _assert_same(L.TripletMarginLoss(mining="batch_hard"), pml_losses.TripletMarginLoss(), x, y,
                 extra=(miner(x.detach(), y),))


@pytest.mark.parametrize("N", [1, 3, 127])
@pytest.mark.parametrize("backend", BACKENDS)
def test_npairs_matches_pml(N, backend):
    x, y = _data(N)
    _assert_same(L.NPairsLoss(backend=backend), pml_losses.NPairsLoss(), x, y)


@pytest.mark.parametrize("N", [1, 3, 127])
def test_lifted_structure_matches_pml(N):
    x, y = _data(N)
    _assert_same(L.LiftedStructureLoss(), pml_losses.LiftedStructureLoss(), x, y)
    _assert_same(L.LiftedStructureLoss(neg_margin=0.5, pos_margin=0.1),
                 pml_losses.LiftedStructureLoss(neg_margin=0.5, pos_margin=0.1), x, y)


def test_lifted_structure_zero_terms_count_in_the_mean():
    """pml averages every positive pair's term (MeanReducer), zeros included: a close positive
    pair far from the negatives has a zero term and still counts."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 0, 1])
    _assert_same(L.LiftedStructureLoss(), pml_losses.LiftedStructureLoss(), x, y)
    _assert_same(L.LiftedStructureLoss(pos_margin=1.3), pml_losses.LiftedStructureLoss(pos_margin=1.3), x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_well_separated_anchors_stay_in_the_mean(backend):
    """Two identical positives far from their negatives have ℓ ≈ 1e-7, below one float32 step
    of 1/T: such an anchor must stay in pml's non-zero mean, not round to 0 and drop out."""
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    x[1], x[2] = x[0], -x[0]  # anchors 0 and 1: one point, their nearest negative opposite
    x.requires_grad_()
    y = torch.tensor([0, 0, 1, 2, 2, 3])
    for t in (0.1, 0.05):
        _assert_same(L.SupConLoss(temperature=t, backend=backend), pml_losses.SupConLoss(temperature=t), x, y)


@pytest.mark.parametrize("N", [1, 3, 127])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_matches_pml_ntxent_with_instance_labels(N, backend):
    """pml's NTXentLoss on cat(z1, z2) with labels cat(arange N, arange N): one loss per
    ordered positive pair (2N), MeanReducer: the same mean over 2N anchors as nt_xent."""
    g = torch.Generator().manual_seed(N)
    z1 = torch.randn(N, 16, generator=g, requires_grad=True)
    z2 = torch.randn(N, 16, generator=g, requires_grad=True)
    labels = torch.cat([torch.arange(N), torch.arange(N)])
    a = fastnce.nt_xent(z1, z2, temperature=0.07, backend=backend)
    b = pml_losses.NTXentLoss(temperature=0.07)(torch.cat([z1, z2]), labels)
    torch.testing.assert_close(a, b.reshape(()), rtol=1e-4, atol=1e-6)
    ga = torch.autograd.grad(a, (z1, z2))
    gb = torch.autograd.grad(b, (z1, z2))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6)
    # and the module, two views as a list
    m = L.NTXentLoss(temperature=0.07, backend=backend)([z1, z2])
    torch.testing.assert_close(m, b.reshape(()), rtol=1e-4, atol=1e-6)
