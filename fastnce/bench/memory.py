"""`fastnce-bench memory`: peak memory and time of a loss, forward + backward, against batch size.

For every batch size it runs each fast backend (fastnce.ops.available_backends minus
'reference'; triton is left out on CPU, where it only runs under the interpreter) and the
eager PyTorch formula a user would write (the N×N logits materialised, F.cross_entropy),
on the same seeded inputs, and reports

* peak memory above the inputs, forward + backward. CPU: peak RSS (ru_maxrss after the call)
  minus the RSS just before it, in a fresh child process per point, after a warm-up call on
  tiny inputs so that one-time costs (lazy imports, BLAS thread pools) are not counted.
  CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the call.
* time of forward + backward: the median wall time of the timed calls (a single call when one
  call already takes longer than --time-budget); on the CPU also the median process CPU time
  (cpu_s, user + system over all threads), a steadier figure when other processes compete for
  the cores (the JSON records the load average before and after).
* the largest relative difference of the loss and of the input gradients against the eager
  formula at the same size (the eager one is skipped above --skip-eager-above; then n/a).

Prints a table and writes <device>-<date>-<loss>.{csv,json,png} into --out
(<device> is 'cpu' or 'cuda-<card>'): the PNG has memory vs batch size and time vs batch
size, log-log, one line per implementation.

    fastnce-bench memory                               # NT-Xent, N per view 512..4096, D=128
    fastnce-bench memory --sizes 8192 --loss nt_xent   # the CPU headline of benchmarks/RESULTS.md
    fastnce-bench memory --device cuda --sizes 4096,16384,65536 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

from . import checked_backends, device_arg, file_stem, non_negative_int, positive_float, positive_int, require_device

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows: no peak-RSS figure there
    resource = None

LOSSES = ("nt_xent", "clip", "info_nce", "siglip")
DTYPES = ("float32", "float64", "float16", "bfloat16")
EAGER = "eager"
TEMPERATURE = 0.1
CLIP_SCALE = 1.0 / 0.07  # OpenCLIP's initial logit_scale.exp()
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initialisation
DEFAULT_SIZES = (512, 1024, 2048, 4096)
# CPU: eager NT-Xent at N=8192 per view needs ~3.4 GB; at 16384, ~14 GB.
DEFAULT_SKIP_EAGER_ABOVE_CPU = 8192
FIELDS = (
    "loss", "impl", "device", "dtype", "N", "rows", "cols", "D", "status", "peak_mib", "time_s",
    "time_runs", "cpu_s", "loss_value", "rel_diff_loss", "rel_diff_grad", "match", "mem_vs_eager",
    "time_vs_eager", "matrix_mib", "error",
)
# Largest relative difference against the eager formula that still counts as equal.
MATCH_TOL = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


# ----------------------------------------------------------------------------- the losses

def _torch_dtype(name: str):
    import torch
    return getattr(torch, name)


def make_inputs(loss: str, N: int, D: int, dtype: str, device: str, negatives: int = 0, seed: int = 0):
    """Seeded leaf tensors (requires_grad) for one point; the same in every process."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    dt = _torch_dtype(dtype)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # drawn in fp32 on the CPU: same everywhere
    if loss == "nt_xent":
        xs = [randn(N, D), randn(N, D)]
    elif loss in ("clip", "siglip"):
        xs = [F.normalize(randn(N, D), dim=1), F.normalize(randn(N, D), dim=1)]
    elif loss == "info_nce":
        xs = [randn(N, D), randn(N, D)] + ([randn(negatives, D)] if negatives else [])
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    xs = [x.to(device=device, dtype=dt).requires_grad_() for x in xs]
    # fastnce.ops.naive.lse_dtype's rule, spelt out: eager's measuring process never imports fastnce
    sdt = torch.float64 if dt == torch.float64 else torch.float32
    scalars = {"clip": [CLIP_SCALE], "siglip": [SIGLIP_SCALE, SIGLIP_BIAS]}.get(loss, [])
    return xs + [torch.tensor(v, dtype=sdt, device=device, requires_grad=True) for v in scalars]


def make_loss_fn(loss: str, impl: str, inputs):
    """A closure computing the loss (scalar, mean reduction) with `impl`: 'eager' or a backend."""
    import torch
    import torch.nn.functional as F

    if impl == EAGER:
        if loss == "nt_xent":  # as in shared/anchors/cpu_anchor_bench.py (naive_ntxent)
            a, b = inputs
            N = a.shape[0]

            def f():
                z = F.normalize(torch.cat([a, b]), dim=1)
                s = z @ z.T / TEMPERATURE
                s = s.masked_fill(torch.eye(2 * N, dtype=torch.bool, device=z.device), float("-inf"))
                y = torch.cat([torch.arange(N, 2 * N), torch.arange(0, N)]).to(z.device)
                return F.cross_entropy(s, y)
        elif loss == "clip":  # OpenCLIP's ClipLoss, one process
            a, b, scale = inputs

            def f():
                logits = scale * a @ b.T
                y = torch.arange(a.shape[0], device=a.device)
                return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
        elif loss == "siglip":  # OpenCLIP's SigLipLoss, one process
            a, b, scale, bias = inputs

            def f():
                logits = scale * a @ b.T + bias
                n = a.shape[0]
                labels = 2 * torch.eye(n, device=a.device, dtype=a.dtype) - torch.ones(n, n, device=a.device, dtype=a.dtype)
                return -F.logsigmoid(labels * logits).sum() / n
        else:  # info-nce-pytorch 0.1.4's formula
            q, p, *neg = inputs

            def f():
                qn, pn = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
                if not neg:
                    logits = qn @ pn.T
                    y = torch.arange(q.shape[0], device=q.device)
                else:
                    nn_ = F.normalize(neg[0], dim=-1)
                    pos = torch.sum(qn * pn, dim=1, keepdim=True)
                    logits = torch.cat([pos, qn @ nn_.T], dim=1)
                    y = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
                return F.cross_entropy(logits / TEMPERATURE, y)
        return f

    import fastnce

    if loss == "nt_xent":
        a, b = inputs
        return lambda: fastnce.nt_xent(a, b, TEMPERATURE, backend=impl)
    if loss == "clip":
        a, b, scale = inputs
        return lambda: fastnce.clip_loss(a, b, scale, backend=impl)
    if loss == "siglip":
        a, b, scale, bias = inputs
        return lambda: fastnce.siglip_loss(a, b, scale, bias, backend=impl)
    q, p, *neg = inputs
    return lambda: fastnce.info_nce(q, p, neg[0] if neg else None, TEMPERATURE, backend=impl)


def matrix_shape(loss: str, N: int, negatives: int = 0) -> tuple[int, int]:
    if loss == "nt_xent":
        return 2 * N, 2 * N
    if loss == "info_nce" and negatives:
        return N, negatives
    return N, N


# ----------------------------------------------------------------------------- one point

def _rss_now_kib() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_kib() -> int:
    if resource is None:  # pragma: no cover
        raise RuntimeError("fastnce-bench memory needs the resource module (Linux or macOS) for CPU peak memory")
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def _one_call(fn, inputs, sync=None):
    for x in inputs:
        x.grad = None
    if sync:
        sync()
    t = time.perf_counter()
    out = fn()
    out.backward()
    if sync:
        sync()
    return time.perf_counter() - t, out


def _cpu_seconds() -> float:
    if resource is None:  # pragma: no cover
        return time.process_time()
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed_calls(fn, inputs, repeats: int, budget: float, sync=None):
    """Wall times of the calls, their process CPU times (user + system, all threads), last output."""
    times, cpu = [], []
    while True:
        c = _cpu_seconds()
        dt, out = _one_call(fn, inputs, sync)
        cpu.append(_cpu_seconds() - c)
        times.append(dt)
        if len(times) >= repeats or sum(times) >= budget:
            return times, cpu, out


def _result_tensors(out, inputs):
    import torch
    return {"loss": out.detach().double().cpu(), "grads": [
        (torch.zeros_like(x) if x.grad is None else x.grad).detach().double().cpu() for x in inputs]}


def measure_cpu_point(spec: dict) -> dict:
    """Run in a fresh child process: one (impl, N) point on the CPU. Writes loss/grads to spec['save']."""
    import gc

    import torch

    if spec["impl"] != EAGER:
        import fastnce  # noqa: F401  (imported before the baseline, as a user's script would)

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    # Warm-up on tiny inputs: lazy imports, custom-op dispatch set-up and BLAS thread pools
    # are paid once per process, not per call, so they stay out of the measurement.
    tiny = make_inputs(spec["loss"], 8, spec["D"], spec["dtype"], "cpu", min(spec["negatives"], 8))
    _one_call(make_loss_fn(spec["loss"], spec["impl"], tiny), tiny)
    del tiny
    inputs = make_inputs(spec["loss"], spec["N"], spec["D"], spec["dtype"], "cpu", spec["negatives"])
    fn = make_loss_fn(spec["loss"], spec["impl"], inputs)
    gc.collect()
    base_now, base_max = _rss_now_kib(), _maxrss_kib()
    base = base_now if base_now is not None else base_max
    times, cpu, out = _timed_calls(fn, inputs, spec["repeats"], spec["time_budget"])
    peak = _maxrss_kib()
    # max(…, 0): the kernel's RSS counters are batched per thread, so at tiny sizes the current
    # RSS read before can exceed the later high-water mark by ~100 KiB
    rec = dict(status="ok", peak_mib=round(max(peak - base, 0) / 1024, 1), time_s=round(statistics.median(times), 4),
               time_runs=len(times), cpu_s=round(statistics.median(cpu), 3), times=[round(t, 4) for t in times],
               loss_value=float(out.detach()))
    if spec.get("save"):
        torch.save(_result_tensors(out, inputs), spec["save"])
    return rec


def measure_cuda_point(spec: dict) -> tuple[dict, Optional[dict]]:
    """One (impl, N) point on the current CUDA device, in this process."""
    import torch

    dev = torch.device(spec["device"])
    sync = lambda: torch.cuda.synchronize(dev)
    inputs = fn = None
    try:
        inputs = make_inputs(spec["loss"], spec["N"], spec["D"], spec["dtype"], spec["device"], spec["negatives"])
        fn = make_loss_fn(spec["loss"], spec["impl"], inputs)
        _one_call(fn, inputs, sync)  # warm-up: compilation, autotuning, cuBLAS workspaces
        for x in inputs:
            x.grad = None
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        times, _, out = _timed_calls(fn, inputs, spec["repeats"], spec["time_budget"], sync)
        peak = torch.cuda.max_memory_allocated(dev)
        rec = dict(status="ok", peak_mib=round((peak - base) / 2**20, 1), time_s=round(statistics.median(times), 6),
                   time_runs=len(times), loss_value=float(out.detach()))
        return rec, _result_tensors(out, inputs)
    except torch.cuda.OutOfMemoryError as e:
        return dict(status="oom", error=str(e).splitlines()[0][:300]), None
    except Exception as e:  # one failing backend should not lose the other points
        return dict(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"), None
    finally:
        del inputs, fn
        torch.cuda.empty_cache()


def _run_child(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "fastnce.bench.memory", "--child", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status="timeout", error=f"no result within {timeout:.0f} s")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        why = "killed (out of memory?)" if r.returncode in (-9, 137) else f"exit code {r.returncode}"
        tail = r.stderr.strip().splitlines()[-1:] or [""]
        return dict(status="error", error=f"{why}: {tail[0][:300]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- comparison

def _rel(a, b) -> float:
    """max |a − b| / max |b| (0 when both are 0); inf when a has NaN/inf where b does not."""
    import torch
    if a.shape != b.shape:
        return float("inf")
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    a, b = torch.where(both_inf, 0.0, a), torch.where(both_inf, 0.0, b)
    num = (a - b).abs().max().item() if a.numel() else 0.0
    den = b.abs().max().item() if b.numel() else 0.0
    if not math.isfinite(num):
        return float("inf")
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def compare(res: dict, ref: dict) -> tuple[float, float]:
    """(relative difference of the loss, largest relative difference over the input gradients)."""
    dl = _rel(res["loss"].reshape(1), ref["loss"].reshape(1))
    dg = max((_rel(a, b) for a, b in zip(res["grads"], ref["grads"])), default=0.0)
    return dl, dg


# ----------------------------------------------------------------------------- the run

def default_impls(device: str, dtype: str, loss: str = "nt_xent") -> list[str]:
    import torch
    from fastnce.ops import available_backends

    op = "sigmoid" if loss == "siglip" else "lse"
    names = [b for b in available_backends(device, _torch_dtype(dtype), op) if b != "reference"]
    if torch.device(device).type == "cpu":
        names = [b for b in names if b != "triton"]  # the interpreter is a test path, not a speed path
    return names


def is_cuda_device(device: str) -> bool:
    return str(device).startswith("cuda")


def _device_tag(device: str) -> str:
    import torch
    if torch.device(device).type != "cuda":
        return "cpu"
    card = torch.cuda.get_device_name(torch.device(device))
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")


def machine_info(device: str) -> dict:
    import torch
    import fastnce

    info = dict(python=platform.python_version(), torch=torch.__version__, fastnce=fastnce.__version__,
                platform=platform.platform(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def _loadavg():
    """1-minute load average (other processes on the machine skew CPU timings), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in re.split(r"[,\s]+", text.strip()) if s]
    except ValueError:
        sizes = []
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastnce-bench memory",
        description="Peak memory above the inputs and time of a loss (forward + backward) against batch "
                    "size, for each fast backend and the eager PyTorch formula.")
    p.add_argument("--loss", choices=LOSSES, default="nt_xent")
    p.add_argument("--sizes", type=_parse_sizes, default=list(DEFAULT_SIZES),
                   help="batch sizes N (per view for nt_xent: the matrix is 2N×2N), comma separated "
                        f"(default {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--dim", type=positive_int, default=128, help="feature dimension D (default 128)")
    p.add_argument("--negatives", type=non_negative_int, default=0,
                   help="info_nce only: number of unpaired negative keys (default 0: in-batch negatives)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to measure (default: every available one but "
                        "'reference'; on the CPU 'triton' only when named here)")
    p.add_argument("--no-eager", action="store_true", help="do not run the eager formula")
    p.add_argument("--skip-eager-above", type=positive_int, default=None, metavar="N",
                   help="do not run the eager formula for sizes above N (default: "
                        f"{DEFAULT_SKIP_EAGER_ABOVE_CPU} on the CPU, no limit on CUDA)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed calls per point (default 3 on the CPU, 10 on CUDA); fewer when they "
                        "exceed --time-budget")
    p.add_argument("--time-budget", type=positive_float, default=2.0,
                   help="seconds of timed calls per point after which no more are made (default 2)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch.set_num_threads in each CPU point (default: torch's default, one per core); "
                        "1 gives steadier times when other processes compete for the cores")
    p.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds per CPU point (default 1800)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="folder for the CSV, JSON and PNG (default benchmarks/results)")
    p.add_argument("--name", type=file_stem, default=None,
                   help="file stem, written in --out (default <device>-<date>-<loss>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.1e}"
        return f"{v:.{nd}g}" if abs(v) < 1 else f"{v:,.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def format_table(records: list[dict]) -> str:
    cols = [("N", "N"), ("impl", "impl"), ("status", "status"), ("peak_mib", "peak MiB"), ("time_s", "time s"), ("cpu_s", "cpu s"),
            ("mem_vs_eager", "mem/eager"), ("time_vs_eager", "time/eager"), ("rel_diff_loss", "Δloss rel"),
            ("rel_diff_grad", "Δgrad rel"), ("match", "match")]
    rows = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in records]
    w = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def _unique_stem(out: str, stem: str) -> str:
    cand, i = stem, 2
    while any(os.path.exists(os.path.join(out, cand + ext)) for ext in (".csv", ".json", ".png")):
        cand, i = f"{stem}-{i}", i + 1
    return cand


def write_outputs(records: list[dict], meta: dict, out: str, stem: str, plot: bool = True) -> dict:
    import csv

    os.makedirs(out, exist_ok=True)
    paths = {"csv": os.path.join(out, stem + ".csv"), "json": os.path.join(out, stem + ".json")}
    with open(paths["csv"], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
    with open(paths["json"], "w") as fh:
        json.dump({"meta": meta, "records": records}, fh, indent=1, default=str)
    if plot:
        paths["png"] = os.path.join(out, stem + ".png")
        plot_records(records, meta, paths["png"])
    return paths


def plot_records(records: list[dict], meta: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    for impl in impls:
        pts = sorted((r["N"], r["peak_mib"], r["time_s"]) for r in records
                     if r["impl"] == impl and r.get("status") == "ok")
        if not pts:
            continue
        style = dict(marker="o", linestyle="--" if impl == EAGER else "-", label=impl)
        ax_m.plot([p[0] for p in pts], [max(p[1], 0.1) for p in pts], **style)
        ax_t.plot([p[0] for p in pts], [p[2] for p in pts], **style)
    sizes = sorted({r["N"] for r in records})
    xlabel = "N per view (matrix 2N×2N)" if meta["loss"] == "nt_xent" else "batch size N"
    for ax, ylabel in ((ax_m, "peak memory above inputs (MiB)"), (ax_t, "forward + backward time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    where = meta.get("machine", {}).get("gpu") or f"CPU, {meta.get('machine', {}).get('cpu_count')} cores"
    fig.suptitle(f"fastnce {meta['loss']}, D={meta['dim']}, {meta['dtype']}, {where} ({meta['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(args) -> tuple[list[dict], dict]:
    import torch

    device = args.device
    is_cuda = torch.device(device).type == "cuda"
    require_device("fastnce-bench memory", device)
    if args.backends:  # each must run here: else the reason, not a traceback
        impls = checked_backends("fastnce-bench memory", args.backends, device, _torch_dtype(args.dtype))
    else:
        impls = default_impls(device, args.dtype, args.loss)
    if not args.no_eager:
        impls = [EAGER] + impls
    skip_above = args.skip_eager_above
    if skip_above is None and not is_cuda:
        skip_above = DEFAULT_SKIP_EAGER_ABOVE_CPU
    repeats = args.repeats or (10 if is_cuda else 3)
    sizes = sorted(set(args.sizes))

    load_start = _loadavg()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    records: list[dict] = []
    points = [(N, impl) for N in sizes for impl in impls]
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(points), disable=args.quiet, desc=f"{args.loss} {device}", unit="pt", file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    with tempfile.TemporaryDirectory(prefix="fastnce-bench-") as tmp:
        for N in sizes:
            results = {}
            rows, cols = matrix_shape(args.loss, N, args.negatives)
            for impl in impls:
                if bar is not None:
                    bar.set_postfix_str(f"N={N} {impl}")
                spec = dict(loss=args.loss, impl=impl, N=N, D=args.dim, dtype=args.dtype, device=device,
                            negatives=args.negatives, repeats=repeats, time_budget=args.time_budget,
                            threads=args.threads)
                rec = dict(loss=args.loss, impl=impl, device=device, dtype=args.dtype, N=N, rows=rows, cols=cols,
                           D=args.dim, matrix_mib=round(rows * cols * 4 / 2**20, 1))
                if impl == EAGER and skip_above is not None and N > skip_above:
                    rec.update(status="skipped", error=f"eager skipped above N={skip_above}")
                elif is_cuda:
                    r, res = measure_cuda_point(spec)
                    rec.update(r)
                    if res is not None:
                        results[impl] = res
                else:
                    spec["save"] = os.path.join(tmp, f"{impl}-{N}.pt")
                    rec.update(_run_child(spec, args.timeout))
                    if rec.get("status") == "ok" and os.path.exists(spec["save"]):
                        results[impl] = torch.load(spec["save"])
                        os.remove(spec["save"])
                records.append(rec)
                if bar is not None:
                    bar.update(1)
            _annotate(records[-len(impls):], results, args.dtype)
    if bar is not None:
        bar.close()
    meta = dict(loss=args.loss, sizes=sizes, dim=args.dim, dtype=args.dtype, device=device, impls=impls,
                negatives=args.negatives, temperature=TEMPERATURE,
                threads=args.threads or torch.get_num_threads(), repeats=repeats, time_budget=args.time_budget,
                date=started, finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                command="fastnce-bench memory " + " ".join(args._argv),
                memory=("peak RSS above the RSS just before the call, fresh child process per point, after a "
                        "tiny warm-up call" if not is_cuda else
                        "torch.cuda.max_memory_allocated above memory_allocated before the call, after a warm-up"),
                machine=machine_info(device), load_avg_start=load_start, load_avg_end=_loadavg())
    return records, meta


def _annotate(recs: list[dict], results: dict, dtype: str) -> None:
    """Fill in the comparison with the eager formula for the records of one size."""
    eager = next((r for r in recs if r["impl"] == EAGER and r.get("status") == "ok"), None)
    ref = results.get(EAGER)
    for r in recs:
        if r.get("status") != "ok" or r["impl"] == EAGER:
            continue
        if eager is not None:
            if eager["peak_mib"] > 0:
                r["mem_vs_eager"] = round(r["peak_mib"] / eager["peak_mib"], 4)
            if eager["time_s"] > 0:
                r["time_vs_eager"] = round(r["time_s"] / eager["time_s"], 3)
        if ref is not None and r["impl"] in results:
            dl, dg = compare(results[r["impl"]], ref)
            r["rel_diff_loss"], r["rel_diff_grad"] = dl, dg
            r["match"] = bool(dl <= MATCH_TOL[dtype] and dg <= MATCH_TOL[dtype])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(measure_cpu_point(json.loads(args.child))), flush=True)
        return 0
    args._argv = argv
    records, meta = run_benchmark(args)
    print(format_table(records))
    la = (meta["load_avg_start"], meta["load_avg_end"])
    if not is_cuda_device(args.device) and all(x is not None for x in la) and max(la) > 1.5 * (os.cpu_count() or 1):
        print(f"note: 1-min load average {la[0]} -> {la[1]} on {os.cpu_count()} cores: other processes were "
              "running, the CPU times are skewed", file=sys.stderr)
    date = meta["date"][:10]
    stem = args.name or _unique_stem(args.out, f"{_device_tag(args.device)}-{date}-{args.loss}")
    paths = write_outputs(records, meta, args.out, stem, plot=not args.no_plot)
    print("wrote " + ", ".join(paths.values()))
    bad = [r for r in records if r.get("match") is False]
    for r in bad:
        print(f"MISMATCH: {r['impl']} at N={r['N']}: loss rel diff {r['rel_diff_loss']:.2e}, "
              f"grad rel diff {r['rel_diff_grad']:.2e}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
