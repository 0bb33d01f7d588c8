"""torch.compile and torch.autocast around every loss module of fastnce.losses."""
import copy

import pytest
import torch
import torch._dynamo

import fastnce.losses as L

N, D = 12, 6


def cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    x, y = r(N, D), torch.randint(0, 3, (N,), generator=g)
    return {
        "NTXentLoss": (L.NTXentLoss(), (r(N, D), r(N, D))),
        "NTXentLoss-3views": (L.NTXentLoss(), ([r(N, D) for _ in range(3)],)),
        "DCLLoss": (L.DCLLoss(), (r(N, D), r(N, D))),
        "DCLWLoss": (L.DCLWLoss(), (r(N, D), r(N, D))),
        "MoCoLoss": (L.MoCoLoss(D, 32), (r(N, D), r(N, D))),
        "ClipLoss": (L.ClipLoss(), (r(N, D), r(N, D))),
        "SigLipLoss": (L.SigLipLoss(), (r(N, D), r(N, D))),
        "CPCLoss": (L.CPCLoss(5, D, 2), (r(3, 7, 5), r(3, 7, D))),
        "DINOLoss": (L.DINOLoss(output_dim=D), ([r(N, D) for _ in range(2)], [r(N, D) for _ in range(3)])),
        "SwAVLoss": (L.SwAVLoss(), ([r(N, D) for _ in range(2)],)),
        "NCELoss": (L.NCELoss(), (r(N), r(N), r(N, 3), r(N, 3))),
        "SupConLoss": (L.SupConLoss(), (x, y)),
        "SoftNearestNeighborLoss": (L.SoftNearestNeighborLoss(), (x, y)),
        "ContrastiveLoss": (L.ContrastiveLoss(), (x, y)),
        "TripletMarginLoss": (L.TripletMarginLoss(), (x, y)),
        "NPairsLoss": (L.NPairsLoss(), (x, y)),
        "LiftedStructureLoss": (L.LiftedStructureLoss(), (x, y)),
    }


# pytorch-metric-learning's semantics branch on the data (classes found by torch.unique,
# AvgNonZeroReducer's count of non-zero losses): these compile with graph breaks only.
DATA_DEPENDENT = {"SupConLoss", "SoftNearestNeighborLoss", "ContrastiveLoss", "TripletMarginLoss", "NPairsLoss",
                  "LiftedStructureLoss"}


@pytest.mark.parametrize("name", list(cases()))
def test_compile_matches_eager(name):
    module, args = cases()[name]
    twin = copy.deepcopy(module)  # DINO's centre and MoCo's queue change with every call
    want = module(*args)
    compiled = torch.compile(twin, fullgraph=name not in DATA_DEPENDENT, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), want)
    # the state a step leaves (MoCo's queue and pointer, DINO's centre), and the next step on it
    torch.testing.assert_close(dict(twin.named_buffers()), dict(module.named_buffers()))
    torch.testing.assert_close(compiled(*args), module(*args))
    torch.testing.assert_close(dict(twin.named_buffers()), dict(module.named_buffers()))


@pytest.mark.parametrize("name", sorted(set(cases()) - DATA_DEPENDENT))
def test_one_graph(name):
    """No graph break (a break is also a device-to-host sync on a GPU: MoCo's queue pointer read
    with int() was one). explain counts them where compile(fullgraph=True) of a module let that
    one through."""
    module, args = cases()[name]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(*args)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


# CPC's predictions W_k c_t are its predictors' nn.Linear products: autocast runs them in its
# dtype, as it would the same layers in a CPC model; the loss on them is float32.
AUTOCAST_LAYERS = {"CPCLoss"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(cases()))
def test_autocast_leaves_float32_inputs_in_float32(name, dtype):
    """The README: autocast is off inside the losses, so float32 inputs give float32's loss and
    gradients under it (the metric losses' distance products once ran in 16 bits there: a
    batch-hard triplet gradient 0.17 off, a bfloat16 loss)."""
    module, args = cases()[name]
    args = _requiring_grad(args)
    twin = copy.deepcopy(module)
    leaves = [t for t in _tensors(args) if t.requires_grad]
    want = module(*args)
    want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
    with torch.autocast("cpu", dtype=dtype):
        got = twin(*args)
    got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
    assert got.dtype == torch.float32
    if name in AUTOCAST_LAYERS:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        return
    torch.testing.assert_close(got, want)
    assert [g is None for g in got_grads] == [g is None for g in want_grads]
    torch.testing.assert_close([g for g in got_grads if g is not None], [g for g in want_grads if g is not None])


def _requiring_grad(args):
    if isinstance(args, (list, tuple)):
        return type(args)(_requiring_grad(a) for a in args)
    return args.detach().requires_grad_() if args.is_floating_point() else args


def _tensors(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _tensors(a)
        else:
            yield a


def test_dino_warm_up_epochs_in_one_graph():
    """DINOLoss(..., epoch=e), lightly's call during the teacher temperature's warm-up: one graph
    with fullgraph (the schedule's value was once read with float(): a data-dependent guard), and
    a few graphs, not one an epoch, over the epochs."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(1)
    t = [torch.randn(4, 8, generator=g) for _ in range(2)]
    s = [torch.randn(4, 8, generator=g) for _ in range(3)]
    module = L.DINOLoss(output_dim=8, warmup_teacher_temp_epochs=10)
    twin = copy.deepcopy(module)
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for epoch in range(12):
        torch.testing.assert_close(compiled(t, s, epoch=epoch), module(t, s, epoch=epoch))
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


@pytest.mark.parametrize("name", ["SwAVLoss", "DINOLoss", "NTXentLoss", "ClipLoss"])
def test_one_graph_for_every_batch_size(name):
    """dynamic=True over nine batch sizes (past dynamo's limit of 8 graphs): SwAV's Sinkhorn once
    took math.log of the batch size, a graph per size and then an error."""
    from torch._dynamo.utils import counters

    module = cases()[name][0]
    g = torch.Generator().manual_seed(2)
    twin = copy.deepcopy(module)
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (3, 4, 5, 7, 9, 12, 17, 31, 64):
        x = [torch.randn(n, D, generator=g) for _ in range(2)]
        args = (x, x[::-1]) if name == "DINOLoss" else (x,) if name == "SwAVLoss" else tuple(x)
        torch.testing.assert_close(compiled(*args), module(*args))
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
