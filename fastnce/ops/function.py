"""The primitive as torch custom ops: one forward op and one backward op for every fast backend.

Backend launcher contract (fastnce/ops/tiled.py, triton_lse.py, cuda_lse.py each provide it):

    unavailable_reason(device, dtype) -> None, or a sentence saying why it cannot run
    forward(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col, symmetric)
        -> row_lse (M,), col_lse (N,) or None
    backward(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset,
             row_lse, col_lse, grad_row, grad_col, symmetric, need_bias, need_q, need_k)
        -> dq (M, D) or None, dk (N, D) or None, dbias (N,) or None

q (M, D), k (N, D) contiguous, same dtype and device; k is q when symmetric. scale a 0-dim
float32 tensor; bias (N,) or None; labels int64 or None; mask_mode one of naive.MASK_*;
exclude_offset drops the pairs j == i + offset (None: none dropped). grad_row / grad_col are
contiguous, in the LSE dtype, or None when that output gets no gradient. LSE vectors and
gradients are float32 (float64 for float64 inputs). The gradients are unscaled, G as in
DESIGN.md §1:  dq = G @ k,  dk = Gᵀ @ q,  dbias = Σ_i G[i, :];  when symmetric dq = (G + Gᵀ) @ q
and dk is None. need_q / need_k: whether dq / dk are wanted (a frozen tower, MoCo's queue: a
launcher may skip the work and return None; one that computes it anyway is correct too). The
scale, its gradient and the cast to the input dtype happen here, once.

The sigmoid primitive (similarity_sigmoid_nll, SigLIP) has its own two launchers, in tiled.py
and triton_sigmoid.py (the CUDA extension has none):

    sigmoid_forward(q, k, scale, bias, positive_offset) -> rows (M,)
    sigmoid_backward(q, k, scale, bias, positive_offset, grad_row, need_bias, need_q, need_k)
        -> G @ k (M, D) or None, Gᵀ @ q (N, D) or None, Σ G (0-dim) or None,
           G = −grad_row[i]·z·σ(−z·S)

with bias a 0-dim tensor or None and positive_offset an int or None, the rest as above.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Optional

import torch
from torch import Tensor

from .naive import lse_dtype, nan_rows_where_not_finite, nan_where_not_finite

BACKENDS = ("torch", "triton", "cuda")
# Per primitive, the module that implements each backend: "lse" (similarity_lse) and
# "sigmoid" (similarity_sigmoid_nll, whose launchers are sigmoid_forward / sigmoid_backward).
_MODULES = {
    "lse": {"torch": "fastnce.ops.tiled", "triton": "fastnce.ops.triton_lse", "cuda": "fastnce.ops.cuda_lse"},
    "sigmoid": {"torch": "fastnce.ops.tiled", "triton": "fastnce.ops.triton_sigmoid"},
}


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run here; the message says why."""


def backend_module(name: str, op: str = "lse"):
    if op not in _MODULES:
        raise ValueError(f"op must be one of {tuple(_MODULES)}, got {op!r}")
    if name not in _MODULES[op]:
        raise BackendUnavailable(
            f"backend {name!r} has no kernel for the sigmoid primitive (the CUDA extension computes "
            "the logsumexp one); use backend='triton' on CUDA tensors, or 'torch'"
        )
    try:
        return importlib.import_module(_MODULES[op][name])
    except ImportError as e:  # e.g. triton not installed
        raise BackendUnavailable(f"backend {name!r} cannot be imported: {e}") from e


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, op: str = "lse") -> Optional[str]:
    if op not in _MODULES:
        raise ValueError(f"op must be one of {tuple(_MODULES)}, got {op!r}")
    try:
        return backend_module(name, op).unavailable_reason(device, dtype)
    except BackendUnavailable as e:
        return str(e)


def _constant_under_compile(fn):
    """torch.compiler.assume_constant_result(fn): torch.compile evaluates fn once while tracing.

    That function imports torch._dynamo to set one attribute, which is 0.8 s of every
    `import fastnce` (a third of it) for users who never compile; when torch._dynamo is not
    loaded yet the attribute is set here (tests/test_ops.py checks that it is the same mark).
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, op: str = "lse") -> str:
    """The backend name that will run for primitive op ("lse" or "sigmoid"), or an error that
    says why the one asked for cannot."""
    if backend == "reference":
        return backend
    if backend == "auto":
        if device.type != "cuda" or dtype == torch.float64:
            return "torch"  # no GPU kernel computes in float64: the tiled path is the fast one
        reasons = []
        for name in _gpu_preference():
            why = unavailable_reason(name, device, dtype, op)
            if why is None:
                return name
            reasons.append(why)
        raise BackendUnavailable(
            "backend='auto' found no GPU kernel for CUDA tensors ("
            + "; ".join(reasons)
            + ("); install triton or build the CUDA extension" if op == "lse" else "); install triton")
            + ", or pass backend='torch' to use the tiled PyTorch path"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', 'reference') + BACKENDS}, got {backend!r}")
    why = unavailable_reason(backend, device, dtype, op)
    if why is not None:
        raise BackendUnavailable(f"backend={backend!r} is unavailable: {why}")
    return backend


def _gpu_preference() -> tuple[str, ...]:
    # Order by measured speed (benchmarks/RESULTS.md); triton first until the cuda kernels
    # are measured faster on a GPU.
    return ("triton", "cuda")


@contextlib.contextmanager
def _launching(q: Tensor):
    """Where a backend runs its kernels: autocast off (they choose their own precision) and, on
    a GPU, q's device made current, since Triton launches and autotunes on the current device
    (tensors on cuda:1 while cuda:0 is current would fault, or time the wrong GPU)."""
    with torch.autocast(q.device.type, enabled=False), _current_device(q.device):
        yield


def _current_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


@torch.library.custom_op("fastnce::similarity_lse", mutates_args=())
def similarity_lse_op(
    q: Tensor, k: Optional[Tensor], scale: Tensor, bias: Optional[Tensor],
    q_labels: Optional[Tensor], k_labels: Optional[Tensor], mask_mode: int,
    exclude_offset: Optional[int], with_col: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    symmetric = k is None
    with _launching(q):
        row, col = backend_module(backend).forward(
            q, q if symmetric else k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col, symmetric
        )
    row = nan_where_not_finite(row, q)
    return row, _empty(row) if col is None else nan_where_not_finite(col, q if symmetric else k)


@similarity_lse_op.register_fake
def _(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col, backend):
    N = q.shape[0] if k is None else k.shape[0]
    dt = lse_dtype(q.dtype)
    return q.new_empty((q.shape[0],), dtype=dt), q.new_empty((N if with_col else 0,), dtype=dt)


@torch.library.custom_op("fastnce::similarity_lse_backward", mutates_args=())
def similarity_lse_backward_op(
    q: Tensor, k: Optional[Tensor], scale: Tensor, bias: Optional[Tensor],
    q_labels: Optional[Tensor], k_labels: Optional[Tensor], mask_mode: int,
    exclude_offset: Optional[int], row_lse: Tensor, col_lse: Tensor,
    grad_row: Optional[Tensor], grad_col: Optional[Tensor], need_bias: bool, need_q: bool, need_k: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    symmetric = k is None
    with _launching(q):
        dq, dk, dbias = backend_module(backend).backward(
            q, q if symmetric else k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset,
            row_lse, col_lse if col_lse.numel() else None, grad_row, grad_col, symmetric, need_bias,
            need_q, need_k and not symmetric,
        )
    return _wanted(dq, need_q, row_lse), _wanted(dk, need_k and not symmetric, row_lse), _wanted(dbias, need_bias, row_lse)


def _wanted(x: Optional[Tensor], wanted: bool, like: Tensor) -> Tensor:
    """The op's output for a gradient: x, or an empty tensor where it is not wanted (also when a
    launcher computed it anyway), matching the fake implementations' shapes."""
    return x if wanted else _empty(like)


@similarity_lse_backward_op.register_fake
def _(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, row_lse, col_lse,
      grad_row, grad_col, need_bias, need_q, need_k, backend):
    dt = lse_dtype(q.dtype)
    N = q.shape[0] if k is None else k.shape[0]
    return (
        q.new_empty(q.shape if need_q else (0,), dtype=dt),
        q.new_empty(k.shape if need_k and k is not None else (0,), dtype=dt),
        q.new_empty((N if need_bias else 0,), dtype=dt),
    )


def _wanted_products(symmetric: bool, need_q, need_k, need_scale) -> tuple[bool, bool]:
    """Which of G @ k and Gᵀ @ q a backward computes: those whose gradient is wanted, and one of
    them for the scale's gradient Σ_ij G_ij q_i·k_j (G @ k unless Gᵀ @ q is computed anyway).
    A frozen side (MoCo's queue, a locked tower) costs no product."""
    want_k = bool(need_k) and not symmetric
    return bool(need_q) or (bool(need_scale) and not want_k), want_k


def scale_grad(dq_u: Optional[Tensor], q: Tensor, dk_u: Optional[Tensor], k: Optional[Tensor],
               symmetric: bool = False) -> Tensor:
    """Σ_ij G_ij q_i·k_j from whichever product was computed: Σ_i (G @ k)_i·q_i, or
    Σ_j (Gᵀ @ q)_j·k_j; the symmetric dq holds G and Gᵀ, each once."""
    if dq_u is not None:
        return (dq_u * q.to(dq_u.dtype)).sum() * (0.5 if symmetric else 1.0)
    return (dk_u * k.to(dk_u.dtype)).sum()


def _input_grads(ctx, products, q, k, scale, bias, symmetric=False):
    """(dq, dk, dscale, dbias) for the inputs (q, k, scale, bias: the first four of an autograd
    function's) that need one, from the unscaled (G @ k, Gᵀ @ q, Σ G) computed for
    ctx.needs_input_grad (see _wanted_products). Shared by the custom ops and the ring."""
    need_q, need_k, need_scale, need_bias = ctx.needs_input_grad[:4]
    want_q, want_k = _wanted_products(symmetric, need_q, need_k, need_scale)
    dq_u, dk_u, dbias = products
    dq_u, dk_u = (dq_u if want_q else None), (dk_u if want_k else None)
    dscale = scale_grad(dq_u, q, dk_u, k, symmetric).to(scale.dtype).reshape(scale.shape) if need_scale else None
    # In place: the unscaled buffers are ours, and a copy would be one more (M, D) at the peak.
    s = scale.detach()
    dq = dq_u.mul_(s.to(dq_u.dtype)).to(q.dtype) if need_q else None
    dk = dk_u.mul_(s.to(dk_u.dtype)).to(k.dtype) if want_k else None
    db = dbias.to(bias.dtype).reshape(bias.shape) if need_bias else None
    return dq, dk, dscale, db


def _setup_context(ctx, inputs, output):
    q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col, backend = inputs
    row, col = output
    ctx.save_for_backward(q, k, scale, bias, q_labels, k_labels, row, col)
    ctx.args = (mask_mode, exclude_offset, backend)


def _backward(ctx, grad_row, grad_col):
    q, k, scale, bias, q_labels, k_labels, row, col = ctx.saved_tensors
    mask_mode, exclude_offset, backend = ctx.args
    need_q, need_k, need_scale, need_bias = ctx.needs_input_grad[:4]
    symmetric = k is None
    if grad_col is not None and grad_col.numel() == 0:
        grad_col = None
    grad_row = None if grad_row is None else grad_row.contiguous()  # may arrive expanded
    grad_col = None if grad_col is None else grad_col.contiguous()
    if grad_row is None and grad_col is None:
        return None, None, None, None, None, None, None, None, None, None
    want_q, want_k = _wanted_products(symmetric, need_q, need_k, need_scale)
    products = similarity_lse_backward_op(
        q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, row, col,
        grad_row, grad_col, bool(need_bias), want_q, want_k, backend,
    )
    return *_input_grads(ctx, products, q, k, scale, bias, symmetric), None, None, None, None, None, None


similarity_lse_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastnce: double backward (create_graph=True through a loss) is not supported by the fused "
        "backends; use backend='reference' for higher-order gradients"
    )


similarity_lse_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------- the sigmoid primitive
@torch.library.custom_op("fastnce::similarity_sigmoid_nll", mutates_args=())
def similarity_sigmoid_nll_op(
    q: Tensor, k: Tensor, scale: Tensor, bias: Optional[Tensor], positive_offset: Optional[int], backend: str,
) -> Tensor:
    with _launching(q):
        row = backend_module(backend, "sigmoid").sigmoid_forward(q, k, scale, bias, positive_offset)
    return nan_rows_where_not_finite(row, q, k)


@similarity_sigmoid_nll_op.register_fake
def _(q, k, scale, bias, positive_offset, backend):
    return q.new_empty((q.shape[0],), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("fastnce::similarity_sigmoid_nll_backward", mutates_args=())
def similarity_sigmoid_nll_backward_op(
    q: Tensor, k: Tensor, scale: Tensor, bias: Optional[Tensor], positive_offset: Optional[int],
    grad_row: Tensor, need_bias: bool, need_q: bool, need_k: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    with _launching(q):
        dq, dk, dbias = backend_module(backend, "sigmoid").sigmoid_backward(
            q, k, scale, bias, positive_offset, grad_row, need_bias, need_q, need_k)
    return _wanted(dq, need_q, grad_row), _wanted(dk, need_k, grad_row), _wanted(dbias, need_bias, grad_row)


@similarity_sigmoid_nll_backward_op.register_fake
def _(q, k, scale, bias, positive_offset, grad_row, need_bias, need_q, need_k, backend):
    dt = lse_dtype(q.dtype)
    return (q.new_empty(q.shape if need_q else (0,), dtype=dt), k.new_empty(k.shape if need_k else (0,), dtype=dt),
            q.new_empty(() if need_bias else (0,), dtype=dt))


def _sigmoid_setup_context(ctx, inputs, output):
    q, k, scale, bias, positive_offset, backend = inputs
    ctx.save_for_backward(q, k, scale, bias, output)
    ctx.args = (positive_offset, backend)


def nan_grad_where_nan(grad_row: Tensor, rows: Tensor) -> Tensor:
    """grad_row with NaN where the forward's row is NaN (nan_rows_where_not_finite): the
    backward recomputes G from S, where an infinite feature's terms can be 0, and would
    otherwise give a finite gradient beside a NaN loss."""
    return torch.where(torch.isnan(rows), float("nan"), grad_row).contiguous()


def _sigmoid_backward(ctx, grad_row):
    q, k, scale, bias, rows = ctx.saved_tensors
    positive_offset, backend = ctx.args
    need_q, need_k, need_scale, need_bias = ctx.needs_input_grad[:4]
    want_q, want_k = _wanted_products(False, need_q, need_k, need_scale)
    products = similarity_sigmoid_nll_backward_op(
        q, k, scale, bias, positive_offset, nan_grad_where_nan(grad_row, rows), bool(need_bias), want_q, want_k,
        backend)
    return *_input_grads(ctx, products, q, k, scale, bias), None, None


similarity_sigmoid_nll_op.register_autograd(_sigmoid_backward, setup_context=_sigmoid_setup_context)
similarity_sigmoid_nll_backward_op.register_autograd(
    _no_double_backward, setup_context=lambda ctx, inputs, output: None)
