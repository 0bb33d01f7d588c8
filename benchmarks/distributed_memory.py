"""Per-rank peak memory of fastnce.distributed at a fixed global batch, W = 1, 2, 4 on CPU.

    python benchmarks/distributed_memory.py                      # CLIP, N=4096 pairs, D=2048
    python benchmarks/distributed_memory.py --loss nt_xent --n 2048 --dim 2048 --worlds 1 2 4

W gloo processes on 127.0.0.1 share a global batch of N rows (N/W each); every rank runs
one forward + backward of the loss and reports its peak memory above what it held just
before the call.

Method (CPU has no allocator statistics, so resident memory is read from the kernel):
* Before the measured call each rank has its inputs allocated and has run the same loss once
  on a tiny batch, so libraries, gloo's connections and lazy initialisation are paid for.
* The baseline is VmRSS right then; /proc/self/clear_refs ('5') resets the high-water
  mark VmHWM to it; after forward + backward, peak above inputs = VmHWM − baseline.
  It counts everything the call allocates and is alive at its worst moment, the input
  gradients (.grad, kept after the call) included.
* glibc's malloc keeps freed memory for reuse, which would make RSS lag behind the live
  tensors; every allocation over 64 KiB is therefore served by mmap
  (MALLOC_MMAP_THRESHOLD_=65536, set before the ranks start), so a freed tensor leaves
  RSS at once and the high-water mark follows the live tensors.
W = 1 is the single-process loss (fastnce.distributed calls through), the baseline that the
ring divides by W. The 'gather' scheme is shown for contrast: it holds all N keys per rank.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks

import torch  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _loss(fd, loss, scheme, a, b):
    if loss == "clip":
        return fd.clip_loss(a, b, torch.tensor(10.0), scheme=scheme)
    if loss == "siglip":
        return fd.siglip_loss(a, b, torch.tensor(10.0), torch.tensor(-10.0), scheme=scheme)
    return fd.nt_xent(a, b, 0.1, scheme=scheme)


def _worker(rank, world, port, args, outdir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, args.threads // world))
    import torch.distributed as dist

    import fastnce.distributed as fd

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    n = args.n // world
    g = torch.Generator().manual_seed(rank)
    # Warm-up on a tiny batch: imports, gloo pairs, lazy init.
    tiny = [torch.randn(3, 8, generator=g).requires_grad_() for _ in range(2)]
    _loss(fd, args.loss, args.scheme, *tiny).backward()
    a = torch.nn.functional.normalize(torch.randn(n, args.dim, generator=g), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, args.dim, generator=g), dim=1).requires_grad_()
    dist.barrier()
    base = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    _loss(fd, args.loss, args.scheme, a, b).backward()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    dist.barrier()
    with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
        json.dump({"rank": rank, "peak_above_inputs": peak, "seconds": seconds,
                   "inputs": 2 * n * args.dim * 4}, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, world):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(world, _free_port(), args, outdir), nprocs=world, join=True)
        ranks = [json.load(open(os.path.join(outdir, f"{r}.json"))) for r in range(world)]
    return {
        "loss": args.loss, "scheme": args.scheme if world > 1 else "single-process", "world_size": world,
        "global_n": args.n, "dim": args.dim,
        "inputs_mib_per_rank": ranks[0]["inputs"] / 2**20,
        "peak_mib_per_rank_max": max(r["peak_above_inputs"] for r in ranks) / 2**20,
        "peak_mib_per_rank": [round(r["peak_above_inputs"] / 2**20, 1) for r in ranks],
        "seconds_max": max(r["seconds"] for r in ranks),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=("clip", "nt_xent", "siglip"), default="clip")
    p.add_argument("--n", type=int, default=4096, help="global batch: CLIP pairs, or NT-Xent rows per view")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--schemes", nargs="+", default=["ring", "gather"], choices=("ring", "gather"))
    p.add_argument("--threads", type=int, default=2, help="CPU threads shared by the ranks")
    p.add_argument("--json", help="append one JSON line per measurement to this file")
    args = p.parse_args(argv)
    for w in args.worlds:
        if args.n % w:
            p.error(f"--n {args.n} is not divisible by world size {w}")
    rows, done_single = [], False
    for scheme in args.schemes:
        for w in args.worlds:
            if w == 1 and done_single:
                continue  # W = 1 is the single-process loss whatever the scheme
            args.scheme = scheme
            r = measure(args, w)
            done_single |= w == 1
            rows.append(r)
            print(f"{r['loss']:8s} {r['scheme']:15s} W={w}  N={args.n} D={args.dim}  inputs/rank "
                  f"{r['inputs_mib_per_rank']:7.1f} MiB  peak above inputs/rank {r['peak_mib_per_rank_max']:7.1f} MiB "
                  f"{r['peak_mib_per_rank']}  {r['seconds_max']:.1f} s", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
