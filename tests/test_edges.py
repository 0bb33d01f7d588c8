"""Defined behaviour at the edges (issue 7): odd layouts, partial requires_grad, zero and
non-finite inputs, autocast, double backward, torch.compile."""
import pytest
import torch

import fastnce
from fastnce import ops

from big_inputs import operands_past_2_to_the_31

LOSSES = {
    "nt_xent": lambda a, b, be: fastnce.nt_xent(a, b, 0.2, backend=be),
    "clip_loss": lambda a, b, be: fastnce.clip_loss(a, b, 5.0, backend=be),
    "info_nce": lambda a, b, be: fastnce.info_nce(a, b, temperature=0.2, backend=be),
}


@pytest.mark.parametrize("name", LOSSES)
def test_batch_of_one_has_no_negatives_and_zero_loss(name):
    a, b = torch.randn(1, 4, requires_grad=True), torch.randn(1, 4, requires_grad=True)
    loss = LOSSES[name](a, b, "torch")
    # lse of the single logit minus that logit: zero up to float32 rounding of |logit| (≤ 5·|a||b|)
    assert loss.item() == pytest.approx(0.0, abs=1e-6 * (1 + 5 * a.norm().item() * b.norm().item()))
    loss.backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_non_contiguous_inputs(name, layout):
    base = torch.randn(8, 6)
    if layout == "transposed":
        a = torch.randn(6, 8).T
    elif layout == "strided":
        a = torch.randn(8, 12)[:, ::2]
    else:
        a = torch.randn(1, 6).expand(8, 6)
    a = a.clone().requires_grad_() if layout == "expanded" else a.requires_grad_()
    want_in = a.detach().contiguous().requires_grad_()
    loss = LOSSES[name](a, base, "torch")
    want = LOSSES[name](want_in, base, "reference")
    torch.testing.assert_close(loss, want)
    loss.backward()
    want.backward()
    torch.testing.assert_close(a.grad, want_in.grad)


def test_requires_grad_on_some_inputs_only():
    q = torch.randn(5, 3, requires_grad=True)
    k = torch.randn(7, 3)
    scale = torch.tensor(2.0)
    row, col = ops.similarity_lse(q, k, scale, col_lse=True, backend="torch")
    (row.sum() + col.sum()).backward()
    q2 = q.detach().requires_grad_()
    r2, c2 = ops.similarity_lse(q2, k, scale, col_lse=True, backend="reference")
    (r2.sum() + c2.sum()).backward()
    torch.testing.assert_close(q.grad, q2.grad)
    # only the scale learns
    s = torch.tensor(2.0, requires_grad=True)
    ops.similarity_lse(q.detach(), k, s, backend="torch")[0].sum().backward()
    s2 = torch.tensor(2.0, requires_grad=True)
    ops.similarity_lse(q.detach(), k, s2, backend="reference")[0].sum().backward()
    torch.testing.assert_close(s.grad, s2.grad)


SUBSETS = ["q", "k", "scale", "bias", "q scale", "k scale", "k bias", "q bias", "bias scale", "q bias scale",
           "q k scale bias"]


def _primitive(name, q, k, scale, bias, backend):
    if name == "lse":
        row, col = ops.similarity_lse(q, k, scale, bias, col_lse=True, backend=backend)
        return (row * torch.linspace(0.5, 1.5, row.shape[0], device=row.device)).sum() + 0.3 * col.sum()
    return ops.similarity_sigmoid_nll(q, k, scale, bias[0], positive_offset=1, backend=backend).sum()


def _device(backend):
    """The fused backends run on the GPU where there is one (else triton under the interpreter)."""
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("prim", ["lse", "sigmoid"])
@pytest.mark.parametrize("subset", SUBSETS)
def test_frozen_inputs_get_no_gradient_and_the_others_theirs(backend, prim, subset):
    """Any subset of q, k, scale, bias requiring grad gets the gradients it gets when all do,
    whichever side's product the backward skips (a frozen k, MoCo's queue, costs no Gᵀ @ q; the
    scale's gradient then comes from G @ k or Gᵀ @ q)."""
    if backend == "cuda" and prim == "sigmoid":
        pytest.skip("the cuda backend has no sigmoid kernel")
    if backend != "reference" and ops.unavailable_reason(backend, torch.device(_device(backend)), torch.float32):
        pytest.skip(f"{backend} unavailable")
    g = torch.Generator().manual_seed(3)
    leaves = dict(q=torch.randn(7, 5, generator=g), k=torch.randn(9, 5, generator=g),
                  scale=torch.tensor(1.7), bias=torch.randn(9, generator=g))
    leaves = {n: t.to(_device(backend)) for n, t in leaves.items()}
    full = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    _primitive(prim, *full.values(), "reference").backward()
    part = {n: t.clone().requires_grad_(n in subset.split()) for n, t in leaves.items()}
    _primitive(prim, *part.values(), backend).backward()
    for n, t in part.items():
        if n in subset.split():
            torch.testing.assert_close(t.grad, full[n].grad, rtol=1e-4, atol=1e-5)
        else:
            assert t.grad is None


@pytest.mark.parametrize("prim", ["lse", "sigmoid"])
@pytest.mark.parametrize("learnable_scale", [False, True])
def test_triton_backward_skips_the_frozen_side(prim, learnable_scale, monkeypatch):
    """A learnable scale (MoCo or LiT with a learned temperature) takes its gradient from the
    product that is computed anyway: the frozen side still costs nothing."""
    from fastnce.ops import triton_lse, triton_sigmoid

    module = triton_lse if prim == "lse" else triton_sigmoid
    calls = []
    for fn in ("_dq_pass", "_dk_pass", "_grad_atomic"):
        orig = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _f=fn, _o=orig: calls.append(_f) or _o(*a))
    dev = _device("triton")
    q, k = torch.randn(7, 5, device=dev, requires_grad=True), torch.randn(9, 5, device=dev)
    bias = torch.randn(9, device=dev)
    scale = torch.tensor(1.5, device=dev, requires_grad=True) if learnable_scale else 1.5
    _primitive(prim, q, k, scale, bias, "triton").backward()
    assert calls == ["_dq_pass"], calls  # k frozen: the rows' pass alone
    calls.clear()
    _primitive(prim, q.detach(), k.requires_grad_(), scale, bias, "triton").backward()
    assert calls == ["_dk_pass"], calls  # q frozen: the columns' pass alone


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("learn", ["bias", "bias scale"])
def test_symmetric_bias_learns_with_the_features_frozen(backend, learn):
    """k = q (exclude_self) with only the bias (and scale) learning: no dq is asked for, yet the
    symmetric path accumulates through it; the autograd form and the no-autograd form
    (fastnce.distributed's) both give the reference's bias gradient and no feature gradient."""
    if ops.unavailable_reason(backend, torch.device(_device(backend)), torch.float32):
        pytest.skip(f"{backend} unavailable")
    dev = _device(backend)
    g = torch.Generator().manual_seed(4)
    q, bias = torch.randn(7, 5, generator=g).to(dev), torch.randn(7, generator=g).to(dev)
    w = torch.linspace(0.5, 1.5, 7, device=dev)
    grads = []
    for be in (backend, "reference"):
        b = bias.clone().requires_grad_()
        s = torch.tensor(1.3, device=dev, requires_grad="scale" in learn)
        row, _ = ops.similarity_lse(q, None, s, b, exclude_self=True, backend=be)
        (row * w).sum().backward()
        grads.append((b.grad, s.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    row = ops.lse_forward(q, None, 1.3, bias, exclude_self=True, backend="reference")[0]
    _, _, want = ops.lse_backward(q, None, 1.3, bias, row_lse=row, grad_row=w, exclude_self=True,
                                  need_bias=True, need_q=True, backend="reference")
    dq, dk, got = ops.lse_backward(q, None, 1.3, bias, row_lse=row, grad_row=w, exclude_self=True,
                                   need_bias=True, need_q=False, backend=backend)
    assert dq is None and dk is None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_only_column_lse_used():
    q, k = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    _, col = ops.similarity_lse(q, k, 1.0, col_lse=True, backend="torch")
    col.sum().backward()
    q2, k2 = q.detach().requires_grad_(), k.detach().requires_grad_()
    ops.similarity_lse(q2, k2, 1.0, col_lse=True, backend="reference")[1].sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_vectors_stay_finite(dtype):
    a = torch.randn(6, 8).to(dtype)
    a[2] = 0
    b = torch.randn(6, 8).to(dtype).requires_grad_()
    a.requires_grad_()
    for loss in (fastnce.nt_xent(a, b), fastnce.info_nce(a, b)):
        assert torch.isfinite(loss)
        a.grad = None
        loss.backward()
        assert torch.isfinite(a.grad).all()


def test_duplicate_rows():
    a = torch.randn(1, 5).repeat(6, 1)
    b = torch.randn(6, 5)
    for name, fn in LOSSES.items():
        torch.testing.assert_close(fn(a, b, "torch"), fn(a, b, "reference"))


FAST = [b for b in ops.available_backends("cpu") if b != "reference"]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_propagate_nan_never_a_finite_number(name, bad, backend):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(6, 4, generator=g)
    with torch.no_grad():
        a[3, 1] = bad
    loss = LOSSES[name](a, b, backend)
    assert not torch.isfinite(loss)
    loss.backward()
    assert not torch.isfinite(a.grad).all()


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("name", LOSSES)
def test_infinite_feature_whose_similarities_are_all_minus_inf_gives_nan_gradients(name, backend):
    """An infinite feature against keys all of the opposite sign: the row of S is all −inf, which
    must not pass for a fully masked row (−inf, zero gradient) beside a NaN loss."""
    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    b = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    b[:, 1] = -b[:, 1].abs() - 0.1
    a[3, 1] = float("inf")
    a.requires_grad_()
    loss = LOSSES[name](a, b, backend)
    assert not torch.isfinite(loss)
    loss.backward()
    assert not torch.isfinite(a.grad).all()
    row, col = ops.similarity_lse(a.detach(), b, 1.0, col_lse=True, backend=backend)
    assert torch.isnan(row[3]) and torch.isfinite(row[[0, 1, 2, 4, 5]]).all()


@pytest.mark.parametrize("backend", FAST)
def test_non_finite_features_in_the_primitive(backend):
    """Unnormalised features: a NaN in one key reaches every row's LSE."""
    q, k = torch.randn(5, 3), torch.randn(7, 3)
    k[4, 0] = float("nan")
    row, col = ops.similarity_lse(q, k, 2.0, col_lse=True, backend=backend)
    assert torch.isnan(row).all() and torch.isnan(col[4]) and torch.isfinite(col[[0, 1, 2, 3, 5, 6]]).all()


@pytest.mark.parametrize("backend", ["reference", "torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_plus_inf_bias_makes_its_rows_non_finite(backend):
    """A +inf bias column (the README: +inf on reference / torch, NaN on the fused kernels, whose
    online max meets inf - inf): never a finite LSE for a row that sees it, the others untouched."""
    dev = _device(backend)
    q, k = torch.randn(5, 3, device=dev), torch.randn(7, 3, device=dev)
    bias = torch.zeros(7, device=dev)
    bias[2] = float("inf")
    row, col = ops.similarity_lse(q, k, 2.0, bias, col_lse=True, backend=backend)
    want_row = float("inf") if backend in ("reference", "torch") else float("nan")
    torch.testing.assert_close(row, torch.full_like(row, want_row), equal_nan=True)
    assert not torch.isfinite(col[2]) and torch.isfinite(col[[0, 1, 3, 4, 5, 6]]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LOSSES)
def test_autocast_leaves_the_loss_in_input_precision(name, dtype):
    a, b = torch.randn(16, 8), torch.randn(16, 8)
    want = LOSSES[name](a, b, "reference")
    with torch.autocast("cpu", dtype=dtype):
        got = LOSSES[name](a, b, "torch")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


MIXED = {  # (call, number of feature arguments): the features come first
    "info_nce": (lambda q, p, n: fastnce.info_nce(q, p, n, 0.2), 3),
    "nt_xent": (lambda a, b: fastnce.nt_xent(a, b, 0.2), 2),
    "dcl_loss": (lambda a, b: fastnce.functional.dcl_loss(a, b, 0.2), 2),
    "clip_loss": (lambda a, b: fastnce.clip_loss(a, b, 5.0), 2),
    "siglip_loss": (lambda a, b: fastnce.siglip_loss(a, b, 5.0, -2.0), 2),
    "nt_xent_multiview": (lambda a, b, c: fastnce.losses.nt_xent_multiview([a, b, c], 0.2), 3),
    "cpc_loss": (lambda c, z: fastnce.losses.cpc_loss(c.reshape(2, 3, 8), z.reshape(2, 3, 8),
                                                      [torch.eye(8) * 0.5]), 2),
}


@pytest.mark.parametrize("name", MIXED)
def test_mixed_dtypes_under_autocast_take_its_dtype(name):
    """Under autocast, features of different dtypes (bfloat16 queries beside a float32 queue)
    are cast to autocast's dtype, as eager's matmul would; outside autocast they are an error."""
    fn, n = MIXED[name]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 8, generator=g) for _ in range(n)]
    mixed = [xs[0].bfloat16()] + xs[1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*mixed)
    torch.testing.assert_close(got, fn(*[x.bfloat16() for x in xs]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="same dtype"):
        fn(*mixed)
    # autocast's matmul leaves float64 alone (and then fails on the mix): never rounded to 16 bits
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="same dtype"):
        fn(*([xs[0].double()] + xs[1:]))


def test_info_nce_under_autocast_matches_info_nce_pytorch():
    """info-nce-pytorch's drop-in under autocast with a float32 queue (its matmul casts)."""
    info_nce_pytorch = pytest.importorskip("info_nce")
    g = torch.Generator().manual_seed(0)
    model, x, queue = torch.nn.Linear(10, 12), torch.randn(8, 10, generator=g), torch.randn(16, 12, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = model(x)
        got = fastnce.info_nce(q, q.detach() + 0.1, queue)
        want = info_nce_pytorch.info_nce(q, q.detach() + 0.1, queue)
    # both compute in bfloat16 (ours with float32 accumulation): equal to its rounding
    torch.testing.assert_close(got, want.float(), rtol=0.05, atol=0.01)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_scalars_change_and_are_still_checked(backend):
    """A Python-float temperature that changes between calls (a schedule) compiles with
    fullgraph (once it failed: math.isfinite of a symbolic float); a bad tensor temperature
    is still an error in the compiled graph, as in eager."""
    from torch._dynamo.utils import counters

    a, b = torch.randn(6, 8), torch.randn(6, 8)
    torch.compiler.reset()
    counters.clear()
    step = torch.compile(lambda a, b, t: fastnce.nt_xent(a, b, t, backend="torch"), fullgraph=True, backend=backend)
    for t in [0.05 + 0.01 * i for i in range(12)]:  # past dynamo's limit of 8 graphs a function
        torch.testing.assert_close(step(a, b, t), fastnce.nt_xent(a, b, t, backend="torch"))
    # as plain PyTorch: the float becomes symbolic at its second value (the primitive's
    # torch.tensor(float) once kept it a constant: a graph per value, then an error)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    with pytest.raises(Exception, match="temperature must be a positive finite number"):
        step(a, b, -0.1)
    assert torch.isfinite(step(a, b, torch.tensor(0.2)))
    for bad in (-0.1, float("nan"), 0.0):
        with pytest.raises(RuntimeError, match="temperature must be a positive finite number"):
            step(a, b, torch.tensor(bad))


TEMPERATURE_LOSSES = {  # every loss whose scale is 1 / temperature (or 2 / temperature)
    "nt_xent": lambda a, b, y, t: fastnce.nt_xent(a, b, t, backend="torch"),
    "info_nce": lambda a, b, y, t: fastnce.info_nce(a, b, temperature=t, backend="torch"),
    "dcl_loss": lambda a, b, y, t: fastnce.losses.dcl_loss(a, b, t, backend="torch"),
    "nt_xent_multiview": lambda a, b, y, t: fastnce.losses.nt_xent_multiview([a, b, a + b], t, backend="torch"),
    "supcon_loss": lambda a, b, y, t: fastnce.losses.supcon_loss(a, y, t, backend="torch"),
    "soft_nearest_neighbor_loss": lambda a, b, y, t: fastnce.losses.soft_nearest_neighbor_loss(a, y, t, backend="torch"),
}


@pytest.mark.parametrize("name", TEMPERATURE_LOSSES)
def test_a_temperature_schedule_compiles_no_graph_after_the_second_value(name):
    """A Python-float temperature that changes every call: once dynamo has made it symbolic (the
    second value) no value compiles another graph. Under torch 2.11 the scale 1 / t, a float
    computed from the argument, was specialised on its value where it met a tensor: a graph per
    value, then an error past 8 with fullgraph (torch 2.13 keeps it symbolic)."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(3)
    a, b, y = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.tensor([0, 1, 0, 2, 1, 0])
    fn = TEMPERATURE_LOSSES[name]
    torch.compiler.reset()
    counters.clear()
    step = torch.compile(fn, backend="aot_eager")
    temperatures = [0.05 + 0.01 * i for i in range(12)]
    for i, t in enumerate(temperatures):
        torch.testing.assert_close(step(a, b, y, t), fn(a, b, y, t))
        if i == 2:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


def test_scalars_of_two_dimensions_are_rejected():
    """A (1, 1) temperature would broadcast a (N,) loss to (1, N): numbers, () and (1,) only."""
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"temperature must be a scalar \(a number, or a tensor of shape"):
        fastnce.info_nce(a, b, temperature=torch.tensor([[0.1]]), reduction="none")
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        fastnce.clip_loss(a, b, torch.tensor([[5.0]]))
    assert fastnce.info_nce(a, b, temperature=torch.tensor([0.1]), reduction="none").shape == (4,)


@pytest.mark.parametrize("value", [torch.tensor(True), torch.tensor(0.5 + 1j)], ids=["bool", "complex"])
def test_scalars_of_bool_or_complex_dtype_are_rejected(value):
    """A bool tensor would pass for 1.0 and a complex one lose its imaginary part (a Python bool
    is refused already): the error names the argument and the dtype."""
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match=f"temperature must hold a real number, got a tensor of dtype {value.dtype}"):
        fastnce.nt_xent(a, b, value)
    with pytest.raises(TypeError, match=f"logit_scale must hold a real number, got a tensor of dtype {value.dtype}"):
        fastnce.clip_loss(a, b, value)


def test_double_backward_is_a_clear_error():
    q = torch.randn(5, 3, requires_grad=True)
    row, _ = ops.similarity_lse(q, None, 1.0, backend="torch")
    (g,) = torch.autograd.grad(row.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
    # the reference supports it
    row, _ = ops.similarity_lse(q, None, 1.0, backend="reference")
    (g,) = torch.autograd.grad(row.sum(), q, create_graph=True)
    g.pow(2).sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_torch_compile_fullgraph(name):
    a, b = torch.randn(10, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    fn = lambda a, b: LOSSES[name](a, b, "torch")
    want = fn(a, b)
    want_g = torch.autograd.grad(want, (a, b))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(a, b)
    got_g = torch.autograd.grad(got, (a, b))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w)


def test_torch_backend_is_deterministic():
    a, b = torch.randn(300, 16, requires_grad=True), torch.randn(300, 16)
    grads = []
    for _ in range(2):
        a.grad = None
        fastnce.nt_xent(a, b, backend="torch").backward()
        grads.append(a.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("side", ["q", "k"])
def test_offsets_past_2_to_the_31_on_gpu(backend, side):
    """M·D (or N·D) > 2³¹ elements: the last rows must be right, so offsets are 64-bit."""
    if ops.unavailable_reason(backend, torch.device("cuda"), torch.bfloat16):
        pytest.skip(f"{backend} unavailable")
    q, k, big, tail = operands_past_2_to_the_31(side)
    row, col = ops.similarity_lse(q, k, 0.05, col_lse=True, backend=backend)
    if side == "q":
        want_row, want_col = ops.similarity_lse(q.detach()[tail].float(), k.detach().float(), 0.05, col_lse=True,
                                                backend="reference")
        torch.testing.assert_close(row[tail], want_row, rtol=2e-2, atol=2e-2)
    else:
        want_row, want_col = ops.similarity_lse(q.detach().float(), k.detach()[tail].float(), 0.05, col_lse=True,
                                                backend="reference")
        torch.testing.assert_close(col[tail], want_col, rtol=2e-2, atol=2e-2)
    (row.sum() + col.sum()).backward()
    grad_big = big.grad[tail].float()
    assert torch.isfinite(grad_big).all() and grad_big.abs().sum() > 0


METRIC_LOSSES = ["SupConLoss", "SoftNearestNeighborLoss", "ContrastiveLoss", "TripletMarginLoss", "NPairsLoss",
                 "LiftedStructureLoss"]


@pytest.mark.parametrize("name", METRIC_LOSSES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_metric_losses_propagate_non_finite_embeddings(name, bad):
    """A NaN or inf embedding must not pass for a point at distance 0 (the distance helper once
    turned a NaN squared distance into 0: a finite loss beside NaN gradients)."""
    from fastnce import losses as L

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    x[2, 1] = bad
    x.requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    loss = getattr(L, name)()(x, y)
    assert not torch.isfinite(loss), f"{name}: {loss}"
