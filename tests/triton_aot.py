"""Compile the Triton kernels of fastnce/ops/triton_lse.py and triton_sigmoid.py for a GPU
target, without a GPU.

    python tests/triton_aot.py [sm]             the default config of every kernel variant
    python tests/triton_aot.py [sm] --configs   every autotune candidate of the kernel variants
                                                that the GPU benchmark runs, with the registers,
                                                spills and shared memory of each

Run in a process without TRITON_INTERPRET (the interpreter replaces the jitted kernels); exits
non-zero on the first compile error. The interpreter checks what the kernels compute; this
checks that the GPU compiler accepts them (code the interpreter runs as Python, such as a
return inside a constexpr branch, can still fail there) and what the compiled code costs.

Arguments are specialised as the JIT specialises them at the benchmark's shapes: pointers
16-byte aligned, integers divisible by 16. Without that hint the loads are not vectorised and
every kernel spills, which is not the code that runs on the GPU.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastnce.ops import triton_lse as T  # noqa: E402
from fastnce.ops import triton_sigmoid as TS  # noqa: E402

INPUTS = {"p_x", "p_y", "p_q", "p_k"}
LABELS = {"p_lx", "p_ly", "p_lq", "p_lk"}

# The kernel variants of the GPU benchmark (fastnce/bench/gpu.py), bf16: NT-Xent at D = 128
# (row LSE from every tile or half of them, symmetric backward from every tile or half of them), CLIP at D = 512 (one-pass row+col forward, then either the
# one-recompute atomic backward or the two-pass deterministic one).
_NO_MASK = dict(HAS_BIAS=False, MASK_MODE=0, DOT_F32=False, PREC="ieee")
_BWD = dict(HAS_G=True, WRITE_DB=False, G_NORM=False, SPREAD=T.ONE_EXP_SPREAD)
BENCH_VARIANTS = [
    ("simclr fwd", T._fwd_kernel, 128, dict(_NO_MASK, BIAS_ON_ROW=False, EXCLUDE=True)),
    ("simclr fwd half", T._fwd_half_kernel, 128, dict(_NO_MASK, EXCLUDE=True, SPREAD=T.ONE_EXP_SPREAD)),
    ("simclr bwd sym", T._bwd_kernel, 128,
     dict(_NO_MASK, **_BWD, BIAS_ON_ROW=False, EXCLUDE=True, HAS_H=False, SYM=True)),
    ("simclr bwd half", T._bwd_half_kernel, 128, dict(_NO_MASK, **_BWD, EXCLUDE=True, HAS_H=False, BDV=128)),
    ("clip panel", T._fwd_panel_kernel, 512, dict(_NO_MASK, EXCLUDE=False, SPREAD=T.ONE_EXP_SPREAD)),
    # not a benchmark case: CLIP at D = 128, where only the BK = 128 candidates remain (_prune)
    ("clip panel D=128", T._fwd_panel_kernel, 128, dict(_NO_MASK, EXCLUDE=False, SPREAD=T.ONE_EXP_SPREAD)),
    ("clip bwd atomic", T._bwd_atomic_kernel, 512, dict(_NO_MASK, **_BWD, EXCLUDE=False, HAS_H=True)),
    ("clip bwd two-pass", T._bwd_kernel, 512,
     dict(_NO_MASK, **_BWD, BIAS_ON_ROW=False, EXCLUDE=False, HAS_H=True, SYM=False)),
    # SigLIP at CLIP's width, its two kernels (the backward's dq launch; dk's differs in G_ON_ROW)
    ("siglip fwd", TS._sig_fwd_kernel, 512, dict(_NO_MASK, HAS_BIAS=True, POSITIVE=True)),
    ("siglip bwd", TS._sig_bwd_kernel, 512,
     dict(_NO_MASK, HAS_BIAS=True, POSITIVE=True, G_ON_ROW=True, WRITE_DB=False, G_NORM=False)),
    ("siglip bwd atomic", TS._sig_bwd_atomic_kernel, 512,
     dict(_NO_MASK, HAS_BIAS=True, POSITIVE=True, WRITE_DB=True, G_NORM=False)),
]


def signature(fn, consts, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INPUTS:
            sig[name] = "*" + dtype
        elif name in LABELS:
            sig[name] = "*i64"
        elif name.startswith("p_"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(target, fn, consts, dtype, num_warps, num_stages, D=512):
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}  # the flags this kernel has
    if "ONE_K" in fn.arg_names:  # as the launch's heuristic sets it
        consts = dict(consts, ONE_K=D <= consts["BK"])
    sig = signature(fn, consts, dtype)
    # every pointer and integer argument "divisible by 16", as the JIT marks them at these shapes
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n] != "constexpr"}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _ptxas(sm: int) -> str:
    """The ptxas Triton compiles with: chosen per architecture since triton 3.6, one before."""
    try:
        return get_ptxas(sm).path
    except TypeError:  # triton 3.5 (torch 2.9): get_ptxas() takes no argument
        return get_ptxas().path


def resources(kernel, sm: int) -> dict:
    """Registers and spill bytes per thread (ptxas -v of the kernel's PTX, with the ptxas Triton
    compiled it with) and shared memory."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        arch = f"sm_{sm}a" if sm >= 90 else f"sm_{sm}"
        log = subprocess.run([_ptxas(sm), "-v", f"-arch={arch}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return dict(regs=regs, spill=spill, smem_kib=kernel.metadata.shared // 1024)


def default_configs(sm: int) -> None:
    """The config used without autotuning, of every kernel, at D = 128 (one K step: BK = D) and
    D = 512 (a loop over D), bf16 and fp32, the half backward (D ≤ 128 only) and the merge: 27 LSE
    kernels; then SigLIP's forward and its two backward kernels (the two-pass one in dk's launch,
    with the bias sums) likewise: 12 more."""
    target = GPUTarget("cuda", sm, 32)
    flags = dict(HAS_BIAS=True, EXCLUDE=True, MASK_MODE=1, DOT_F32=False)
    for D, dtype, prec in ((128, "bf16", "ieee"), (512, "bf16", "ieee"), (128, "fp32", "tf32x3"), (512, "fp32", "tf32x3")):
        for kind, fn in (("fwd", T._fwd_kernel), ("panel", T._fwd_panel_kernel), ("half", T._fwd_half_kernel),
                         ("bwd", T._bwd_kernel), ("atomic", T._bwd_atomic_kernel), ("half-bwd", T._bwd_half_kernel)):
            if kind == "half-bwd" and D > T._HALF_BWD_MOST_D:
                continue
            meta = T._default_meta(kind, D)
            warps, stages = meta.pop("num_warps"), meta.pop("num_stages", 2)
            consts = dict(flags, PREC=prec, **meta)
            variants = [dict()]
            if kind == "fwd":
                consts["BIAS_ON_ROW"] = False
            consts["SPREAD"] = T.ONE_EXP_SPREAD
            if kind in ("bwd", "atomic", "half-bwd"):
                consts.update(HAS_G=True, HAS_H=True, WRITE_DB=True, G_NORM=dtype == "fp16")
            if kind == "half-bwd":  # the launcher's feature width
                consts["BDV"] = max(16, triton.next_power_of_2(D))
            if kind == "bwd":
                consts["BIAS_ON_ROW"] = False
                variants = [dict(SYM=False), dict(SYM=True, HAS_H=False, MASK_MODE=2)]
            for v in variants:
                t = time.time()
                compile_one(target, fn, dict(consts, **v), dtype, warps, stages, D)
                print(f"compiled {kind}{'' if not v else f' {v}'} {dtype} D={D} ({time.time() - t:.1f} s)", flush=True)
    compile_one(target, T._col_merge_kernel, dict(BN=128), "fp32", 4, 2)
    print("compiled merge fp32", flush=True)
    for D, dtype, prec in ((128, "bf16", "ieee"), (512, "bf16", "ieee"), (128, "fp16", "ieee"), (512, "fp32", "tf32x3")):
        for kind, fn in (("fwd", TS._sig_fwd_kernel), ("bwd", TS._sig_bwd_kernel), ("atomic", TS._sig_bwd_atomic_kernel)):
            meta = T._default_meta(kind, D)
            warps, stages = meta.pop("num_warps"), meta.pop("num_stages", 2)
            consts = dict(HAS_BIAS=True, POSITIVE=True, DOT_F32=False, PREC=prec, G_ON_ROW=False, WRITE_DB=True,
                          G_NORM=dtype == "fp16", **meta)
            compile_one(target, fn, consts, dtype, warps, stages, D)
            print(f"compiled siglip {kind} {dtype} D={D}", flush=True)


def autotune_candidates(sm: int) -> None:
    """One line per (benchmark variant, autotune candidate): 'config <variant> | <meta> | regs spill smem'."""
    target = GPUTarget("cuda", sm, 32)
    configs = {T._fwd_kernel: T._cfgs(True), T._fwd_panel_kernel: T._PANEL_CFGS, T._fwd_half_kernel: T._HALF_CFGS,
               T._bwd_kernel: T._cfgs(False), T._bwd_atomic_kernel: T._ATOMIC_CFGS,
               T._bwd_half_kernel: T._HALF_BWD_CFGS, TS._sig_fwd_kernel: T._cfgs(True),
               TS._sig_bwd_kernel: T._cfgs(False), TS._sig_bwd_atomic_kernel: T._ATOMIC_CFGS}
    for label, fn, D, flags in BENCH_VARIANTS:
        for c in T._prune(configs[fn], {"D": D}):
            r = resources(compile_one(target, fn, dict(flags, **c.kwargs), "bf16", c.num_warps, c.num_stages, D), sm)
            meta = " ".join(f"{k}={v}" for k, v in c.kwargs.items())
            print(f"config {label:<17} | {meta:<28} warps={c.num_warps:<2} stages={c.num_stages} | "
                  f"regs={r['regs']:<3} spill={r['spill']:<4} smem={r['smem_kib']}KiB", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sm = int(args[0]) if args else 90
    if "--configs" in sys.argv:
        autotune_candidates(sm)
    else:
        default_configs(sm)
