"""The `cuda` backend (csrc/, fastnce/ops/cuda_lse.py).

Three layers:
* everywhere: asking for the backend where it cannot run is a clear BackendUnavailable, and
  deciding that is cheap (no compile attempt without a GPU);
* without a GPU, where g++ and the CUDA headers are present: the kernels themselves, run under a
  CPU emulation of CUDA (csrc/emu), checked against the float64 reference by DESIGN.md §6's
  criterion; every mask, column LSEs, bias, symmetric, odd sizes, split grids and multi-pass
  backward, in fixed cases and in a hypothesis search over their combinations
  (FASTNCE_EMU_EXAMPLES, 30 by default; 300 passed when this was written);
* on a GPU (pytest.mark.gpu): the same checks through the public API, torch.library.opcheck of
  the fastnce_cuda ops, and agreement with the other backends.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnce.ops as ops
from fastnce.ops import cuda_lse, tiled
from fastnce.ops.function import BackendUnavailable

from tolerances import g_term_sums

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------

def test_unavailable_on_cpu_tensors_says_why():
    q = torch.randn(5, 8)
    with pytest.raises(BackendUnavailable, match="cuda backend runs on CUDA tensors"):
        ops.similarity_lse(q, backend="cuda")
    assert "cuda" not in ops.available_backends("cpu")


def test_unavailable_for_float64():
    why = cuda_lse.unavailable_reason(torch.device("cuda"), torch.float64)
    assert why is not None and "float16, bfloat16 and float32" in why


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only path")
def test_unavailable_reason_is_cheap_without_a_gpu():
    why = cuda_lse.unavailable_reason(torch.device("cuda"), torch.float16)
    assert why is not None
    assert "CPU-only build" in why or "is_available() is False" in why
    assert cuda_lse._state is None  # nothing was compiled or loaded
    with pytest.raises(BackendUnavailable, match="unavailable"):
        ops.resolve_backend("cuda", torch.device("cuda"), torch.float16)


# ---------------------------------------------------------------------------------------------
# DESIGN.md §6: error against float64 at most twice the error of the reference computed in the
# same dtype, plus a small floor.
# ---------------------------------------------------------------------------------------------

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_by_reference(name, fast, ref_dtype, ref64, floor, extra=0.0):
    fast, ref_dtype = fast.double().cpu(), ref_dtype.double().cpu()
    ref64 = ref64.double().cpu()
    fin = torch.isfinite(ref64)
    assert torch.equal(fin, torch.isfinite(fast)), f"{name}: -inf pattern differs from the reference"
    if not fin.any():
        return
    e_fast = (fast - ref64)[fin].abs().max().item()
    e_ref = (ref_dtype - ref64)[fin].abs().max().item()
    bound = 2 * e_ref + floor * max(1.0, ref64[fin].abs().max().item()) + extra
    assert e_fast <= bound, f"{name}: error {e_fast:.3g} > 2 x reference error {e_ref:.3g} + floor"


# ---------------------------------------------------------------------------------------------
# The kernels under the CPU emulation
# ---------------------------------------------------------------------------------------------

def _cuda_include() -> Path | None:
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    cands += ["/usr/local/cuda"]
    for c in cands:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    return None


def _emu_compile(sources, out, *flags) -> subprocess.CompletedProcess:
    """g++ (C++20) of sources into out under the emulation (csrc/emu/cuda_emu.h included first,
    the CUDA headers on the path); skips the test where g++ or the headers are missing."""
    inc, gxx = _cuda_include(), shutil.which("g++")
    if inc is None or gxx is None:
        pytest.skip("the kernel emulation needs g++ (C++20) and the CUDA headers")
    return subprocess.run([gxx, "-std=c++20", *flags, "-DFASTNCE_EMULATE", "-include", str(CSRC / "emu" / "cuda_emu.h"),
                           f"-I{inc}", "-Wno-unknown-pragmas", *map(str, sources), "-o", str(out), "-pthread"],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    out = tmp_path_factory.mktemp("emu") / "libfastnce_emu.so"
    r = _emu_compile([CSRC / "emu" / "emu_harness.cpp"], out, "-O1", "-shared", "-fPIC")
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.emu_forward.argtypes = [I, P, P, P, P, P, P, I, I, I64, I64, I64, I64, I, P, P, I, I, I64, I64]
    lib.emu_backward.argtypes = [I, P, P, P, P, P, P, I, I, I64, I64, I64, I64, I,
                                 P, P, P, P, P, P, P, I, I, I, I, I64, I64]
    lib.emu_backward.restype = I
    lib.emu_backward_launched.restype = I
    lib.emu_backward_plan.argtypes = [I, I64, I64, P]
    lib.emu_forward_resident.argtypes = [I, I64, I64]
    lib.emu_forward_resident.restype = I
    lib.emu_take_violation.restype = ctypes.c_char_p
    lib.emu_set_copies_land_early.argtypes = [I]
    lib.emu_set_blocks_in_order.argtypes = [I]
    return lib


def _hardware_rules_kept(lib, what):
    """The first rule of the hardware (alignment, launch limits) the emulated kernels broke in
    `what`, which a CPU would let pass and a GPU would not (csrc/emu/cuda_emu.h)."""
    broken = lib.emu_take_violation()
    assert broken is None, f"{what}: {broken.decode()}"


# Shared memory a block may opt into: H100 / H200 227 KiB, A100 163 KiB; an H100's a
# multiprocessor, 228 KiB.
H100_OPTIN, A100_OPTIN, H100_SM = 232448, 166912, 233472

# kind: 0 fp16 tensor cores, 1 bf16 tensor cores, 2 fp32 as tf32, 3 fp32 FMA
KINDS = {0: torch.float16, 1: torch.bfloat16, 2: torch.float32, 3: torch.float32}
# tf32 keeps 10 mantissa bits: it is judged against the reference in float16 inputs.
JUDGE = {0: torch.float16, 1: torch.bfloat16, 2: torch.float16, 3: torch.float32}

EMU_CASES = [
    # (kind, M, N, D, options)
    (3, 1, 1, 1, {}),
    (3, 3, 127, 5, dict(mask=1)),
    (3, 127, 3, 33, dict(mask=2, excl=0)),
    (3, 130, 130, 70, dict(sym=True, excl=0, bias=True)),
    (3, 100, 100, 16, dict(sym=True, excl=50, mask=1)),
    (3, 200, 70, 130, dict(excl=-3, bias=True, min_tiles=1, smem=40000)),  # split grid, 3 passes
    (3, 70, 260, 64, dict(mask=2, min_tiles=1, grads="row")),
    (3, 70, 260, 64, dict(min_tiles=1, grads="col")),
    (3, 65, 65, 20, dict(bias=True, with_col=False)),
    (3, 4, 1, 8, dict(mask=1, excl=0, labels=(0, 1))),  # rows with no valid pair: -inf
    (0, 129, 67, 72, dict(mask=1, excl=0, bias=True, min_tiles=1, smem=60000)),
    (0, 90, 90, 24, dict(sym=True, excl=0, vec=0)),
    (1, 67, 129, 8, dict(mask=2, vec=0)),
    (1, 127, 127, 40, dict(sym=True, excl=0, mask=1, bias=True)),
    (2, 100, 150, 200, dict(bias=True, excl=1, smem=70000)),
    # k is q without bias: the row kernel's mirror (G and G[J, I]^T from each tile), no dk kernel
    (3, 130, 130, 70, dict(sym=True, excl=0)),
    (1, 130, 130, 72, dict(sym=True, mask=2, excl=0, grads="col", min_tiles=1)),  # split grid
    (2, 100, 100, 200, dict(sym=True, excl=-7, grads="row", smem=70000)),  # 2 passes, asymmetric exclusion
    (0, 70, 70, 8, dict(sym=True, mask=1, min_tiles=1, vec=0)),
    # scale x30: a tile's LSEs lie far apart, G's terms keep one exponential each (16-bit)
    (0, 70, 90, 8, dict(mask=1, scale_mul=30.0)),
    (1, 70, 70, 8, dict(sym=True, excl=0, scale_mul=30.0)),
    # a 256-wide panel (D = 200): the backward accumulates in shared memory, not in registers
    (1, 70, 90, 200, dict(mask=1, bias=True)),
    (0, 80, 80, 200, dict(sym=True, excl=0, min_tiles=1)),
    # an H100's shared memory (228 KiB a multiprocessor): simclr's D = 128 holds the block's rows
    # in the forward and the mirrored backward; D = 200 streams them with the keys
    (1, 130, 130, 128, dict(sym=True, excl=0, smem=233472)),
    (0, 90, 100, 200, dict(mask=1, bias=True, smem=233472)),
    (1, 100, 150, 72, dict(mask=1, bias=True, smem=40000)),  # 16-bit, rows streamed, 2 passes
    # clip's width: 9 chunks a tile over 5 x 5 tiles (H100), and an A100's 164 KiB: 2 passes
    (1, 300, 260, 520, dict(bias=True, smem=233472)),
    (0, 200, 130, 512, dict(excl=0, smem=167936)),
    # the wide backward (8 warps, whole tiles, accumulators in registers; 128 < D <= 512 on an
    # H100): clip's width with labels and bias (row and column kernels), the mirror at D = 300
    # (3 of 8 warps without a chunk), a split grid at D = 200 (two warps a chunk), plain loads
    (1, 130, 100, 512, dict(mask=1, bias=True, smem=H100_OPTIN)),
    # a frozen side (MoCo's queue, a locked tower): the other kernel alone; dbias without dk
    (3, 70, 90, 40, dict(mask=1, need="q")),
    (1, 70, 90, 72, dict(need="k", min_tiles=1)),
    (0, 70, 90, 24, dict(bias=True, need="q")),
    (2, 70, 90, 200, dict(bias=True, need="", excl=2, smem=70000)),
    (1, 130, 100, 512, dict(bias=True, need="q", smem=H100_OPTIN)),
    (3, 70, 70, 24, dict(sym=True, excl=0, need="")),  # k is q: dq all the same
    # no upstream gradient: no launch, the gradients asked for are zeros
    (3, 70, 70, 24, dict(sym=True, excl=0, bias=True, grads="none")),
    (1, 70, 90, 24, dict(bias=True, need="q", grads="none")),
    (0, 150, 150, 300, dict(sym=True, excl=0, smem=H100_OPTIN)),
    (1, 70, 200, 200, dict(mask=2, min_tiles=1, grads="col", smem=H100_OPTIN)),
    (0, 90, 70, 130, dict(excl=2, bias=True, vec=0, smem=H100_OPTIN)),
    # fp32 FMA with D > 128: the backward's accumulator in shared memory, loaded and stored
    # around each chunk's product over several tiles (row and column kernels; the mirror)
    (3, 70, 150, 200, dict(mask=1, bias=True)),
    (3, 150, 150, 130, dict(sym=True, excl=0)),
    # labels are int64 (hashed ids): labels equal in their low 32 bits are still different, in
    # the forward, the row and column backward and the mirror
    (3, 70, 90, 16, dict(mask=1, bias=True, label_step=2**32)),
    (0, 70, 130, 24, dict(mask=2, min_tiles=1, label_step=2**32)),
    (1, 70, 70, 24, dict(sym=True, mask=1, excl=0, label_step=2**32)),
    # NT-Xent at a small temperature: the excluded self-pair's S lies far above every LSE of
    # its tile while those lie close together (one exponential a tile): its exponential
    # overflows and must not reach G (the mirror, row and column kernels, the wide backward)
    (1, 70, 70, 64, dict(sym=True, excl=0, scale_mul=8.0)),
    (0, 130, 130, 64, dict(sym=True, excl=0, bias=True, scale_mul=8.0)),
    (1, 70, 70, 200, dict(sym=True, excl=0, scale_mul=8.0, smem=H100_OPTIN)),
    # the mirror with one gradient term, rows' LSEs far (> 90 nats) from columns': the test for
    # one exponential a tile must see the mirror's LSEs too (rows' column LSEs, columns' row LSEs)
    (0, 130, 130, 16, dict(sym=True, excl=0, grads="col", lse_steps=True)),
    (0, 130, 130, 16, dict(sym=True, excl=0, grads="row", lse_steps=True)),
    (1, 130, 130, 200, dict(sym=True, excl=0, grads="col", lse_steps=True, smem=H100_OPTIN)),
    # features one element into their storage (a flat buffer's slice): plain loads, as
    # lse_ops.cpp decides from the addresses
    (1, 70, 90, 64, dict(unaligned=True, mask=1, bias=True)),
    (2, 70, 70, 32, dict(sym=True, excl=0, unaligned=True, smem=H100_OPTIN)),
]


def _ptr(t):
    return None if t is None else t.data_ptr()


def _at_odd_address(t):
    """A copy of t one element into a fresh buffer: its address is not 16-byte aligned."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view_as(t)
    return out.copy_(t)


def _emu_case(lib, kind, M, N, D, sym=False, bias=False, mask=0, excl=None, with_col=True, grads="both",
              min_tiles=1000, smem=10**6, vec=-1, labels=(0, 3), seed=0, nan_key=None, scale_mul=1.0,
              unaligned=False, need="qk", label_step=1, lse_steps=False):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    q64 = torch.randn(M, D, **f64)
    k64 = q64 if sym else torch.randn(N, D, **f64)
    if lse_steps:  # rows ..63 near 0, rows 64.. along one direction: each block's LSEs close, far apart
        q64[:64] *= 0.1
        q64[64:] = 0.05 * q64[64:] + 4.0 * torch.randn(1, D, **f64)
    if nan_key is not None:
        k64[nan_key, 0] = float("nan")
    N = k64.shape[0]
    scale = torch.tensor(scale_mul * 2.0 / D ** 0.5, dtype=torch.float64)
    b64 = torch.randn(N, **f64) if bias else None
    ql = kl = None
    if mask:
        ql = torch.randint(*labels, (M,), generator=g) * label_step
        kl = ql if sym else torch.randint(*labels, (N,), generator=g) * label_step
    gr = torch.randn(M, **f64) if grads in ("both", "row") else None
    # no upstream gradient ("none"): the kernels get none, the reference zeros (it needs one)
    gr_ref = torch.zeros(M, dtype=torch.float64) if grads == "none" else gr
    gc = torch.randn(N, **f64) if (grads in ("both", "col") and with_col) else None
    dt = KINDS[kind]

    def reference(qq, kk):
        sc = scale.to(qq.dtype)
        bb = None if b64 is None else b64.to(qq.dtype)
        r, c = tiled.forward(qq, kk, sc, bb, ql, kl, mask, excl, with_col, sym)
        cast = lambda t: None if t is None else t.to(r.dtype)
        dq, dk, db = tiled.backward(qq, kk, sc, bb, ql, kl, mask, excl, r, c, cast(gr_ref), cast(gc), sym, bias)
        return r, c, dq, dk, db

    ref64 = reference(q64, k64)
    jd = JUDGE[kind]
    ref_dt = reference(q64.to(jd).float(), k64.to(jd).float())

    q = q64.to(dt)
    k = q if sym else k64.to(dt)
    if unaligned:
        q = _at_odd_address(q)
        k = q if sym else _at_odd_address(k)
    b = None if b64 is None else b64.float()
    sc = scale.float()
    row = torch.empty(M)
    col = torch.empty(N) if with_col else None
    args = (kind, _ptr(q), _ptr(k), _ptr(sc), _ptr(b), _ptr(ql), _ptr(kl), mask, int(excl is not None),
            excl or 0, M, N, D, vec)  # vec -1: lse_ops.cpp's rule (lse_plan.h's use_vec_loads)
    lib.emu_forward(*args, _ptr(row), _ptr(col), int(sym), 4, min_tiles, smem)
    _hardware_rules_kept(lib, "forward")
    untouched = 12345.0  # what the buffer of a gradient not returned keeps
    dq, dk = torch.full((M, D), untouched), torch.full((N, D), untouched)
    db = torch.empty(N) if bias else None
    gr32 = None if gr is None else gr.float()  # named: a temporary would be freed before the call
    gc32 = None if gc is None else gc.float()
    lib.emu_backward(*args, _ptr(row), _ptr(col), _ptr(gr32), _ptr(gc32), _ptr(dq), _ptr(dk), _ptr(db),
                     int(sym), int("q" in need), int("k" in need), 4, min_tiles, smem)
    _hardware_rules_kept(lib, "backward")
    # lse_ops.cpp returns dq and dk only where wanted (k is q: dq alone), and a frozen side costs
    # nothing: its kernel is not launched (the column kernel runs for dbias, or k is q with bias)
    want_q, want_k = "q" in need or sym, "k" in need and not sym
    assert bool((dq == untouched).all()) != want_q and bool((dk == untouched).all()) != want_k
    launched = lib.emu_backward_launched()
    work = gr is not None or gc is not None  # else the outputs are zeros, no launch
    assert bool(launched & 1) == (want_q and work), "the row kernel's launch"
    if not (want_k or bias or sym) or not work:
        assert not launched & 2, "the column kernel ran for a frozen k"
    fast = (row, col, dq if want_q else None, dk if want_k else None, db)
    return fast, ref_dt, ref64, _g_rounding_sums(q64, k64, scale, b64, ql, kl, mask, excl, ref64, gr_ref, gc, sym)


def _g_rounding_sums(q64, k64, scale, b64, ql, kl, mask, excl, ref64, gr, gc, sym):
    """{"dq": |G| @ |k|, "dk": |G|ᵀ @ |q|, "dbias": Σ_i |G[i, :]|} (float64; symmetric: dq
    (|G| + |G|ᵀ) @ |q|) for the exact G (DESIGN.md §1): what a relative error of G per term
    moves the unscaled gradients by; and "s": the largest |S| of the problem. S = I @ (Sᵀ)ᵀ, so
    the tiled reference's dk for keys Sᵀ is G itself, transposed."""
    one = torch.tensor(1.0, dtype=torch.float64)
    S = scale * q64 @ k64.T + (0.0 if b64 is None else b64[None, :])
    _, Gt, _ = tiled.backward(torch.eye(q64.shape[0], dtype=torch.float64), S.T.contiguous(), one, None, ql, kl, mask,
                              excl, ref64[0], ref64[1], gr, gc, False, False)
    G = Gt.T
    return dict(g_term_sums(G, q64, None if sym else k64), s=S.abs().max().item() if S.numel() else 0.0,
                dbias=G.abs().sum(0))


def check_emulated(emu, kind, M, N, D, opts):
    """The emulated kernels against float64 by DESIGN.md §6, plus two roundings the factor 2
    covers on average but not in a sum of a few terms: for 16-bit and tf32 products one rounding
    of G per term of dq and dk (as FlashAttention's P); and the kernels' base-2 exponentials,
    whose arguments S·log2(e) and lse·log2(e) carry a few fp32 roundings of |S| more than the
    reference's exp(S − lse) (felt only at logits of a hundred and more)."""
    fast, ref_dt, ref64, sums = _emu_case(emu, kind, M, N, D, **opts)
    eps32 = torch.finfo(torch.float32).eps
    for name, f, rd, r64 in zip(("row_lse", "col_lse", "dq", "dk", "dbias"), fast, ref_dt, ref64):
        if f is None or r64 is None:
            continue
        terms = sums[name].max().item() if name in sums and sums[name].numel() else 1.0
        extra = 6 * eps32 * sums["s"] * terms
        if kind != 3 and name in ("dq", "dk"):
            extra += torch.finfo(JUDGE[kind]).eps * terms
        assert_by_reference(name, f, rd, r64, FLOOR[JUDGE[kind]], extra)


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: f"k{c[0]}-{c[1]}x{c[2]}x{c[3]}-" + "-".join(
    f"{k}{v}" for k, v in c[4].items()))
def test_kernels_emulated(emu, case):
    kind, M, N, D, opts = case
    check_emulated(emu, kind, M, N, D, opts)


@pytest.mark.parametrize("case", [c for c in EMU_CASES if c[4].get("smem") in (H100_OPTIN, 233472)], ids=lambda c:
                         f"k{c[0]}-{c[1]}x{c[2]}x{c[3]}-" + "-".join(f"{k}{v}" for k, v in c[4].items()))
def test_kernels_emulated_with_copies_landing_early(emu, case):
    """The asynchronous copies landing at their issue, the earliest a GPU may land them (the
    other tests: at the wait, the latest): a copy into a slot that is still being read gives
    wrong values here. The cases with an H100's shared memory: resident rows, the wide backward."""
    kind, M, N, D, opts = case
    emu.emu_set_copies_land_early(1)
    try:
        check_emulated(emu, kind, M, N, D, opts)
    finally:
        emu.emu_set_copies_land_early(0)


def test_emulator_reports_a_broken_hardware_rule(emu):
    """Sixteen-byte copies of features that do not start on 16 bytes (what lse_ops.cpp's vec_loads
    rule prevents) work on a CPU; the emulation names the rule a GPU would fault on."""
    with pytest.raises(AssertionError, match="cp.async: global address not 16-byte aligned"):
        _emu_case(emu, 1, 70, 90, 64, unaligned=True, vec=1)
    _emu_case(emu, 1, 70, 90, 64, unaligned=False, vec=1)  # and nothing is left over for the next call


_RULES_PROGRAM = r'''
#include <cstdio>
using namespace nvcuda;
static void report(const char* what) { const char* v = emu::take_violation(); std::printf("%s: %s\n", what, v ? v : "-"); }
int main() {
  alignas(128) static __half h[64 * 64];
  alignas(128) static float f[64 * 64];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  emu::launch([&] { wmma::load_matrix_sync(a, h, 72); wmma::store_matrix_sync(f, c, 68, wmma::mem_row_major); }, 1, 1, 32, 0);
  report("fine");
  emu::launch([&] { wmma::load_matrix_sync(a, h + 8, 72); }, 1, 1, 32, 0);
  report("pointer");
  emu::launch([&] { wmma::load_matrix_sync(a, h, 68); }, 1, 1, 32, 0);
  report("ldm");
  emu::launch([&] { wmma::store_matrix_sync(f, c, 66, wmma::mem_row_major); }, 1, 1, 32, 0);
  report("store ldm");
  emu::launch([&] { emu::cp_async16(h + 4, f, true); emu::cp_async_wait_all(); }, 1, 1, 32, 0);
  report("copy");
  emu::launch([&] { if (threadIdx.x % 32 < 16) wmma::load_matrix_sync(a, h, 72); __syncthreads(); }, 1, 1, 64, 0);
  report("part of a warp");
  emu::launch([&] { wmma::load_matrix_sync(a, h + 16 * (threadIdx.x % 2), 72); }, 1, 1, 32, 0);
  report("pointer a lane");
  emu::launch([] {}, 1, 1, 1056, 0);
  report("threads");
  emu::launch([] {}, 1, 1, 48, 0);
  report("part warp");
  emu::launch([] {}, 1, 65536, 32, 0);
  report("grid");
  emu::g_smem_per_block = 1024;
  emu::launch([] {}, 1, 1, 32, 2048);
  report("smem");
}
'''


def test_emulator_checks_each_rule(tmp_path):
    """Each rule cuda_emu.h checks, broken once on purpose (and kept once): WMMA's pointer and
    leading dimensions, WMMA calls the same in every lane of a warp, cp.async's addresses, a
    launch's threads, grid and shared memory."""
    src, exe = tmp_path / "rules.cpp", tmp_path / "rules"
    src.write_text(_RULES_PROGRAM)
    r = _emu_compile([src], exe, "-O0")
    assert r.returncode == 0, r.stderr[-4000:]
    out = dict(line.split(": ", 1) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                               check=True).stdout.splitlines())
    assert out == {
        "fine": "-",
        "pointer": "wmma: matrix pointer not 32-byte aligned",
        "ldm": "wmma: leading dimension not a multiple of 16 bytes",
        "store ldm": "wmma: leading dimension not a multiple of 16 bytes",
        "copy": "cp.async: shared-memory address not 16-byte aligned",
        "part of a warp": "wmma: lanes of a warp made different calls (WMMA is warp-collective)",
        "pointer a lane": "wmma: lanes of a warp made different calls (WMMA is warp-collective)",
        "threads": "launch: threads a block not in [1, 1024]",
        "part warp": "emulation: threads a block must be whole warps",
        "grid": "launch: grid not in [1, 2^31 - 1] x [1, 65535]",
        "smem": "launch: more dynamic shared memory than a block may have on the device",
    }


@pytest.mark.parametrize("sanitizer,copies", [("thread", "early"), ("address,undefined", "late")])
def test_kernels_emulated_under_a_sanitizer(tmp_path, sanitizer, copies):
    """Every kernel once per path (csrc/emu/sanitize_main.cpp) under ThreadSanitizer, where a
    barrier missing between two threads' shared-memory accesses is a reported race (the copies
    landing at their issue: one into a slot that others still read is one too), and under
    AddressSanitizer with UBSan, where an access past a shared-memory tile or a tensor is an
    error. (Values: the tests above.) About a minute each on 2 cores."""
    exe = tmp_path / "sanitize"
    r = _emu_compile([CSRC / "emu" / "emu_harness.cpp", CSRC / "emu" / "sanitize_main.cpp"], exe,
                     "-O1", "-g", f"-fsanitize={sanitizer}", "-fno-sanitize-recover=undefined")
    if r.returncode != 0 and "san" in r.stderr and "cannot find" in r.stderr:
        pytest.skip(f"g++ has no {sanitizer} sanitizer runtime here")
    assert r.returncode == 0, r.stderr[-4000:]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", TSAN_OPTIONS="halt_on_error=0")
    run = subprocess.run([str(exe), copies], capture_output=True, text=True, env=env, timeout=900)
    if "FATAL: ThreadSanitizer: unexpected memory mapping" in run.stderr:
        pytest.skip("ThreadSanitizer cannot map its shadow memory on this kernel (ASLR bits)")
    assert run.returncode == 0 and "Sanitizer" not in run.stderr, (run.stdout + run.stderr)[-8000:]
    assert run.stdout.count(": ok") == run.stdout.count("kind ") >= 10


@pytest.mark.parametrize("kind,D,rows", [
    (1, 128, 128),  # 4 blocks a multiprocessor either way
    (1, 512, 512),  # clip: 2 blocks of 101 KiB with the rows, half the bytes a tile
    (0, 576, 576),
    (1, 640, 0),  # the rows would leave one block: streamed (4 blocks)
    (2, 192, 192),  # fp32: 2 blocks either way
    (2, 256, 0),
])
def test_forward_rows_plan(emu, kind, D, rows):
    assert emu.emu_forward_resident(kind, D, H100_SM) == rows


@pytest.mark.parametrize("kind,D,smem,plan", [
    (1, 512, H100_OPTIN, (1, 512, 512)),  # clip on an H100 / H200: the wide kernel (225 KiB)
    (0, 130, H100_OPTIN, (1, 192, 192)),
    (1, 320, A100_OPTIN, (1, 320, 320)),
    (1, 512, A100_OPTIN, (0, 384, 0)),  # the wide kernel does not fit: 2 passes of 384 and 128
    (1, 520, H100_OPTIN, (0, 576, 0)),  # past 512
    (1, 128, H100_OPTIN, (0, 128, 128)),  # accumulators in registers of the 4-warp kernel
    (2, 512, H100_OPTIN, (0, 512, 0)),  # fp32
])
def test_backward_plan(emu, kind, D, smem, plan):
    out = (ctypes.c_int * 3)()
    emu.emu_backward_plan(kind, D, smem, out)
    assert tuple(out) == plan


@st.composite
def emu_problems(draw):
    """Any combination of the kernels' options: kind, odd sizes, k is q (the upper forward and
    the mirrored backward where there is no bias and only self-pairs are excluded), masks,
    exclusion offsets, bias, gradient terms, split grids, backward panels (and rows resident or
    streamed: shared memory of 40 KB, an H100's 228 KiB, or 1 MB), wide LSE spreads."""
    kind = draw(st.sampled_from([0, 1, 2, 3]))
    sym = draw(st.booleans())
    M = draw(st.integers(1, 140))
    N = M if sym else draw(st.integers(1, 140))
    with_col = draw(st.booleans())
    opts = dict(sym=sym, bias=draw(st.booleans()), mask=draw(st.sampled_from([0, 1, 2])),
                excl=draw(st.sampled_from([None, 0, 0, 3, -2])), with_col=with_col,
                grads=draw(st.sampled_from(["both", "row", "col"] if with_col else ["row"])),
                min_tiles=draw(st.sampled_from([1, 1000])), smem=draw(st.sampled_from([40000, 233472, 10**6])),
                scale_mul=draw(st.sampled_from([1.0, 1.0, 8.0])), seed=draw(st.integers(0, 2**16)))
    return kind, M, N, draw(st.sampled_from([1, 8, 24, 64, 72, 130, 200])), opts


@settings(max_examples=int(os.environ.get("FASTNCE_EMU_EXAMPLES", 30)), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=emu_problems())
def test_kernels_emulated_any_options(emu, case):
    kind, M, N, D, opts = case
    check_emulated(emu, kind, M, N, D, opts)


@pytest.fixture(params=[False, True], ids=["blocks-at-once", "blocks-in-order"])
def block_order(emu, request):
    """The emulated launches' blocks all at once, or one after another: in order, a split grid's
    atomic merges meet the NaN split's part in the middle, after a number and before one (a
    merge that drops a NaN on either side is then caught every run, not in most)."""
    emu.emu_set_blocks_in_order(request.param)
    yield request.param
    emu.emu_set_blocks_in_order(False)


@pytest.mark.parametrize("min_tiles", [1000, 1], ids=["one-pass", "split-grid"])
def test_kernels_emulated_propagate_nan(emu, min_tiles, block_order):
    """A NaN in one key: every row LSE and that key's column LSE are NaN, never a number. Split
    grid: 3 splits of one column tile each, the NaN key's in the middle."""
    (row, col, dq, dk, db), _, _, _ = _emu_case(emu, 0, 70, 130, 16, nan_key=77, min_tiles=min_tiles)
    assert torch.isnan(row).all()
    assert torch.isnan(col[77]) and torch.isfinite(col[torch.arange(130) != 77]).all()
    assert torch.isnan(dq).all()


@pytest.mark.parametrize("min_tiles", [1000, 1], ids=["one-pass", "split-grid"])
def test_kernels_emulated_propagate_nan_symmetric(emu, min_tiles, block_order):
    """k is q: a NaN feature reaches every row LSE, also those that get it from the tiles above."""
    (row, col, dq, _, _), _, _, _ = _emu_case(emu, 0, 140, 140, 16, sym=True, excl=0, nan_key=100,
                                              min_tiles=min_tiles)
    assert torch.isnan(row).all() and torch.isnan(col).all() and torch.isnan(dq).all()


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------

def _require_cuda_backend():
    why = cuda_lse.unavailable_reason(torch.device("cuda"), torch.float16)
    if why is not None:
        pytest.skip(f"cuda backend unavailable: {why}")


GPU_CASES = [
    # (M, N, D, options) ; N None: k = q (symmetric)
    (1, 1, 1, {}),
    (3, 127, 5, dict(label_mask="same")),
    (127, 3, 33, dict(label_mask="different")),
    (127, None, 64, dict(exclude_self=True)),
    (1000, None, 128, dict(exclude_self=True, diag_offset=500)),
    (1000, 1000, 96, dict(col_lse=True, bias=True)),
    (256, 5000, 128, dict(col_lse=True)),  # split grid (few row blocks)
    (300, None, 40, dict(label_mask="same", exclude_self=True, col_lse=True, bias=True)),
    (300, None, 40, dict(label_mask="different", exclude_self=True, col_lse=True)),  # the mirror, both terms
    (200, 300, 520, dict(col_lse=True, label_mask="different")),  # D not a multiple of 64, past 512
    # the wide backward (16-bit, 128 < D <= 512 on an H100 / H200): clip's width; the mirror
    (1000, 700, 512, dict(col_lse=True, bias=True)),
    (500, None, 300, dict(exclude_self=True)),
]


class _highest:
    """fp32 kernels use plain FMA (no tf32) inside this context."""

    def __enter__(self):
        self.prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.prev)


def _gpu_run(backend, q, k, scale, bias, labels, k_labels, opts):
    q = q.detach().requires_grad_(True)
    k = None if k is None else k.detach().requires_grad_(True)
    scale = scale.detach().requires_grad_(True)
    bias = None if bias is None else bias.detach().requires_grad_(True)
    row, col = ops.similarity_lse(q, k, scale, bias, labels=labels, k_labels=k_labels, backend=backend, **opts)
    g = torch.Generator(device="cpu").manual_seed(1)
    w_row = torch.randn(row.shape, generator=g, dtype=torch.float64).to(row)
    loss = (torch.where(torch.isfinite(row), row, 0) * w_row).sum()
    if col is not None:
        w_col = torch.randn(col.shape, generator=g, dtype=torch.float64).to(col)
        loss = loss + (torch.where(torch.isfinite(col), col, 0) * w_col).sum()
    loss.backward()
    grads = [q.grad, None if k is None else k.grad, scale.grad.reshape(1), None if bias is None else bias.grad]
    return [row, col] + grads


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-" + "-".join(c[3]))
def test_gpu_matches_float64_reference(dtype, case):
    _require_cuda_backend()
    M, N, D, opts = case
    opts = dict(opts)
    use_bias = opts.pop("bias", False)
    g = torch.Generator(device="cpu").manual_seed(0)
    q64 = torch.randn(M, D, generator=g, dtype=torch.float64).cuda()
    k64 = None if N is None else torch.randn(N, D, generator=g, dtype=torch.float64).cuda()
    n = M if N is None else N
    s64 = torch.tensor(2.0 / D ** 0.5, dtype=torch.float64, device="cuda")
    b64 = torch.randn(n, generator=g, dtype=torch.float64).cuda() if use_bias else None
    labels = k_labels = None
    if "label_mask" in opts:
        labels = torch.randint(0, 3, (M,), generator=g).cuda()
        k_labels = None if N is None else torch.randint(0, 3, (N,), generator=g).cuda()
    cast = lambda t, d: None if t is None else t.to(d)
    ref64 = _gpu_run("reference", q64, k64, s64, b64, labels, k_labels, opts)
    ref_dt = _gpu_run("reference", cast(q64, dtype), cast(k64, dtype), s64.float(), cast(b64, torch.float32),
                      labels, k_labels, opts)
    with _highest():
        fast = _gpu_run("cuda", cast(q64, dtype), cast(k64, dtype), s64.float(), cast(b64, torch.float32),
                        labels, k_labels, opts)
    extra = {}
    if dtype != torch.float32:  # one rounding of G per term of the second product (see check_emulated)
        sums = _gpu_g_rounding_sums(q64, k64, s64, b64, labels, k_labels, opts)
        eps, s = torch.finfo(dtype).eps, s64.item()
        extra = {name: eps * s * t.max().item() for name, t in sums.items() if t.numel()}
        extra["dscale"] = eps * (q64.abs() * sums["dq"]).sum().item()
    for name, f, rd, r64 in zip(("row_lse", "col_lse", "dq", "dk", "dscale", "dbias"), fast, ref_dt, ref64):
        if r64 is None:
            continue
        assert_by_reference(name, f, rd, r64, FLOOR[dtype], extra.get(name, 0.0))


def _gpu_g_rounding_sums(q64, k64, s64, b64, labels, k_labels, opts):
    """{"dq": |G| @ |k|, "dk": |G|ᵀ @ |q|} (k is q: dq (|G| + |G|ᵀ) @ |q|) for the exact G of
    _gpu_run's loss: the reference's key gradient for q = I and keys Sᵀ (scale 1) is Gᵀ."""
    k = q64 if k64 is None else k64
    S = s64 * q64 @ k.T + (0.0 if b64 is None else b64[None, :])
    eye = torch.eye(q64.shape[0], dtype=torch.float64, device=q64.device)
    one = torch.tensor(1.0, dtype=torch.float64, device=q64.device)
    kl = labels if k64 is None else k_labels
    return g_term_sums(_gpu_run("reference", eye, S.T.contiguous(), one, None, labels, kl, opts)[3].T, q64, k64)


@gpu
@needs_gpu
def test_gpu_tf32_when_allowed():
    _require_cuda_backend()
    q = torch.randn(300, 128, device="cuda")
    k = torch.randn(400, 128, device="cuda")
    ref, _ = ops.similarity_lse(q.double(), k.double(), 0.1, backend="reference")
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        row, _ = ops.similarity_lse(q, k, 0.1, backend="cuda")
    finally:
        torch.set_float32_matmul_precision(prev)
    ref16, _ = ops.similarity_lse(q.half(), k.half(), 0.1, backend="reference")
    assert_by_reference("row_lse (tf32)", row, ref16, ref, FLOOR[torch.float16])


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_opcheck(dtype):
    _require_cuda_backend()
    q = torch.randn(70, 40, device="cuda", dtype=dtype)
    k = torch.randn(90, 40, device="cuda", dtype=dtype)
    scale = torch.tensor(0.5, device="cuda")
    bias = torch.randn(90, device="cuda")
    ql = torch.randint(0, 3, (70,), device="cuda")
    kl = torch.randint(0, 3, (90,), device="cuda")
    fwd = (q, k, scale, bias, ql, kl, 1, 0, True, False, False)
    torch.library.opcheck(torch.ops.fastnce_cuda.lse_forward.default, fwd)
    for with_col in (True, False):  # k is q: the tiles on and above the diagonal
        torch.library.opcheck(torch.ops.fastnce_cuda.lse_forward.default,
                              (q, q, scale, None, None, None, 0, 0, with_col, True, False))
    row, col = torch.ops.fastnce_cuda.lse_forward(*fwd)
    grads = (row, col, torch.randn_like(row), torch.randn_like(col))
    for need_bias, need_q, need_k in ((True, True, True), (False, True, False), (False, False, True), (True, False, False)):
        bwd = (q, k, scale, bias, ql, kl, 1, 0, *grads, False, need_bias, need_q, need_k, False)
        torch.library.opcheck(torch.ops.fastnce_cuda.lse_backward.default, bwd)
    sym = (q, q, scale, None, None, None, 0, 0, row, None, torch.randn_like(row), None, True, False, True, False, False)
    torch.library.opcheck(torch.ops.fastnce_cuda.lse_backward.default, sym)


@gpu
@needs_gpu
@pytest.mark.parametrize("other", ["torch", "triton"])
def test_gpu_agrees_with_other_backends(other):
    _require_cuda_backend()
    why = ops.function.unavailable_reason(other, torch.device("cuda"), torch.bfloat16)
    if why is not None:
        pytest.skip(why)
    g = torch.Generator(device="cpu").manual_seed(3)
    q = torch.randn(777, 128, generator=g).cuda().bfloat16()
    k = torch.randn(1500, 128, generator=g).cuda().bfloat16()
    bias = torch.randn(1500, generator=g).cuda()
    outs = {}
    for b in ("cuda", other):
        qq, kk, bb = (t.detach().requires_grad_(True) for t in (q, k, bias))
        row, col = ops.similarity_lse(qq, kk, 0.2, bb, col_lse=True, backend=b)
        (row.sum() + 2 * col.sum()).backward()
        outs[b] = [row, col, qq.grad.float(), kk.grad.float(), bb.grad]
    for a, c in zip(outs["cuda"], outs[other]):
        torch.testing.assert_close(a.float(), c.float(), rtol=2e-2, atol=2e-2)
