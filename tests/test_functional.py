"""The public losses against the real info-nce-pytorch package and against plain formulas."""
import info_nce as info_nce_pytorch
import pytest
import torch
import torch.nn.functional as F

import fastnce

BACKENDS = ["reference", "torch"]


def leaves(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def value_and_grads(fn, xs):
    out = fn(*xs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)) if out.dim() else torch.tensor(1.0)
    grads = torch.autograd.grad((out * w).sum(), [x for x in xs if x is not None])
    return out, grads


# --- info_nce: the drop-in ---------------------------------------------------------------

CASES = [
    ("none", None),
    ("unpaired", lambda n, d: (23, d)),
    ("paired", lambda n, d: (n, 5, d)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("n,d", [(1, 3), (3, 1), (17, 32), (127, 8)])
def test_info_nce_equals_info_nce_pytorch(backend, reduction, case, n, d):
    name, neg_shape = case
    mode = "paired" if name == "paired" else "unpaired"
    shapes = [(n, d), (n, d)] + ([neg_shape(n, d)] if neg_shape else [])
    xs = leaves(*shapes, seed=n * 31 + d)
    if not neg_shape:
        xs.append(None)
    theirs = lambda q, p, neg: info_nce_pytorch.info_nce(q, p, neg, 0.2, reduction, mode)
    ours = lambda q, p, neg: fastnce.info_nce(q, p, neg, 0.2, reduction, mode, backend=backend)
    want, want_g = value_and_grads(theirs, xs)
    got, got_g = value_and_grads(ours, xs)
    assert_close_scaled(got, want)
    for g, w in zip(got_g, want_g):
        assert_close_scaled(g, w)


def assert_close_scaled(got, want, rtol=1e-5):
    """rtol 1e-5, with an absolute floor for entries that cancel to ~0 (float32 sums)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_info_nce_module_equals_info_nce_pytorch():
    q, p, neg = leaves((9, 4), (9, 4), (12, 4))
    for kw in [dict(), dict(temperature=0.5, reduction="sum")]:
        torch.testing.assert_close(fastnce.InfoNCE(**kw)(q, p, neg), info_nce_pytorch.InfoNCE(**kw)(q, p, neg))
    torch.testing.assert_close(fastnce.InfoNCE()(q, p), info_nce_pytorch.InfoNCE()(q, p))


BAD_SHAPES = [
    ((4, 3, 1), (4, 3), None, "unpaired"),
    ((4, 3), (4,), None, "unpaired"),
    ((4, 3), (4, 3), (2, 5, 3), "unpaired"),
    ((4, 3), (4, 3), (5, 3), "paired"),
    ((4, 3), (5, 3), None, "unpaired"),
    ((4, 3), (4, 3), (5, 2, 3), "paired"),
    ((4, 3), (4, 2), None, "unpaired"),
    ((4, 3), (4, 3), (5, 2), "unpaired"),
]


@pytest.mark.parametrize("q,p,neg,mode", BAD_SHAPES)
def test_info_nce_raises_info_nce_pytorch_errors(q, p, neg, mode):
    args = [torch.randn(*q), torch.randn(*p), None if neg is None else torch.randn(*neg)]
    with pytest.raises(ValueError) as theirs:
        info_nce_pytorch.info_nce(*args, negative_mode=mode)
    with pytest.raises(ValueError) as ours:
        fastnce.info_nce(*args, negative_mode=mode)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_16_bit_temperature_divides_as_info_nce_pytorch(dtype):
    """A bfloat16 / float16 temperature tensor: 1/T in float32, not rounded to 16 bits (which
    moved the loss by ~5e-4 relative and T's gradient with it); nt_xent likewise, against the
    same temperature value in float32."""
    q, p = leaves((8, 16), (8, 16), seed=3)
    t_ours, t_theirs = (torch.tensor(0.07, dtype=dtype, requires_grad=True) for _ in range(2))
    ours = value_and_grads(lambda q, p, t: fastnce.info_nce(q, p, temperature=t), [q, p, t_ours])
    theirs = value_and_grads(lambda q, p, t: info_nce_pytorch.info_nce(q, p, temperature=t), [q, p, t_theirs])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    t16 = torch.tensor(0.07, dtype=dtype)
    torch.testing.assert_close(fastnce.nt_xent(q, p, t16), fastnce.nt_xent(q, p, t16.float()), rtol=1e-6, atol=0)


def test_info_nce_needs_a_paired_negative_per_row():
    """(N, 0, D) paired negatives, like (0, D) unpaired ones, are an error (info-nce-pytorch
    returns a loss of 0)."""
    q, p = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="negative_keys holds no negatives"):
        fastnce.info_nce(q, p, torch.randn(4, 0, 3), negative_mode="paired")
    with pytest.raises(ValueError, match="negative_keys is an empty batch"):
        fastnce.info_nce(q, p, torch.randn(0, 3))


def test_info_nce_reduction_error_is_cross_entropys():
    q, p = torch.randn(3, 2), torch.randn(3, 2)
    with pytest.raises(ValueError) as theirs:
        info_nce_pytorch.info_nce(q, p, reduction="avg")
    with pytest.raises(ValueError) as ours:
        fastnce.info_nce(q, p, reduction="avg")
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("mode", ["paired", "anything"])
def test_info_nce_without_negatives_ignores_negative_mode_as_info_nce_pytorch(mode):
    """A config that turns negatives off may leave any negative_mode (info-nce-pytorch reads it
    only with negatives); with negatives an unknown mode is an error."""
    q, p = leaves((6, 8), (6, 8), seed=1)
    torch.testing.assert_close(fastnce.info_nce(q, p, None, 0.2, negative_mode=mode),
                               info_nce_pytorch.info_nce(q, p, None, 0.2, negative_mode=mode))
    with pytest.raises(ValueError, match="negative_mode"):
        fastnce.info_nce(q, p, torch.randn(3, 8), 0.2, negative_mode="anything")


# --- nt_xent and clip_loss against the formulas users write --------------------------------

def nt_xent_formula(z1, z2, t, reduction):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = (z @ z.T) / t
    n2 = s.shape[0]
    s = s.masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    n = z1.shape[0]
    y = torch.cat([torch.arange(n, n2), torch.arange(0, n)])
    return F.cross_entropy(s, y, reduction=reduction)


def clip_formula(a, b, scale, reduction):
    logits = scale * a @ b.T
    y = torch.arange(a.shape[0])
    per_pair = 0.5 * (F.cross_entropy(logits, y, reduction="none") + F.cross_entropy(logits.T, y, reduction="none"))
    return {"mean": per_pair.mean(), "sum": per_pair.sum(), "none": per_pair}[reduction]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,d", [(1, 4), (3, 1), (127, 16), (300, 7)])
def test_nt_xent_matches_formula(backend, reduction, n, d):
    xs = leaves((n, d), (n, d), seed=n + d)
    want, want_g = value_and_grads(lambda a, b: nt_xent_formula(a, b, 0.3, reduction), xs)
    got, got_g = value_and_grads(lambda a, b: fastnce.nt_xent(a, b, 0.3, reduction, backend=backend), xs)
    assert_close_scaled(got, want)
    for g, w in zip(got_g, want_g):
        assert_close_scaled(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,d", [(1, 4), (3, 1), (127, 16), (300, 7)])
def test_clip_loss_matches_formula(backend, reduction, n, d):
    a, b = leaves((n, d), (n, d), seed=n * d)
    a0, b0 = F.normalize(a.detach(), dim=1).requires_grad_(), F.normalize(b.detach(), dim=1).requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    xs = [a0, b0, scale]
    want, want_g = value_and_grads(lambda x, y, s: clip_formula(x, y, s, reduction), xs)
    got, got_g = value_and_grads(lambda x, y, s: fastnce.clip_loss(x, y, s, reduction, backend=backend), xs)
    assert_close_scaled(got, want)
    for g, w in zip(got_g, want_g):
        assert_close_scaled(g, w)


@pytest.mark.parametrize("fn", ["nt_xent", "clip_loss", "info_nce"])
def test_gradcheck_float64(fn):
    a, b = leaves((5, 3), (5, 3), dtype=torch.float64)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    call = {
        "nt_xent": lambda a, b, s: fastnce.nt_xent(a, b, 1 / s, backend="torch"),
        "clip_loss": lambda a, b, s: fastnce.clip_loss(a, b, s, backend="torch"),
        "info_nce": lambda a, b, s: fastnce.info_nce(a, b, temperature=1 / s, backend="torch"),
    }[fn]
    assert torch.autograd.gradcheck(call, (a, b, s))


def test_half_inputs_give_float32_losses():
    for dt in (torch.float16, torch.bfloat16):
        a, b = torch.randn(6, 4).to(dt), torch.randn(6, 4).to(dt)
        assert fastnce.nt_xent(a, b).dtype == torch.float32
        assert fastnce.clip_loss(a, b, 10.0).dtype == torch.float32
        assert fastnce.info_nce(a, b).dtype == torch.float32


# --- bad input: a clear error that names the argument --------------------------------------

def bad_inputs():
    x = torch.randn(4, 3)
    return [
        ("nt_xent dim mismatch", lambda: fastnce.nt_xent(x, torch.randn(4, 5)), ValueError, "z2"),
        ("nt_xent rows mismatch", lambda: fastnce.nt_xent(x, torch.randn(5, 3)), ValueError, "z2"),
        ("nt_xent ndim", lambda: fastnce.nt_xent(torch.randn(4), x), ValueError, "z1"),
        ("nt_xent integer", lambda: fastnce.nt_xent(x.long(), x.long()), TypeError, "z1"),
        ("nt_xent dtypes", lambda: fastnce.nt_xent(x, x.double()), ValueError, "dtype"),
        ("nt_xent devices", lambda: fastnce.nt_xent(x, x.to("meta")), ValueError, "device"),
        ("nt_xent empty", lambda: fastnce.nt_xent(x[:0], x[:0]), ValueError, "empty batch"),
        ("nt_xent temperature 0", lambda: fastnce.nt_xent(x, x, 0.0), ValueError, "temperature"),
        ("nt_xent temperature <0", lambda: fastnce.nt_xent(x, x, -1.0), ValueError, "temperature"),
        ("nt_xent temperature nan", lambda: fastnce.nt_xent(x, x, float("nan")), ValueError, "temperature"),
        ("nt_xent temperature inf", lambda: fastnce.nt_xent(x, x, float("inf")), ValueError, "temperature"),
        ("nt_xent temperature str", lambda: fastnce.nt_xent(x, x, "0.1"), TypeError, "temperature"),
        ("nt_xent reduction", lambda: fastnce.nt_xent(x, x, reduction="avg"), ValueError, "reduction"),
        ("nt_xent backend", lambda: fastnce.nt_xent(x, x, backend="gpu"), ValueError, "backend"),
        ("clip rows", lambda: fastnce.clip_loss(x, torch.randn(5, 3), 10.0), ValueError, "text_features"),
        ("clip dim", lambda: fastnce.clip_loss(x, torch.randn(4, 2), 10.0), ValueError, "text_features"),
        ("clip scale nan", lambda: fastnce.clip_loss(x, x, torch.tensor(float("nan"))), ValueError, "logit_scale"),
        ("clip scale vector", lambda: fastnce.clip_loss(x, x, torch.ones(2)), ValueError, "logit_scale"),
        ("clip list", lambda: fastnce.clip_loss([[1.0]], x, 1.0), TypeError, "image_features"),
        ("info_nce empty", lambda: fastnce.info_nce(x[:0], x[:0]), ValueError, "empty batch"),
        ("info_nce temperature", lambda: fastnce.info_nce(x, x, temperature=0), ValueError, "temperature"),
        ("info_nce mode", lambda: fastnce.info_nce(x, x, x, negative_mode="both"), ValueError, "negative_mode"),
        ("info_nce integer", lambda: fastnce.info_nce(x.int(), x.int()), TypeError, "query"),
        ("similarity_lse labels", lambda: fastnce.ops.similarity_lse(x, label_mask="same"), ValueError, "labels"),
        ("similarity_lse labels shape", lambda: fastnce.ops.similarity_lse(x, labels=torch.zeros(3, dtype=torch.long), label_mask="same"), ValueError, "labels"),
        ("similarity_lse float labels", lambda: fastnce.ops.similarity_lse(x, labels=torch.zeros(4), label_mask="same"), TypeError, "labels"),
        ("similarity_lse bias", lambda: fastnce.ops.similarity_lse(x, x, bias=torch.zeros(3)), ValueError, "bias"),
        ("similarity_lse bias list", lambda: fastnce.ops.similarity_lse(x, x, bias=[0.0] * 4), TypeError, "bias"),
        ("similarity_lse integer bias", lambda: fastnce.ops.similarity_lse(x, x, bias=torch.zeros(4, dtype=torch.long)),
         TypeError, "bias must be a floating-point tensor"),
        ("similarity_lse mask", lambda: fastnce.ops.similarity_lse(x, label_mask="equal"), ValueError, "label_mask"),
        ("similarity_lse diag_offset", lambda: fastnce.ops.similarity_lse(x, exclude_self=True, diag_offset=1.5),
         TypeError, "diag_offset must be an int"),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_naming_the_argument(case):
    _, call, exc, word = case
    with pytest.raises(exc, match=word):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropies_are_never_negative(backend):
    """A batch of one (each row's only term is its positive) and unnormalised N-pairs logits of
    ~1e16: the LSE's copy of the positive logit and the positive itself round differently, which
    gave −1e-7 (and −4); a cross-entropy is at least 0."""
    from fastnce import losses as L

    worst = 0.0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(1, 3, generator=g), torch.randn(1, 3, generator=g)
        for loss in (fastnce.nt_xent(a, b, reduction="none", backend=backend),
                     fastnce.clip_loss(a, b, 10.0, reduction="none", backend=backend),
                     fastnce.info_nce(a, b, reduction="none", backend=backend)):
            worst = min(worst, loss.min().item())
    assert worst == 0.0
    v = torch.randn(2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e8
    x, y = torch.stack([v[0], v[0] * 1.01, v[1], v[1] * 0.99]), torch.tensor([0, 0, 1, 1])
    assert L.NPairsLoss(normalize_embeddings=False, backend=backend)(x, y).item() >= 0.0


def _saved_bytes(loss_fn) -> int:
    """Bytes of the storages autograd keeps for the backward of loss_fn()."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(kept.values())


@pytest.mark.parametrize("name, most", [("nt_xent", 2.1), ("info_nce", 2.1), ("clip_loss", 1.1)])
def test_autograd_keeps_no_float32_copies_of_16_bit_features(name, most):
    """What a loss keeps for its backward, in units of its bfloat16 features: the normalised
    features (NT-Xent, InfoNCE: and the features before it), never float32 copies of them
    (normalising and the positive logits once kept 8x for NT-Xent, 3x for CLIP; on a GPU that
    is most of the peak above the inputs)."""
    z1, z2 = (torch.randn(256, 64).bfloat16().requires_grad_() for _ in range(2))
    call = {"nt_xent": lambda: fastnce.nt_xent(z1, z2, 0.1, backend="torch"),
            "info_nce": lambda: fastnce.info_nce(z1, z2, backend="torch"),
            "clip_loss": lambda: fastnce.clip_loss(z1, z2, 10.0, backend="torch")}[name]
    assert _saved_bytes(call) <= most * (z1.nbytes + z2.nbytes)


def test_normalise_and_paired_products_have_second_derivatives():
    """Their backward is made of differentiable ops (the reference backend's double backward)."""
    from fastnce.functional import l2_normalize, paired_logits
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradgradcheck(l2_normalize, (x,))
    assert torch.autograd.gradgradcheck(lambda a, b: paired_logits(a, b, 2.0), (x, y))
