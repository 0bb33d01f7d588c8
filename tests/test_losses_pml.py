"""fastnce.losses against pytorch-metric-learning: equal values and gradients (float32, rtol 1e-4)."""
import pytest
import torch

import fastnce
from fastnce import losses as L
from fastnce.losses import naive as R

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

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
    _close_values_and_grads(ours(x, y), theirs(x, y, *extra), x)


def _close_values_and_grads(a, b, x):
    """Two scalar losses of x: values and gradients (float32, rtol 1e-4)."""
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


# ---------------------------------------------------------------- flags, defaults and edge batches

def _unnormalised_data(N, D=8, seed=0, scale=0.4):
    """Unnormalised embeddings of norm ~1 (scale·√D): their distances straddle the margins, so
    normalising them or not changes the loss."""
    g = torch.Generator().manual_seed(seed + N)
    x = (torch.randn(N, D, generator=g) * scale).requires_grad_()
    y = torch.randint(0, max(2, N // 6), (N,), generator=g)
    return x, y


UNNORMALISED = [
    ("contrastive", lambda: L.ContrastiveLoss(0.1, 0.9, normalize_embeddings=False),
     lambda: pml_losses.ContrastiveLoss(0.1, 0.9, distance=pml_distances.LpDistance(normalize_embeddings=False))),
    ("triplet", lambda: L.TripletMarginLoss(0.2, normalize_embeddings=False),
     lambda: pml_losses.TripletMarginLoss(0.2, distance=pml_distances.LpDistance(normalize_embeddings=False))),
    ("lifted", lambda: L.LiftedStructureLoss(0.8, 0.1, normalize_embeddings=False),
     lambda: pml_losses.LiftedStructureLoss(0.8, 0.1, distance=pml_distances.LpDistance(normalize_embeddings=False))),
    ("npairs", lambda: L.NPairsLoss(normalize_embeddings=False, backend="torch"),
     lambda: pml_losses.NPairsLoss(distance=pml_distances.DotProductSimilarity(normalize_embeddings=False))),
]


@pytest.mark.parametrize("name,ours,theirs", UNNORMALISED, ids=[u[0] for u in UNNORMALISED])
@pytest.mark.parametrize("N", [5, 64])
def test_modules_pass_normalize_embeddings_false_on(name, ours, theirs, N):
    """normalize_embeddings=False reaches the loss: pml with its distance's
    normalize_embeddings=False (every module, not only the triplet one)."""
    x, y = _unnormalised_data(N)
    _close_values_and_grads(ours()(x, y), theirs()(x, y), x)


FUNCTIONAL_DEFAULTS = [
    ("contrastive", L.contrastive_loss, pml_losses.ContrastiveLoss),
    ("triplet", L.triplet_margin_loss, pml_losses.TripletMarginLoss),
    ("lifted", L.lifted_structure_loss, pml_losses.LiftedStructureLoss),
    ("npairs", L.npairs_loss, pml_losses.NPairsLoss),
]


@pytest.mark.parametrize("name,ours,theirs", FUNCTIONAL_DEFAULTS, ids=[f[0] for f in FUNCTIONAL_DEFAULTS])
def test_functional_defaults_are_pmls(name, ours, theirs):
    """The functional forms' default margins / flags are pml's defaults, as the modules' are
    (the modules pass every argument, so the functions' own defaults were never exercised)."""
    x, y = _unnormalised_data(64, D=16, scale=1.0)
    _close_values_and_grads(ours(x, y), theirs()(x, y), x)


METRIC = {
    "contrastive": (L.ContrastiveLoss, pml_losses.ContrastiveLoss),
    "triplet": (L.TripletMarginLoss, pml_losses.TripletMarginLoss),
    "lifted": (L.LiftedStructureLoss, pml_losses.LiftedStructureLoss),
    "npairs": (L.NPairsLoss, pml_losses.NPairsLoss),
}


@pytest.mark.parametrize("name", METRIC)
@pytest.mark.parametrize("labels", ["one_class", "all_distinct", "one_pair"])
def test_metric_edge_batches_match_pml(name, labels):
    """A batch of one class (no negative pair), of distinct classes (no positive pair), and with
    a single positive pair: pml's value and (zero, finite) gradients. A single-class batch gave
    LiftedStructureLoss −inf negative logsumexps (NaN gradients) unless it returns early."""
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(7), requires_grad=True)
    y = {"one_class": torch.zeros(6, dtype=torch.long), "all_distinct": torch.arange(6),
         "one_pair": torch.tensor([0, 0, 1, 2, 3, 4])}[labels]
    ours, theirs = METRIC[name]
    _close_values_and_grads(ours()(x, y), theirs()(x, y), x)
    naive = {"contrastive": R.contrastive_naive, "triplet": R.triplet_margin_naive,
             "lifted": R.lifted_structure_naive, "npairs": R.npairs_naive}[name]
    _close_values_and_grads(naive(x, y), theirs()(x, y), x)  # the oracle too


def test_triplet_all_does_not_count_ties_at_the_margin():
    """margin=0 and a negative at exactly the positive's distance (a duplicated sample under two
    labels): its term relu(d_ap − d_an) is 0 and pml's AvgNonZeroReducer does not count it; the
    count of d_an < d_ap + margin must be strict. The features are ±1 in 4 of 8 places: normalised
    to ±0.5, every dot product is exact in any order of summation, so the tie holds in float32 on
    every CPU (with randn features one GEMM kernel broke it by a rounding, another did not)."""
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(6, 8)
    for row in base:
        row[torch.randperm(8, generator=g)[:4]] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    x = torch.cat([base, base[1:2]]).requires_grad_()  # row 6 duplicates row 1, another class
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    _close_values_and_grads(L.TripletMarginLoss(margin=0.0)(x, y), pml_losses.TripletMarginLoss(margin=0.0)(x, y), x)
    _close_values_and_grads(L.triplet_margin_loss(x.double(), y, 0.0), pml_losses.TripletMarginLoss(margin=0.0)(x.double(), y), x)
