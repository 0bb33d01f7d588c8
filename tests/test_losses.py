"""fastnce.losses against their formula references (fastnce/losses/naive.py), lightly where it
is installed, and gradcheck in float64 on small sizes."""
import importlib.util
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import fastnce
from fastnce import losses as L
from fastnce.losses import _common
from fastnce.losses import naive as R

BACKENDS = ["reference", "torch"]
F64 = dict(rtol=1e-9, atol=1e-10)
F32 = dict(rtol=1e-4, atol=1e-6)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(N, g):
    if N == 1:
        return torch.zeros(1, dtype=torch.long)
    if N == 3:
        return torch.tensor([0, 1, 0])
    return torch.randint(0, max(2, N // 6), (N,), generator=g)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _close_with_grads(ours, ref, inputs, tol):
    torch.testing.assert_close(ours, ref.to(ours.dtype).reshape(ours.shape), **tol)
    for a, b in zip(_grads(ours, inputs), _grads(ref, inputs)):
        a = torch.zeros_like(inputs[0]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **tol)


# ---------------------------------------------------------------- NT-Xent, several views

@pytest.mark.parametrize("V,N", [(2, 1), (3, 3), (4, 127)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_multiview_matches_reference(V, N, backend):
    views = torch.randn(V, N, 16, generator=_gen(N), dtype=torch.float64, requires_grad=True)
    ours = L.NTXentLoss(temperature=0.2, backend=backend)(views)
    _close_with_grads(ours, R.nt_xent_multiview_naive(views, 0.2), (views,), F64)
    as_list = L.NTXentLoss(temperature=0.2, backend=backend)(list(views.unbind(0)))
    torch.testing.assert_close(as_list, ours, **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_two_views_equals_nt_xent(backend):
    z1, z2 = torch.randn(2, 9, 8, generator=_gen(1))
    for red in ("mean", "sum", "none"):
        torch.testing.assert_close(L.nt_xent_multiview([z1, z2], 0.3, red, backend=backend),
                                   fastnce.nt_xent(z1, z2, 0.3, red, backend=backend), **F32)
    torch.testing.assert_close(L.NTXentLoss(backend=backend)(z1, z2), fastnce.nt_xent(z1, z2, backend=backend))


def test_nt_xent_multiview_gradcheck():
    views = torch.randn(3, 4, 5, generator=_gen(2), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: L.nt_xent_multiview(v, 0.5, backend="torch"), (views,))


def test_nt_xent_multiview_errors():
    with pytest.raises(ValueError, match="two views"):
        L.nt_xent_multiview(torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="shape"):
        L.nt_xent_multiview([torch.randn(4, 3), torch.randn(5, 3)])


@pytest.mark.parametrize("scheme", ["ring", "gather"])
@pytest.mark.parametrize("as_list", [False, True])
def test_distributed_nt_xent_module_refuses_more_views(scheme, as_list):
    """Distributed NT-Xent is two views: three are an error, not a silent local loss (checked
    before any collective, so no process group is needed)."""
    views = torch.randn(3, 5, 8)
    with pytest.raises(ValueError, match="takes two views"):
        L.NTXentLoss(distributed=scheme)(list(views) if as_list else views)


@pytest.mark.parametrize("make", [L.NTXentLoss, L.DCLLoss, L.DCLWLoss, L.ClipLoss, L.SigLipLoss],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", ["allgather", True, "Ring"])
def test_modules_reject_an_unknown_scheme_when_built(make, bad):
    with pytest.raises(ValueError, match="distributed must be None or one of"):
        make(distributed=bad)


# ---------------------------------------------------------------- DCL

@pytest.mark.parametrize("N", [2, 3, 127])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dcl_matches_reference(N, weighted, backend):
    z1, z2 = torch.randn(2, N, 16, generator=_gen(N), dtype=torch.float64).unbind(0)
    z1.requires_grad_(), z2.requires_grad_()
    weight_fn = L.vmf_weights if weighted else None
    ours = L.dcl_loss(z1, z2, 0.2, "none", weight_fn=weight_fn, backend=backend)
    n1, n2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    w = (L.vmf_weights(n1, n2), L.vmf_weights(n2, n1)) if weighted else (None, None)
    ref = R.dcl_naive(z1, z2, 0.2, *w)
    torch.testing.assert_close(ours, ref, **F64)
    _close_with_grads(ours.sum(), ref.sum(), (z1, z2), F64)
    module = L.DCLWLoss(0.2, backend=backend) if weighted else L.DCLLoss(0.2, backend=backend)
    torch.testing.assert_close(module(z1, z2), ours.mean(), **F64)
    torch.testing.assert_close(L.dcl_loss(z1, z2, 0.2, "sum", weight_fn=weight_fn, backend=backend), ours.sum(), **F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [2, 5])
def test_dcl_weight_fn_is_called_per_view_in_order(backend, N):
    """z1's anchors get weight_fn(z1, z2), z2's weight_fn(z2, z1), as lightly's DCLLoss: an
    asymmetric weight sees a swap (vmf_weights and the other weights here are symmetric)."""
    z1, z2 = torch.randn(2, N, 6, generator=_gen(N), dtype=torch.float64).unbind(0)
    z1.requires_grad_(), z2.requires_grad_()
    weight = lambda a, b: 1 + a[:, 0] - 0.5 * b[:, 1]
    ours = L.dcl_loss(z1, z2, 0.3, "none", weight_fn=weight, backend=backend)
    n1, n2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    ref = R.dcl_naive(z1, z2, 0.3, weight(n1, n2), weight(n2, n1))
    torch.testing.assert_close(ours, ref, **F64)
    _close_with_grads(ours.sum(), ref.sum(), (z1, z2), F64)


def test_dcl_takes_the_positive_out_of_nt_xent():
    """DCL's denominator is NT-Xent's without the positive: their per-anchor losses differ by
    log(1 − softmax probability of the positive)."""
    z1, z2 = torch.randn(2, 9, 8, generator=_gen(5), dtype=torch.float64).unbind(0)
    nt = fastnce.nt_xent(z1, z2, 0.3, "none")
    dcl = L.dcl_loss(z1, z2, 0.3, "none")
    torch.testing.assert_close(dcl, nt + torch.log1p(-torch.exp(-nt)), **F64)


def test_dcl_gradcheck():
    """Unweighted, and with a weight that has a gradient (vmf_weights has none by design, which a
    numerical Jacobian would see)."""
    z = torch.randn(2, 4, 5, generator=_gen(6), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: L.dcl_loss(z[0], z[1], 0.5, backend="torch"), (z,))
    weight = lambda a, b: 1 + ((a - b) ** 2).sum(1)
    assert torch.autograd.gradcheck(lambda z: L.dcl_loss(z[0], z[1], 0.5, weight_fn=weight, backend="torch"), (z,))


def test_dcl_errors():
    with pytest.raises(ValueError, match="at least 2 samples"):
        L.dcl_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="same shape"):
        L.dcl_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"weight_fn must return a tensor of shape \(3,\)"):
        L.dcl_loss(torch.randn(3, 4), torch.randn(3, 4), weight_fn=lambda a, b: torch.ones(2))
    with pytest.raises(TypeError, match="weight_fn"):
        L.DCLLoss(weight_fn=1.0)
    with pytest.raises(ValueError, match="sigma"):
        L.DCLWLoss(sigma=0.0)
    with pytest.raises(ValueError, match="temperature"):
        L.DCLLoss(temperature=float("inf"))


# ---------------------------------------------------------------- MoCo

@pytest.mark.parametrize("backend", BACKENDS)
def test_moco_matches_reference_and_enqueues(backend):
    torch.manual_seed(0)
    loss = L.MoCoLoss(dim=8, queue_size=10, temperature=0.07, backend=backend)
    assert torch.allclose(loss.queue.norm(dim=1), torch.ones(10))
    q = torch.randn(6, 8, requires_grad=True)
    k = torch.randn(6, 8)
    queue0 = loss.queue.clone()
    ours = loss(q, k)
    _close_with_grads(ours, R.moco_naive(q, k, queue0, 0.07), (q,), F32)
    assert int(loss.queue_ptr) == 6
    torch.testing.assert_close(loss.queue[:6], fastnce.functional.l2_normalize(k))
    torch.testing.assert_close(loss.queue[6:], queue0[6:])
    assert not loss.queue.requires_grad
    # wrap-around: 6 more keys fill slots 6..9 then 0..1
    k2 = torch.randn(6, 8)
    loss(q, k2)
    assert int(loss.queue_ptr) == 2
    kn = fastnce.functional.l2_normalize(k2)
    torch.testing.assert_close(loss.queue[6:], kn[:4])
    torch.testing.assert_close(loss.queue[:2], kn[4:])
    # a batch larger than the queue keeps its last queue_size keys
    big = torch.randn(23, 8)
    loss.enqueue(big)
    assert sorted(map(tuple, loss.queue.tolist())) == sorted(map(tuple, fastnce.functional.l2_normalize(big)[-10:].tolist()))
    sd = loss.state_dict()
    assert set(sd) == {"queue", "queue_ptr"}


def test_moco_no_update_and_momentum_update():
    loss = L.MoCoLoss(dim=4, queue_size=8)
    before = loss.queue.clone()
    loss(torch.randn(3, 4), torch.randn(3, 4), update_queue=False)
    assert torch.equal(before, loss.queue) and int(loss.queue_ptr) == 0
    loss.eval()  # a validation loss leaves the queue alone unless asked
    loss(torch.randn(3, 4), torch.randn(3, 4))
    assert torch.equal(before, loss.queue) and int(loss.queue_ptr) == 0
    loss(torch.randn(3, 4), torch.randn(3, 4), update_queue=True)
    assert int(loss.queue_ptr) == 3
    loss.train()
    q_enc, k_enc = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)), torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    q_enc[1].running_mean.fill_(2.0)
    old = [p.clone() for p in k_enc.parameters()]
    L.momentum_update(k_enc, q_enc, m=0.9)
    for pk, po, pq in zip(k_enc.parameters(), old, q_enc.parameters()):
        torch.testing.assert_close(pk, 0.9 * po + 0.1 * pq)
    # buffers are the key encoder's own (MoCo, DINO and lightly average parameters only)
    assert torch.equal(k_enc[1].running_mean, torch.zeros(3))
    with pytest.raises(ValueError, match="parameter 0 has shape"):
        L.momentum_update(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))


def test_momentum_update_bounds():
    """m = 1 keeps the key encoder, m = 0 copies the query encoder (MoCo's initialisation)."""
    q_enc, k_enc = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    old = [p.clone() for p in k_enc.parameters()]
    L.momentum_update(k_enc, q_enc, m=1.0)
    assert all(torch.equal(pk, po) for pk, po in zip(k_enc.parameters(), old))
    L.momentum_update(k_enc, q_enc, m=0.0)
    assert all(torch.equal(pk, pq) for pk, pq in zip(k_enc.parameters(), q_enc.parameters()))
    for m in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="m must be in"):
            L.momentum_update(k_enc, q_enc, m=m)


# ---------------------------------------------------------------- CLIP

@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_loss_module(backend):
    g = _gen(3)
    img = torch.randn(7, 8, generator=g, requires_grad=True)
    txt = torch.randn(7, 8, generator=g, requires_grad=True)
    m = L.ClipLoss(backend=backend)
    torch.testing.assert_close(float(m.logit_scale.detach()), float(torch.log(torch.tensor(1 / 0.07))))
    ours = m(img, txt)
    ref = R.clip_naive(torch.nn.functional.normalize(img), torch.nn.functional.normalize(txt), m.logit_scale.exp())
    _close_with_grads(ours, ref, (img, txt), F32)
    g_scale, = torch.autograd.grad(m(img, txt), m.logit_scale)
    assert g_scale.abs() > 0
    with torch.no_grad():
        m.logit_scale.fill_(10.0)  # exp(10) > 100: clamped in place, the gradient still flows
    torch.testing.assert_close(m.scale(), torch.tensor(100.0))
    g_scale, = torch.autograd.grad(m(img, txt), m.logit_scale)
    assert m.logit_scale == math.log(100.0) and g_scale != 0
    fixed = L.ClipLoss(learnable=False)
    assert "logit_scale" in dict(fixed.named_buffers()) and not list(fixed.parameters())


@pytest.mark.parametrize("cls", [L.ClipLoss, L.SigLipLoss], ids=lambda c: c.__name__)
def test_fixed_logit_scale_above_the_cap_is_clamped(cls):
    """A fixed scale written above log(max_logit_scale) after construction (load_state_dict, by
    hand) still multiplies by max_logit_scale; the buffer itself is left as written."""
    a, b = torch.randn(2, 6, 8, generator=_gen(2), dtype=torch.float64).unbind(0)
    capped = cls(learnable=False, max_logit_scale=10.0, backend="reference")
    capped.logit_scale.fill_(math.log(50.0))
    at_cap = cls(init_temperature=0.1, learnable=False, max_logit_scale=10.0, backend="reference")
    if cls is L.SigLipLoss:
        at_cap.logit_bias.copy_(capped.logit_bias)
    assert float(capped.logit_scale) == pytest.approx(math.log(50.0))
    torch.testing.assert_close(capped(a, b), at_cap(a, b), **F64)


@pytest.mark.parametrize("bias,error", [(float("nan"), ValueError), (float("inf"), ValueError), ("a", TypeError)])
def test_siglip_module_checks_init_bias_when_built(bias, error):
    with pytest.raises(error, match="init_bias must be a finite number"):
        L.SigLipLoss(init_bias=bias)


def test_zero_shot():
    classes = torch.eye(3, 5)
    img = torch.tensor([[0.0, 2, 0, 0, 0], [5, 0, 0, 0.1, 0], [0, 0, 1, 0, 0]])
    logits = L.zero_shot_logits(img, classes, 10.0)
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits[0], torch.tensor([0.0, 10.0, 0.0]))
    assert L.zero_shot_predict(img, classes).tolist() == [1, 0, 2]


def test_zero_shot_logits_are_cosines_of_unnormalised_inputs():
    """Class embeddings (means of prompt embeddings) are not unit vectors: both sides are normalised."""
    g = torch.Generator().manual_seed(3)
    img = torch.randn(7, 5, generator=g, dtype=torch.float64)
    classes = 3 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    want = 10.0 * F.normalize(img, dim=1) @ F.normalize(classes, dim=1).T
    torch.testing.assert_close(L.zero_shot_logits(img, classes, 10.0), want, **F64)
    assert torch.equal(L.zero_shot_predict(img, classes, 10.0), want.argmax(1))


# ---------------------------------------------------------------- CPC

@pytest.mark.parametrize("backend", BACKENDS)
def test_cpc_matches_reference(backend):
    torch.manual_seed(0)
    gru = L.GRUContext(code_dim=6, context_dim=5)
    codes = torch.randn(3, 7, 6, requires_grad=True)
    context = gru(codes)
    assert context.shape == (3, 7, 5)
    context = context.detach().requires_grad_()
    loss = L.CPCLoss(context_dim=5, code_dim=6, num_steps=3, backend=backend)
    ws = [p.weight for p in loss.predictors]
    _close_with_grads(loss(context, codes), R.cpc_naive(context, codes, ws), (codes, context, ws[0]), F32)


def test_cpc_gradcheck_and_errors():
    c = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, z, w: L.cpc_loss(c, z, list(w), backend="torch"), (c, z, w))
    with pytest.raises(ValueError, match="offsets"):
        L.cpc_loss(c, z, [w[0]] * 4)


# ---------------------------------------------------------------- DINO, SwAV

def test_dino_matches_reference_and_updates_center():
    torch.manual_seed(0)
    loss = L.DINOLoss(output_dim=12, warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_epochs=4)
    assert loss.center.shape == (1, 1, 12) and "center" in loss.state_dict()
    teacher = [torch.randn(5, 12) for _ in range(2)]
    student = [torch.randn(5, 12, requires_grad=True) for _ in range(4)]
    center = loss.center.clone()
    ours = loss(teacher, student, epoch=1)
    ref = R.dino_naive(teacher, student, center, 0.03, 0.1)  # linspace(0.02, 0.05, 4)[1]
    _close_with_grads(ours, ref, tuple(student), F32)
    expected = 0.9 * center + 0.1 * torch.stack(teacher).mean((0, 1), keepdim=True)
    torch.testing.assert_close(loss.center, expected)
    # explicit teacher_temp wins; after warm-up the final temperature is used
    center = loss.center.clone()
    torch.testing.assert_close(loss(teacher, student, teacher_temp=0.07), R.dino_naive(teacher, student, center, 0.07, 0.1))
    center = loss.center.clone()
    torch.testing.assert_close(loss(teacher, student, epoch=10), R.dino_naive(teacher, student, center, 0.05, 0.1))
    with pytest.raises(ValueError, match="two views"):
        loss([teacher[0]], [student[0]])


def test_dino_gradcheck():
    t = [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)]
    s = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    center = torch.randn(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: L.dino_loss(t, list(s), center, 0.5, 0.3), (s,))


def test_nce_loss_computes_mixed_dtypes_in_float32():
    """bfloat16 model logits beside float32 noise log-probabilities (an AMP model, a fixed
    noise distribution): the same loss as with every argument in float32."""
    g = _gen(5)
    d, dn, n, nn_ = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.randn(6, 3, generator=g), \
        torch.randn(6, 3, generator=g)
    mixed = L.nce_loss(d.bfloat16(), dn, n.bfloat16(), nn_)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, L.nce_loss(d.bfloat16().float(), dn, n.bfloat16().float(), nn_))


def test_dino_module_takes_stacked_views():
    """DINOLoss, like dino_loss, takes (V, B, D) tensors as well as lists of (B, D) views."""
    g = _gen(4)
    t, s = torch.randn(2, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    as_lists, as_tensors = L.DINOLoss(output_dim=8), L.DINOLoss(output_dim=8)
    want = as_lists(list(t), list(s))
    torch.testing.assert_close(as_tensors(t, s), want, rtol=0, atol=0)
    torch.testing.assert_close(as_tensors.center, as_lists.center, rtol=0, atol=0)
    assert as_tensors.center.abs().sum() > 0


def test_update_teacher():
    s, t = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    w = t.weight.clone()
    L.update_teacher(t, s, m=0.5)
    torch.testing.assert_close(t.weight, 0.5 * w + 0.5 * s.weight)


def test_swav_matches_reference():
    torch.manual_seed(0)
    high = [torch.randn(9, 6, requires_grad=True) for _ in range(2)]
    low = [torch.randn(9, 6, requires_grad=True) for _ in range(3)]
    _close_with_grads(L.SwAVLoss()(high, low), R.swav_naive(high, low), tuple(high + low), F32)
    _close_with_grads(L.SwAVLoss(temperature=0.5)(high), R.swav_naive(high, [], 0.5), tuple(high), F32)
    q = L.sinkhorn(torch.randn(9, 6) * 40)  # large scores: no overflow, rows sum to 1
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(9))
    protos = L.SwAVPrototypes(dim=6, n_prototypes=4)
    assert protos(torch.randn(5, 6)).shape == (5, 4)


def _load_lightly():
    """lightly's DINO, SwAV, DCL and NT-Xent loss source files as {name: module}, loaded without
    lightly/__init__ (which needs torchvision); None when lightly is not installed."""
    spec = importlib.util.find_spec("lightly")
    if spec is None or spec.origin is None:
        return None
    root = os.path.dirname(spec.origin)
    saved = {k: v for k, v in sys.modules.items() if k == "lightly" or k.startswith("lightly.")}
    try:
        for name in ["lightly", "lightly.models", "lightly.models.modules", "lightly.loss", "lightly.utils"]:
            mod = types.ModuleType(name)
            mod.__path__ = []
            sys.modules[name] = mod

        def load(name, path):
            s = importlib.util.spec_from_file_location(name, os.path.join(root, path))
            m = importlib.util.module_from_spec(s)
            sys.modules[name] = m
            s.loader.exec_module(m)
            return m

        sys.modules["lightly.models.modules"].center = load("lightly.models.modules.center", "models/modules/center.py")
        sys.modules["lightly.utils"].dist = load("lightly.utils.dist", "utils/dist.py")
        utils = types.ModuleType("lightly.models.utils")  # the memory bank's import; used distributed only
        utils.concat_all_gather = None
        sys.modules["lightly.models.utils"] = sys.modules["lightly.models"].utils = utils
        sys.modules["lightly.models.modules"].memory_bank = load("lightly.models.modules.memory_bank",
                                                                 "models/modules/memory_bank.py")
        return {name: load(f"lightly.loss.{name}_loss", f"loss/{name}_loss.py") for name in ("dino", "swav", "dcl", "ntx_ent")}
    finally:
        for k in [k for k in sys.modules if k == "lightly" or k.startswith("lightly.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_dino_and_swav_match_lightly():
    mods = _load_lightly()
    if mods is None:
        pytest.skip("lightly is not installed")
    dino_mod, swav_mod = mods["dino"], mods["swav"]
    torch.manual_seed(0)
    ours = L.DINOLoss(output_dim=32, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=5)
    theirs = dino_mod.DINOLoss(output_dim=32, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=5)
    for epoch in range(3):
        t = [torch.randn(8, 32) for _ in range(2)]
        s = [torch.randn(8, 32, requires_grad=True) for _ in range(4)]
        _close_with_grads(ours(t, s, epoch=epoch), theirs(t, s, epoch=epoch), tuple(s), F32)
        torch.testing.assert_close(ours.center, theirs.center)
    high = [torch.randn(16, 10, requires_grad=True) for _ in range(2)]
    low = [torch.randn(16, 10, requires_grad=True) for _ in range(3)]
    _close_with_grads(L.SwAVLoss()(high, low), swav_mod.SwaVLoss()(high, low).reshape(()), tuple(high + low), F32)


def test_dino_keeps_float32_where_same_view_pairs_are_large():
    """The pairs t = s are left out of the sum, not subtracted from it: here each student view
    is confidently wrong about its own teacher view (cross-entropies ~440) and right about the
    other (~0.1); a total minus the same-view terms kept 4 digits in float32 (1e-4 off)."""
    g = _gen(12)
    base, other = torch.randn(64, 256, generator=g) * 3, torch.randn(64, 256, generator=g) * 3
    t, s = torch.stack([base, other]), torch.stack([other, base])
    want = R.dino_naive(list(t.double()), list(s.double()), torch.zeros(256, dtype=torch.float64), 0.04, 0.02)
    got = L.dino_loss(t, s, torch.zeros(256), 0.04, 0.02)
    torch.testing.assert_close(got.double(), want, rtol=5e-6, atol=0)


def test_dino_stays_float32_under_autocast():
    """Autocast (bfloat16 on the CPU) would run its pairs' product in bfloat16: ~1e-3 off
    float64 and a bfloat16 loss, where outside autocast the same inputs give float32's 1e-7."""
    g = _gen(13)
    xs = [torch.randn(8, 64, generator=g).bfloat16() for _ in range(4)]
    loss = lambda: L.dino_loss(xs[:2], xs, torch.zeros(64), 0.04, 0.1)
    plain = loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = loss()
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=1e-6, atol=0)


def test_dino_epoch_and_teacher_temp_as_tensors():
    """lightly takes an integer tensor epoch (it indexes its schedule); a learnable-looking
    teacher_temp gets no gradient (the teacher's softmax is a target), (1,) works as ()."""
    g = _gen(15)
    t = [torch.randn(4, 8, generator=g) for _ in range(2)]
    s = [torch.randn(4, 8, generator=g) for _ in range(3)]
    loss = L.DINOLoss(output_dim=8, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=5)
    twin = L.DINOLoss(output_dim=8, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=5)
    torch.testing.assert_close(loss(t, s, epoch=torch.tensor(3)), twin(t, s, epoch=3))
    temp = torch.tensor([0.05], requires_grad=True)
    got = L.dino_loss(t, [x.requires_grad_() for x in s], torch.zeros(8), temp)
    torch.testing.assert_close(got, L.dino_loss(t, s, torch.zeros(8), 0.05))
    got.backward()
    assert temp.grad is None


def test_moco_matches_lightlys_memory_bank():
    """MoCoLoss against lightly's NTXentLoss(memory_bank_size=(K, D)) (a query's positive is its
    key, its negatives the bank, then the keys are enqueued) over several steps: loss, query
    gradient, queue and pointer. A batch that divides the queue: lightly restarts at slot 0
    where a batch would run past the end, MoCoLoss wraps around (its docstring)."""
    mods = _load_lightly()
    if mods is None:
        pytest.skip("lightly is not installed")
    g = _gen(14)
    D, n, K = 24, 3, 12
    theirs = mods["ntx_ent"].NTXentLoss(0.2, memory_bank_size=(K, D))
    ours = L.MoCoLoss(D, K, 0.2)
    with torch.no_grad():
        ours.queue.copy_(theirs.memory_bank.bank)
    for _ in range(6):  # twice round the queue
        q, k = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
        a, b = q.clone().requires_grad_(), q.clone().requires_grad_()
        got, want = ours(a, k), theirs(b, k)
        torch.testing.assert_close(got, want.reshape(got.shape), **F32)
        torch.testing.assert_close(torch.autograd.grad(got, a)[0], torch.autograd.grad(want, b)[0], **F32)
        torch.testing.assert_close(ours.queue, theirs.memory_bank.bank)
        assert int(ours.queue_ptr) == int(theirs.memory_bank.bank_ptr)


def test_dino_and_swav_take_mixed_dtypes_as_lightly():
    """A float16 teacher beside float32 students (bfloat16 small crops beside float32 global ones):
    lightly's formulas take them, and so do these, computed in float32."""
    mods = _load_lightly()
    if mods is None:
        pytest.skip("lightly is not installed")
    g = _gen(11)
    t = [torch.randn(8, 32, generator=g).half() for _ in range(2)]
    s = [torch.randn(8, 32, generator=g, requires_grad=True) for _ in range(3)]
    ours, theirs = L.DINOLoss(output_dim=32), mods["dino"].DINOLoss(output_dim=32)
    _close_with_grads(ours(t, s), theirs(t, s), tuple(s), F32)
    # the centre's batch mean: ours in float32, lightly's in float16 (its rounding, ~1e-4, x 0.1)
    torch.testing.assert_close(ours.center, 0.1 * torch.stack(t).float().mean((0, 1), keepdim=True))
    torch.testing.assert_close(ours.center, theirs.center, rtol=0, atol=1e-4)
    high = [torch.randn(16, 10, generator=g, requires_grad=True) for _ in range(2)]
    low = [torch.randn(16, 10, generator=g).bfloat16().requires_grad_() for _ in range(2)]
    # lightly takes the bfloat16 crops too, and computes their log-softmax in bfloat16: compared
    # where it computes in float32, as these do
    want = mods["swav"].SwaVLoss()(high, [x.float() for x in low]).reshape(())
    mods["swav"].SwaVLoss()(high, low)
    assert L.swav_loss(high, low).dtype == torch.float32
    _close_with_grads(L.swav_loss(high, low), want, tuple(high + low), F32)
    # a float32 queue beside float16 crops: lightly's torch.cat promotes, Sinkhorn sees it unrounded
    h16 = [torch.randn(16, 10, generator=g).half().requires_grad_() for _ in range(2)]
    queue = [torch.randn(32, 10, generator=g) / 3 for _ in range(2)]
    want = mods["swav"].SwaVLoss()([x.float() for x in h16], [], queue_outputs=queue).reshape(())
    _close_with_grads(L.swav_loss(h16, queue_outputs=queue), want, tuple(h16), F32)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")  # lightly's weights
@pytest.mark.parametrize("N", [2, 127])
def test_dcl_matches_lightly(N):
    mods = _load_lightly()
    if mods is None:
        pytest.skip("lightly is not installed")
    dcl = mods["dcl"]
    z1, z2 = torch.randn(2, N, 16, generator=_gen(N)).unbind(0)
    z1.requires_grad_(), z2.requires_grad_()
    _close_with_grads(L.DCLLoss(0.07)(z1, z2), dcl.DCLLoss(0.07)(z1, z2), (z1, z2), F32)
    _close_with_grads(L.DCLWLoss(0.2, sigma=0.3)(z1, z2), dcl.DCLWLoss(0.2, sigma=0.3)(z1, z2), (z1, z2), F32)
    custom = lambda a, b: ((a - b) ** 2).sum(1)  # lightly's docstring example: a weight with a gradient
    _close_with_grads(L.DCLLoss(0.1, custom)(z1, z2), dcl.DCLLoss(0.1, custom)(z1, z2), (z1, z2), F32)


# ---------------------------------------------------------------- NCE

def test_nce_matches_reference_and_gradcheck():
    g = _gen(4)
    args = [torch.randn(5, generator=g), torch.randn(5, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)]
    args = [a.double().requires_grad_() for a in args]
    ref = R.nce_naive(*args)
    torch.testing.assert_close(L.nce_loss(*args, reduction="none"), ref, **F64)
    torch.testing.assert_close(L.NCELoss()(*args), ref.mean(), **F64)
    assert torch.autograd.gradcheck(lambda *a: L.nce_loss(*a), tuple(args))
    shared = L.nce_loss(args[0], args[1], args[2][0], args[3][0], reduction="none")
    torch.testing.assert_close(shared, R.nce_naive(args[0], args[1], args[2][:1].expand(5, 3), args[3][:1].expand(5, 3)), **F64)
    with pytest.raises(ValueError, match="broadcast"):
        L.nce_loss(args[0], args[1], args[2], torch.randn(4, 3, dtype=torch.float64))
    # stable for extreme logits
    big = L.nce_loss(torch.tensor([200.0]), torch.tensor([0.0]), torch.tensor([[-200.0]]), torch.tensor([[0.0]]))
    assert torch.isfinite(big) and big < 1e-6


# ---------------------------------------------------------------- SupCon, soft nearest neighbours

@pytest.mark.parametrize("N", [1, 3, 127])
@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_matches_reference(N, backend):
    g = _gen(N)
    x = torch.randn(N, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = _labels(N, g)
    _close_with_grads(L.SupConLoss(temperature=0.3, backend=backend)(x, y), R.supcon_naive(x, y, 0.3), (x,), F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_reductions_and_gradcheck(backend):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    per = L.supcon_loss(x, y, 0.5, "none", backend=backend)
    assert per.shape == (6,) and per[5] == 0 and (per[:5] > 0).all()
    torch.testing.assert_close(L.supcon_loss(x, y, 0.5, backend=backend), per[:5].mean())
    torch.testing.assert_close(L.supcon_loss(x, y, 0.5, "sum", backend=backend), per.sum())
    assert torch.autograd.gradcheck(lambda x: L.supcon_loss(x, y, 0.5, backend=backend), (x,))


@pytest.mark.parametrize("N", [1, 3, 127])
@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_nearest_neighbor_matches_reference(N, backend):
    g = _gen(N)
    x = torch.randn(N, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = _labels(N, g)
    if N > 3:
        y[0] = 1000  # a sample without a same-class partner
    _close_with_grads(L.SoftNearestNeighborLoss(temperature=3.0, backend=backend)(x, y),
                      R.soft_nearest_neighbor_naive(x, y, 3.0), (x,), F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_nearest_neighbor_convention_and_gradcheck(backend):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2])
    per = L.soft_nearest_neighbor_loss(x, y, reduction="none", backend=backend)
    assert per[4] == 0 and torch.isfinite(per).all()
    torch.testing.assert_close(L.soft_nearest_neighbor_loss(x, y, backend=backend), per[:4].mean())
    assert L.soft_nearest_neighbor_loss(x, torch.arange(5), backend=backend) == 0
    T = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, T: L.soft_nearest_neighbor_loss(x, y, T, backend=backend), (x, T))


# ---------------------------------------------------------------- tiled distance losses

TILED = [
    ("contrastive", lambda x, y: L.contrastive_loss(x, y, 0.1, 0.9), lambda x, y: R.contrastive_naive(x, y, 0.1, 0.9)),
    ("triplet", lambda x, y: L.triplet_margin_loss(x, y, 0.2), lambda x, y: R.triplet_margin_naive(x, y, 0.2)),
    ("triplet_hard", lambda x, y: L.triplet_margin_loss(x, y, 0.2, "batch_hard"),
     lambda x, y: R.triplet_margin_naive(x, y, 0.2, "batch_hard")),
    ("lifted", lambda x, y: L.lifted_structure_loss(x, y, 0.8, 0.1), lambda x, y: R.lifted_structure_naive(x, y, 0.8, 0.1)),
    ("npairs", lambda x, y: L.npairs_loss(x, y, backend="torch"), R.npairs_naive),
]


@pytest.mark.parametrize("name,ours,ref", TILED, ids=[t[0] for t in TILED])
@pytest.mark.parametrize("block_elems", [64, 1 << 20])
def test_tiled_losses_match_reference(name, ours, ref, block_elems, monkeypatch):
    """Many small row blocks (64 entries: one row per block) and one block give the reference."""
    monkeypatch.setattr(_common, "BLOCK_ELEMS", block_elems)
    for N in (3, 37):
        g = _gen(N)
        x = torch.randn(N, 8, generator=g, dtype=torch.float64, requires_grad=True)
        y = _labels(N, g)
        _close_with_grads(ours(x, y), ref(x, y), (x,), F64)


@pytest.mark.parametrize("name,ours,ref", TILED, ids=[t[0] for t in TILED])
def test_tiled_losses_gradcheck(name, ours, ref, monkeypatch):
    monkeypatch.setattr(_common, "BLOCK_ELEMS", 16)
    x = torch.randn(7, 3, generator=_gen(5), dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda x: ours(x, y), (x,))


@pytest.mark.parametrize("name", ["triplet_margin_loss", "contrastive_loss"])
def test_blockwise_holds_no_full_matrix_for_backward(name, monkeypatch):
    """With several blocks, everything the autograd graph keeps (distinct storages, summed) is
    O(N·D + block), not the N×N distances split over the blocks (the largest single saved
    tensor is small either way: without checkpointing ~3M entries here, with it ~9K)."""
    monkeypatch.setattr(_common, "BLOCK_ELEMS", 64 * 64)
    N = 512
    x = torch.randn(N, 8, requires_grad=True)
    y = torch.randint(0, 8, (N,))
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = getattr(L, name)(x, y)
    assert sum(kept.values()) < N * N // 8
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_label_and_argument_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        L.SupConLoss()(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        L.ContrastiveLoss()(x, torch.zeros(4))
    with pytest.raises(ValueError, match="mining"):
        L.TripletMarginLoss(mining="semihard")
    with pytest.raises(ValueError, match="temperature"):
        L.SupConLoss(temperature=0)


@pytest.mark.parametrize("call", [
    lambda x, y: L.SupConLoss()(x, y),
    lambda x, y: L.ContrastiveLoss()(x, y),
    lambda x, y: fastnce.ops.similarity_lse(x, x, 1.0, labels=y, label_mask="same"),
], ids=["SupConLoss", "ContrastiveLoss", "similarity_lse"])
def test_labels_are_checked_for_dtype_shape_and_device(call):
    """A bool mask, an (N, 1) column (it would broadcast in the pair masks) or labels on another
    device (the meta device stands in for a GPU) are errors naming `labels`."""
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="must hold integer class labels, got torch.bool"):
        call(x, torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match=r"must have shape \(4,\), one label per row"):
        call(x, torch.tensor([[0], [1], [0], [1]]))
    with pytest.raises(ValueError, match="must be on the same device"):
        call(x, torch.zeros(4, dtype=torch.long, device="meta"))


def test_bad_arguments_name_themselves():
    """Each raises at once, naming the argument (found by review: these once passed silently,
    returned NaN, or failed later with a bare broadcast error)."""
    x, y = torch.randn(4, 8), torch.tensor([0, 0, 1, 1])
    cases = [
        (ValueError, "views must have at least one sample", lambda: L.NTXentLoss()(torch.randn(2, 0, 3))),
        (ValueError, "query must have dim = 8", lambda: L.MoCoLoss(dim=8)(torch.randn(4, 5), torch.randn(4, 5))),
        (ValueError, "key must have dim = 8", lambda: L.MoCoLoss(dim=8)(x, torch.randn(4, 5))),
        (ValueError, "teacher_out must have output_dim = 8",
         lambda: L.DINOLoss(output_dim=8)([torch.randn(4, 16)] * 2, [torch.randn(4, 16)] * 2)),
        (ValueError, "teacher_temp must be a positive",
         lambda: L.DINOLoss(output_dim=8)([x] * 2, [x] * 3, teacher_temp=0.0)),
        (ValueError, "center_momentum must be in", lambda: L.DINOLoss(output_dim=8, center_momentum=5)),
        (ValueError, "center must hold one value per output dimension",
         lambda: L.dino_loss([x] * 2, [x] * 2, torch.zeros(5))),
        (TypeError, "neg_margin must be a finite number", lambda: L.ContrastiveLoss(neg_margin="a")),
        (ValueError, "pos_margin must be a finite number", lambda: L.ContrastiveLoss(pos_margin=float("nan"))),
        (ValueError, "margin must be a finite number", lambda: L.TripletMarginLoss(margin=float("inf"))),
        (TypeError, "neg_margin must be a finite number", lambda: L.LiftedStructureLoss(neg_margin="a")),
        (ValueError, "iterations must be an int >= 0", lambda: L.sinkhorn(x, iterations=-2)),
        (TypeError, "sinkhorn_iterations must be an int >= 0", lambda: L.SwAVLoss(sinkhorn_iterations=1.5)),
        # from a fuzzer against lightly: these failed inside torch (or silently broadcast, SwAV's
        # crops of other batch sizes or prototype counts giving a finite meaningless loss)
        (ValueError, r"high_resolution_outputs\[1\] must have the shape of high_resolution_outputs\[0\]",
         lambda: L.swav_loss([x, x[:1]])),
        (ValueError, r"low_resolution_outputs\[0\] must have the shape of high_resolution_outputs\[0\]",
         lambda: L.swav_loss([x, x], [x[:, :3]])),
        (ValueError, r"queue_outputs\[0\] must have the same number of prototypes",
         lambda: L.swav_loss([x, x], queue_outputs=[x[:, :3], x[:, :3]])),
        (ValueError, "queue_outputs must hold one", lambda: L.swav_loss([x, x], queue_outputs=[x])),
        (ValueError, "scores must have 2 dimensions", lambda: L.sinkhorn(x[0])),
        (ValueError, "scores is an empty batch", lambda: L.sinkhorn(x[:0])),
        (TypeError, "scores must be a torch.Tensor", lambda: L.sinkhorn([[1.0, 2.0]])),
        (ValueError, "n_prototypes must be an int >= 1", lambda: L.SwAVPrototypes(4, 0)),
        (ValueError, "features must have the same feature dimension as prototypes",
         lambda: L.SwAVPrototypes(4, 5)(torch.randn(2, 3))),
        (ValueError, "warmup_teacher_temp_epochs must be an int >= 0",
         lambda: L.DINOLoss(output_dim=8, warmup_teacher_temp_epochs=-1)),
        (ValueError, "epoch must be an int >= 0", lambda: L.DINOLoss(output_dim=8)([x] * 2, [x] * 2, epoch=-1)),
        (TypeError, "epoch must be an int >= 0", lambda: L.DINOLoss(output_dim=8)([x] * 2, [x] * 2, epoch=2.5)),
        (TypeError, "epoch must be an int >= 0",
         lambda: L.DINOLoss(output_dim=8)([x] * 2, [x] * 2, epoch=torch.tensor(2.0))),
        (ValueError, "epoch must be an int >= 0",
         lambda: L.DINOLoss(output_dim=8)([x] * 2, [x] * 2, teacher_temp=0.05, epoch=-1)),
        (TypeError, "center must be a torch.Tensor", lambda: L.dino_loss([x] * 2, [x] * 2, [0.0] * 8)),
        (TypeError, r"weights\[0\] must be a torch.Tensor",
         lambda: L.cpc_loss(torch.randn(2, 3, 3), torch.randn(2, 3, 4), [[[0.0] * 3] * 4])),
        (ValueError, r"weights\[0\] must have the same device as context",
         lambda: L.cpc_loss(torch.randn(2, 3, 3), torch.randn(2, 3, 4), [torch.randn(4, 3, device="meta")])),
        # the functional forms check what their modules check (a negative teacher_temp once
        # gave a finite wrong number, 0 or NaN a NaN)
        (ValueError, "teacher_temp must be a positive", lambda: L.dino_loss([x] * 2, [x] * 2, x[0], -0.04)),
        (ValueError, "student_temp must be a positive",
         lambda: L.dino_loss([x] * 2, [x] * 2, x[0], student_temp=float("nan"))),
        (ValueError, "temperature must be a positive", lambda: L.swav_loss([x, x], temperature=0.0)),
        (ValueError, "temperature must be a positive", lambda: L.swav_loss([x, x], temperature=float("inf"))),
        (ValueError, "output_dim must be an int >= 1", lambda: L.DINOLoss(output_dim=0)),
        (TypeError, "dim must be an int >= 1, got 4.0", lambda: L.MoCoLoss(dim=4.0)),
        (TypeError, "num_steps must be an int >= 1, got 1.5", lambda: L.CPCLoss(3, 4, 1.5)),
        (ValueError, "num_steps must be an int >= 1, got 0", lambda: L.CPCLoss(3, 4, 0)),
        (TypeError, "query must be a torch.Tensor", lambda: L.MoCoLoss(dim=8)([[1.0] * 8], x)),
        (ValueError, "queue_size must be an int >= 1, got 0", lambda: L.MoCoLoss(dim=4, queue_size=0)),
        (TypeError, "sigma must be a positive finite number", lambda: L.DCLWLoss(sigma=True)),
        (ValueError, "sigma must be a positive finite number", lambda: L.DCLWLoss(sigma=-1.0)),
        (ValueError, "center_mode must be 'mean'", lambda: L.DINOLoss(output_dim=8, center_mode="median")),
        (ValueError, "data_logits_model is an empty batch",
         lambda: L.nce_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0, 3), torch.zeros(0, 3))),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
    assert torch.isfinite(L.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9)(x, y))


@pytest.mark.parametrize("module, cap", [("ClipLoss", 100.0), ("SigLipLoss", 12.0)])
def test_learnable_scale_follows_open_clip_clamp(module, cap):
    """The logit scale's trajectory under Adam equals OpenCLIP's training loop: exp(logit_scale)
    in the graph, the parameter clamped at log(cap) after each step. Aligned pairs push it to
    the cap; random ones must bring it back down (a clamp in the graph kept it there: its
    gradient was 0 above the cap, for good)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 8, generator=g, dtype=torch.float64), dim=1)
    noise = torch.nn.functional.normalize(torch.randn(16, 8, generator=g, dtype=torch.float64), dim=1)
    m = getattr(L, module)(init_temperature=0.05, max_logit_scale=cap).double()
    ours = torch.optim.Adam(m.parameters(), lr=0.3)
    theirs = [p.detach().clone().requires_grad_() for p in m.parameters()]  # logit_scale (, logit_bias)
    opt = torch.optim.Adam(theirs, lr=0.3)
    formula = R.clip_naive if module == "ClipLoss" else (
        lambda a, b, s, bias: fastnce.siglip_loss(a, b, s, bias, backend="reference"))
    trajectory = []
    for step in range(40):
        a, b = (x, x) if step < 20 else (x, noise)
        ours.zero_grad()
        m(a, b).backward()
        ours.step()
        opt.zero_grad()
        formula(a, b, theirs[0].exp(), *theirs[1:]).backward()
        opt.step()
        with torch.no_grad():
            theirs[0].clamp_(max=math.log(cap))
        trajectory.append(m.scale().item())
        torch.testing.assert_close(trajectory[-1], theirs[0].exp().item(), rtol=1e-6, atol=0)
    assert max(trajectory[:20]) == pytest.approx(cap) and trajectory[-1] < cap / 2, trajectory


def test_sizes_may_be_numpy_integers():
    """Sizes read from a config or an array (numpy integers) are sizes (MoCoLoss once said
    'dim must be a positive int, got np.int64(8)')."""
    np = pytest.importorskip("numpy")
    m = L.MoCoLoss(dim=np.int64(8), queue_size=np.int32(16))
    assert m.queue.shape == (16, 8) and type(m.dim) is int and type(m.queue_size) is int
    assert L.CPCLoss(3, 4, np.int64(2)).predictors.__len__() == 2


def test_repr_shows_the_hyperparameters():
    """print(model) shows each loss's settings (most modules once printed a bare `ClipLoss()`)."""
    cases = [
        (fastnce.InfoNCE(negative_mode="paired"), "negative_mode='paired'"),
        (L.NTXentLoss(temperature=0.3), "temperature=0.3"),
        (L.NTXentLoss(distributed="gather"), "distributed='gather'"),
        (L.DCLWLoss(sigma=0.7), "sigma=0.7"),
        (L.MoCoLoss(8, 16, reduction="sum"), "dim=8, queue_size=16, temperature=0.07, reduction='sum'"),
        (L.ClipLoss(max_logit_scale=50.0), "max_logit_scale=50.0"),
        (L.SigLipLoss(normalize=False), "normalize=False"),
        (L.CPCLoss(3, 4, 1, backend="torch"), "backend='torch'"),
        (L.DINOLoss(8, student_temp=0.2), "output_dim=8, teacher_temp=0.04, student_temp=0.2"),
        (L.SwAVLoss(sinkhorn_iterations=5), "sinkhorn_iterations=5"),
        (L.SupConLoss(temperature=torch.nn.Parameter(torch.tensor(0.2))), "temperature=0.2,"),
        (L.SoftNearestNeighborLoss(temperature=2.0), "temperature=2.0"),
        (L.ContrastiveLoss(neg_margin=0.5), "neg_margin=0.5"),
        (L.TripletMarginLoss(mining="batch_hard"), "mining='batch_hard'"),
        (L.LiftedStructureLoss(pos_margin=0.1), "pos_margin=0.1"),
        (L.NPairsLoss(backend="torch"), "backend='torch'"),
        (L.NCELoss(reduction="sum"), "reduction='sum'"),
    ]
    for module, shown in cases:
        assert shown in repr(module), repr(module)
    assert "distributed" not in repr(L.NTXentLoss()) and "group" not in repr(L.ClipLoss())


# ---------------------------------------------------------------- DINO, SwAV, NCE: settings off the defaults

@pytest.mark.parametrize("iterations", [0, 1, 5])
@pytest.mark.parametrize("epsilon", [0.05, 0.3])
@pytest.mark.parametrize("queue", [False, True])
def test_swav_sinkhorn_settings_match_lightly(iterations, epsilon, queue):
    """SwAVLoss's sinkhorn_iterations / sinkhorn_epsilon (0 rounds included: exp(scores/ε) scaled
    to mass B, unbalanced) against lightly's SwaVLoss and the float64 formula; the suite had only
    their defaults."""
    mods = _load_lightly()
    if mods is None:
        pytest.skip("lightly is not installed")
    g = torch.Generator().manual_seed(iterations * 10 + int(epsilon * 100) + queue)
    high = [torch.randn(12, 7, generator=g).div(3).requires_grad_() for _ in range(2)]
    low = [torch.randn(12, 7, generator=g).div(3).requires_grad_() for _ in range(2)]
    queued = [torch.randn(20, 7, generator=g) / 3 for _ in range(2)] if queue else None
    kw = dict(temperature=0.2, sinkhorn_iterations=iterations, sinkhorn_epsilon=epsilon)
    ours = L.SwAVLoss(**kw)(high, low, queue_outputs=queued)
    theirs = mods["swav"].SwaVLoss(**kw)(high, low, queue_outputs=queued).reshape(())
    leaves = high + low
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    scores = torch.randn(9, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(L.sinkhorn(scores, iterations, epsilon), R.sinkhorn_naive(scores, iterations, epsilon),
                               rtol=1e-9, atol=1e-12)


def test_swav_prototypes_are_cosine_similarities():
    """scores = normalize(features) @ normalize(prototypes)ᵀ: invariant to the features' scale, in
    [−1, 1]; normalize_() puts the prototypes back on the unit sphere."""
    protos = L.SwAVPrototypes(dim=6, n_prototypes=4)
    f = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)) * 7
    want = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(protos.prototypes.detach(), dim=1).T
    torch.testing.assert_close(protos(f), want)
    torch.testing.assert_close(protos(f / 7), want)
    with torch.no_grad():
        protos.prototypes.mul_(torch.arange(1.0, 5.0)[:, None])
    scores = protos(f)
    protos.normalize_()
    torch.testing.assert_close(protos.prototypes.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(protos(f), scores)


def test_dino_teacher_gets_no_gradient():
    """The docstring's one difference from lightly: teacher outputs that require grad (a teacher
    run without no_grad) get none; the student's loss and gradient are those of detached ones."""
    g = torch.Generator().manual_seed(2)
    t = [torch.randn(4, 8, generator=g, requires_grad=True) for _ in range(2)]
    s = [torch.randn(4, 8, generator=g, requires_grad=True) for _ in range(3)]
    center = torch.randn(8, generator=g)
    loss = L.dino_loss(t, s, center, 0.04, 0.1)
    grads = torch.autograd.grad(loss, t + s, allow_unused=True)
    assert all(gr is None or not gr.any() for gr in grads[:2])
    want = L.dino_loss([x.detach() for x in t], s, center, 0.04, 0.1)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    loss = L.DINOLoss(output_dim=8)(t, s)
    assert all(gr is None or not gr.any() for gr in torch.autograd.grad(loss, t + s, allow_unused=True)[:2])


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_dino_center_momentum_bounds_match_lightly(m):
    """center_momentum 0 (the centre is the last batch mean) and 1 (a fixed centre) are in the
    documented range [0, 1], and update as lightly's."""
    mods = _load_lightly()
    if mods is None:
        pytest.skip("lightly is not installed")
    ours, theirs = L.DINOLoss(output_dim=8, center_momentum=m), mods["dino"].DINOLoss(output_dim=8, center_momentum=m)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        t = [torch.randn(4, 8, generator=g) for _ in range(2)]
        s = [torch.randn(4, 8, generator=g) for _ in range(3)]
        torch.testing.assert_close(ours(t, s), theirs(t, s), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.center, theirs.center)


# ---------------------------------------------------------------- NCE, InfoNCE module

def test_nce_rejects_a_data_log_noise_of_another_shape():
    """data_log_noise must be (N,) like data_logits_model: a (1,) or (N, 1) one would broadcast
    to a finite, meaningless loss."""
    d = torch.randn(5)
    n = torch.randn(5, 3)
    for bad in (torch.randn(1), torch.randn(5, 1), torch.randn(4)):
        with pytest.raises(ValueError, match="data_log_noise"):
            L.nce_loss(d, bad, n, n)


def test_nce_computes_in_float64_when_the_model_logits_are_float64():
    """The docstring: float64 when data_logits_model is float64, whatever the others' dtypes (a
    float32 noise distribution): float64's result, not float32's rounding of it."""
    g = torch.Generator().manual_seed(8)
    d, dn = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g)
    n, nn_ = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g)
    got = L.nce_loss(d, dn, n, nn_, reduction="none")
    assert got.dtype == torch.float64
    want = R.nce_naive(d, dn.double(), n, nn_.double())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)  # float32 is ~1e-7 off


def test_info_nce_module_paired_mode_equals_info_nce_pytorch():
    """fastnce.InfoNCE(negative_mode='paired') forwards its mode (only the repr saw it)."""
    info_nce_pytorch = pytest.importorskip("info_nce")
    g = torch.Generator().manual_seed(9)
    q, p = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    neg = torch.randn(6, 5, 4, generator=g)
    for kw in (dict(negative_mode="paired"), dict(negative_mode="paired", temperature=0.3, reduction="sum")):
        torch.testing.assert_close(fastnce.InfoNCE(**kw)(q, p, neg), info_nce_pytorch.InfoNCE(**kw)(q, p, neg))


@pytest.mark.parametrize("Vt,Vs", [(2, 4), (3, 2), (1, 3), (4, 1)])
def test_dino_any_numbers_of_views_match_reference(Vt, Vs):
    """Vt·Vs − min(Vt, Vs) pairs for either side the larger (the suite had Vt ≤ Vs only)."""
    g = torch.Generator().manual_seed(Vt * 10 + Vs)
    t = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(Vt)]
    s = [torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(Vs)]
    center = torch.randn(6, generator=g, dtype=torch.float64)
    ours, want = L.dino_loss(t, s, center, 0.07, 0.2), R.dino_naive(t, s, center, 0.07, 0.2)
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=0)
    for a, b in zip(torch.autograd.grad(ours, s, allow_unused=True), torch.autograd.grad(want, s, allow_unused=True)):
        a = torch.zeros(5, 6, dtype=torch.float64) if a is None else a  # view 0 with Vt = 1: no pair
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
