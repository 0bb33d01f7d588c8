"""Peak memory of SupCon and soft-nearest-neighbour losses: fastnce (torch backend, tiled) vs
their eager references (fastnce/losses/naive.py, the full N×N matrix), CPU, forward + backward.

Each point runs in a fresh subprocess; the number is the peak RSS above the inputs
(ru_maxrss after − before), as /work/shared/anchors/cpu_anchor_bench.py measures ("cold").
"warm" first runs the same loss once at N=64, so one-time library set-up (thread pools, BLAS
buffers, glibc's mmap threshold adapting to the first large frees) is not counted, for
either implementation.

    python benchmarks/losses_memory.py [N] [D]      -> one JSON line per (loss, impl, cold/warm), then ratios
    python benchmarks/losses_memory.py --child LOSS IMPL N D WARM
"""
import json
import os
import resource
import subprocess
import sys
import time


def child(loss, impl, N, D, warm):
    import torch
    from fastnce import losses as L
    from fastnce.losses import naive as R

    def make(n):
        x = torch.randn(n, D, requires_grad=True)
        y = torch.randint(0, max(1, n // 8), (n,))  # about 8 samples per class
        if loss == "supcon":
            if impl == "fastnce":
                return x, lambda: L.supcon_loss(x, y, 0.1, backend="torch")
            return x, lambda: R.supcon_naive(x, y, 0.1)
        if impl == "fastnce":
            return x, lambda: L.soft_nearest_neighbor_loss(x, y, 1.0, backend="torch")
        return x, lambda: R.soft_nearest_neighbor_naive(x, y, 1.0)

    torch.manual_seed(0)
    if warm:
        _, g = make(64)
        g().backward()
    x, f = make(N)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    value = f()
    value.backward()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(loss=loss, impl=impl, mode="warm" if warm else "cold", N=N, D=D, s=round(dt, 3), value=round(float(value), 5),
                          peak_rss_mib=round(peak / 1024, 1), delta_mib=round((peak - base) / 1024, 1))))


def main(N, D):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(here) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = {}
    for loss in ("supcon", "soft_nearest_neighbor"):
        for impl in ("fastnce", "eager"):
            for warm in (0, 1):
                r = subprocess.run([sys.executable, __file__, "--child", loss, impl, str(N), str(D), str(warm)],
                                   capture_output=True, text=True, timeout=1200, env=env)
                line = r.stdout.strip() or json.dumps(dict(loss=loss, impl=impl, N=N, error=r.stderr.strip()[-300:]))
                print(line, flush=True)
                rows[loss, impl, warm] = json.loads(line)
    for loss in ("supcon", "soft_nearest_neighbor"):
        for warm in (0, 1):
            a, b = rows[loss, "fastnce", warm], rows[loss, "eager", warm]
            if "delta_mib" in a and "delta_mib" in b:
                print(f"{loss} ({'warm' if warm else 'cold'}): fastnce {a['delta_mib']} MiB, {a['s']} s vs eager "
                      f"{b['delta_mib']} MiB, {b['s']} s -> 1/{b['delta_mib'] / max(a['delta_mib'], 0.1):.1f} of eager memory")


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 8192, int(sys.argv[2]) if len(sys.argv) > 2 else 128)
