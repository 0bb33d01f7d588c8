"""The primitive: the tiled `torch` backend against the reference, gradcheck, the op layer."""
import pytest
import torch

import fastnce
from fastnce import ops
from fastnce.ops import tiled

from tolerances import ATOL, RTOL, assert_within_twice_reference_error

MASKS = [
    dict(),
    dict(exclude_self=True),
    dict(exclude_self=True, diag_offset=-2),
    dict(label_mask="same"),
    dict(label_mask="different", exclude_self=True),
]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 7 columns × 5 rows, so small inputs cross several tiles and leave tails."""
    monkeypatch.setattr(tiled, "COL_BLOCK", 7)
    monkeypatch.setattr(tiled, "TILE_ELEMS", 35)


def make_inputs(M, N, D, dtype, symmetric=False, bias=False, mask=None, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(M, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = None if symmetric else torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    scale = torch.tensor(0.9, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    kw = dict(mask or {})
    if "label_mask" in kw:
        kw["labels"] = torch.randint(0, classes, (M,), generator=g)
        if not symmetric:
            kw["k_labels"] = torch.randint(0, classes, (N,), generator=g)
    return q, k, scale, b, kw


def run(backend, q, k, scale, b, kw, col, seed=1):
    """Forward, then backward of a random linear function of the LSEs; returns outputs and grads."""
    row, colv = ops.similarity_lse(q, k, scale, b, col_lse=col, backend=backend, **kw)
    g = torch.Generator().manual_seed(seed)
    w_row = torch.randn(row.shape, generator=g, dtype=torch.float64)
    loss = (torch.where(torch.isfinite(row), row, 0).double() * w_row).sum()
    if col:
        w_col = torch.randn(colv.shape, generator=g, dtype=torch.float64)
        loss = loss + (torch.where(torch.isfinite(colv), colv, 0).double() * w_col).sum()
    leaves = [t for t in (q, k, scale, b) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return (row, colv), grads


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "none")
@pytest.mark.parametrize("symmetric", [False, True], ids=["qk", "self"])
@pytest.mark.parametrize("bias,col", [(False, False), (False, True), (True, True)], ids=["plain", "col", "bias+col"])
def test_gradcheck_float64(small_tiles, mask, symmetric, bias, col):
    """k = q with col_lse and no bias is the mirrored path whose backward adds both LSEs' gradients."""
    M = 9
    N = M if symmetric else 11
    q, k, scale, b, kw = make_inputs(M, N, 3, torch.float64, symmetric, bias, mask)
    for backend in ("reference", "torch"):
        def f(*xs):
            it = iter(xs)
            qq = next(it)
            kk = None if symmetric else next(it)
            ss = next(it)
            bb = next(it) if bias else None
            row, c = ops.similarity_lse(qq, kk, ss, bb, col_lse=col, backend=backend, **kw)
            row = torch.where(torch.isfinite(row), row, 0)
            return (row, torch.where(torch.isfinite(c), c, 0)) if col else row
        leaves = [t for t in (q, k, scale, b) if t is not None]
        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6), backend


SHAPES = [(1, 1, 1), (1, 5, 3), (3, 1, 3), (127, 1000, 3), (1000, 127, 16), (33, 50, 1)]


@pytest.mark.parametrize("M,N,D", SHAPES)
@pytest.mark.parametrize("mask", MASKS[:2] + MASKS[3:], ids=["none", "self", "same", "diff+self"])
def test_torch_matches_reference_float32(small_tiles, M, N, D, mask):
    if M * N > 20000:  # tiny tiles: keep the python loop count sane
        tiled.COL_BLOCK, tiled.TILE_ELEMS = 64, 64 * 48
    q, k, scale, b, kw = make_inputs(M, N, D, torch.float32, bias=True, mask=mask)
    want, want_g = run("reference", q, k, scale, b, kw, col=True)
    got, got_g = run("torch", q, k, scale, b, kw, col=True)
    for w, g in zip(want + want_g, got + got_g):
        torch.testing.assert_close(g, w, rtol=RTOL[torch.float32], atol=ATOL[torch.float32] * 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_low_precision_within_twice_reference_error(small_tiles, dtype, symmetric):
    M, N, D = 40, 40 if symmetric else 53, 16
    q, k, scale, b, kw = make_inputs(M, N, D, dtype, symmetric, mask=dict(exclude_self=symmetric))
    exact, exact_g = run("reference", *[None if t is None else t.detach().double().requires_grad_() for t in (q, k, scale, b)], kw, col=not symmetric)
    low, low_g = run("reference", q, k, scale, b, kw, col=not symmetric)
    fast, fast_g = run("torch", q, k, scale, b, kw, col=not symmetric)
    for name, f, l, e in zip(["row", "col", "dq", "dk", "dscale"], fast + fast_g, low + low_g, exact + exact_g):
        if e is None:
            continue
        assert f.dtype == l.dtype
        assert_within_twice_reference_error(f, l, e, floor=1e-3 * max(1.0, e.abs().max().item()), what=name)


def test_result_dtypes():
    for dtype, want in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        q = torch.randn(4, 3).to(dtype)
        for backend in ("reference", "torch"):
            row, col = ops.similarity_lse(q, q, 1.0, col_lse=True, backend=backend)
            assert row.dtype == want and col.dtype == want


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fully_masked_rows_are_minus_inf_with_zero_gradient(backend):
    q = torch.randn(5, 4, requires_grad=True)
    k = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 7, 1])  # class 7 has no key
    k_labels = torch.tensor([0, 1, 2, 0, 1, 2])
    row, col = ops.similarity_lse(q, k, 2.0, labels=labels, k_labels=k_labels, label_mask="same", col_lse=True, backend=backend)
    assert row[3] == float("-inf") and torch.isfinite(row[[0, 1, 2, 4]]).all()
    (row[[0, 1, 2, 4]].sum() + col.sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert (q.grad[3] == 0).all()


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
@pytest.mark.parametrize("symmetric", [False, True], ids=["qk", "self"])
@pytest.mark.parametrize("mask", MASKS[3:], ids=["same", "diff+self"])
def test_labels_are_64_bit(backend, symmetric, mask):
    """Labels are int64 (hashed ids, a large label space): labels equal in their low 32 bits
    are still different labels. Results on labels c·2³² + 5 as the reference's on the classes c."""
    q, k, scale, b, kw = make_inputs(37, 37 if symmetric else 29, 8, torch.float32, symmetric, True, mask)
    wide = {n: v * 2**32 + 5 if n.endswith("labels") else v for n, v in kw.items()}
    assert wide["labels"].dtype == torch.int64
    got_lse, got_grads = run(backend, q, k, scale, b, wide, True)
    want_lse, want_grads = run("reference", q, k, scale, b, kw, True)
    for got, want in zip(got_lse + got_grads, want_lse + want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_minus_inf_bias_masks_its_column(backend):
    """A −inf bias drops its column as a mask does: col_lse −inf with zero gradient, no NaN
    reaching the other lines (the reference once gave NaN gradients through that column)."""
    q = torch.randn(3, 5, requires_grad=True)
    k = torch.randn(4, 5, requires_grad=True)
    bias = torch.tensor([0.0, float("-inf"), 1.0, 0.0], requires_grad=True)
    row, col = ops.similarity_lse(q, k, 1.0, bias, col_lse=True, backend=backend)
    want, _ = ops.similarity_lse(q.detach(), k.detach()[[0, 2, 3]], 1.0, bias.detach()[[0, 2, 3]],
                                 backend="reference")
    assert col[1] == float("-inf")
    torch.testing.assert_close(row, want)
    (row.sum() + col[[0, 2, 3]].sum()).backward()
    for g in (q.grad, k.grad, bias.grad):
        assert torch.isfinite(g).all()
    assert (k.grad[1] == 0).all() and bias.grad[1] == 0


def test_tiles_stay_small_and_match_at_the_default_tile():
    """At default tiles, a batch wider than one column block still matches the reference."""
    q = torch.randn(300, 8)
    k = torch.randn(tiled.COL_BLOCK + 37, 8)
    want = ops.similarity_lse(q, k, 3.0, col_lse=True, backend="reference")
    got = ops.similarity_lse(q, k, 3.0, col_lse=True, backend="torch")
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)


def test_opcheck_torch_backend():
    q = torch.randn(6, 5, requires_grad=True)
    k = torch.randn(7, 5, requires_grad=True)
    scale = torch.tensor(1.5, requires_grad=True)
    bias = torch.randn(7, requires_grad=True)
    labels, k_labels = torch.tensor([0, 1, 0, 1, 2, 2]), torch.tensor([1, 1, 0, 2, 2, 0, 1])
    for args in [
        (q, k, scale, bias, labels, k_labels, 1, 0, True, "torch"),
        (q, None, scale, None, None, None, 0, 0, False, "torch"),
        (q, k, scale, None, None, None, 0, None, True, "torch"),
    ]:
        torch.library.opcheck(torch.ops.fastnce.similarity_lse.default, args)


def test_torch_compile_fullgraph_sees_through_the_op():
    import fastnce

    def f(z1, z2, a, b, s):
        return fastnce.nt_xent(z1, z2, backend="torch") + fastnce.clip_loss(a, b, s, backend="torch")

    z1, z2, a, b = (torch.randn(9, 4, requires_grad=True) for _ in range(4))
    s = torch.tensor(3.0, requires_grad=True)
    want = f(z1, z2, a, b, s)
    want_g = torch.autograd.grad(want, (z1, z2, a, b, s))
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(z1, z2, a, b, s)
    got_g = torch.autograd.grad(got, (z1, z2, a, b, s))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w)


def test_import_leaves_torch_dynamo_unloaded_and_compile_still_sees_through(tmp_path):
    """`import fastnce` marks resolve_backend for torch.compile without importing torch._dynamo
    (0.8 s); a fresh process that compiles afterwards still gets one graph, and the mark is
    the one torch.compiler.assume_constant_result sets."""
    import subprocess
    import sys

    script = tmp_path / "fresh.py"
    script.write_text(
        "import sys, torch, fastnce\n"
        "from fastnce.ops import function\n"
        "assert 'torch._dynamo' not in sys.modules, 'import fastnce loaded torch._dynamo'\n"
        "official = vars(torch.compiler.assume_constant_result(lambda: None))\n"
        "assert vars(function.resolve_backend) == official, (vars(function.resolve_backend), official)\n"
        "f = lambda a, b, s: fastnce.clip_loss(a, b, s, backend='torch')\n"
        "a, b, s = torch.randn(5, 3), torch.randn(5, 3), torch.tensor(2.0)\n"
        "torch.testing.assert_close(torch.compile(f, fullgraph=True, backend='eager')(a, b, s), f(a, b, s))\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_expanded_incoming_gradient():
    q = torch.randn(5, 3, requires_grad=True)
    row, _ = ops.similarity_lse(q, None, 1.0, exclude_self=True, backend="torch")
    row.sum().backward()  # the gradient arrives with stride 0
    q2 = q.detach().clone().requires_grad_()
    ops.similarity_lse(q2, None, 1.0, exclude_self=True, backend="reference")[0].sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_lse_forward_backward_match_autograd(backend):
    """The no-autograd pairs used by fastnce.distributed give the autograd ops' gradients (the
    reference's own materialised backward too: it once ran the torch backend's silently)."""
    f64 = dict(dtype=torch.float64)
    q = torch.randn(6, 4, **f64, requires_grad=True)
    k = torch.randn(9, 4, **f64, requires_grad=True)
    bias = torch.randn(9, **f64, requires_grad=True)
    labels, k_labels = torch.tensor([0, 1, 0, 2, 1, 0]), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    kw = dict(labels=labels, k_labels=k_labels, label_mask="different", exclude_self=True, diag_offset=1)
    row, col = ops.similarity_lse(q, k, 2.0, bias, col_lse=True, backend="reference", **kw)
    gr, gc = torch.randn(6, **f64), torch.randn(9, **f64)
    dq, dk, db = torch.autograd.grad((row * gr).sum() + (col * gc).sum(), (q, k, bias))
    r2, c2 = ops.lse_forward(q, k, 2.0, bias, col_lse=True, backend=backend, **kw)
    torch.testing.assert_close(r2, row.detach())
    gq, gk, gb = ops.lse_backward(q, k, 2.0, bias, row_lse=r2, grad_row=gr, col_lse=c2, grad_col=gc,
                                  need_bias=True, backend=backend, **kw)
    torch.testing.assert_close(2.0 * gq, dq)
    torch.testing.assert_close(2.0 * gk, dk)
    torch.testing.assert_close(gb, db)
    # k is q (NT-Xent): (G + Gᵀ) @ q in the first; with a bias, its gradient too
    b6 = bias[:6]
    row, _ = ops.similarity_lse(q, None, 2.0, b6, exclude_self=True, backend="reference")
    dq, db = torch.autograd.grad((row * gr).sum(), (q, b6))
    gq, gk, gb = ops.lse_backward(q, None, 2.0, b6, row_lse=row.detach(), grad_row=gr, exclude_self=True,
                                  need_bias=True, backend=backend)
    torch.testing.assert_close(2.0 * gq, dq)
    torch.testing.assert_close(gb, db)
    assert gk is None
    with pytest.raises(ValueError, match="need_bias=True needs a bias"):
        ops.lse_backward(q, None, 2.0, row_lse=row.detach(), grad_row=gr, need_bias=True, backend=backend)
    # SigLIP's rows
    rows = ops.similarity_sigmoid_nll(q, k, 2.0, bias[0], positive_offset=1, backend="reference")
    dq, dk, db = torch.autograd.grad((rows * gr).sum(), (q, k, bias))
    gq, gk, gb = ops.sigmoid_nll_backward(q, k, 2.0, bias[0].detach(), grad_row=gr, positive_offset=1,
                                          need_bias=True, backend=backend)
    torch.testing.assert_close(2.0 * gq, dq)
    torch.testing.assert_close(2.0 * gk, dk)
    torch.testing.assert_close(gb, db[0])


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_lse_backward_with_k_none_and_other_column_lses(backend):
    """k = q with column LSEs that are not the rows' (they cover more keys elsewhere): the
    kernels' mirrored k = q path assumes one LSE for both, and the torch backend once dropped
    col_lse there, a gradient 2 off with no error (a fuzzer found it)."""
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on CPU tensors here (the interpreter is off)")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(7, 3, generator=g, dtype=torch.float64)
    row, col = torch.randn(7, generator=g, dtype=torch.float64) + 3, torch.randn(7, generator=g, dtype=torch.float64) + 3
    gr, gc = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    kw = dict(row_lse=row, grad_row=gr, col_lse=col, grad_col=gc, exclude_self=True)
    want = ops.lse_backward(q, q, 2.0, need_k=True, backend="reference", **kw)
    dtype = torch.float32 if backend == "triton" else torch.float64
    f = lambda t: t.to(dtype)
    got, dk, _ = ops.lse_backward(f(q), None, 2.0, row_lse=f(row), grad_row=f(gr), col_lse=f(col), grad_col=f(gc),
                                  exclude_self=True, backend=backend)
    assert dk is None
    torch.testing.assert_close(got.double(), want[0] + want[1], **({} if backend != "triton" else dict(rtol=1e-5, atol=1e-5)))


def test_lse_backward_checks_its_vectors():
    """Each LSE and upstream gradient named when missing or of the wrong shape (a (1,) one was
    broadcast to a wrong gradient; grad_col without col_lse read a 1-element buffer for every
    column on the triton backend); offsets past int64 named too."""
    q, k = torch.randn(4, 3), torch.randn(5, 3)
    row, col, gr, gc = torch.zeros(4), torch.zeros(5), torch.ones(4), torch.ones(5)
    cases = [
        (ValueError, "needs grad_row or grad_col", dict(row_lse=row)),
        (ValueError, "grad_col needs col_lse", dict(row_lse=row, grad_col=gc)),
        (ValueError, r"row_lse must be a floating-point tensor of shape \(4,\)", dict(row_lse=row[:1], grad_row=gr)),
        (ValueError, r"grad_row must be a floating-point tensor of shape \(4,\)", dict(row_lse=row, grad_row=gr[:1])),
        (ValueError, r"col_lse must be a floating-point tensor of shape \(5,\)",
         dict(row_lse=row, col_lse=col[:3], grad_col=gc)),
        (TypeError, r"grad_col must be a floating-point tensor of shape \(5,\), got torch.int64",
         dict(row_lse=row, col_lse=col, grad_col=gc.long())),
        (TypeError, "row_lse must be a torch.Tensor", dict(row_lse=[0.0] * 4, grad_row=gr)),
    ]
    for backend in ops.available_backends("cpu"):  # triton under the interpreter
        for error, match, kw in cases:
            with pytest.raises(error, match=match):
                ops.lse_backward(q, k, 2.0, backend=backend, **kw)
        with pytest.raises(ValueError, match=r"grad_row must be a floating-point tensor of shape \(4,\)"):
            ops.sigmoid_nll_backward(q, k, 2.0, grad_row=gr[:1], backend=backend)
    with pytest.raises(ValueError, match="diag_offset must lie within int64"):
        ops.similarity_lse(q, None, exclude_self=True, diag_offset=2 ** 70)
    with pytest.raises(ValueError, match="positive_offset must lie within int64"):
        ops.similarity_sigmoid_nll(q, k, positive_offset=-(2 ** 64))


def test_backend_selection():
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    assert "torch" in ops.available_backends("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.similarity_lse(torch.randn(3, 2), backend="fastest")
    with pytest.raises(ops.BackendUnavailable, match="backend='cuda' is unavailable"):
        ops.similarity_lse(torch.randn(3, 2), backend="cuda")
    # info_nce's paired negatives use no primitive; a bad or unavailable backend is still an error
    q, negatives = torch.randn(3, 2), torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastnce.info_nce(q, q, negatives, negative_mode="paired", backend="fastest")
    with pytest.raises(ops.BackendUnavailable, match="backend='cuda' is unavailable"):
        fastnce.info_nce(q, q, negatives, negative_mode="paired", backend="cuda")


def test_auto_backend_choice_for_cuda_tensors(monkeypatch):
    """Decided without a GPU: float64 takes the tiled path, triton comes before cuda, and with
    neither an error naming each reason (never a silent fall-back to the slow path)."""
    from fastnce.ops import function

    cuda = torch.device("cuda")
    assert ops.resolve_backend("auto", cuda, torch.float64) == "torch"
    assert ops.resolve_backend("auto", cuda, torch.float64, "sigmoid") == "torch"
    reasons = {"triton": None, "cuda": None}
    monkeypatch.setattr(function, "unavailable_reason", lambda name, device, dtype, op="lse": reasons[name])
    assert ops.resolve_backend("auto", cuda, torch.float16) == "triton"
    reasons["triton"] = "no triton here"
    assert ops.resolve_backend("auto", cuda, torch.float16) == "cuda"
    reasons["cuda"] = "no extension here"
    with pytest.raises(ops.BackendUnavailable, match="no triton here; no extension here.*backend='torch'"):
        ops.resolve_backend("auto", cuda, torch.float16)


def _arguments_the_primitive_would_ignore():
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 0, 1])
    return [
        ("k_labels_without_a_mask", ValueError, "labels were given but label_mask is None",
         lambda be: ops.similarity_lse(q, k, k_labels=y, backend=be)),
        ("k_labels_with_k_None", ValueError, "k_labels must be None when k is None",
         lambda be: ops.similarity_lse(q, None, labels=y, k_labels=y.flip(0), label_mask="same", backend=be)),
        ("k_without_k_labels", ValueError, "with a separate k needs k_labels",
         lambda be: ops.similarity_lse(q, k, labels=y, label_mask="different", backend=be)),
        ("diag_offset_without_exclude_self", ValueError, "diag_offset only applies with exclude_self=True",
         lambda be: ops.similarity_lse(q, k, diag_offset=1, backend=be)),
        ("scale_of_two_entries", ValueError, r"scale must be a scalar, got a tensor of shape \(2,\)",
         lambda be: ops.similarity_lse(q, k, torch.ones(2), backend=be)),
        ("bool_scale_tensor", TypeError, "scale must hold a real number, got a tensor of dtype torch.bool",
         lambda be: ops.similarity_lse(q, k, torch.tensor(True), backend=be)),
        ("complex_scale_tensor", TypeError, "scale must hold a real number, got a tensor of dtype torch.complex64",
         lambda be: ops.similarity_lse(q, k, torch.tensor(2 + 1j), backend=be)),
        ("unhashable_label_mask", ValueError, r"label_mask must be None, 'same' or 'different', got \['same'\]",
         lambda be: ops.similarity_lse(q, k, labels=y, k_labels=y, label_mask=["same"], backend=be)),
        ("bool_diag_offset", TypeError, "diag_offset must be an int, got bool",
         lambda be: ops.similarity_lse(q, k, exclude_self=True, diag_offset=True, backend=be)),
        ("bool_positive_offset", TypeError, "positive_offset must be an int or None, got bool",
         lambda be: ops.similarity_sigmoid_nll(q, k, positive_offset=True, backend=be)),
        ("sigmoid_need_bias_without_bias", ValueError, "need_bias=True needs a bias",
         lambda be: ops.sigmoid_nll_backward(q, k, grad_row=torch.ones(4), need_bias=True, backend=be)),
    ]


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
@pytest.mark.parametrize("case", _arguments_the_primitive_would_ignore(), ids=lambda c: c[0])
def test_primitive_rejects_arguments_it_would_ignore(case, backend):
    """Each would otherwise be ignored or replaced silently (q's labels against k, say)."""
    _, error, match, call = case
    with pytest.raises(error, match=match):
        call(backend)


def test_torch_backend_exact_at_large_logsumexp():
    """Rows whose LSE is ~1e4..1e5 (unnormalised features, a large bias): the torch backend's G
    must be as accurate as the float32 reference's, on the general and the mirrored path. (It
    once folded the upstream weight into the shift, lse − log(w), whose rounding at that size
    moved every entry of G by ~1e-3 relative.)"""
    from tolerances import assert_within_twice_reference_error

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64) * 30
    k = torch.randn(23, 8, generator=g, dtype=torch.float64) * 30
    bias = torch.randn(23, generator=g, dtype=torch.float64) * 1e4
    w = torch.rand(40, generator=g, dtype=torch.float64)  # non-negative weights, as any mean or sum
    for kk, b in ((None, None), (k, bias)):
        def grads(backend, dt):
            q = x.to(dt).detach().requires_grad_()
            kd = None if kk is None else kk.to(dt)
            row, _ = ops.similarity_lse(q, kd, 1.0, None if b is None else b.to(dt), backend=backend)
            (row.double() * w).sum().backward()
            return q.grad
        exact = grads("reference", torch.float64)
        assert_within_twice_reference_error(grads("torch", torch.float32), grads("reference", torch.float32), exact,
                                            1e-5 * exact.abs().max().item(), what=f"dq, k={'q' if kk is None else 'k'}")


def test_kernels_run_with_their_tensors_device_current(monkeypatch):
    """Every custom op (both primitives, forward and backward) launches its backend inside
    _current_device(q.device), which on a GPU makes q's device current: Triton launches and
    autotunes on the current device, whatever device the tensors are on."""
    from fastnce.ops import function

    entered = []
    real = function._current_device
    monkeypatch.setattr(function, "_current_device", lambda d: entered.append(d) or real(d))
    q, k = (torch.randn(5, 3, requires_grad=True) for _ in range(2))
    row, col = ops.similarity_lse(q, k, 2.0, col_lse=True, backend="torch")
    (row.sum() + col.sum()).backward()
    ops.similarity_sigmoid_nll(q, k, 2.0, backend="torch").sum().backward()
    assert entered == [torch.device("cpu")] * 4

    made_current = []

    class Recorder:
        def __init__(self, device):
            made_current.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with real(torch.device("cuda", 1)):
        pass
    with real(torch.device("cpu")):
        pass
    assert made_current == [torch.device("cuda", 1)]


_NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture
def fp32_precision_restored():
    """Every backend's fp32_precision as it was: set_float32_matmul_precision('medium') also
    sends the CPU's (mkldnn's) float32 matmuls through bfloat16, for the tests after it."""
    tb = torch.backends  # the fp32_precision API of torch >= 2.9 (the tests using this skip below)
    saved = [(b, b.fp32_precision) for b in (tb, tb.cuda.matmul, tb.mkldnn.matmul, tb.mkldnn.conv, tb.mkldnn.rnn,
                                             tb.cudnn.conv, tb.cudnn.rnn)]
    legacy = torch.get_float32_matmul_precision()
    yield
    for b, _ in saved:
        b.fp32_precision = "none"  # so that the legacy setter below may run
    torch.set_float32_matmul_precision(legacy)
    for b, value in saved:
        b.fp32_precision = value
    assert torch.get_float32_matmul_precision() == legacy


@pytest.mark.skipif(not _NEW_TF32_API, reason="torch < 2.9 has only the legacy tf32 flags")
@pytest.mark.parametrize("allow", [
    None,
    "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "torch.backends.fp32_precision = 'tf32'",
    "torch.backends.cuda.matmul.allow_tf32 = True",
    "torch.set_float32_matmul_precision('high')",
    "torch.set_float32_matmul_precision('medium')",
    "torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'",
])
def test_tf32_policy_follows_every_torch_api(allow, fp32_precision_restored, monkeypatch):
    """The GPU kernels' float32 precision follows PyTorch's own matmul setting, whichever API set
    it; after the new API (torch >= 2.9) a read of the legacy flags raises, so none is read."""
    from fastnce.ops import cuda_lse, naive, triton_lse
    if allow is not None:
        exec(allow)
    want = allow is not None and not allow.endswith("'ieee'")
    assert naive.tf32_allowed() is want
    assert cuda_lse._allow_tf32(torch.float32) is want and not cuda_lse._allow_tf32(torch.bfloat16)
    monkeypatch.setattr(triton_lse, "_INTERPRET", False)  # the GPU branch; pure Python
    assert triton_lse._dot_args(torch.float32)[1] == ("tf32" if want else triton_lse._FP32_PRECISION)
