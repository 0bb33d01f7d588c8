"""Property-based checks of every available backend against the float64 reference.

Hypothesis draws shapes, dtypes, masks, temperatures (1e-3 … 10), input norms
(1e-4 … 1e4) and, for the triton backend, its kernel plans. A fast backend must be finite wherever the reference is, and within
DESIGN.md §6's criterion: its error against the float64 reference at most twice the error of
the reference with its products in that dtype (as eager PyTorch computes them), plus a floor.
"""
import contextlib
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnce
from fastnce import ops
from fastnce.ops import tiled
from fastnce.ops import _prepare
from tolerances import g_term_sums

FAST_BACKENDS = [b for b in ops.available_backends("cpu") if b != "reference"]
# The Triton interpreter is ~100x slower than the tiled path: fewer, smaller draws.
EXAMPLES = {"torch": int(os.environ.get("FASTNCE_HYPOTHESIS_EXAMPLES", 120)), "triton": 60, "cuda": 15}
DTYPES = {"torch": [torch.float32, torch.float16, torch.bfloat16, torch.float64], "triton": [torch.float32, torch.float16]}
# The triton backend's kernel plans (fastnce/ops/triton_lse.py _PLANS), drawn per example.
TRITON_PLANS = {"FASTNCE_TRITON_BACKWARD": ["atomic", "two-pass"], "FASTNCE_TRITON_SYM_FORWARD": ["rows", "half"],
                "FASTNCE_TRITON_SYM_BACKWARD": ["mirror", "half"]}


@st.composite
def problems(draw, backend):
    M = draw(st.integers(1, 24 if backend == "triton" else 70))
    symmetric = draw(st.booleans())
    N = M if symmetric else draw(st.integers(1, 24 if backend == "triton" else 70))
    D = draw(st.sampled_from([1, 2, 3, 8, 17]))
    dtype = draw(st.sampled_from(DTYPES.get(backend, [torch.float32, torch.float16])))
    temperature = 10 ** draw(st.floats(-3, 1))
    q_norm, k_norm = 10 ** draw(st.floats(-4, 4)), 10 ** draw(st.floats(-4, 4))
    if symmetric:
        k_norm = q_norm
    seed = draw(st.integers(0, 2**31 - 1))
    kw = {}
    if draw(st.booleans()):
        kw["exclude_self"] = True
        if not symmetric:
            kw["diag_offset"] = draw(st.integers(-3, 3))
    mask = draw(st.sampled_from([None, "same", "different"]))
    g = torch.Generator().manual_seed(seed)
    if mask:
        classes = draw(st.integers(1, 4))
        kw["label_mask"] = mask
        kw["labels"] = torch.randint(0, classes, (M,), generator=g)
        if not symmetric:
            kw["k_labels"] = torch.randint(0, classes, (N,), generator=g)
    q = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1) * q_norm
    k = None if symmetric else torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1) * k_norm
    bias = torch.randn(N, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    col = (not symmetric) and draw(st.booleans())
    tile = (draw(st.sampled_from([7, 16, 4096])), draw(st.sampled_from([5, 64])))
    plans = {env: draw(st.sampled_from(names)) for env, names in TRITON_PLANS.items()} if backend == "triton" else {}
    return dict(tile=tile, plans=plans, q=q.to(dtype), k=None if k is None else k.to(dtype), scale=1 / temperature, bias=bias, col=col, kw=kw)


def _evaluate(p, backend, dtype):
    """LSEs and gradients of a fixed random linear function of them, inputs cast to dtype.

    backend 'eager' is the reference with its products in the input dtype (PyTorch's own
    error in that dtype, DESIGN.md §6).
    """
    q = p["q"].to(dtype).requires_grad_()
    k = None if p["k"] is None else p["k"].to(dtype).requires_grad_()
    bias = None if p["bias"] is None else p["bias"].to(dtype if dtype == torch.float64 else torch.float32).requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(p["scale"], dtype=acc, requires_grad=True)
    if backend == "eager":
        row, col = ops.similarity_lse_naive(q, q if k is None else k, scale, bias, *_masks(p), with_col=p["col"],
                                            products_in_input_dtype=True)
    else:
        row, col = ops.similarity_lse(q, k, scale, bias, col_lse=p["col"], backend=backend, **p["kw"])
    outs = [row] + ([col] if p["col"] else [])
    loss = _loss(outs)
    leaves = [t for t in (q, k, scale, bias) if t is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach().double() for o in outs] + [torch.zeros(()) if x is None else x.double() for x in grads]


def _masks(p):
    """(q_labels, k_labels, mask_mode, exclude_offset) of the problem, as the kernels get them."""
    q = p["q"]
    return _prepare(q, p["k"], torch.tensor(1.0), None, p["kw"].get("labels"), p["kw"].get("k_labels"),
                    p["kw"].get("label_mask"), p["kw"].get("exclude_self", False), p["kw"].get("diag_offset", 0))[4:]


def _loss(outs):
    """The fixed random linear function of the LSEs whose gradients are compared."""
    g = torch.Generator().manual_seed(0)
    return sum((torch.where(torch.isfinite(o), o, 0).double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
               for o in outs)


def g_rounding_sums(p):
    """{"dq": |G| @ |k|, "dk": |G|ᵀ @ |q|} (float64) for the exact G = ∂loss/∂S (DESIGN.md §1):
    the size of one rounding of G per term of dq = scale·G @ k, dk = scale·Gᵀ @ q (symmetric:
    dq = scale·(G + Gᵀ) @ q). S = I @ (Sᵀ)ᵀ, so the reference's gradient for keys Sᵀ is Gᵀ."""
    q = p["q"].double()
    k = q if p["k"] is None else p["k"].double()
    S = p["scale"] * q @ k.T + (0.0 if p["bias"] is None else p["bias"].double()[None, :])
    keys = S.T.clone().requires_grad_()
    one = torch.tensor(1.0, dtype=torch.float64)
    row, col = ops.similarity_lse_naive(torch.eye(q.shape[0], dtype=torch.float64), keys, one, None, *_masks(p),
                                        with_col=p["col"])
    G = torch.autograd.grad(_loss([row] + ([col] if p["col"] else [])), keys)[0].T
    return g_term_sums(G, q, None if p["k"] is None else k)


def s_max(p):
    """A bound on |S| for this problem."""
    k = p["q"] if p["k"] is None else p["k"]
    b = 0.0 if p["bias"] is None else p["bias"].abs().max().item()
    return p["scale"] * p["q"].double().norm(dim=1).max().item() * k.double().norm(dim=1).max().item() + b


@contextlib.contextmanager
def torch_tiles(col_block, rows):
    """Small tiles for the torch backend, so that small draws cross tiles and leave tails."""
    saved = tiled.COL_BLOCK, tiled.TILE_ELEMS
    tiled.COL_BLOCK, tiled.TILE_ELEMS = col_block, col_block * rows
    try:
        yield
    finally:
        tiled.COL_BLOCK, tiled.TILE_ELEMS = saved


@contextlib.contextmanager
def environment(values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def check_against_reference(p, backend):
    dtype = p["q"].dtype
    exact = _evaluate(p, "reference", torch.float64)  # from the same (rounded) inputs
    low = _evaluate(p, "eager", dtype)
    with torch_tiles(*p["tile"]), environment(p["plans"]):
        fast = _evaluate(p, backend, dtype)
    names = ["row", "col"][: 1 + p["col"]] + [n for n, t in zip(["dq", "dk", "dscale", "dbias"], [1, p["k"], 1, p["bias"]]) if t is not None]
    for name, f, l, e in zip(names, fast, low, exact):
        # Where the float64 result does not fit the dtype (a float16 gradient past 65504), the
        # reference fed that dtype overflows too: finiteness is owed where it is finite.
        finite = torch.isfinite(e) & torch.isfinite(l)
        assert torch.isfinite(f[finite]).all(), f"{name}: not finite where the reference is"
        f, l, e = f[finite], l[finite], e[finite]
        if e.numel() == 0:
            continue
        mag = e.abs().max().item()
        if dtype == torch.float64:
            # The float64 reference is the exact one (its own error is 0): the floor is the
            # rounding that |S| brings into exp(S − lse), a few float64 ulps of |S|.
            floor = 1e-12 * (1 + s_max(p)) * max(1.0, mag)
        else:
            floor = 2e-5 * max(1.0, mag)
            if name == "dscale" and dtype != torch.float32:
                # Σ_ij G_ij q_i·k_j cancels; fused kernels round G to the dtype for the tensor
                # cores, so each term carries one rounding of the dtype.
                dq = exact[names.index("dq")]
                floor += 2 * torch.finfo(dtype).eps * (dq * p["q"].double()).abs().sum().item() / p["scale"]
            if name in ("dq", "dk") and dtype != torch.float32:
                # the same one rounding of G per term of G @ k (Gᵀ @ q), which the criterion's
                # factor 2 covers on average but not in a sum of a few terms that cancel
                floor += torch.finfo(dtype).eps * p["scale"] * g_rounding_sums(p)[name].max().item()
        err, ref_err = (f - e).abs().max().item(), (l - e).abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 × {ref_err:.3g} + {floor:.3g}"


def _primitive_test(backend):
    @settings(max_examples=EXAMPLES.get(backend, 15), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(p=problems(backend))
    def test(p):
        check_against_reference(p, backend)

    return test


# One test function per backend, so Hypothesis reports each one's count of examples.
for _backend in FAST_BACKENDS:
    globals()[f"test_primitive_matches_float64_reference_{_backend}"] = _primitive_test(_backend)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 40), d=st.integers(1, 12),
    temperature=st.floats(1e-3, 10), log_norm=st.floats(-4, 4),
    which=st.sampled_from(["nt_xent", "clip_loss", "info_nce", "info_nce_unpaired"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_losses_finite_and_match_reference(n, d, temperature, log_norm, which, seed):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(s, d, generator=g) * 10**log_norm for s in (n, n, n + 3))
    call = {
        "nt_xent": lambda be, a, b, c: fastnce.nt_xent(a, b, temperature, backend=be),
        "clip_loss": lambda be, a, b, c: fastnce.clip_loss(a, b, 1 / temperature, backend=be),
        "info_nce": lambda be, a, b, c: fastnce.info_nce(a, b, temperature=temperature, backend=be),
        "info_nce_unpaired": lambda be, a, b, c: fastnce.info_nce(a, b, c, temperature=temperature, backend=be),
    }[which]
    exact = call("reference", a.double(), b.double(), c.double())
    low = call("reference", a, b, c)
    fast = call("torch", a, b, c)
    if math.isfinite(exact.item()):
        assert math.isfinite(fast.item())
        err, ref_err = abs(fast.item() - exact.item()), abs(low.item() - exact.item())
        assert err <= 2 * ref_err + 2e-5 * max(1.0, abs(exact.item()))
