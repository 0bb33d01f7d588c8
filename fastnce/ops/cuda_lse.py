"""The `cuda` backend: the primitive in CUDA C++ (csrc/), registered as torch ops fastnce_cuda::*.

The kernels come from the extension `fastnce._C` when setup.py built it
(FASTNCE_BUILD_CUDA=1 pip install --no-build-isolation -e .); otherwise csrc/ is compiled on
first use with torch.utils.cpp_extension.load (cached in torch's extensions directory, so only
the first process pays the minute or two). The launcher contract is fastnce/ops/function.py's.

Kernel design (csrc/lse_kernels.cuh): 64 x 64 tiles of S, 4 warps each holding a 32 x 32
sub-tile, D streamed through shared memory 64 columns at a time; fp16/bf16 products on tensor
cores (WMMA), fp32 by plain FMA, or as tf32 on tensor cores when torch allows tf32 matmuls
(naive.tf32_allowed). Forward: online softmax over column tiles,
column LSEs merged by an atomic log-add-exp; for k = q without bias (NT-Xent) only the tiles on
and above the diagonal, the rows below getting their part through the column LSEs. Backward: a
row kernel (dq) and a column kernel (dk, dbias) that recompute S per tile; for k = q without
bias (NT-Xent) the row kernel alone, each tile giving G and its mirror: dq = (G + Gᵀ) @ q from
2 products instead of 4. G's terms (row and column, G and its mirror) share one exponential
per entry where the tile's LSEs lie within 40 of each other (16-bit and tf32 products), as in
the Triton kernels; up to D = 128 the accumulators stay in registers.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch

from .naive import tf32_allowed

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_JIT_NAME = "fastnce_cuda_jit"
_BUILD_HINT = "install the CUDA toolkit or build with FASTNCE_BUILD_CUDA=1 pip install --no-build-isolation -e ."

_lock = threading.Lock()
_state: Optional[str] = None  # None: not tried yet; "" loaded; else why it failed
_fakes_registered = False


def sources_dir() -> Optional[Path]:
    """csrc/ of a source checkout (editable install) or fastnce/_csrc of a regular install."""
    here = Path(__file__).resolve().parent.parent  # fastnce/
    for d in (here.parent / "csrc", here / "_csrc"):
        if (d / "lse_kernels.cu").is_file() and (d / "lse_ops.cpp").is_file():
            return d
    return None


def _built_extension() -> bool:
    try:
        return importlib.util.find_spec("fastnce._C") is not None
    except (ImportError, ValueError):
        return False


def _nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists():
        return str(Path(CUDA_HOME, "bin", "nvcc"))
    return shutil.which("nvcc")


def _load() -> str:
    """Load (or compile) the extension once; '' on success, else the reason it failed."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        try:
            if _built_extension():
                import fastnce._C  # noqa: F401  (registers fastnce_cuda::*)
            else:
                from torch.utils.cpp_extension import load

                src = sources_dir()
                if src is None:
                    raise RuntimeError("the CUDA sources (csrc/) are not in this installation")
                load(
                    name=_JIT_NAME,
                    sources=[str(src / "lse_ops.cpp"), str(src / "lse_kernels.cu")],
                    extra_include_paths=[str(src)],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3"],
                    is_python_module=False,
                    verbose=os.environ.get("FASTNCE_VERBOSE_BUILD", "0") == "1",
                )
            _register_fakes()
            _state = ""
        except Exception as e:  # compile or load failure: report it, never crash the caller
            _state = f"the CUDA extension failed to build or load ({type(e).__name__}: {str(e).strip()[:500]})"
        return _state


def _register_fakes() -> None:
    """Shape functions for torch.compile / opcheck (the C++ side registers CUDA kernels only)."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("fastnce_cuda::lse_forward")
    def _(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col, symmetric, allow_tf32):
        return q.new_empty((q.shape[0],), dtype=torch.float32), q.new_empty(
            (k.shape[0] if with_col else 0,), dtype=torch.float32
        )

    @torch.library.register_fake("fastnce_cuda::lse_backward")
    def _(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, row_lse, col_lse,
          grad_row, grad_col, symmetric, need_bias, need_q, need_k, allow_tf32):
        return (
            q.new_empty(q.shape if need_q or symmetric else (0,), dtype=torch.float32),
            q.new_empty(k.shape if need_k and not symmetric else (0,), dtype=torch.float32),
            q.new_empty((k.shape[0] if need_bias else 0,), dtype=torch.float32),
        )

    _fakes_registered = True


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    device = torch.device(device)
    if dtype not in SUPPORTED_DTYPES:
        return f"the cuda backend supports float16, bfloat16 and float32, got {dtype}"
    if device.type != "cuda":
        extra = "" if torch.version.cuda else " (and this torch is a CPU-only build)"
        return f"the cuda backend runs on CUDA tensors, got a tensor on {device}{extra}"
    if torch.version.cuda is None:
        return "this torch is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU or no driver)"
    if _state is None and not _built_extension():
        if sources_dir() is None:
            return "the CUDA extension fastnce._C is not built and the csrc/ sources are missing: reinstall fastnce"
        if _nvcc() is None:
            return f"the CUDA extension fastnce._C is not built and nvcc was not found to compile it: {_BUILD_HINT}"
    why = _load()
    return why or None


def _allow_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and tf32_allowed()


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def forward(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col, symmetric):
    _require()
    row, col = torch.ops.fastnce_cuda.lse_forward(
        q, k, scale.to(torch.float32).reshape(()), _f32(bias), q_labels, k_labels, int(mask_mode),
        exclude_offset, bool(with_col), bool(symmetric), _allow_tf32(q.dtype),
    )
    return row, (col if with_col else None)


def backward(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset,
             row_lse, col_lse, grad_row, grad_col, symmetric, need_bias, need_q=True, need_k=True):
    _require()
    dq, dk, dbias = torch.ops.fastnce_cuda.lse_backward(
        q, k, scale.to(torch.float32).reshape(()), _f32(bias), q_labels, k_labels, int(mask_mode),
        exclude_offset, _f32(row_lse), _f32(col_lse) if grad_col is not None else None,
        _f32(grad_row), _f32(grad_col), bool(symmetric), bool(need_bias), bool(need_q), bool(need_k),
        _allow_tf32(q.dtype),
    )
    return ((dq if need_q or symmetric else None), (None if symmetric or not need_k else dk),
            (dbias if need_bias else None))


def _require() -> None:
    why = _load()
    if why:
        raise RuntimeError(f"fastnce cuda backend: {why}")
