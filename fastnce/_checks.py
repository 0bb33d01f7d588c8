"""Argument checks shared by the primitive and every loss: each error names the argument,
what was expected and what was received."""
from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_features(name: str, x, ndim: int = 2) -> Tensor:
    """A floating-point tensor of ndim dims with at least one row and one column."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): at least one row is needed")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has no feature dimension (shape {tuple(x.shape)})")
    return x


def cast_under_autocast(*xs):
    """xs with their tensors cast to autocast's dtype when autocast is on for their device and
    their dtypes differ (float16 / bfloat16 / float32 ones: what eager's matmul would cast, e.g.
    bfloat16 queries beside a float32 queue); else unchanged, and check_same rejects a mix."""
    ts = [x for x in xs if isinstance(x, Tensor)]
    if len({x.dtype for x in ts}) < 2 or not torch.is_autocast_enabled(ts[0].device.type):
        return xs
    dt = torch.get_autocast_dtype(ts[0].device.type)
    return tuple(x.to(dt) if isinstance(x, Tensor) and x.dtype in FLOAT_DTYPES[:3] else x for x in xs)


def check_same(names_tensors: dict, what=("device", "dtype")) -> None:
    """All tensors share device and dtype (None entries are skipped)."""
    items = [(n, t) for n, t in names_tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        for attr in what:
            if getattr(t, attr) != getattr(first, attr):
                raise ValueError(
                    f"{n} must have the same {attr} as {first_name} ({getattr(first, attr)}), got {getattr(t, attr)}"
                )


def check_dim_match(name_a: str, a: Tensor, name_b: str, b: Tensor, dim_a: int = -1, dim_b: int = -1, what="feature dimension"):
    if a.shape[dim_a] != b.shape[dim_b]:
        raise ValueError(
            f"{name_b} must have the same {what} as {name_a} ({a.shape[dim_a]}), got {b.shape[dim_b]} (shape {tuple(b.shape)})"
        )


def _finite(value) -> bool:
    # Not math.isfinite: under torch.compile a Python float argument that changes between calls
    # becomes a symbolic float, which comparisons (guards) accept and math.isfinite does not.
    return value - value == 0


def check_real_dtype(name: str, x: Tensor) -> None:
    """A scalar tensor holds a real number: not a bool (a Python bool is refused too), not a
    complex (its imaginary part would be dropped with a warning)."""
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must hold a real number, got a tensor of dtype {x.dtype}")


def _check_number(x, name: str, positive: bool) -> None:
    what = "a positive finite number" if positive else "a finite number"
    if isinstance(x, Tensor):
        check_real_dtype(name, x)
        if x.numel() != 1 or x.dim() > 1:  # (1, 1) would broadcast a (N,) loss to (1, N)
            raise ValueError(f"{name} must be a scalar (a number, or a tensor of shape () or (1,)), "
                             f"got a tensor of shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            return  # reading the value would sync the GPU
        if torch.compiler.is_compiling():  # reading it would break the graph: the graph checks it
            t = x.detach()
            ok = (t - t) == 0
            torch._assert_async(ok & (t > 0) if positive else ok, f"{name} must be {what}")
            return
        value = float(x.detach())
    elif isinstance(x, Real) and not isinstance(x, bool):
        value = float(x)
    else:
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}")
    if not _finite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {what}, got {value}")


def check_temperature(temperature, name: str = "temperature") -> None:
    """A positive finite number, or a one-element tensor holding one (read on the CPU only: a
    CUDA tensor is not synced; under torch.compile the graph asserts it)."""
    _check_number(temperature, name, positive=True)


def reciprocal_temperature(temperature, like: Tensor, numerator: float = 1.0):
    """numerator / temperature, the logits' scale; a float16 / bfloat16 temperature tensor is
    divided in float32 (its reciprocal rounded to 16 bits was off by up to ~4e-3, where
    info-nce-pytorch divides float32 logits by it).

    Under torch.compile a number becomes a 0-dim tensor on like's device first: torch 2.11
    specialised a float computed from a float argument (1 / t) on its value where it met a
    tensor, a graph per value of a temperature schedule (torch 2.13 does not); the argument
    itself stays symbolic."""
    if isinstance(temperature, Tensor):
        if temperature.dtype in (torch.float16, torch.bfloat16):
            temperature = temperature.float()
    elif torch.compiler.is_compiling():
        from .ops.naive import lse_dtype  # here: fastnce.ops imports this module

        temperature = torch.ones((), dtype=lse_dtype(like.dtype), device=like.device) * temperature
    return numerator / temperature


def check_finite_scalar(x, name: str) -> None:
    """A finite number, or a one-element tensor holding one (checked as check_temperature's)."""
    _check_number(x, name, positive=False)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_labels(name: str, labels, n: int, n_name: str, device) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class labels, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one label per row of {n_name}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on the same device as {n_name} ({device}), got {labels.device}")
    return labels.to(torch.int64).contiguous()
