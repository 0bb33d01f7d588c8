"""The `triton` backend against the reference: masks, bias, col_lse, symmetric, every gradient.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), where the
kernels use 16-row/column tiles, so the small odd shapes cross several tiles and leave tails.
On a GPU the same small tests run on CUDA tensors, plus the `gpu`-marked ones (bf16, large
shapes, triton vs torch backend).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastnce import ops
from fastnce.ops import triton_lse

from tolerances import ATOL

DEV = "cuda" if torch.cuda.is_available() else "cpu"

if ops.unavailable_reason("triton", torch.device(DEV), torch.float32) is not None:
    pytest.skip(f"triton backend unavailable: {ops.unavailable_reason('triton', torch.device(DEV), torch.float32)}",
                allow_module_level=True)

NONE = dict()
EX0 = dict(exclude_self=True)
EX3 = dict(exclude_self=True, diag_offset=3)
EXM5 = dict(exclude_self=True, diag_offset=-5)
SAME = dict(label_mask="same")
DIFF = dict(label_mask="different")
DIFF_EX = dict(label_mask="different", exclude_self=True, diag_offset=1)
MASKS = [NONE, EX0, EX3, EXM5, SAME, DIFF, DIFF_EX]
QK_SHAPES = [(1, 3, 16), (3, 17, 1), (17, 3, 33), (17, 17, 16), (130, 17, 3), (17, 130, 3)]
SYM_SHAPES = [(1, 16), (3, 1), (17, 33), (20, 3), (33, 16)]


@pytest.fixture(autouse=True)
def fixed_config(monkeypatch):
    """One config per kernel variant (GPU): autotuning every dtype × mask variant of these small
    tests would compile for many minutes. The large tests below switch tuning back on."""
    monkeypatch.setattr(triton_lse, "AUTOTUNE", False, raising=False)


def mask_id(m):
    return ",".join(f"{k}={v}" for k, v in m.items()) or "none"


def make_inputs(M, N, D, dtype, symmetric=False, bias=False, mask=None, classes=3, seed=0, device=DEV, scale=0.9):
    """q, k (None when symmetric), scale, bias, mask kwargs; q, k, bias rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(M, D, generator=g, dtype=torch.float64).to(dtype)
    k = None if symmetric else torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype) if bias else None
    kw = dict(mask or {})
    if "label_mask" in kw:
        kw["labels"] = torch.randint(0, classes, (M,), generator=g).to(device)
        if not symmetric:
            kw["k_labels"] = torch.randint(0, classes, (N,), generator=g).to(device)
    mv = lambda t: None if t is None else t.to(device)
    return mv(q), mv(k), torch.tensor(scale, device=device), mv(b), kw


def run(backend, q, k, scale, b, kw, col, as_dtype=None, seed=1, grad_sizes=(1.0, 1.0)):
    """Forward, then the gradients of a random linear function of the LSEs (float64 weights of
    sizes grad_sizes: row LSEs', column LSEs').

    as_dtype recasts the float inputs first (float64 for the exact reference).
    """
    cast = lambda t: None if t is None else (t if as_dtype is None else t.to(as_dtype)).detach().requires_grad_()
    q, k, b = cast(q), cast(k), cast(b)
    scale = scale.to(torch.float64 if as_dtype == torch.float64 else torch.float32).detach().requires_grad_()
    row, colv = ops.similarity_lse(q, k, scale, b, col_lse=col, backend=backend, **kw)
    g = torch.Generator().manual_seed(seed)
    w_row = grad_sizes[0] * torch.randn(row.shape, generator=g, dtype=torch.float64).to(row.device)
    loss = (torch.where(torch.isfinite(row), row, 0).double() * w_row).sum()
    outs = [row]
    if col:
        w_col = grad_sizes[1] * torch.randn(colv.shape, generator=g, dtype=torch.float64).to(row.device)
        loss = loss + (torch.where(torch.isfinite(colv), colv, 0).double() * w_col).sum()
        outs.append(colv)
    leaves = [t for t in (q, k, scale, b) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return outs + list(grads)


NAMES = ["row_lse", "col_lse", "dq", "dk", "dscale", "dbias"]


def names(k, b, col):
    return [n for n in NAMES if (n != "col_lse" or col) and (n != "dk" or k is not None) and (n != "dbias" or b is not None)]


def check(M, N, D, dtype, symmetric, bias, mask, col, backend="triton", floor_scale=1.0, scale=0.9,
          grad_sizes=(1.0, 1.0)):
    """backend in dtype vs the float64 reference: DESIGN §6's criterion, −inf where the reference has it."""
    q, k, s, b, kw = make_inputs(M, N, D, dtype, symmetric, bias, mask, scale=scale)
    check_inputs(q, k, s, b, kw, col, backend, floor_scale, grad_sizes)


def check_inputs(q, k, s, b, kw, col, backend="triton", floor_scale=1.0, grad_sizes=(1.0, 1.0)):
    """check() on given inputs; the gradients' floor is relative to the upstream gradients' size."""
    dtype, (M, D), N = q.dtype, q.shape, (q if k is None else k).shape[0]
    fast = run(backend, q, k, s, b, kw, col, grad_sizes=grad_sizes)
    low = run("reference", q, k, s, b, kw, col, grad_sizes=grad_sizes)
    exact = run("reference", q, k, s, b, kw, col, as_dtype=torch.float64, grad_sizes=grad_sizes)
    # Each exponential's argument S − lse carries float32's rounding of S (its dot product, the
    # scale), which the kernel's other order of summation makes differ from the reference's: a
    # relative error of eps32·|S| per term of G, beside ATOL's 1e-5 felt only at logits of
    # hundreds (scale 40 on unnormalised features; the largest |LSE| bounds the valid |S|).
    lses = [ex[torch.isfinite(ex)] for name, ex in zip(names(k, b, col), exact) if name.endswith("lse")]
    arg_rounding = torch.finfo(torch.float32).eps * max((t.abs().max().item() for t in lses if t.numel()), default=0.0)
    for name, f, lo, ex in zip(names(k, b, col), fast, low, exact):
        assert f.shape == ex.shape, name
        assert torch.isfinite(f[torch.isfinite(ex)]).all(), f"{name}: non-finite values"
        if name.endswith("lse"):
            assert torch.equal(torch.isinf(f), torch.isinf(ex)), f"{name}: −inf pattern differs"
            f, lo, ex = (torch.where(torch.isinf(ex), 0, t.double()) for t in (f, lo, ex))
        fast_err = (f.double() - ex).abs().max().item()
        ref_err = (lo.double() - ex).abs().max().item()
        size = 1.0 if name.endswith("lse") else min(grad_sizes)
        ex_max = ex.abs().max().item()
        floor = floor_scale * ATOL[dtype] * max(size, ex_max) + arg_rounding * (1.0 if name.endswith("lse") else ex_max)
        if name == "dscale" and dtype in (torch.float16, torch.bfloat16):
            # dscale = Σ_i dq_u[i]·q[i] is a sum with cancellation, and the reference computes it in
            # float32 whatever the input dtype, while a fast kernel rounds G to the input dtype for
            # the tensor-core product (as FlashAttention does with P): allow that rounding, eps of
            # the dtype relative to the sum of the magnitudes of the terms.
            dq_exact = exact[names(k, b, col).index("dq")]
            mag = (dq_exact * q.double()).sum(1).abs().sum().item() / float(s)
            floor += 2 * torch.finfo(dtype).eps * mag
        assert fast_err <= 2 * ref_err + floor, (
            f"{name} ({dtype}, {M}x{N}x{D}): error {fast_err:.3g} > 2 × reference error {ref_err:.3g} + {floor:.3g}")


# ---------------------------------------------------------------------------- interpreter / small
@pytest.mark.parametrize("M,N,D", QK_SHAPES)
def test_shapes_float32_bias_col(M, N, D):
    check(M, N, D, torch.float32, False, True, NONE, True)


@pytest.mark.parametrize("i,mask", list(enumerate(MASKS)), ids=[mask_id(m) for m in MASKS])
@pytest.mark.parametrize("bias,col", [(False, False), (True, True)], ids=["plain", "bias+col"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_masks_qk(i, mask, bias, col, dtype):
    M, N, D = QK_SHAPES[(i + 2 * bias) % len(QK_SHAPES)]
    if dtype == torch.float16 and not bias:
        M, N, D = QK_SHAPES[(i + 3) % len(QK_SHAPES)]
    check(M, N, D, dtype, False, bias, mask, col)


@pytest.mark.parametrize("i,mask", list(enumerate(MASKS)), ids=[mask_id(m) for m in MASKS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_masks_symmetric(i, mask, dtype):
    M, D = SYM_SHAPES[i % len(SYM_SHAPES)]
    bias = col = i % 2 == 1 or dtype == torch.float16
    check(M, M, D, dtype, True, bias, mask, col)


@pytest.mark.parametrize("M,D", SYM_SHAPES, ids=[f"{m}x{d}" for m, d in SYM_SHAPES])
def test_symmetric_float32_shapes(M, D):
    check(M, M, D, torch.float32, True, False, EX0, False)


def test_symmetric_many_tiles():
    """130 rows: 9 row and column tiles (tail of 2), so mirror tiles are off the diagonal."""
    check(130, 130, 3, torch.float32, True, True, DIFF_EX, True)


@pytest.mark.parametrize("symmetric", [False, True], ids=["qk", "self"])
def test_bfloat16(symmetric):
    """bf16 (upcast before tl.dot under the interpreter, DESIGN §6)."""
    check(17, 17 if symmetric else 20, 33, torch.bfloat16, symmetric, True, DIFF_EX, True)


def test_fully_masked_rows_and_columns_are_minus_inf_with_finite_gradients():
    q = torch.randn(5, 4, device=DEV, requires_grad=True)
    k = torch.randn(4, 4, device=DEV, requires_grad=True)
    labels, k_labels = torch.tensor([0, 1, 2, 3, 9], device=DEV), torch.tensor([0, 0, 1, 7], device=DEV)
    row, col = ops.similarity_lse(q, k, 2.0, labels=labels, k_labels=k_labels, label_mask="same",
                                  col_lse=True, backend="triton")
    want_row, want_col = ops.similarity_lse(q, k, 2.0, labels=labels, k_labels=k_labels, label_mask="same",
                                            col_lse=True, backend="reference")
    assert torch.isinf(row[2:]).all() and torch.isfinite(row[:2]).all()
    assert torch.isinf(col[3]) and torch.isfinite(col[:3]).all()
    torch.testing.assert_close(row, want_row)
    torch.testing.assert_close(col, want_col)
    fin = lambda t: torch.where(torch.isfinite(t), t, 0).sum()
    dq, dk = torch.autograd.grad(fin(row) + fin(col), (q, k))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert (dq[2:] == 0).all() and (dk[3] == 0).all()


def test_backward_is_deterministic(monkeypatch):
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "1")
    q, k, s, b, kw = make_inputs(33, 20, 16, torch.float32, False, True, DIFF)
    a = run("triton", q, k, s, b, kw, True)
    c = run("triton", q, k, s, b, kw, True)
    for x, y in zip(a, c):
        assert torch.equal(x, y)


def test_lse_backward_matches_torch_backend():
    """The non-autograd entry point (used by fastnce.distributed) with grad_col only."""
    q, k, s, b, kw = make_inputs(20, 17, 16, torch.float32, False, True, EX3, False)
    row, col = ops.lse_forward(q, k, s, b, col_lse=True, backend="torch", **kw)
    h = torch.randn(17, device=DEV)
    for bk in ("triton", "torch"):
        out = ops.lse_backward(q, k, s, b, row_lse=row, col_lse=col, grad_col=h, need_bias=True, backend=bk, **kw)
        if bk == "triton":
            got = out
    for x, y in zip(got, out):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_unavailable_reasons(monkeypatch):
    why = triton_lse.unavailable_reason(torch.device(DEV), torch.float64)
    assert isinstance(why, str) and "float64" in why
    with pytest.raises(ops.BackendUnavailable, match="float64"):
        ops.similarity_lse(torch.randn(3, 2, dtype=torch.float64, device=DEV), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = triton_lse.unavailable_reason(torch.device("cpu"), torch.float32)
    assert isinstance(why, str) and "TRITON_INTERPRET=1" in why
    assert triton_lse.unavailable_reason(torch.device("cuda"), torch.float16) is None


def test_opcheck_triton_backend():
    q = torch.randn(6, 5, device=DEV, requires_grad=True)
    k = torch.randn(7, 5, device=DEV, requires_grad=True)
    scale = torch.tensor(1.5, device=DEV, requires_grad=True)
    bias = torch.randn(7, device=DEV, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2], device=DEV)
    k_labels = torch.tensor([1, 1, 0, 2, 2, 0, 1], device=DEV)
    for args in [
        (q, k, scale, bias, labels, k_labels, 1, 0, True, "triton"),
        (q, None, scale, None, None, None, 0, 0, False, "triton"),
    ]:
        torch.library.opcheck(torch.ops.fastnce.similarity_lse.default, args)


def test_torch_compile_fullgraph():
    """The custom op traces whole under torch.compile (aot_eager: inductor's CPU C++ build is slow)."""
    def f(q, k, s, b):
        row, col = ops.similarity_lse(q, k, s, b, exclude_self=True, col_lse=True, backend="triton")
        return row.mean() + col.mean()

    q, k = (torch.randn(9, 4, device=DEV, requires_grad=True) for _ in range(2))
    b = torch.randn(9, device=DEV, requires_grad=True)
    s = torch.tensor(3.0, device=DEV, requires_grad=True)
    want = f(q, k, s, b)
    want_g = torch.autograd.grad(want, (q, k, s, b))
    got = torch.compile(f, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor")(q, k, s, b)
    got_g = torch.autograd.grad(got, (q, k, s, b))
    torch.testing.assert_close(got, want)
    for x, y in zip(got_g, want_g):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------------------- GPU only
gpu = pytest.mark.gpu

GPU_MASKS = [NONE, EX0, DIFF_EX, SAME]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("mask", GPU_MASKS, ids=[mask_id(m) for m in GPU_MASKS])
@pytest.mark.parametrize("symmetric", [False, True], ids=["qk", "self"])
def test_gpu_dtypes_vs_float64(dtype, mask, symmetric):
    check(1000, 1000 if symmetric else 777, 128, dtype, symmetric, True, mask, True)


@gpu
@pytest.mark.parametrize("D", [1, 33, 64, 512])
def test_gpu_odd_feature_dims(D):
    check(300, 259, D, torch.bfloat16, False, True, EX3, True)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_device_that_is_not_current(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current (a model placed with .to("cuda:1")): the
    kernels run on cuda:1 and give what they give there as the current device (bit for bit:
    the deterministic plans)."""
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "1")
    q, k, s, b, kw = make_inputs(300, 259, 64, torch.bfloat16, False, True, SAME, device="cuda:1")
    with torch.cuda.device(0):
        got = run("triton", q, k, s, b, kw, True)
    with torch.cuda.device(1):
        want = run("triton", q, k, s, b, kw, True)
    for x, y in zip(got, want):
        assert x.device == torch.device("cuda", 1)
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@gpu
def test_gpu_tf32_when_allowed(monkeypatch):
    # the API of torch >= 2.9 (after which reading the legacy allow_tf32 raises); test_cuda's
    # twin sets the legacy one
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")
    else:
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    check(512, 512, 128, torch.float32, False, False, NONE, True, floor_scale=300.0)  # tf32: ~1e-3 rel


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_gpu_large_row_lse(dtype, monkeypatch):
    """N = 65536 keys at D = 128: row LSE of 1024 queries vs float64 (S fits at 1024 rows)."""
    monkeypatch.setattr(triton_lse, "AUTOTUNE", True)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(1024, 128, device="cuda", generator=g), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(65536, 128, device="cuda", generator=g), dim=1).to(dtype)
    row, _ = ops.similarity_lse(q, k, 14.0, backend="triton")
    low, _ = ops.similarity_lse(q, k, 14.0, backend="reference")
    exact, _ = ops.similarity_lse(q.double(), k.double(), 14.0, backend="reference")
    err = (row.double() - exact).abs().max().item()
    assert err <= 2 * (low.double() - exact).abs().max().item() + 1e-4 * exact.abs().max().item()


@gpu
@pytest.mark.parametrize("symmetric", [False, True], ids=["clip", "ntxent"])
def test_gpu_large_triton_matches_torch_backend(symmetric, monkeypatch):
    """16384 rows, D = 128, bf16: forward and all gradients against the tiled torch backend."""
    monkeypatch.setattr(triton_lse, "AUTOTUNE", True)
    N, D = 16384, 128
    q, k, s, b, kw = make_inputs(N, N, D, torch.bfloat16, symmetric, not symmetric, EX0 if symmetric else NONE)
    q = torch.nn.functional.normalize(q.float(), dim=1).to(torch.bfloat16)
    k = None if k is None else torch.nn.functional.normalize(k.float(), dim=1).to(torch.bfloat16)
    s = torch.tensor(10.0, device="cuda")
    got = run("triton", q, k, s, b, kw, not symmetric)
    want = run("torch", q, k, s, b, kw, not symmetric)
    for name, x, y in zip(names(k, b, not symmetric), got, want):
        scale = y.double().abs().max().item()
        err = (x.double() - y.double()).abs().max().item()
        assert err <= 2e-2 * max(scale, 1e-6), f"{name}: {err:.3g} vs max {scale:.3g}"


@gpu
def test_gpu_backward_plan_is_timed_once_per_shape_class(monkeypatch, spy):
    """auto on a GPU times both plans once for the class, keeps the faster, and is correct."""
    monkeypatch.setattr(triton_lse, "AUTOTUNE", True)
    monkeypatch.delenv("FASTNCE_TRITON_BACKWARD", raising=False)
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "0")
    monkeypatch.setattr(triton_lse, "_plans", {})
    spy("_grad_two_pass")
    check(2000, 1500, 96, torch.bfloat16, False, True, NONE, True)
    (plan,) = [v for k, v in triton_lse.timed_plans().items() if k[0] == "backward"]
    assert plan in ("atomic", "two-pass")
    timed_calls = spy.calls["_grad_two_pass"]
    assert timed_calls >= 2  # autotune call + do_bench repetitions (+ the real one if it won)
    run("triton", *make_inputs(2000, 1500, 96, torch.bfloat16, False, True, NONE), True)
    assert spy.calls["_grad_two_pass"] == timed_calls + (plan == "two-pass")  # not timed again


@gpu
def test_gpu_symmetric_plans_are_timed_once_per_shape_class(monkeypatch):
    """auto on a GPU times the symmetric forward's and backward's plans once for the class."""
    monkeypatch.setattr(triton_lse, "AUTOTUNE", True)
    for env in ("FASTNCE_TRITON_SYM_FORWARD", "FASTNCE_TRITON_SYM_BACKWARD"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "0")
    monkeypatch.setattr(triton_lse, "_plans", {})
    check(2000, 2000, 96, torch.bfloat16, True, False, EX0, False)
    plans = {k[0]: v for k, v in triton_lse.timed_plans().items()}
    assert plans["sym-forward"] in ("rows", "half") and plans["sym-backward"] in ("mirror", "half"), plans


# ---------------------------------------------------------------------------- the GPU script's CPU parts
def test_bench_gpu_pieces(tmp_path):
    from fastnce.bench import gpu as bench

    assert bench.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.card_slug("NVIDIA H200") == "h200"
    args = bench.parse_args(["--cases", "clip-32k,simclr-16k", "--impls", "eager,inf-cl", "--out", str(tmp_path)])
    assert args.cases == ["clip-32k", "simclr-16k"] and args.impls == ["eager", "inf-cl"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "clip-2k"])
    recs = [bench.record("clip-32k", "fastnce-triton", "bf16", 12.3456, 99.96, "h100"),
            bench.record("clip-1m", "inf-cl", "bf16", None, None, "h100", "skipped: too slow")]
    path = bench.write_records(recs, str(tmp_path), "h100", "2026-01-02")
    assert path.endswith("gpu-h100-2026-01-02.json")
    import json
    got = json.load(open(path))
    assert got[0] == {"case": "clip-32k", "impl": "fastnce-triton", "dtype": "bf16", "ms": 12.346,
                      "peak_mib": 100.0, "card": "h100"}
    assert got[1]["ms"] is None and got[1]["note"] == "skipped: too slow"
    assert bench.fused_flops("simclr-16k") == 4 * 2.0 * 32768**2 * 128
    assert "fastnce-triton" in bench.format_table(recs, 700.0)
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed

    # a records file that does not parse is kept aside, never overwritten by an --append run
    bad = tmp_path / "gpu-h100-2026-01-03.json"
    bad.write_text('[{"case": "clip-32k", "ms": 1')
    assert bench._load(str(bad), []) == [] and not bad.exists()
    assert (tmp_path / "gpu-h100-2026-01-03.json.unreadable").read_text().startswith('[{"case"')
    assert bench._load(str(tmp_path / "none.json"), {}) == {}
    if not torch.cuda.is_available():
        assert bench.main([]) == 2  # says it needs a GPU


def test_panel_count_from_the_environment(monkeypatch):
    """FASTNCE_TRITON_PANELS fixes the panel count per call (the GPU bench's check of a panel
    that owns several row blocks sets it between checks)."""
    if triton_lse.unavailable_reason("cpu", torch.float32) is not None:
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    cpu = torch.device("cpu")
    assert triton_lse._panels(2048, 2048, cpu) == 4
    monkeypatch.setenv("FASTNCE_TRITON_PANELS", "3")
    assert triton_lse._panels(2048, 2048, cpu) == 3


def test_bench_gpu_order_puts_the_must_shows_first():
    """A run cut short by its deadline keeps the issues' must-shows: the fused impls up to 128k,
    then Inf-CL and torch.compile up to 32k (their anchors), then clip-1m, then the rest."""
    from fastnce.bench import gpu as bench

    order = bench.run_order(list(bench.IMPLS), list(bench.DEFAULT_CASES))
    assert sorted(order) == sorted((i, c) for i in bench.IMPLS for c in bench.DEFAULT_CASES)
    at = {pair: n for n, pair in enumerate(order)}
    must = [(i, c) for i in bench.FUSED for c in ("simclr-16k", "clip-32k", "clip-128k")]
    anchors = [("inf-cl", "clip-32k"), ("inf-cl", "clip-128k"), ("torch.compile", "simclr-16k"),
               ("torch.compile", "clip-32k")]
    assert max(at[p] for p in must) < min(at[p] for p in anchors)
    assert max(at[p] for p in anchors) < at[("fastnce-triton", "clip-1m")]
    assert at[("fastnce-triton", "clip-1m")] < min(at[p] for p in at if p[0] == "eager")
    assert order[0] == ("fastnce-triton", "simclr-16k")


# ---------------------------------------------------------------------------- one-pass forward (panels)
# The forward with col_lse runs one pass over S: P programs ("panels"), each owning the row
# blocks p, p + P, …, keep per-column partial (max, sum-exp) rows merged afterwards. Under the
# interpreter the row blocks are 16 rows, so M = 130 has 9 of them.
PANEL_CASES = [  # (M, N, D, panels): P = 1, P < #row blocks (several blocks a panel), P > #row blocks
    (130, 17, 3, 1), (130, 17, 3, 2), (17, 130, 3, 4), (1, 3, 16, 1), (3, 17, 1, 3), (17, 17, 16, 12),
    (130, 130, 17, None),
]


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of triton_lse functions: spy('name') wraps it, spy.calls['name'] counts."""
    calls = {}

    def wrap(name):
        fn = getattr(triton_lse, name)
        calls[name] = 0

        def counted(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        monkeypatch.setattr(triton_lse, name, counted)

    wrap.calls = calls
    return wrap


@pytest.mark.parametrize("i,mask", list(enumerate(MASKS)), ids=[mask_id(m) for m in MASKS])
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
def test_panel_forward_masks(i, mask, bias, monkeypatch, spy):
    M, N, D, panels = PANEL_CASES[(i + 3 * bias) % len(PANEL_CASES)]
    monkeypatch.setattr(triton_lse, "PANELS", panels)
    spy("_lse_panel")
    check(M, N, D, torch.float32, False, bias, mask, True)
    assert spy.calls["_lse_panel"] == 1


@pytest.mark.parametrize("M,N,D,panels", PANEL_CASES, ids=[f"{m}x{n}x{d}-P{p}" for m, n, d, p in PANEL_CASES])
def test_panel_forward_shapes_match_transposed(M, N, D, panels, monkeypatch):
    """The one-pass forward against the reference (float64) and the two-pass one it replaces."""
    monkeypatch.setattr(triton_lse, "PANELS", panels)
    q, k, s, b, kw = make_inputs(M, N, D, torch.float32, False, True, DIFF_EX, classes=2)
    row, col = ops.similarity_lse(q, k, s, b, col_lse=True, backend="triton", **kw)
    want_row, want_col = ops.similarity_lse(q.double(), k.double(), s.double(), b.double(), col_lse=True,
                                            backend="reference", **kw)
    torch.testing.assert_close(row.double(), want_row, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col.double(), want_col, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(triton_lse, "COL_LSE", "transposed")
    row2, col2 = ops.similarity_lse(q, k, s, b, col_lse=True, backend="triton", **kw)
    assert torch.equal(row, row2)  # same tiles, same order
    torch.testing.assert_close(col, col2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("panels", [1, 3])
def test_panel_forward_fully_masked_and_nan(panels, monkeypatch):
    monkeypatch.setattr(triton_lse, "PANELS", panels)
    q, k = torch.randn(40, 8, device=DEV), torch.randn(20, 8, device=DEV)
    labels = torch.arange(40, device=DEV) % 5
    k_labels = torch.arange(20, device=DEV) % 4 + 2  # classes 2..5: rows of class 0, 1 and column class 5 empty
    kw = dict(labels=labels, k_labels=k_labels, label_mask="same", col_lse=True)
    row, col = ops.similarity_lse(q, k, 2.0, backend="triton", **kw)
    want_row, want_col = ops.similarity_lse(q, k, 2.0, backend="reference", **kw)
    assert torch.isinf(col[k_labels == 5]).all() and torch.isinf(row[labels < 2]).all()
    torch.testing.assert_close(row, want_row)
    torch.testing.assert_close(col, want_col)
    # a NaN in one key: every row LSE is NaN, and that key's column LSE; the others are not
    k[7, 3] = float("nan")
    row, col = ops.similarity_lse(q, k, 2.0, col_lse=True, backend="triton")
    assert torch.isnan(row).all()
    assert torch.isnan(col[7]) and torch.isfinite(col[torch.arange(20) != 7]).all()


def test_panel_symmetric_with_col(monkeypatch, spy):
    """NT-Xent-style self-similarity with col_lse also takes the one-pass forward."""
    monkeypatch.setattr(triton_lse, "PANELS", 2)
    spy("_lse_panel")
    check(33, 33, 16, torch.float32, True, True, EX0, True)
    assert spy.calls["_lse_panel"] == 1


def test_panel_count():
    """Off the interpreter's small fixed count: P·N·8 ≤ 64 MiB, P ≥ #SMs where 256 MiB allows."""
    P = triton_lse._panels(32768, 32768, torch.device(DEV))
    assert P >= 1 and P * 32768 * 8 <= 256 << 20
    if DEV == "cuda":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert sms <= P <= 4 * sms and triton_lse._panels(32768, 1 << 20, torch.device(DEV)) == 0


@pytest.mark.parametrize("sms", [1, 8, 132])
@pytest.mark.parametrize("M,N", [(64, 100), (32768, 32768), (1 << 20, 1 << 14), (32768, 254_000), (32768, 255_000),
                                 (4096, 1 << 20), (1 << 20, 1 << 20)])
def test_panel_count_on_a_stand_in_gpu(M, N, sms, monkeypatch):
    """_panels' GPU branch on any machine (a stand-in device of `sms` multiprocessors): the
    partials fit in 256 MiB, no more programs than row blocks or 4 a multiprocessor, never
    fewer than the multiprocessors (or row blocks) to save memory, and the transposed pass (0)
    only where even that many would not fit. At N = 32768 on 132 SMs: 256 panels (64 MiB)."""
    import types

    monkeypatch.setattr(triton_lse, "_INTERPRET", False)
    monkeypatch.setattr(triton_lse, "PANELS", None)
    monkeypatch.delenv("FASTNCE_TRITON_PANELS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=sms))
    P = triton_lse._panels(M, N, torch.device("cuda"))
    blocks = -(-M // triton_lse._PANEL_MIN_BM)
    fewest = min(sms, blocks)
    if P == 0:
        assert fewest * N * 8 > 256 << 20
    else:
        assert fewest <= P <= min(blocks, 4 * sms) and P * N * 8 <= 256 << 20
    if (M, N, sms) == (32768, 32768, 132):
        assert P == 256


# ---------------------------------------------------------------------------- backward: one recompute or two
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("i,mask", list(enumerate([NONE, EXM5, SAME, DIFF_EX])), ids=["none", "ex-5", "same", "diff-ex1"])
def test_backward_paths(i, mask, dtype, det, monkeypatch, spy):
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "1" if det else "0")
    spy("_grad_atomic")
    M, N, D = [(130, 17, 3), (17, 130, 33), (3, 17, 16), (17, 17, 33)][i]
    check(M, N, D, dtype, False, True, mask, True)
    assert spy.calls["_grad_atomic"] == (0 if det else 1)


def test_backward_row_only_atomic(spy):
    """grad_row only (no col_lse): the one-recompute path with HAS_H off, over 2 feature blocks."""
    spy("_grad_atomic")
    check(33, 20, 40, torch.float32, False, False, EX3, False)
    assert spy.calls["_grad_atomic"] == 1


@pytest.mark.parametrize("plan", ["atomic", "two-pass"])
def test_backward_plan_forced_by_environment(plan, monkeypatch, spy):
    """FASTNCE_TRITON_BACKWARD picks the plan, whatever D; both give the reference's gradients."""
    monkeypatch.setenv("FASTNCE_TRITON_BACKWARD", plan)
    spy("_grad_atomic")
    spy("_grad_two_pass")
    check(40, 29, 300, torch.float32, False, True, EX3, True)
    assert spy.calls["_grad_atomic"] == (plan == "atomic")
    assert spy.calls["_grad_two_pass"] == (plan == "two-pass")


@pytest.mark.parametrize("D,plan", [(256, "atomic"), (257, "two-pass")])
def test_backward_plan_untimed_follows_feature_dim(D, plan, monkeypatch):
    """Without timing (no GPU autotuning): one recompute up to D = 256, two passes above, where
    the one-recompute kernel's candidates are small or spill on sm_90."""
    monkeypatch.delenv("FASTNCE_TRITON_BACKWARD", raising=False)
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "0")
    q = torch.zeros(3, D)
    args = (q, q, None, None, None, None, 0, None, q[:, 0], q[:, 0], None, None, False)
    assert triton_lse._backward_plan(args) == plan


def test_backward_plan_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("FASTNCE_TRITON_BACKWARD", "fast")
    q, k, s, b, kw = make_inputs(5, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="FASTNCE_TRITON_BACKWARD.*'fast'"):
        run("triton", q, k, s, b, kw, True)


def test_autotuning_past_the_largest_size_class_runs_first_on_a_slice(monkeypatch):
    """A first call past _TUNE_MOST rows runs once on the leading rows (same class, so the
    autotuner's choice carries over), then never again for that class."""
    monkeypatch.setattr(triton_lse, "AUTOTUNE", True)
    monkeypatch.setattr(triton_lse, "_TUNE_MOST", 8)
    monkeypatch.setattr(triton_lse, "_tuned_on_slice", set())
    seen = []
    run = lambda a: seen.append([None if not isinstance(t, torch.Tensor) else tuple(t.shape) for t in a])
    q, k, b = torch.zeros(20, 4), torch.zeros(30, 4), torch.zeros(30)
    args = (q, k, torch.tensor(1.0), b, None, None, 0, None, torch.zeros(20), torch.zeros(20))
    triton_lse._tune_on_slice(("x",), run, args)
    assert seen == [[(8, 4), (8, 4), (), (8,), None, None, None, None, (8,), (8,)]]
    triton_lse._tune_on_slice(("x",), run, args)  # tuned: not again
    triton_lse._tune_on_slice(("x",), run, (q[:8], k[:8]) + args[2:])  # small: no slice
    assert len(seen) == 1
    triton_lse._tune_on_slice(("y",), run, args)  # another kernel kind
    assert len(seen) == 2


# ---------------------------------------------------------------------------- backward: one exponential or two
ONE_EXP_CASES = [(70, 70, 24, True, EX0), (70, 70, 24, True, DIFF_EX), (70, 53, 24, False, NONE),
                 (53, 70, 24, False, SAME)]


@pytest.mark.parametrize("spread", [40.0, -1.0], ids=["shared-exp", "own-exps"])
@pytest.mark.parametrize("col", [True, False], ids=["row+col", "row"])
@pytest.mark.parametrize("case", ONE_EXP_CASES, ids=["self-ex0", "self-diff-ex1", "qk", "qk-same"])
def test_backward_terms_with_shared_or_own_exponentials(case, col, spread, monkeypatch):
    """The backward's G from one exponential per entry (tile LSEs within ONE_EXP_SPREAD; float16
    inputs), and with that switched off (-1: one exponential per term), both vs float64."""
    monkeypatch.setattr(triton_lse, "ONE_EXP_SPREAD", spread)
    assert triton_lse._spread(torch.float16) == spread
    M, N, D, symmetric, mask = case
    for plan in ("atomic", "two-pass"):
        monkeypatch.setenv("FASTNCE_TRITON_BACKWARD", plan)
        check(M, N, D, torch.float16, symmetric, False, mask, col)


def test_full_fp32_products_never_share_an_exponential():
    """A shared exponential's rounding grows with the spread (up to 40·2⁻²⁴ in G): fine beside
    16-bit or tf32 products, not beside fp32 ones (it showed in the scale gradient)."""
    assert triton_lse._spread(torch.float32) == -1.0
    assert triton_lse._spread(torch.bfloat16) == triton_lse._spread(torch.float16) == triton_lse.ONE_EXP_SPREAD
    check(48, 48, 24, torch.float32, True, False, SAME, True)  # failed its dscale bound when shared


@pytest.mark.parametrize("symmetric", [True, False], ids=["self", "qk"])
def test_backward_wide_lse_spread_keeps_own_exponentials(symmetric):
    """Scale 40 on unnormalised features: a tile's LSEs lie hundreds apart, past ONE_EXP_SPREAD,
    where one shared exponential would underflow and lose whole rows."""
    check(70, 70 if symmetric else 53, 24, torch.float16, symmetric, False, EX0 if symmetric else NONE, True,
          scale=40.0)


@pytest.mark.parametrize("plan", ["atomic", "two-pass", "mirror", "half"])
@pytest.mark.parametrize("grad_sizes,col", [((1e-6, 1e-6), True), ((1e-4, 1e3), True), ((1e-6, 1e-6), False)],
                         ids=["small", "small-row-large-col", "small-row-only"])
def test_float16_backward_for_upstream_gradients_of_any_size(grad_sizes, col, plan, monkeypatch):
    """float16: G is scaled by 1 / max(|g|, |h|) before its cast for the second product, so that
    small upstream gradients (a mean over a large batch, no loss scaling) do not underflow to
    float16's subnormals, and row and column gradients of very different sizes do not overflow
    it; the gradients' floor relative to their size."""
    symmetric = plan in ("mirror", "half")
    monkeypatch.setenv("FASTNCE_TRITON_SYM_BACKWARD" if symmetric else "FASTNCE_TRITON_BACKWARD", plan)
    check(53, 53 if symmetric else 41, 24, torch.float16, symmetric, not symmetric, EX0 if symmetric else SAME, col,
          grad_sizes=grad_sizes)


def _along_one_direction(norms, D, seed, dtype):
    """Rows of the given norms close to one direction: S ≈ scale·n_i·n_j, so rows of one norm
    have LSEs within a few units of each other, and rows of other norms lie far from them."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g, dtype=torch.float64)
    x = u + 0.1 * u.norm() / D ** 0.5 * torch.randn(len(norms), D, generator=g, dtype=torch.float64)
    return (torch.as_tensor(norms, dtype=torch.float64)[:, None] * x / x.norm(dim=1, keepdim=True)).to(dtype).to(DEV)


@pytest.mark.parametrize("plan", ["mirror", "half"])
@pytest.mark.parametrize("col", [False, True], ids=["row", "row+col"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_symmetric_backward_tiles_of_close_rows_and_far_columns(dtype, col, plan, monkeypatch):
    """k is q (NT-Xent), rows in blocks of 16 of norms 3, 0.3 and 1 along one direction at scale
    40: each block's LSEs lie within a few units, the blocks' hundreds apart. Whether a tile's
    terms share one exponential is judged on its rows' LSEs and its columns': from the rows'
    alone the columns' terms overflow."""
    monkeypatch.setenv("FASTNCE_TRITON_SYM_BACKWARD", plan)
    q = _along_one_direction([3.0] * 16 + [0.3] * 16 + [1.0] * 16, 24, 0, dtype)
    check_inputs(q, None, torch.tensor(40.0, device=DEV), None, EX0, col)


@pytest.mark.parametrize("plan", ["atomic", "two-pass"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_backward_column_lses_far_below_the_rows(dtype, plan, monkeypatch):
    """CLIP's row and column LSEs: queries of norm 1 and keys of norms −3 … 3 along one direction
    at scale 40: every row LSE lies near 120, the column LSEs spread down to −120."""
    monkeypatch.setenv("FASTNCE_TRITON_BACKWARD", plan)
    a = torch.linspace(-3, 3, 29, dtype=torch.float64)
    x = _along_one_direction([1.0] * 37 + a.abs().tolist(), 24, 0, torch.float64)
    q, k = x[:37].to(dtype), (x[37:] * a.sign().to(DEV)[:, None]).to(dtype)
    check_inputs(q, k, torch.tensor(40.0, device=DEV), None, NONE, True)


def _forward_against_reference(q, k, scale, bias, kw, col):
    """The triton backend's row (and column) LSEs of q, k (in their dtype; k None: k is q) with
    a float64 scale and bias taken as float32, against the float64 reference on the same values."""
    mv = lambda t: t.to(DEV) if torch.is_tensor(t) else t
    bias = None if bias is None else bias.float()
    got = ops.similarity_lse(mv(q), mv(k), mv(scale.float()), mv(bias), col_lse=col, backend="triton",
                             **{n: mv(v) for n, v in kw.items()})
    f64 = lambda t: None if t is None else t.double()
    want = ops.similarity_lse(f64(q), f64(k), f64(scale.float()), f64(bias), col_lse=col, backend="reference", **kw)
    assert torch.isfinite(want[0]).all()
    for g, w in list(zip(got, want))[: 1 + col]:
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", ["rows", "panel", "transposed", "half"])
@pytest.mark.parametrize("level", ["high", "low"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_forward_logits_far_from_zero_with_lines_masked_a_whole_tile(path, level, dtype, monkeypatch):
    """Logits near +100 (CLIP's logit scale, NT-Xent at τ = 0.01) or near −150 (soft nearest
    neighbours' bias −‖k‖²/T at T = 0.01), labels in runs of 16 rows, so that whole tiles of a
    line are masked while other lines of the tile are not: the online (max, sum) merge of such a
    line keeps its running max (not the tile's shift: 0 or the tile's top) and does not scale
    its empty sum by an overflowing e^(shift − max) (0·inf). Every forward path."""
    monkeypatch.setattr(triton_lse, "PANELS", 2)
    monkeypatch.setattr(triton_lse, "COL_LSE", "transposed" if path == "transposed" else "panel")
    monkeypatch.setenv("FASTNCE_TRITON_SYM_FORWARD", "half" if path == "half" else "rows")
    g = torch.Generator().manual_seed(3)
    M, N, D = 64, 48, 4
    u = torch.randn(D, generator=g, dtype=torch.float64)
    unit = lambda n: torch.nn.functional.normalize(u / u.norm() + 0.15 * torch.randn(n, D, generator=g,
                                                                                      dtype=torch.float64), dim=1)
    q, k = unit(M), None if path == "half" else unit(N)
    kw = dict(labels=(torch.arange(M) // 16) % 3, label_mask="same")
    if k is not None:
        kw["k_labels"] = (torch.arange(N) // 16 + 1) % 3
    scale, bias = torch.tensor(100.0, dtype=torch.float64), None
    if level == "low":  # S near −150: by a bias (k given), or by a negative scale (k is q, no bias)
        if k is None:
            scale = torch.tensor(-150.0, dtype=torch.float64)
        else:
            bias = torch.full((N,), -250.0, dtype=torch.float64)
    _forward_against_reference(q.to(dtype), None if k is None else k.to(dtype), scale, bias, kw,
                               col=path in ("panel", "transposed"))


@pytest.mark.parametrize("side", ["columns", "rows"])
@pytest.mark.parametrize("panels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_panel_forward_line_maxima_far_apart_on_one_side_only(side, panels, dtype, monkeypatch):
    """Every third column (a bias of −200: soft nearest neighbours' −‖k‖²/T with keys of unequal
    norms) or every third row (a query of norm 0.01 among queries of norm 1 near one direction,
    scale 200) far below the others: a tile's maxima lie close along one side and far apart
    along the other, so the two sides' sums must not share one exponential (the low lines'
    terms would underflow: an LSE of −inf)."""
    monkeypatch.setattr(triton_lse, "PANELS", panels)
    g = torch.Generator().manual_seed(5)
    M, N, D = 40, 37, 8
    if side == "columns":
        q = torch.randn(M, D, generator=g, dtype=torch.float64)
        k = torch.randn(N, D, generator=g, dtype=torch.float64)
        bias = torch.where(torch.arange(N) % 3 == 0, -200.0, 0.0) + torch.randn(N, generator=g, dtype=torch.float64)
        scale = torch.tensor(0.5, dtype=torch.float64)
    else:
        q = _along_one_direction(torch.where(torch.arange(M + N) % 3 == 0, 0.01, 1.0), D, 5, torch.float64).cpu()
        q, k = q[:M], q[M:] / q[M:].norm(dim=1, keepdim=True)
        bias = torch.randn(N, generator=g, dtype=torch.float64)
        scale = torch.tensor(200.0, dtype=torch.float64)
    _forward_against_reference(q.to(dtype), k.to(dtype), scale, bias, {}, col=True)


@pytest.mark.parametrize("D", [24, 32, 40], ids=["one-k", "one-k-full", "k-loop"])
@pytest.mark.parametrize("dqc", [16, 32], ids=["dq-chunks", "dq-whole"])
def test_single_k_step_and_dq_chunks(D, dqc, monkeypatch):
    """D ≤ BK (32 under the interpreter) takes the one-K-step kernels (held operand, the tile
    rows reused for the second product); the atomic kernel's dq in chunks of DQC or whole."""
    from triton_checks import with_meta

    with_meta(monkeypatch, triton_lse, ("atomic",), DQC=dqc)
    monkeypatch.setenv("FASTNCE_TRITON_BACKWARD", "atomic")
    check(37, 29, D, torch.float32, False, True, EX3, True)
    check(37, 37, D, torch.float16, True, False, DIFF_EX, True)


@pytest.mark.parametrize("plan", ["atomic", "two-pass"])
@pytest.mark.parametrize("D", [8, 32], ids=["one-k-short", "one-k-full"])
def test_single_k_step_with_feature_blocks_wider_than_it(D, plan, monkeypatch):
    """One K step (D ≤ BK = 32) with feature blocks BDV = 64 > BK, as a GPU's configs have for
    D ≤ 32: the second product loads its (BN, BDV) features rather than reusing the S tile's
    (BN, BK) ones. Both plans, and the mirrored symmetric backward."""
    from triton_checks import with_meta

    with_meta(monkeypatch, triton_lse, ("bwd", "atomic"), BDV=64)
    monkeypatch.setenv("FASTNCE_TRITON_BACKWARD", plan)
    monkeypatch.setenv("FASTNCE_TRITON_SYM_BACKWARD", "mirror")
    check(37, 29, D, torch.float32, False, True, EX3, True)
    check(37, 37, D, torch.float16, True, True, DIFF_EX, True)


# ---------------------------------------------------------------------------- symmetric forward: all tiles or half
HALF_MASKS = [NONE, EX0, SAME, DIFF, dict(label_mask="different", exclude_self=True)]


@pytest.mark.parametrize("plan", ["half", "rows"])
@pytest.mark.parametrize("M,D", [(1, 8), (16, 16), (17, 33), (48, 24), (63, 40), (100, 16)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("i,mask", list(enumerate(HALF_MASKS)), ids=[mask_id(m) for m in HALF_MASKS])
def test_symmetric_forward_plans(i, mask, M, D, plan, monkeypatch, spy):
    """Row LSE (and col = row) of a symmetric S from every tile, or from the tiles on and above
    the diagonal (odd and even block counts, a program owning several block pairs), vs float64."""
    monkeypatch.setenv("FASTNCE_TRITON_SYM_FORWARD", plan)
    spy("_lse_half")
    dtype = torch.float16 if (i + M) % 3 == 0 else torch.float32
    check(M, M, D, dtype, True, False, mask, i % 2 == 0)
    assert spy.calls["_lse_half"] == (plan == "half")


@pytest.mark.parametrize("panels", [1, 2, 5])
def test_half_forward_any_program_count_and_wide_spread(panels, monkeypatch):
    """Any number of programs gives the same LSEs; scale 40 on unnormalised features puts a
    tile's line maxima far apart, where the shared exponential must not be used."""
    monkeypatch.setattr(triton_lse, "_half_panels", lambda M, device: panels)
    for dtype in (torch.float32, torch.float16):  # one exponential per sum, or shared where allowed
        check(70, 70, 24, dtype, True, False, EX0, True)
        check(70, 70, 24, dtype, True, False, EX0, True, scale=40.0)


def test_half_forward_nan_and_fully_masked_rows(monkeypatch):
    monkeypatch.setenv("FASTNCE_TRITON_SYM_FORWARD", "half")
    q = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 7
    labels[5] = 99  # alone in its class: with label_mask="same" and exclude_self, fully masked
    row, _ = ops.similarity_lse(q, None, 1.0, labels=labels, label_mask="same", exclude_self=True,
                                backend="triton")
    ref, _ = ops.similarity_lse(q.double(), None, 1.0, labels=labels, label_mask="same", exclude_self=True,
                                backend="reference")
    assert row[5] == float("-inf") and torch.isfinite(row[torch.arange(40) != 5]).all()
    torch.testing.assert_close(row.double(), ref, rtol=1e-5, atol=1e-5)
    q[17, 3] = float("nan")
    row, _ = ops.similarity_lse(q, None, 1.0, backend="triton")
    assert torch.isnan(row).all()


# ---------------------------------------------------------------------------- symmetric backward: every tile or half
@pytest.mark.parametrize("M,D", [(1, 8), (16, 16), (17, 33), (48, 24), (63, 40), (100, 16)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("i,mask", list(enumerate(HALF_MASKS)), ids=[mask_id(m) for m in HALF_MASKS])
def test_symmetric_backward_from_half_the_tiles(i, mask, M, D, monkeypatch, spy):
    """(G + Gᵀ) @ q from the tiles on and above the diagonal with atomics for the J side (odd and
    even block counts; one K step with the feature tiles reused or reloaded, and a loop over
    D; row and row + col gradients; float32, float16 with G scaled, bfloat16) vs float64."""
    monkeypatch.setenv("FASTNCE_TRITON_SYM_BACKWARD", "half")
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "0")
    spy("_grad_half")
    dtype = (torch.float32, torch.float16, torch.bfloat16)[(i + M) % 3]
    check(M, M, D, dtype, True, False, mask, i % 2 == 0)
    assert spy.calls["_grad_half"] == 1


@pytest.mark.parametrize("plan", ["half", "mirror"])
def test_symmetric_backward_of_the_column_lse_alone(plan, monkeypatch):
    """Only col_lse (= row_lse) gets a gradient: G's column terms alone (HAS_G off)."""
    monkeypatch.setenv("FASTNCE_TRITON_SYM_BACKWARD", plan)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(45, 20, generator=g)
    w = torch.randn(45, generator=g, dtype=torch.float64)
    grads = []
    for backend, x in (("triton", q), ("reference", q.double())):
        x = x.clone().requires_grad_()
        s = torch.tensor(0.7, dtype=x.dtype, requires_grad=True)
        _, col = ops.similarity_lse(x, None, s, col_lse=True, exclude_self=True, backend=backend)
        grads.append(torch.autograd.grad((col.double() * w).sum(), (x, s)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [0.9, 40.0], ids=["shared-exp", "wide-spread"])
def test_symmetric_backward_half_with_shared_or_own_exponentials(scale, monkeypatch):
    """float16: one exponential for G and its mirror where the tile's LSEs lie within
    ONE_EXP_SPREAD; scale 40 on unnormalised features puts them far apart (one each)."""
    monkeypatch.setenv("FASTNCE_TRITON_SYM_BACKWARD", "half")
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "0")
    check(70, 70, 24, torch.float16, True, False, EX0, True, scale=scale)


@pytest.mark.parametrize("case", ["bias", "offset", "wide", "deterministic"])
def test_symmetric_backward_half_only_where_it_applies(case, monkeypatch, spy):
    """The half plan needs a symmetric S (no bias, only self-pairs excluded), D ≤ 128 (its
    registers) and atomics (not in deterministic mode); elsewhere the mirror runs, as asked."""
    monkeypatch.setenv("FASTNCE_TRITON_SYM_BACKWARD", "half")
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "1" if case == "deterministic" else "0")
    spy("_grad_half")
    spy("_grad_symmetric")
    check(20, 20, 129 if case == "wide" else 16, torch.float32, True, case == "bias", EX3 if case == "offset" else EX0,
          False)
    assert (spy.calls["_grad_half"], spy.calls["_grad_symmetric"]) == (0, 1)


def test_deterministic_mode_is_bit_for_bit(monkeypatch, spy):
    spy("_grad_atomic")
    q, k, s, b, kw = make_inputs(130, 47, 33, torch.float16, False, True, DIFF)
    monkeypatch.setattr(triton_lse, "PANELS", 3)
    torch.use_deterministic_algorithms(True)
    try:
        assert triton_lse.deterministic()
        a = run("triton", q, k, s, b, kw, True)
        c = run("triton", q, k, s, b, kw, True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert spy.calls["_grad_atomic"] == 0
    for x, y in zip(a, c):
        assert torch.equal(x, y)


# ---------------------------------- races between programs, accesses past tensors (interpreter)
RACE_CASES = {
    # name: (M, N (None: k is q), D, mask, col_lse, bias, frozen, environment)
    "clip-atomic": (40, 37, 40, SAME, True, True, (), dict(FASTNCE_TRITON_BACKWARD="atomic")),
    "clip-two-pass": (40, 37, 40, DIFF_EX, True, True, (), dict(FASTNCE_TRITON_BACKWARD="two-pass")),
    # more keys than queries, each plan (the dk launch's rows and columns swap sizes)
    "wide-atomic": (21, 50, 40, EX3, True, True, (), dict(FASTNCE_TRITON_BACKWARD="atomic")),
    "wide-two-pass": (21, 50, 40, SAME, True, True, (), dict(FASTNCE_TRITON_BACKWARD="two-pass")),
    "ntxent-rows-mirror": (40, None, 40, EX0, False, False, (),
                           dict(FASTNCE_TRITON_SYM_FORWARD="rows", FASTNCE_TRITON_SYM_BACKWARD="mirror")),
    "ntxent-half-half": (40, None, 40, SAME | EX0, False, False, (),
                         dict(FASTNCE_TRITON_SYM_FORWARD="half", FASTNCE_TRITON_SYM_BACKWARD="half")),
    "queue-frozen": (20, 70, 40, NONE, False, False, ("k",), dict(FASTNCE_TRITON_BACKWARD="two-pass")),
    "tower-frozen": (37, 40, 24, NONE, True, True, ("q",), dict(FASTNCE_TRITON_BACKWARD="atomic")),
}


def _lse_through_triton(q, k, s, b, kw, col, frozen=(), scale_grad=True):
    """The triton forward and the backward of Σ row LSE + 0.7 Σ column LSE (finite entries) on
    fresh leaves of q, k, b (wanting a gradient unless named in frozen) and s (if scale_grad).
    Returns [row, col, then the gradients of s, q, k, b that were wanted]."""
    sc = s.detach().clone().requires_grad_(scale_grad)
    q, k, b = (None if t is None else t.detach().clone().requires_grad_(n not in frozen)
               for t, n in ((q, "q"), (k, "k"), (b, "b")))
    row, colv = ops.similarity_lse(q, k, sc, b, col_lse=col, backend="triton", **kw)
    loss = torch.where(torch.isfinite(row), row, 0).sum()
    if col:
        loss = loss + torch.where(torch.isfinite(colv), colv, 0).mul(0.7).sum()
    if loss.requires_grad:
        loss.backward()
    return [row, colv] + [t.grad for t in (sc, q, k, b) if t is not None and t.requires_grad]


@pytest.mark.skipif(not triton_lse._INTERPRET, reason="checks the interpreter's sequential programs")
@pytest.mark.parametrize("name", list(RACE_CASES))
def test_programs_of_a_launch_do_not_race(name, monkeypatch):
    """Every launch of a forward and backward, each plan: no address is stored by two programs,
    stored by one and loaded by another, or updated atomically by one and accessed plainly by
    another, and none lies outside the launch's tensors (tests/triton_checks.py). The
    interpreter runs the programs in turn and reads host memory anywhere, so such a race or
    overrun gives the right values here and, on a GPU, the timing's values or a fault."""
    from triton_checks import checked_launches

    M, N, D, mask, col, use_bias, frozen, env = RACE_CASES[name]
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    q, k, s, b, kw = make_inputs(M, N, D, torch.float32, N is None, use_bias, mask)
    with checked_launches() as report:
        _lse_through_triton(q, k, s, b, kw, col, frozen)
    assert report.state["launches"] >= 2
    assert report.found == []


@pytest.mark.skipif(not triton_lse._INTERPRET, reason="checks the interpreter's sequential programs")
@pytest.mark.parametrize("plan", ["atomic", "two-pass"])
def test_siglip_programs_do_not_race(plan, monkeypatch):
    from triton_checks import checked_launches

    monkeypatch.setenv("FASTNCE_TRITON_BACKWARD", plan)
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "0")
    q, k, s, b, _ = make_inputs(40, 37, 40, torch.float32, False, False)
    q.requires_grad_(), k.requires_grad_()
    s = s.clone().requires_grad_()
    bias = torch.tensor(-1.0, requires_grad=True)
    with checked_launches() as report:
        ops.similarity_sigmoid_nll(q, k, s, bias, backend="triton").sum().backward()
    assert report.state["launches"] >= 2
    assert report.found == []


@pytest.mark.skipif(not triton_lse._INTERPRET, reason="checks the interpreter's sequential programs")
def test_race_detector_sees_each_kind_of_race():
    """A kernel whose programs all store to one address, one that reads its neighbour's output,
    one that adds atomically where another program stores, one that reads an element past its
    tensor: each reported, by name; one that keeps to its own elements, not."""
    import triton
    import triton.language as tl
    from triton_checks import checked_launches

    @triton.jit
    def every_program_writes_zero(p_out):
        tl.store(p_out, tl.program_id(0).to(tl.float32))

    @triton.jit
    def reads_the_neighbours(p_out):
        i = tl.program_id(0)
        tl.store(p_out + i, tl.load(p_out + (i + 1) % 4) + 1.0)

    @triton.jit
    def adds_where_another_stores(p_out):
        i = tl.program_id(0)
        if i == 0:
            tl.store(p_out, 1.0)
        else:
            tl.atomic_add(p_out, 1.0)

    @triton.jit
    def reads_past_the_end(p_out):
        i = tl.program_id(0)
        o = i * 4 + tl.arange(0, 4)
        tl.store(p_out + o, tl.load(p_out + o, mask=o < 6) * 0.0, mask=o < 5)

    @triton.jit
    def each_its_own(p_out):
        i = tl.program_id(0)
        tl.store(p_out + i, tl.load(p_out + i) + 1.0)
        tl.atomic_add(p_out + 4, 1.0)

    out = torch.zeros(5)
    with checked_launches() as report:
        every_program_writes_zero[(4,)](out)
        reads_the_neighbours[(4,)](out)
        adds_where_another_stores[(4,)](out)
        reads_past_the_end[(2,)](out)
        each_its_own[(4,)](out)
    assert report.state["launches"] == 5
    assert report.found == [
        "every_program_writes_zero: 1 addresses stored by more than one program",
        "reads_the_neighbours: 4 loads of addresses another program stores",
        "adds_where_another_stores: 1 plain accesses of addresses other programs update atomically",
        "reads_past_the_end: 1 accesses outside every tensor argument",
    ]


@pytest.mark.skipif(not triton_lse._INTERPRET, reason="checks the interpreter's sequential programs")
@settings(max_examples=int(os.environ.get("FASTNCE_TRITON_CHECK_EXAMPLES", 25)), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_launch_keeps_to_its_programs_and_tensors(data, monkeypatch):
    """As above, over drawn options: sizes (1 to 60 rows, k is q or not), D, masks, bias,
    column LSE, dtypes, every plan, a frozen side."""
    from triton_checks import checked_launches

    sym = data.draw(st.booleans(), "k is q")
    M = data.draw(st.integers(1, 60), "M")
    N = None if sym else data.draw(st.integers(1, 60), "N")
    D = data.draw(st.sampled_from([1, 5, 16, 33, 40, 64]), "D")
    mask = data.draw(st.sampled_from(MASKS), "mask")
    use_bias = data.draw(st.booleans(), "bias")
    col = data.draw(st.booleans(), "col_lse")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), "dtype")
    frozen = data.draw(st.sampled_from([(), ("q",)] + ([] if sym else [("k",)])), "frozen")
    env = dict(FASTNCE_TRITON_BACKWARD=data.draw(st.sampled_from(["atomic", "two-pass"]), "backward"),
               FASTNCE_TRITON_SYM_FORWARD=data.draw(st.sampled_from(["rows", "half"]), "sym forward"),
               FASTNCE_TRITON_SYM_BACKWARD=data.draw(st.sampled_from(["mirror", "half"]), "sym backward"),
               FASTNCE_TRITON_DETERMINISTIC="0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    q, k, s, b, kw = make_inputs(M, M if sym else N, D, dtype, sym, use_bias, mask)
    only_scale_left = "q" in frozen and k is None and b is None  # something must want a gradient
    with checked_launches() as report:
        _lse_through_triton(q, k, s, b, kw, col, frozen, scale_grad=only_scale_left)
    assert report.found == []


@pytest.mark.skipif(not triton_lse._INTERPRET, reason="checks the interpreter's sequential programs")
@settings(max_examples=int(os.environ.get("FASTNCE_TRITON_CHECK_EXAMPLES", 15)), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_siglip_launch_keeps_to_its_programs_and_tensors(data, monkeypatch):
    """The sigmoid primitive's launches over drawn sizes, D, bias, positive offset, dtype, plan
    and frozen side: no races between programs, no access outside the tensors."""
    from triton_checks import checked_launches

    M, N = data.draw(st.integers(1, 60), "M"), data.draw(st.integers(1, 60), "N")
    D = data.draw(st.sampled_from([1, 5, 16, 33, 40, 64]), "D")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), "dtype")
    offset = data.draw(st.sampled_from([0, 0, 3, -2, None]), "positive_offset")
    use_bias = data.draw(st.booleans(), "bias")
    frozen = data.draw(st.sampled_from([(), ("q",), ("k",)]), "frozen")
    monkeypatch.setenv("FASTNCE_TRITON_BACKWARD", data.draw(st.sampled_from(["atomic", "two-pass"]), "backward"))
    monkeypatch.setenv("FASTNCE_TRITON_DETERMINISTIC", "0")
    q, k, s, _, _ = make_inputs(M, N, D, dtype, False, False)
    q.requires_grad_("q" not in frozen)
    k.requires_grad_("k" not in frozen)
    s.requires_grad_()
    bias = torch.tensor(-2.0, requires_grad=True) if use_bias else None
    with checked_launches() as report:
        ops.similarity_sigmoid_nll(q, k, s, bias, positive_offset=offset, backend="triton").sum().backward()
    assert report.state["launches"] >= 2
    assert report.found == []


@pytest.mark.skipif(not triton_lse._INTERPRET, reason="poisons the interpreter's CPU allocations")
@pytest.mark.parametrize("name", list(RACE_CASES))
def test_no_launch_reads_what_no_program_wrote(name, monkeypatch):
    """Every output and scratch tensor allocated uninitialised is filled with NaN first
    (tests/triton_checks.py): each plan's values and gradients are those of a plain run, bit for
    bit, so no kernel reads an element that no program wrote."""
    from triton_checks import poisoned_allocations

    M, N, D, mask, col, use_bias, frozen, env = RACE_CASES[name]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    q, k, s, b, kw = make_inputs(M, N, D, torch.float32, N is None, use_bias, mask)
    plain = _lse_through_triton(q, k, s, b, kw, col, frozen)
    with poisoned_allocations():
        poisoned = _lse_through_triton(q, k, s, b, kw, col, frozen)
    assert len(poisoned) == len(plain)
    for x, y in zip(poisoned, plain):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
