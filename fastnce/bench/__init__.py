"""Benchmarks and self-checks: `fastnce-bench memory | gradcheck | gpu` (python -m fastnce.bench)."""

import argparse
import math


def positive_int(text: str) -> int:
    """argparse type: an int ≥ 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an int ≥ 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def _number(text: str, kind, ok, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def file_stem(text: str) -> str:
    """argparse type: a file name without a directory (the directory is --out's)."""
    if not text or text in (".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"expected a file name without a directory (--out gives that), got {text!r}")
    return text


def device_arg(text: str) -> str:
    """argparse type: a torch device string (cpu, cuda, cuda:1, ...)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    return text


def require_device(prog: str, device: str) -> None:
    """A clean exit where a CUDA device is asked for and torch sees none."""
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{prog}: --device {device} asked for, but torch.cuda.is_available() is False")


def checked_backends(prog: str, names: str, device: str, dtype) -> list:
    """The comma-separated backend names, each able to run on device in dtype; else a clean exit
    with the reason (fastnce.ops.resolve_backend's words)."""
    import torch

    from fastnce.ops import BackendUnavailable, resolve_backend

    backends = [b.strip() for b in names.split(",") if b.strip()]
    if not backends:
        raise SystemExit(f"{prog}: --backends names no backend")
    for b in backends:
        try:
            resolve_backend(b, torch.device(device), dtype)
        except (ValueError, BackendUnavailable) as e:
            raise SystemExit(f"{prog}: {e}") from None
    return backends
