"""CPU speed suite (pytest-benchmark): the torch backend against the eager formula, forward + backward.

Not part of the default test run (pyproject's testpaths = tests). Run it with

    pytest benchmarks/ --benchmark-enable

and compare within a group (one loss and size). No timed assertions: the numbers depend on
the machine and on what else runs on it; benchmarks/RESULTS.md records measured ones. Peak
memory is measured by `fastnce-bench memory` (a fresh process per point), not here.
"""
import pytest
import torch

from fastnce.bench.memory import EAGER, make_inputs, make_loss_fn

D = 128
CASES = [("nt_xent", 512), ("nt_xent", 2048), ("clip", 1024), ("clip", 4096), ("siglip", 1024), ("siglip", 4096)]


@pytest.mark.parametrize("impl", [EAGER, "torch"])
@pytest.mark.parametrize("loss,N", CASES, ids=[f"{loss}-N{N}" for loss, N in CASES])
def test_forward_backward(benchmark, loss, N, impl):
    torch.manual_seed(0)
    inputs = make_inputs(loss, N, D, "float32", "cpu")
    fn = make_loss_fn(loss, impl, inputs)

    def step():
        for x in inputs:
            x.grad = None
        out = fn()
        out.backward()
        return out

    benchmark.group = f"{loss} N={N} D={D} float32 forward+backward"
    benchmark.extra_info.update(loss=loss, N=N, D=D, impl=impl, threads=torch.get_num_threads())
    out = benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    assert torch.isfinite(out).item()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in inputs)
