"""`fastnce-bench gradcheck`: check every backend on this machine against the reference.

For each available backend but 'reference' (fastnce.ops.available_backends; on the CPU that
is 'torch', plus 'triton' under TRITON_INTERPRET=1) and each dtype it supports of
--dtypes (default float32 and float64), it compares values and gradients of

* fastnce.ops.similarity_lse: a few shapes, q = k (symmetric) and q ≠ k, every mask
  (none, exclude_self with and without a diagonal offset, labels 'same' / 'different',
  labels + exclude_self), with and without a bias and a column LSE;
* fastnce.nt_xent, fastnce.clip_loss (learnable logit_scale) and fastnce.info_nce
  (in-batch and unpaired negatives), reduction='none' with random weights;

against the reference backend, by flash-attention's criterion (DESIGN.md §6): the error
against the float64 reference is at most twice the error of the reference computed in the
same dtype, plus a small floor. Backends that support float64 also go through
torch.autograd.gradcheck in float64. Prints PASS/FAIL (or SKIP) per check; returns 1 when
any check fails.

    fastnce-bench gradcheck                      # every backend on cuda if there is one, else cpu
    fastnce-bench gradcheck --device cpu --backends torch --quick
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from . import checked_backends, device_arg, require_device

DTYPES = ("float32", "float64", "float16", "bfloat16")
# Absolute floor of the criterion, times max(1, max |exact|).
FLOOR = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}
MASKS = {  # name -> (exclude_self, diag_offset, label_mask)
    "none": (False, 0, None),
    "exclude_self": (True, 0, None),
    "exclude_offset": (True, 3, None),
    "labels_same": (False, 0, "same"),
    "labels_different": (False, 0, "different"),
    "labels_same+exclude_self": (True, 0, "same"),
}
SHAPES_QUICK = [(7, 5, 3), (33, 65, 16)]
SHAPES_FULL = [(1, 1, 1), (7, 5, 3), (33, 65, 16), (130, 257, 40)]
LOSS_SHAPES_QUICK = [(5, 3), (33, 16)]
LOSS_SHAPES_FULL = [(1, 2), (5, 3), (33, 16), (130, 40)]


class Checker:
    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.passed = self.failed = self.skipped = 0
        self.failures: list[str] = []

    def report(self, status: str, name: str, detail: str = "") -> None:
        if status == "PASS":
            self.passed += 1
        elif status == "FAIL":
            self.failed += 1
            self.failures.append(f"{name}  {detail}")
        else:
            self.skipped += 1
        if self.verbose or status == "FAIL":
            print(f"{status}  {name}" + (f"  ({detail})" if detail else ""), flush=True)

    def run(self, name: str, fn) -> None:
        try:
            ok, detail = fn()
        except Exception as e:  # a crash is a failure, with its cause
            tb = traceback.extract_tb(e.__traceback__)[-1]
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} [{tb.filename.split('/')[-1]}:{tb.lineno}]"
        self.report("PASS" if ok else "FAIL", name, detail)


# ----------------------------------------------------------------------------- comparisons

def _err(x, exact):
    """(max |x − exact| over the finite entries, whether the −inf/NaN pattern differs)."""
    import torch
    x, exact = x.double(), exact.double()
    fin = torch.isfinite(exact)
    pattern_bad = bool((torch.isfinite(x) != fin).any()) or bool(((exact == float("-inf")) != (x == float("-inf"))).any())
    if not fin.any():
        return 0.0, pattern_bad
    return (x[fin] - exact[fin]).abs().max().item(), pattern_bad


def criterion(fast: dict, low: dict, exact: dict, dtype: str) -> tuple[bool, str]:
    """Every tensor of fast within 2·(error of low) + floor of exact; detail names the worst."""
    worst, worst_ratio, ok = "", -1.0, True
    for key, ex in exact.items():
        if ex is None:
            if fast.get(key) is not None and bool(fast[key].abs().max() > 0):
                return False, f"{key}: expected no gradient"
            continue
        if fast.get(key) is None:
            return False, f"{key}: missing"
        if tuple(fast[key].shape) != tuple(ex.shape):
            return False, f"{key}: shape {tuple(fast[key].shape)} != {tuple(ex.shape)}"
        e_fast, bad = _err(fast[key], ex)
        if bad:
            return False, f"{key}: -inf/NaN pattern differs from the reference"
        e_low, _ = _err(low[key], ex) if low.get(key) is not None else (0.0, False)
        mag = ex.double()[ex.double().isfinite()].abs().max().item() if ex.double().isfinite().any() else 0.0
        bound = 2 * e_low + FLOOR[dtype] * max(1.0, mag)
        ratio = e_fast / bound
        if ratio > worst_ratio:
            worst, worst_ratio = f"worst {key}: err {e_fast:.2e} <= bound {bound:.2e}" if ratio <= 1 else \
                f"{key}: err {e_fast:.2e} > bound {bound:.2e} (2 x ref err {e_low:.2e} + floor)", ratio
        ok &= ratio <= 1
    return ok, worst


def _grads(out_terms, inputs):
    import torch
    total = sum(out_terms)
    req = [x for x in inputs if x is not None and x.requires_grad]
    gs = torch.autograd.grad(total, req, allow_unused=True)
    it = iter(gs)
    return [next(it) if (x is not None and x.requires_grad) else None for x in inputs]


def _weights(n, gen, device):
    import torch
    return torch.randn(n, generator=gen, dtype=torch.float64).to(device)


# ----------------------------------------------------------------------------- similarity_lse

def _lse_case(backend, dtype, device, M, N, D, symmetric, mask, bias, col, seed=0):
    import torch
    from fastnce.ops import similarity_lse
    from fastnce.ops.naive import lse_dtype

    gen = torch.Generator().manual_seed(seed)
    if symmetric:
        N = M
    q0 = torch.randn(M, D, generator=gen, dtype=torch.float64) / D ** 0.5
    k0 = None if symmetric else torch.randn(N, D, generator=gen, dtype=torch.float64) / D ** 0.5
    s0 = torch.tensor(3.0, dtype=torch.float64)
    b0 = 0.5 * torch.randn(N, generator=gen, dtype=torch.float64) if bias else None
    lab = torch.randint(0, 3, (M,), generator=gen)
    klab = None if symmetric else torch.randint(0, 3, (N,), generator=gen)
    excl, off, lmode = MASKS[mask]
    g_row = _weights(M, gen, "cpu")
    g_col = _weights(N, gen, "cpu")

    def run(name, dt):
        tdt = getattr(torch, dt)
        q = q0.to(device, tdt).requires_grad_()
        k = None if symmetric else k0.to(device, tdt).requires_grad_()
        s = s0.to(device, lse_dtype(tdt)).requires_grad_()
        b = None if b0 is None else b0.to(device, lse_dtype(tdt)).requires_grad_()
        kw = dict(exclude_self=excl, diag_offset=off, col_lse=col, backend=name)
        if lmode is not None:
            kw.update(labels=lab.to(device), label_mask=lmode, k_labels=None if symmetric else klab.to(device))
        row, cl = similarity_lse(q, k, s, b, **kw)
        terms = [(torch.where(torch.isfinite(row), row, 0.0) * g_row.to(device, row.dtype)).sum()]
        if col:
            terms.append((torch.where(torch.isfinite(cl), cl, 0.0) * g_col.to(device, cl.dtype)).sum())
        gq, gk, gs, gb = _grads(terms, [q, k, s, b])
        return dict(row_lse=row.detach(), col_lse=None if not col else cl.detach(), dq=gq, dk=gk, dscale=gs, dbias=gb)

    exact = run("reference", "float64")
    low = run("reference", dtype)
    fast = run(backend, dtype)
    exact = {k: v for k, v in exact.items() if not (v is None and k in ("col_lse", "dk", "dbias"))}
    return criterion(fast, low, exact, dtype)


# ----------------------------------------------------------------------------- losses

def _loss_case(loss, backend, dtype, device, N, D, variant, seed=0):
    import torch
    import fastnce
    from fastnce.ops.naive import lse_dtype

    gen = torch.Generator().manual_seed(seed)
    a0 = torch.randn(N, D, generator=gen, dtype=torch.float64)
    b0 = torch.randn(N, D, generator=gen, dtype=torch.float64)
    n0 = torch.randn(2 * N + 1, D, generator=gen, dtype=torch.float64)
    rows = 2 * N if loss == "nt_xent" else N
    w = _weights(rows, gen, "cpu")

    def run(name, dt):
        tdt = getattr(torch, dt)
        a = a0.to(device, tdt).requires_grad_()
        b = b0.to(device, tdt).requires_grad_()
        if loss == "nt_xent":
            out = fastnce.nt_xent(a, b, variant, reduction="none", backend=name)
            ins = [a, b]
        elif loss == "clip":
            a2 = torch.nn.functional.normalize(a, dim=1)
            b2 = torch.nn.functional.normalize(b, dim=1)
            s = torch.tensor(variant, dtype=lse_dtype(tdt), device=device, requires_grad=True)
            out = fastnce.clip_loss(a2, b2, s, reduction="none", backend=name)
            ins = [a, b, s]
        elif loss == "siglip":  # SigLIP's initialisation: scale 10, bias −10 (variant = the scale)
            a2 = torch.nn.functional.normalize(a, dim=1)
            b2 = torch.nn.functional.normalize(b, dim=1)
            sdt = lse_dtype(tdt)
            s = torch.tensor(variant, dtype=sdt, device=device, requires_grad=True)
            t = torch.tensor(-variant, dtype=sdt, device=device, requires_grad=True)
            out = fastnce.siglip_loss(a2, b2, s, t, reduction="none", backend=name)
            ins = [a, b, s, t]
        else:
            neg = None if variant == "in-batch" else n0.to(device, tdt).requires_grad_()
            out = fastnce.info_nce(a, b, neg, 0.1, reduction="none", backend=name)
            ins = [a, b] + ([neg] if neg is not None else [])
        grads = _grads([(out.double() * w.to(device)).sum()], ins)
        return dict(loss=out.detach(), **{f"grad{i}": g for i, g in enumerate(grads)})

    return criterion(run(backend, dtype), run("reference", dtype), run("reference", "float64"), dtype)


# ----------------------------------------------------------------------------- autograd.gradcheck

def _gradcheck_cases(backend, device):
    """(name, fn, inputs) for torch.autograd.gradcheck in float64; no row fully masked."""
    import torch
    import fastnce
    from fastnce.ops import similarity_lse

    gen = torch.Generator().manual_seed(1)
    M, N, D = 6, 5, 3
    dd = dict(dtype=torch.float64, device=device)
    r = lambda *s: (torch.randn(*s, generator=gen, dtype=torch.float64) * 0.5).to(device).requires_grad_()
    q, k, b, b6 = r(M, D), r(N, D), r(N), r(M)
    s = torch.tensor(2.0, **dd).requires_grad_()
    lab = (torch.arange(M) % 2).to(device)
    klab = (torch.arange(N) % 2).to(device)
    cases = []
    for mask in MASKS:
        excl, off, lmode = MASKS[mask]
        lab_kw = {} if lmode is None else dict(labels=lab, label_mask=lmode)
        # q ≠ k, row and column LSEs, bias
        kw = dict(exclude_self=excl, diag_offset=min(off, 2), col_lse=True, backend=backend, **lab_kw)
        if lmode is not None:
            kw["k_labels"] = klab

        def f_asym(q, k, s, b, kw=kw):
            row, col = similarity_lse(q, k, s, b, **kw)
            return row, col

        cases.append((f"similarity_lse q!=k mask={mask}", f_asym, (q, k, s, b)))
        # q = k, row LSE, bias
        kw_s = dict(exclude_self=excl, diag_offset=0, backend=backend, **lab_kw)

        def f_sym(q, s, b, kw=kw_s):
            return similarity_lse(q, None, s, b, **kw)[0]

        if mask != "exclude_offset":
            cases.append((f"similarity_lse q=k mask={mask}", f_sym, (q, s, b6)))
    a1, a2 = r(4, D), r(4, D)
    cases.append(("nt_xent", lambda x, y: fastnce.nt_xent(x, y, 0.5, reduction="none", backend=backend), (a1, a2)))
    s2 = torch.tensor(3.0, **dd).requires_grad_()
    cases.append(("clip_loss", lambda x, y, t: fastnce.clip_loss(x, y, t, reduction="none", backend=backend), (a1, a2, s2)))
    from fastnce.ops.function import unavailable_reason

    if unavailable_reason(backend, torch.device(device), torch.float64, "sigmoid") is None:
        t2 = torch.tensor(-1.0, **dd).requires_grad_()
        cases.append(("siglip_loss", lambda x, y, t, c: fastnce.siglip_loss(x, y, t, c, reduction="none",
                                                                             backend=backend), (a1, a2, s2, t2)))
    negs = r(7, D)
    cases.append(("info_nce unpaired", lambda x, y, n: fastnce.info_nce(x, y, n, 0.5, reduction="none", backend=backend),
                  (a1, a2, negs)))
    return cases


# ----------------------------------------------------------------------------- driver

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastnce-bench gradcheck",
                                description="Check every available backend against the reference: values, "
                                            "gradients and torch.autograd.gradcheck.")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu or cuda[:i] (default: cuda when there is one, else cpu)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default: every available one but 'reference')")
    p.add_argument("--dtypes", default="float32,float64",
                   help=f"comma-separated dtypes among {', '.join(DTYPES)} (default float32,float64); "
                        "each backend is checked in those it supports")
    p.add_argument("--quick", action="store_true", help="fewer shapes and combinations (seconds)")
    p.add_argument("--no-autograd-gradcheck", action="store_true", help="skip torch.autograd.gradcheck")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    import torch
    from fastnce.ops import available_backends
    from fastnce.ops.function import unavailable_reason

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    require_device("fastnce-bench gradcheck", device)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes:
        print(f"fastnce-bench gradcheck: --dtypes names no dtype (choose from {', '.join(DTYPES)})", file=sys.stderr)
        return 2
    for d in dtypes:
        if d not in DTYPES:
            print(f"fastnce-bench gradcheck: unknown dtype {d!r} (choose from {', '.join(DTYPES)})", file=sys.stderr)
            return 2
    if args.backends:  # each must run here: else the reason, not a traceback
        backends = checked_backends("fastnce-bench gradcheck", args.backends, device, torch.float32)
    else:
        backends = [b for b in available_backends(dev) if b != "reference"]
    chk = Checker(verbose=not args.quiet)
    print(f"fastnce-bench gradcheck on {device} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, backends {', '.join(backends)}, dtypes {', '.join(dtypes)}", flush=True)
    t0 = time.perf_counter()
    shapes = SHAPES_QUICK if args.quick else SHAPES_FULL
    loss_shapes = LOSS_SHAPES_QUICK if args.quick else LOSS_SHAPES_FULL
    for backend in backends:
        for dt in dtypes:
            why = unavailable_reason(backend, dev, getattr(torch, dt))
            if why is not None:
                chk.report("SKIP", f"{backend} {dt}", why)
                continue
            for si, (M, N, D) in enumerate(shapes):
                for symmetric in (False, True):
                    for mask in MASKS:
                        # bias and col_lse: both settings on q ≠ k; alternate the rest to keep it short
                        opts = [(True, True), (False, False)] if not symmetric else [(bool((si + len(mask)) % 2), False)]
                        if args.quick:
                            opts = opts[:1]
                        for bias, col in opts:
                            name = (f"similarity_lse {backend} {dt} M={M} N={M if symmetric else N} D={D} "
                                    f"{'q=k' if symmetric else 'q!=k'} mask={mask} bias={bias} col_lse={col}")
                            chk.run(name, lambda: _lse_case(backend, dt, dev, M, N, D, symmetric, mask, bias, col))
            for N, D in loss_shapes:
                for loss, variants in (("nt_xent", (0.1, 0.5)), ("clip", (1 / 0.07,)),
                                       ("info_nce", ("in-batch", "unpaired")), ("siglip", (10.0,))):
                    if loss == "siglip":
                        why = unavailable_reason(backend, dev, getattr(torch, dt), "sigmoid")
                        if why is not None:
                            chk.report("SKIP", f"siglip {backend} {dt}", why)
                            continue
                    for v in variants:
                        vname = (f"temperature={v}" if loss == "nt_xent" else f"logit_scale={v:.3g}" if loss == "clip"
                                 else f"logit_scale={v:.3g} logit_bias={-v:.3g}" if loss == "siglip"
                                 else f"negatives={v}")
                        name = f"{loss} {backend} {dt} N={N} D={D} {vname}"
                        chk.run(name, lambda: _loss_case(loss, backend, dt, dev, N, D, v))
        if args.no_autograd_gradcheck:
            continue
        why = unavailable_reason(backend, dev, torch.float64)
        if why is not None:
            chk.report("SKIP", f"torch.autograd.gradcheck {backend} float64", why)
            continue
        for name, fn, inputs in _gradcheck_cases(backend, dev):
            chk.run(f"torch.autograd.gradcheck {backend} float64 {name}",
                    lambda: (torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5), ""))
    print(f"\n{chk.passed} passed, {chk.failed} failed, {chk.skipped} skipped in {time.perf_counter() - t0:.1f} s")
    for f in chk.failures:
        print(f"FAILED {f}")
    return 1 if chk.failed else 0


if __name__ == "__main__":
    sys.exit(main())
