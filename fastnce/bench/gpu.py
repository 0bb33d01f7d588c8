"""`fastnce-bench gpu`: the one-call GPU check and benchmark (python -m fastnce.bench gpu).

1. Correctness: every GPU backend of the impls asked for that is available (triton with each
   of its plans, _CHECK_RUNS)
   in float16, bfloat16 and float32 against the float64 reference at a moderate size, by
   DESIGN.md §6's criterion (error ≤ 2 × the error of the reference computed in that dtype +
   a small floor), row/col LSE and every gradient.
2. The card's bf16 8192³ matmul rate.
3. Forward + backward of the loss, bf16, median ms (CUDA events) and peak memory above the
   inputs (torch.cuda.max_memory_allocated), for
       simclr-16k  fastnce.nt_xent, N = 16384 per view (2N = 32768 rows), D = 128
       clip-32k / clip-128k / clip-1m  fastnce.clip_loss, N = 32768 / 131072 / 1048576, D = 512
   (and, when asked for with --cases, siglip-32k: fastnce.siglip_loss, N = 32768, D = 512)
   and impls fastnce-triton, fastnce-cuda (if built; up to clip-128k), eager (the formulas of
   shared/anchors/gpu_anchor_bench.py), torch.compile (of the eager formula), inf-cl
   (installed with pip --no-deps from --infcl-wheel or ./carry/ when not importable). Cases
   an impl cannot run, or would not fit / would take too long, are skipped with a note; an
   OOM is caught and recorded. Achieved TFLOP/s of the fused impls counts four products of
   2·M·N·D (forward, recompute, dQ, dK; NT-Xent has M = N = 2·N_view); SigLIP's five (its
   backward recomputes S for dQ and again for dK).

Prints a table and writes <out>/gpu-<card>-<date>.json: a list of
{"case", "impl", "dtype", "ms", "peak_mib", "card"}, one per measured point (an impl that
cannot run a case gets no record); <out>/gpu-<card>-<date>-meta.json: versions, the matmul
rate, the correctness results ("checks"), a note for every point skipped, out of memory or
failed, the triton plans chosen and the cuda forward timed with its rows resident and streamed
(clip-32k). Both are rewritten after every check and every point, so that a run cut short
keeps what it measured; --append adds to the files of an earlier run (benchmarks/gpu_session.sh
runs the cuda backend, whose kernels a CUDA fault could take down with the whole process, in a
process of its own after the triton one). The fused impls are timed first, on every case, then
the baselines.

    python -m fastnce.bench gpu --infcl-wheel shared/anchors/inf_cl-1.2.1-py3-none-any.whl
    python -m fastnce.bench gpu --cases clip-32k --impls fastnce-triton,eager,torch.compile
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

CASES = {
    "simclr-16k": dict(kind="ntxent", N=16384, D=128),
    "clip-32k": dict(kind="clip", N=32768, D=512),
    "clip-128k": dict(kind="clip", N=131072, D=512),
    "clip-1m": dict(kind="clip", N=1 << 20, D=512),
    "siglip-32k": dict(kind="siglip", N=32768, D=512),
}
DEFAULT_CASES = ("simclr-16k", "clip-32k", "clip-128k", "clip-1m")  # the issues' standard cases
IMPLS = ("fastnce-triton", "fastnce-cuda", "eager", "torch.compile", "inf-cl")
FUSED = {"fastnce-triton": "triton", "fastnce-cuda": "cuda"}
TEMPERATURE = 0.1
CLIP_SCALE = 1.0 / 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initialisation
# One step of a case takes about this many seconds or more for these impls: time it once.
_SLOW_STEP_S = 1.0
# Inf-CL at N=131072 takes ~3.8 s a step on an H200 and scales as N²: 1M would be ~4 min.
_INFCL_MAX_N = 131072
# Issue 4 times the cuda backend up to clip-128k; at clip-1m a step is tens of seconds that the
# one-call budget needs for fastnce-triton's (the must-show there).
_CUDA_MAX_N = 131072
# From 2**15 rows on, the triton backend's autotune choices and plans no longer depend on N
# (triton_lse._key, _TUNE_MOST): once a fused impl has run a case of that size, a larger case of
# the same kind and D has nothing left to compile or tune, and skips the warm-up step (at clip-1m
# a step of ~10 s of the one call's budget).
_TUNED_FROM_N = 1 << 15
_tuned: set = set()  # (impl, kind, D) measured at N >= _TUNED_FROM_N in this process


# ----------------------------------------------------------------------------- small pieces

def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA A100-SXM4-40GB' -> 'a100'; else a slug."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.replace("-", " "))
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def record(case: str, impl: str, dtype: str, ms: Optional[float], peak_mib: Optional[float], card: str,
           note: Optional[str] = None) -> dict:
    r = {"case": case, "impl": impl, "dtype": dtype,
         "ms": None if ms is None else round(float(ms), 3),
         "peak_mib": None if peak_mib is None else round(float(peak_mib), 1), "card": card}
    if note:
        r["note"] = note
    return r


def write_records(records: list, out_dir: str, card: str, date: Optional[str] = None, suffix: str = "") -> str:
    """Write records as a JSON list to out_dir/gpu-<card>-<date><suffix>.json; returns the path."""
    date = date or _dt.date.today().isoformat()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"gpu-{card}-{date}{suffix}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:  # then renamed: a run killed mid-write leaves the last whole file
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def fused_flops(case: str) -> float:
    """Four products of 2·M·N·D (forward, recompute, dQ, dK); five for SigLIP (two recomputes)."""
    c = CASES[case]
    n = 2 * c["N"] if c["kind"] == "ntxent" else c["N"]
    return (5 if c["kind"] == "siglip" else 4) * 2.0 * n * n * c["D"]


def format_table(records: list, gemm_tflops: Optional[float] = None) -> str:
    lines = [f"{'case':<11} {'impl':<15} {'dtype':<9} {'ms':>10} {'peak MiB':>10} {'TFLOP/s':>8}  note"]
    for r in records:
        tf = ""
        if r["ms"] and r["impl"] in FUSED and r["case"] in CASES:
            tf = f"{fused_flops(r['case']) / (r['ms'] * 1e-3) / 1e12:.0f}"
            if gemm_tflops:
                tf += f" ({100 * float(tf) / gemm_tflops:.0f}%)"
        ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
        pk = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{r['case']:<11} {r['impl']:<15} {r['dtype']:<9} {ms:>10} {pk:>10} {tf:>8}  {r.get('note', '')}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastnce-bench gpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="directory for the JSON files")
    p.add_argument("--infcl-wheel", default=None, help="path of the inf_cl wheel (default: ./carry/inf_cl-*.whl)")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help=f"comma list from {','.join(CASES)} (default {','.join(DEFAULT_CASES)})")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {','.join(IMPLS)}")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    p.add_argument("--check-size", type=int, default=2048, help="rows of the correctness check")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed repetitions per point")
    p.add_argument("--gemm-size", type=int, default=8192,
                   help="n of the n³ bf16 matmul that gives the card's rate (0: not measured)")
    p.add_argument("--append", action="store_true",
                   help="add to this card and date's records and meta files in --out instead of replacing them")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.impls = [c for c in args.impls.split(",") if c]
    for c in args.cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    for i in args.impls:
        if i not in IMPLS:
            p.error(f"unknown impl {i!r}; choose from {', '.join(IMPLS)}")
    return args


# ----------------------------------------------------------------------------- the losses

def clip_naive(a, b, scale):
    import torch
    import torch.nn.functional as F
    logits = scale * a @ b.T
    y = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits.float(), y) + F.cross_entropy(logits.T.float(), y)) / 2


def siglip_naive(a, b, scale):
    """OpenCLIP's SigLipLoss, one process, at SigLIP's initial bias."""
    import torch
    import torch.nn.functional as F
    logits = (scale * a @ b.T).float() + SIGLIP_BIAS
    n = a.shape[0]
    labels = 2 * torch.eye(n, device=a.device) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def ntxent_naive(z1, z2, tau):
    import torch
    import torch.nn.functional as F
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = (z @ z.T).float() / tau
    n2 = s.shape[0]
    s = s.masked_fill(torch.eye(n2, dtype=torch.bool, device=s.device), float("-inf"))
    n = z1.shape[0]
    y = torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(s.device)
    return F.cross_entropy(s, y)


def clip_infcl(a, b, scale):
    import torch
    from inf_cl import cal_flash_loss
    y = torch.arange(a.shape[0], device=a.device)
    hd = min(a.shape[1], 256)
    s = float(scale)
    return (cal_flash_loss(a, b, y, s, head_dim=hd).mean() + cal_flash_loss(b, a, y, s, head_dim=hd).mean()) / 2


def ensure_infcl(wheel: Optional[str]) -> Optional[str]:
    """None when inf_cl imports (installing the wheel with pip --no-deps if needed), else why not."""
    try:
        importlib.import_module("inf_cl")
        return None
    except ImportError:
        pass
    if wheel is None:
        found = sorted(glob.glob(os.path.join("carry", "inf_cl-*.whl")))
        wheel = found[-1] if found else None
    if wheel is None or not os.path.exists(wheel):
        return "inf_cl not importable and no wheel (--infcl-wheel or ./carry/inf_cl-*.whl)"
    # Into a folder of its own: offline (no index), without touching the image's environment.
    target = os.path.join(tempfile.gettempdir(), "fastnce-infcl")
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                            "--disable-pip-version-check", "--target", target, wheel],
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"pip install {wheel} took over 120 s"
    if r.returncode != 0:
        return f"pip install {wheel} failed: {r.stderr.strip()[-300:]}"
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    try:
        importlib.import_module("inf_cl")
        return None
    except ImportError as e:
        return f"inf_cl installed but not importable: {e}"


# ----------------------------------------------------------------------------- measuring

def _step(loss_fn: Callable, xs: list, arg) -> Callable:
    def run():
        for x in xs:
            x.grad = None
        loss_fn(*xs, arg).backward()
    return run


# The bench runs on a CUDA GPU. tests/test_bench_gpu_flow.py runs the whole of main() on the
# CPU (DEVICE = "cpu", tiny cases, triton under the interpreter) so that a slip in this script
# shows in CI rather than in the one GPU call a session may get.
DEVICE = "cuda"


def _on_gpu() -> bool:
    return DEVICE == "cuda"


def _elapsed_ms(run: Callable) -> float:
    """One call of run, in ms: CUDA events on the GPU, the wall clock on the CPU."""
    import torch
    if not _on_gpu():
        t = time.perf_counter()
        run()
        return (time.perf_counter() - t) * 1e3
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    run()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


def _release() -> Optional[str]:
    """Synchronise and free the cache; a pending CUDA error comes back as a string (the caller's
    records must survive it), None when all is well."""
    import torch
    if _on_gpu():
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:
            return repr(e)[:300]
    return None


def measure(run: Callable, budget_s: float, max_reps: int = 25, clear: Optional[Callable] = None,
            warm_up: bool = True):
    """(median ms, peak MiB above what was allocated before, None on the CPU): warm-up (unless
    warm_up is False: nothing left to compile or tune), then a peak run, then reps. A step slower
    than _SLOW_STEP_S is timed once, on the peak run. clear() drops what the warm-up left that
    the peak run allocates afresh (the gradients), so that the peak counts it as the anchors'
    first call does."""
    import torch
    if warm_up:
        run()  # compiles, autotunes
        if clear is not None:
            clear()
    _release()
    if _on_gpu():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = _elapsed_ms(run)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if _on_gpu() else None
    if t > _SLOW_STEP_S * 1e3:
        return t, peak
    reps = max(3, min(max_reps, int(budget_s * 1e3 / max(t, 1e-3))))
    ts = sorted(_elapsed_ms(run) for _ in range(reps))
    return ts[len(ts) // 2], peak


def gemm_tflops(n: int = 8192) -> Optional[float]:
    """The card's bf16 n³ matrix-product rate, TFLOP/s (None for n <= 0, or if it fails)."""
    import torch
    if n <= 0:
        return None
    try:
        a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        ms, _ = measure(lambda: a @ b, 1.0)
    except Exception as e:  # the cases' numbers matter more
        print(f"bf16 matmul rate: failed ({repr(e)[:200]})", flush=True)
        return None
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- correctness

def check_backend(backend: str, dtype, n: int, symmetric: bool, bias: bool = True, D: int = 128) -> dict:
    """One backend, one dtype, vs float64: max error of each output / gradient and pass/fail."""
    import torch
    from fastnce import ops
    from fastnce.ops.naive import lse_dtype

    g = torch.Generator(device=DEVICE).manual_seed(0)
    M, N = n, (n if symmetric else n - n // 7)
    q0 = torch.nn.functional.normalize(torch.randn(M, D, device=DEVICE, generator=g), dim=1).to(dtype)
    k0 = None if symmetric else torch.nn.functional.normalize(
        torch.randn(N, D, device=DEVICE, generator=g), dim=1).to(dtype)
    b0 = torch.randn(N, device=DEVICE, generator=g).to(dtype) if bias else None
    kw = dict(exclude_self=True)
    if symmetric:
        kw.update(labels=torch.randint(0, 50, (M,), device=DEVICE, generator=g), label_mask="different")
    w_row = torch.randn(M, device=DEVICE, generator=g, dtype=torch.float64)
    w_col = torch.randn(N, device=DEVICE, generator=g, dtype=torch.float64)

    def run(be, as_dtype=None):
        cast = lambda t: None if t is None else (t if as_dtype is None else t.to(as_dtype)).detach().requires_grad_()
        q, k, b = cast(q0), cast(k0), cast(b0)
        s = torch.tensor(10.0, device=DEVICE, dtype=lse_dtype(as_dtype or dtype), requires_grad=True)
        row, col = ops.similarity_lse(q, k, s, b, col_lse=True, backend=be, **kw)
        fin = lambda t, w: (torch.where(torch.isfinite(t), t, 0).double() * w).sum()
        loss = fin(row, w_row) + fin(col, w_col)
        leaves = [t for t in (q, k, s, b) if t is not None]
        grads = torch.autograd.grad(loss, leaves)
        names = ["dq"] + ([] if symmetric else ["dk"]) + ["dscale"] + (["dbias"] if bias else [])
        return dict(zip(["row_lse", "col_lse"] + names, [row, col] + list(grads)))

    fast, low, exact = run(backend), run("reference"), run("reference", torch.float64)
    floor_rel = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    out = {"backend": backend, "dtype": str(dtype).replace("torch.", ""), "symmetric": symmetric, "bias": bias,
           "D": D, "ok": True, "errors": {}}
    for name in exact:
        ex = exact[name].double()
        f, lo = fast[name].double(), low[name].double()
        fin = torch.isfinite(ex)
        f, lo, ex = (torch.where(fin, t, 0) for t in (f, lo, ex))
        fe, re_ = (f - ex).abs().max().item(), (lo - ex).abs().max().item()
        floor = floor_rel * max(1.0, ex.abs().max().item())
        if name == "dscale" and dtype != torch.float32:  # G rounded to the dtype for the product: see tests
            floor += 2 * torch.finfo(dtype).eps * (exact["dq"].double() * q0.double()).sum(1).abs().sum().item() / 10.0
        ok = fe <= 2 * re_ + floor and bool(torch.isfinite(fast[name][torch.isfinite(exact[name])]).all())
        out["errors"][name] = {"err": fe, "ref_err": re_, "floor": floor, "ok": ok}
        out["ok"] &= ok
    return out


# (symmetric, bias, plans forced through the environment) of each correctness check at D = 128,
# for (other backends, triton): every plan of the triton backend (its ops/triton_lse.py _PLANS)
# runs once per dtype; the half symmetric plans need S without bias, as NT-Xent has it. In
# bfloat16 one more, CLIP's shape class (q ≠ k, D = 512: the cuda backend's wide backward, the
# triton kernels' D = 512 configs) with the default plans.
_CHECK_RUNS = {
    False: [(False, True, ()), (True, True, ()), (True, False, ())],
    True: [(False, True, (("FASTNCE_TRITON_BACKWARD", "atomic"),)),
           (False, True, (("FASTNCE_TRITON_BACKWARD", "two-pass"),)),
           (True, True, ()),
           (True, False, (("FASTNCE_TRITON_SYM_FORWARD", "rows"), ("FASTNCE_TRITON_SYM_BACKWARD", "mirror"))),
           (True, False, (("FASTNCE_TRITON_SYM_FORWARD", "half"), ("FASTNCE_TRITON_SYM_BACKWARD", "half"))),
           # 4 panels: each owns several row blocks, as only the bench's large cases otherwise do
           (False, False, (("FASTNCE_TRITON_PANELS", "4"),))],
}
_CLIP_CHECK_D = 512


def run_checks(n: int, backends: list, on_result: Optional[Callable] = None) -> list:
    """The correctness checks of the named GPU backends (those available) in every dtype;
    on_result(results so far) after each."""
    import torch
    from fastnce import ops
    from fastnce.ops import triton_lse

    results = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        # only the backends asked for: probing cuda would load (or build) its extension here
        available = [b for b in backends if ops.unavailable_reason(b, torch.device(DEVICE), dtype) is None]
        for be in available:
            # Checked with autotuning off (one fixed config per kernel variant): tuning each dtype
            # and mask variant here would cost minutes of compiles. The kernel code is the same
            # for every config; tests/test_triton.py's GPU tests run the tuned configs.
            tuned = getattr(triton_lse, "AUTOTUNE", False)
            if be == "triton":
                triton_lse.AUTOTUNE = False
            runs = [(sym, bias, plans, 128) for sym, bias, plans in _CHECK_RUNS[be == "triton"]]
            if dtype == torch.bfloat16:
                runs.append((False, True, (), _CLIP_CHECK_D))
            try:
                for sym, bias, plans, D in runs:
                    t0 = time.time()
                    label = "/".join([be] + [p for _, p in plans])
                    os.environ.update(plans)
                    try:
                        r = check_backend(be, dtype, n, sym, bias, D)
                    except Exception as e:  # a crash is a failed check, not a failed script
                        r = {"backend": be, "dtype": str(dtype).replace("torch.", ""), "symmetric": sym,
                             "bias": bias, "D": D, "ok": False, "error": repr(e)[:500]}
                    finally:
                        for env, _ in plans:
                            os.environ.pop(env, None)
                    r["backend"] = label
                    r["seconds"] = round(time.time() - t0, 1)
                    results.append(r)
                    if on_result is not None:
                        on_result(results)
                    worst = "" if "errors" not in r else ", ".join(
                        f"{k} {v['err']:.2g}/{2 * v['ref_err'] + v['floor']:.2g}" for k, v in r["errors"].items())
                    what = ("self" if sym else "q,k") + ("+bias" if bias else "") + f" D={D}"
                    print(f"check {label:<24} {r['dtype']:<9} {what:<9} "
                          f"{'PASS' if r['ok'] else 'FAIL'} ({r['seconds']} s) {worst}{r.get('error', '')}", flush=True)
            finally:
                triton_lse.AUTOTUNE = tuned
    return results


# ----------------------------------------------------------------------------- benchmark

def bench_case(case: str, impls: list, budget: float, card: str, infcl_why: Optional[str], notes: list) -> list:
    """Records of the impls measured on this case; what could not run goes to notes."""
    import torch
    import torch.nn.functional as F
    import fastnce

    c = CASES[case]
    N, D = c["N"], c["D"]
    dt = torch.bfloat16
    try:
        free = torch.cuda.mem_get_info()[0] if _on_gpu() else float("inf")
    except Exception:  # a CUDA error pending from an earlier point: each impl reports its own
        free = float("inf")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    if c["kind"] == "ntxent":
        xs = [torch.randn(N, D, device=DEVICE, generator=g).to(dt).requires_grad_() for _ in range(2)]
        arg = TEMPERATURE
        rows = 2 * N
    else:
        xs = [F.normalize(torch.randn(N, D, device=DEVICE, generator=g), dim=1).to(dt).requires_grad_()
              for _ in range(2)]
        arg = torch.tensor(SIGLIP_SCALE if c["kind"] == "siglip" else CLIP_SCALE, device=DEVICE, requires_grad=True)
        rows = N
    out = []
    for impl in impls:
        note, fn = None, None
        if impl in FUSED:
            why = fastnce.ops.unavailable_reason(FUSED[impl], torch.device(DEVICE), dt,
                                                 "sigmoid" if c["kind"] == "siglip" else "lse")
            if why:
                note = f"unavailable: {why}"
            elif impl == "fastnce-cuda" and N > _CUDA_MAX_N:
                note = f"skipped: the cuda backend is timed up to N = {_CUDA_MAX_N} (one-call time budget)"
            elif c["kind"] == "ntxent":
                fn = lambda z1, z2, t, _b=FUSED[impl]: fastnce.nt_xent(z1, z2, t, backend=_b)
            elif c["kind"] == "siglip":
                fn = lambda a, b, s, _b=FUSED[impl]: fastnce.siglip_loss(a, b, s, SIGLIP_BIAS, backend=_b)
            else:
                fn = lambda a, b, s, _b=FUSED[impl]: fastnce.clip_loss(a, b, s, backend=_b)
        elif impl in ("eager", "torch.compile"):
            # bytes per logit measured on an H200 (DESIGN §5): eager CLIP 18.5 GB at 32768², compiled 4.1 GB
            need = rows * rows * (17.5 if impl == "eager" else 4.0)
            if need > 0.9 * free:
                note = f"skipped: would need ~{need / 2**30:.0f} GiB"
            else:
                base = {"ntxent": ntxent_naive, "clip": clip_naive, "siglip": siglip_naive}[c["kind"]]
                # static shapes: one compile per case, as a user with a fixed batch gets (a second
                # shape would otherwise recompile it dynamic, another kernel)
                fn = base if impl == "eager" else torch.compile(base, dynamic=False)
        elif impl == "inf-cl":
            if c["kind"] == "ntxent":
                note = "skipped: Inf-CL cannot mask the diagonal"
            elif c["kind"] == "siglip":
                note = "skipped: Inf-CL has no sigmoid loss"
            elif infcl_why:
                note = f"skipped: {infcl_why}"
            elif N > _INFCL_MAX_N:
                note = f"skipped: ~{3.8 * (N / 131072) ** 2:.0f} s a step (quadratic from 3.8 s at 128k)"
            else:
                fn = clip_infcl
        if fn is None:
            notes.append(record(case, impl, "bf16", None, None, card, note))
            print(f"{case:<11} {impl:<15} {note}", flush=True)
            continue
        t0 = time.time()
        clear = lambda: [setattr(x, "grad", None) for x in xs + ([arg] if hasattr(arg, "grad") else [])]
        tuned = (impl, c["kind"], D)
        warm_up = not (impl in FUSED and tuned in _tuned)
        try:
            ms, peak = measure(_step(fn, xs, arg), budget if N <= 32768 else budget / 5,
                               max_reps=25 if N <= 32768 else 3, clear=clear, warm_up=warm_up)
            r = record(case, impl, "bf16", ms, peak, card)
            if impl in FUSED and N >= _TUNED_FROM_N:
                _tuned.add(tuned)
        except torch.OutOfMemoryError:
            r = record(case, impl, "bf16", None, None, card, "OOM")
        except Exception as e:  # one impl failing must not lose the others' numbers
            r = record(case, impl, "bf16", None, None, card, f"error: {repr(e)[:300]}")
        clear()
        error = _release()
        if error and r["ms"] is not None:  # the step's kernels faulted after it was timed
            r = record(case, impl, "bf16", None, None, card, f"error after timing: {error}")
        (notes if r["ms"] is None else out).append(r)
        print(f"{case:<11} {impl:<15} {r['ms']} ms, {r['peak_mib']} MiB {r.get('note', '')} "
              f"({time.time() - t0:.0f} s{' with warm-up' if warm_up else ', no warm-up: tuned'})", flush=True)
    del xs
    _release()
    return out


def time_cuda_forward_rows(case: str, budget: float) -> dict:
    """The case's cuda forward (bf16; row and column LSE for clip) with the block's rows held in
    shared memory and streamed with the keys (FASTNCE_CUDA_FORWARD_ROWS): the measurement for
    csrc/lse_plan.h forward_resident, which holds them by an L2-traffic argument. {plan: ms}."""
    import torch
    import torch.nn.functional as F
    import fastnce

    why = fastnce.ops.unavailable_reason("cuda", torch.device(DEVICE), torch.bfloat16)
    if why:
        return {"not measured": why}
    c = CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a, b = (F.normalize(torch.randn(c["N"], c["D"], device=DEVICE, generator=g), dim=1).to(torch.bfloat16)
            for _ in range(2))
    with_col = c["kind"] == "clip"
    out, env, before = {}, "FASTNCE_CUDA_FORWARD_ROWS", os.environ.get("FASTNCE_CUDA_FORWARD_ROWS")
    for rows in ("resident", "streamed"):
        os.environ[env] = rows
        try:
            ms, _ = measure(lambda: fastnce.ops.lse_forward(a, b, CLIP_SCALE, col_lse=with_col, backend="cuda"),
                            budget)
            out[rows] = round(ms, 3)
        except Exception as e:  # the benchmark's other numbers matter more
            out[rows] = f"error: {repr(e)[:200]}"
    if before is None:
        del os.environ[env]
    else:
        os.environ[env] = before
    del a, b
    _release()
    return out


def _load(path: str, default):
    """The JSON in path, or default; a file that does not parse is moved aside, not overwritten."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return default
    except ValueError:
        os.replace(path, path + ".unreadable")
        print(f"{path} did not parse: kept as {path}.unreadable", flush=True)
        return default


def run_order(impls: list, cases: list) -> list:
    """(impl, case) pairs in the order measured, so that a run cut short by its deadline loses
    the least: the fused impls on the cases up to 128k (the issues' must-shows), the anchors they
    are compared with (Inf-CL, torch.compile up to 32k), then clip-1m on the fused impls (a
    step of tens of seconds), then the rest (eager, torch.compile at 128k)."""
    def rank(pair):
        impl, case = pair
        big = CASES[case]["N"] > 131072
        if impl in FUSED:
            return 3 if big else 0
        if impl == "inf-cl":
            return 1
        if impl == "torch.compile" and CASES[case]["N"] <= 32768:
            return 2
        return 4
    return sorted(((i, c) for i in impls for c in cases), key=rank)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from fastnce.ops import triton_lse

    if _on_gpu() and not torch.cuda.is_available():
        print("fastnce-bench gpu: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    t_start = time.time()
    name = torch.cuda.get_device_name() if _on_gpu() else "CPU (smoke test)"
    card = card_slug(name)
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    print(f"{name} | torch {torch.__version__} cuda {torch.version.cuda} | triton {tv}", flush=True)
    date = _dt.date.today().isoformat()
    records_path = os.path.join(args.out, f"gpu-{card}-{date}.json")
    meta_path = os.path.join(args.out, f"gpu-{card}-{date}-meta.json")
    records = _load(records_path, []) if args.append else []
    meta = _load(meta_path, {}) if args.append else {}
    meta.update({"device": name, "card": card, "date": date, "torch": torch.__version__, "cuda": torch.version.cuda,
                 "triton": tv})
    notes = meta.setdefault("not_measured", [])
    checks_before = meta.setdefault("checks", [])[:]

    def save():  # after every check and every point: a run cut short keeps what it measured
        write_records(records, args.out, card, date)
        write_records(meta, args.out, card, date, suffix="-meta")

    if not args.skip_check:
        backends = [FUSED[i] for i in args.impls if i in FUSED]

        def on_result(results):
            meta["checks"] = checks_before + results
            save()
        checks = run_checks(args.check_size, backends, on_result)
        bad = [r for r in checks if not r["ok"]]
        print(f"correctness: {len(checks) - len(bad)}/{len(checks)} passed -> {meta_path}", flush=True)

    tflops = gemm_tflops(args.gemm_size)
    if tflops is not None:
        print(f"bf16 {args.gemm_size}^3 matmul: {tflops:.0f} TFLOP/s", flush=True)
        meta[f"bf16_matmul_{args.gemm_size}_tflops"] = round(tflops, 1)
    tflops = tflops or next((v for k, v in meta.items() if k.startswith("bf16_matmul_")), None)
    infcl_why = ensure_infcl(args.infcl_wheel) if "inf-cl" in args.impls else None
    if infcl_why:
        print(f"inf-cl: {infcl_why}", flush=True)
    for impl, case in run_order(args.impls, args.cases):
        records.extend(bench_case(case, [impl], args.budget, card, infcl_why, notes))
        print(f"  ({time.time() - t_start:.0f} s since the start)", flush=True)
        # which plan (symmetric forward and backward; non-symmetric backward) the triton backend timed faster
        meta["triton_plans"] = {**meta.get("triton_plans", {}),
                                **{str(k): v for k, v in triton_lse.timed_plans().items()}}
        save()
    print(f"triton plans: {meta.get('triton_plans', {})}", flush=True)
    if "fastnce-cuda" in args.impls and "clip-32k" in args.cases:
        meta["cuda_forward_rows_ms"] = {"clip-32k": time_cuda_forward_rows("clip-32k", args.budget)}
        save()
        print(f"cuda forward, rows resident / streamed: {meta['cuda_forward_rows_ms']}", flush=True)
    save()
    print()
    print(format_table(records + notes, tflops))
    print(f"\nwrote {records_path} and {meta_path} ({time.time() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
