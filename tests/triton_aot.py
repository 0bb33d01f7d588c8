"""Compile every Triton kernel of fastnce/ops/triton_lse.py for a GPU target, without a GPU.

Run as a script in a process without TRITON_INTERPRET (the interpreter replaces the jitted
kernels): python tests/triton_aot.py [sm] — exits non-zero on the first compile error.
The interpreter checks what the kernels compute; this checks that the GPU compiler accepts
them (code the interpreter runs as Python, such as a return inside a constexpr branch or a
loop with a runtime step, can still fail there).
"""
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastnce.ops import triton_lse as T  # noqa: E402

D = 512
INPUTS = {"p_x", "p_y", "p_q", "p_k"}
LABELS = {"p_lx", "p_ly", "p_lq", "p_lk"}


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


def compile_one(target, label, fn, consts, dtype, num_warps, num_stages):
    t = time.time()
    triton.compile(ASTSource(fn, signature(fn, consts, dtype), consts), target=target,
                   options=dict(num_warps=num_warps, num_stages=num_stages))
    print(f"compiled {label} {dtype} ({time.time() - t:.1f} s)", flush=True)


def main(sm: int) -> None:
    target = GPUTarget("cuda", sm, 32)
    flags = dict(HAS_BIAS=True, EXCLUDE=True, MASK_MODE=1, DOT_F32=False)
    for dtype, prec in (("bf16", "ieee"), ("fp32", "tf32x3")):
        for kind, fn in (("fwd", T._fwd_kernel), ("panel", T._fwd_panel_kernel), ("bwd", T._bwd_kernel),
                         ("atomic", T._bwd_atomic_kernel)):
            meta = T._default_meta(kind, D)
            warps, stages = meta.pop("num_warps"), meta.pop("num_stages", 2)
            consts = dict(flags, PREC=prec, **meta)
            variants = [dict()]
            if kind == "fwd":
                consts["BIAS_ON_ROW"] = False
            if kind in ("bwd", "atomic"):
                consts.update(HAS_G=True, HAS_H=True, WRITE_DB=True, G_NORM=dtype == "fp16")
            if kind == "bwd":
                consts["BIAS_ON_ROW"] = False
                variants = [dict(SYM=False), dict(SYM=True, HAS_H=False, MASK_MODE=2)]
            for v in variants:
                c = dict(consts, **v)
                compile_one(target, kind + ("" if not v else f" {v}"), fn, c, dtype, warps, stages)
    compile_one(target, "merge", T._col_merge_kernel, dict(BN=128), "fp32", 4, 2)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
