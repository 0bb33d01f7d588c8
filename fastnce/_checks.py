"""Argument checks shared by the primitive and every loss: each error names the argument,
what was expected and what was received."""
from __future__ import annotations

import math
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


def check_temperature(temperature, name: str = "temperature") -> None:
    """A positive finite number (or a CPU tensor holding one; CUDA tensors are not synced)."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(temperature.shape)}")
        if temperature.device.type != "cpu" or torch.compiler.is_compiling():
            return  # reading the value would sync a GPU or break a compiled graph
        value = float(temperature.detach())
    elif isinstance(temperature, Real) and not isinstance(temperature, bool):
        value = float(temperature)
    else:
        raise TypeError(f"{name} must be a positive finite number, got {type(temperature).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def check_finite_scalar(x, name: str) -> None:
    """A finite number, or a one-element tensor (its value read only on the CPU, as above)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return
        value = float(x.detach())
    elif isinstance(x, Real) and not isinstance(x, bool):
        value = float(x)
    else:
        raise TypeError(f"{name} must be a finite number, got {type(x).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


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
