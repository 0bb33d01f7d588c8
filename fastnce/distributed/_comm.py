"""Communication pieces for fastnce.distributed: who the ranks are, one small exchange of
shapes and flags per loss call, ring point-to-point transfers, and two autograd-aware
collectives (all-gather with a summing backward, and a mean-over-ranks gradient for
replicated scalars such as the temperature or CLIP's logit_scale).

Every cross-rank operation that sits inside the loss's graph has a backward that moves the
gradient across ranks too. Two known ways to get this wrong, both avoided here:

* lightly #1528: an all-gather whose backward returns only this rank's slice of its *own*
  gradient (or all-reduces the wrong slices) drops the other ranks' contributions to this
  rank's rows. The right backward sums, over ranks, every rank's gradient for the slot of
  this rank's rows: a reduce-scatter of the whole gathered gradient (`_AllGather`).
* lightly #1977: a raw, autograd-unaware `dist.all_reduce` in the forward gives every rank
  the global value but only the local gradient path, which DDP's averaging then divides by
  the world size. Here no collective in the forward is hidden from autograd.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Every dtype has a code (gather_keys moves any tensor); the table is the same on every rank
# that runs the same torch.
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
_CALLS = ("nt_xent", "dcl_loss", "clip_loss", "siglip_loss", "info_nce", "gather_keys")
_REDUCTIONS = ("mean", "sum", "none")
# The columns of the per-call exchange, the same for every call so that ranks which disagree
# on anything, even on which function they called, still meet in one all-gather of equal size.
_FIELDS = ("failed", "call", "rows", "keys", "dim", "dtype", "mode", "reduction", "flags", "layout",
           "scalar0", "scalar1")

# torch 2.13 renamed the tensor-in/tensor-out collectives; GPU machines may run older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def initialized(group=None) -> bool:
    """Whether torch.distributed is initialised; a ValueError for a process outside `group`
    (it can take no part in the group's loss)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group")
    return True


def is_active(group=None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    return initialized(group) and dist.get_world_size(group) > 1


def _comm_device(x, group=None) -> torch.device:
    """Where small bookkeeping tensors live: NCCL only talks CUDA tensors, gloo either."""
    if isinstance(x, Tensor) and x.is_cuda:
        return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RankInfo:
    """This rank's place in the group and the per-rank shapes of one loss call.

    rows[s], keys[s]: how many loss rows and how many key rows rank s holds, learnt by
    `exchange` (ranks may hold different numbers of rows).
    """

    def __init__(self, group, rows: list, keys: list):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        g = group if group is not None else dist.group.WORLD
        self.next = dist.get_global_rank(g, (self.rank + 1) % self.size)  # P2P peers are global ranks
        self.prev = dist.get_global_rank(g, (self.rank - 1) % self.size)
        self.rows, self.keys = rows, keys
        self.total_rows = sum(self.rows)
        self.row_offset = sum(self.rows[: self.rank])
        self.key_offset = sum(self.keys[: self.rank])

    @property
    def mean_factor(self) -> float:
        """W / N: turns this rank's sum over its rows into its share of the global mean.

        With equal local batches it is 1 / (local rows): the rank's own mean. The ranks'
        losses then average to the single-process mean, and under DDP's gradient averaging
        the parameters get exactly the single-process gradient.
        """
        return self.size / self.total_rows

    def block(self, t: int) -> int:
        """The rank whose key block this rank holds at ring step t (blocks move rank → rank+1)."""
        return (self.rank - t) % self.size


def _scalar_bits(x, device: torch.device) -> Tensor:
    """x (a number, a one-element tensor or None) as the int64 bits of its float64 value, (1,);
    on the device without a host sync."""
    if x is None:
        return torch.zeros(1, dtype=torch.int64, device=device)
    if isinstance(x, Tensor):
        v = x.detach().reshape(1).to(device=device, dtype=torch.float64)
    else:
        v = torch.tensor([float(x)], dtype=torch.float64, device=device)
    return (v + 0.0).view(torch.int64)  # + 0.0: -0.0 becomes 0.0, the same value for the loss


def _gather_table(local: Tensor, group) -> list:
    W = dist.get_world_size(group)
    table = torch.empty(W * local.numel(), dtype=torch.int64, device=local.device)
    _all_gather_single(table, local, group=group)
    return table.view(W, -1).T.cpu().tolist()  # one list per field, one entry per rank


def exchange(what: str, group, device: torch.device, *, rows: int, keys: int, dim: int, dtype: torch.dtype,
             mode: int = 0, mode_names: str = "scheme, negative_keys or negative_mode", reduction: str = "none",
             flags: Optional[dict] = None, scalars: Optional[dict] = None, layout: tuple = ()) -> RankInfo:
    """One all-gather of this call's description (_FIELDS); checks that the ranks agree; RankInfo.

    mode: an integer that must agree across ranks (scheme and argument layout), mode_names what
    it encodes, for the error; flags: {name: requires_grad} of every tensor whose gradient
    crosses ranks (the backward is collective, so they must agree); scalars: up to two
    {name: value} that must be equal on every rank (temperature, logit_scale, logit_bias);
    layout: a tuple of ints that must agree (gather_keys: its trailing shape).
    A mismatch, or a rank whose own checks failed (fail_together), is a ValueError on every
    rank instead of a hang in a later collective or silent garbage.
    """
    flags, scalars = flags or {}, scalars or {}
    local = torch.tensor([0, _CALLS.index(what), rows, keys, dim, _DTYPES.index(dtype), mode,
                          _REDUCTIONS.index(reduction), sum(int(bool(f)) << i for i, f in enumerate(flags.values())),
                          hash(tuple(layout)) & ((1 << 62) - 1)], dtype=torch.int64, device=device)
    bits = [_scalar_bits(v, device) for v in scalars.values()] + [_scalar_bits(None, device)] * (2 - len(scalars))
    col = dict(zip(_FIELDS, _gather_table(torch.cat([local] + bits), group)))
    failed = [s for s, f in enumerate(col["failed"]) if f]
    if failed:
        raise ValueError(f"fastnce.distributed.{what}: rank(s) {failed} of the group raised an error before the "
                         f"collective part of this call (it is raised there: rejected arguments, or MoCoLoss's local "
                         f"loss); every rank raises instead of waiting for them")

    def differs(field):
        return len(set(col[field])) != 1

    prefix = f"fastnce.distributed.{what}:"
    if differs("call"):
        raise ValueError(f"{prefix} the ranks called different functions: {[_CALLS[c] for c in col['call']]}")
    if differs("dim"):
        raise ValueError(f"{prefix} the feature dimension differs across ranks: {col['dim']}")
    if differs("dtype"):
        raise ValueError(f"{prefix} the dtype differs across ranks: {[_DTYPES[c] for c in col['dtype']]}")
    if differs("layout"):
        raise ValueError(f"{prefix} the trailing dimensions differ across ranks (this rank's: {tuple(layout)})")
    if differs("mode"):
        raise ValueError(f"{prefix} ranks called it differently ({mode_names} must be the same on every rank)")
    if differs("reduction"):
        raise ValueError(f"{prefix} reduction differs across ranks: {[_REDUCTIONS[c] for c in col['reduction']]}")
    for i, name in enumerate(flags):
        if len({(f >> i) & 1 for f in col["flags"]}) != 1:
            raise ValueError(
                f"{prefix} {name}.requires_grad differs across ranks ({[bool((f >> i) & 1) for f in col['flags']]}); "
                f"the backward is collective, so every rank must need the same gradients"
            )
    for name, field in zip(scalars, ("scalar0", "scalar1")):
        if differs(field):
            values = torch.tensor(col[field], dtype=torch.int64).view(torch.float64).tolist()
            raise ValueError(f"{prefix} {name} differs across ranks: {values}; the loss needs one value")
    return RankInfo(group, col["rows"], col["keys"])


def fail_together(what: str, group, error: Exception, device: torch.device):
    """This rank's argument checks failed: take part in the call's exchange flagged as failed,
    so that the other ranks raise too instead of waiting in a collective; then raise error."""
    local = torch.zeros(len(_FIELDS), dtype=torch.int64, device=device)
    local[0], local[1] = 1, _CALLS.index(what)
    _gather_table(local, group)
    raise error


@contextmanager
def raising_on_every_rank(what: str, group, like):
    """Around a call's argument checks: an error raised inside (a TypeError or ValueError, a
    backend's BackendUnavailable), in an active group, goes through fail_together (the other
    ranks' exchange then raises). like: the call's first tensor argument, for the exchange's
    device."""
    try:
        yield
    except Exception as error:
        if is_active(group):
            fail_together(what, group, error, _comm_device(like, group))
        raise


def no_double_backward() -> None:
    """Called first in the backward of every Function whose gradient crosses ranks: under
    create_graph=True it raises, because the transfers are not differentiated again and a
    higher-order gradient would silently lack the other ranks' parts. (once_differentiable
    does not do: the losses' incoming gradients are constants, which it lets through.)"""
    if torch.is_grad_enabled():
        raise RuntimeError("fastnce.distributed: double backward (create_graph=True) is not supported: the "
                           "gradients that cross ranks are not differentiated again")


class RingTransfer:
    """Tensors posted to the next rank while the same number arrive from the previous one.

    `start` returns at once (isend/irecv via batch_isend_irecv); `wait` returns the received
    tensors. Each message kind has its own tag so concurrent transfers never cross (gloo
    matches on tags; NCCL on issue order, which is the same on every rank).
    """

    def __init__(self, info: RankInfo, send: Sequence[Tensor], recv_like: Sequence[tuple], tag: int):
        if info.size == 1:  # a ring of one: what leaves comes straight back
            self.bufs, self.works, self._sent = list(send), [], None
            return
        self.bufs = [torch.empty(shape, dtype=dt, device=dev) for shape, dt, dev in recv_like]
        ops = []
        for i, (s, r) in enumerate(zip(send, self.bufs)):
            ops.append(dist.P2POp(dist.isend, s.contiguous(), info.next, info.group, tag=tag + i))
            ops.append(dist.P2POp(dist.irecv, r, info.prev, info.group, tag=tag + i))
        self.works = dist.batch_isend_irecv(ops)
        self._sent = send  # keep the send buffers alive until the transfer is done

    def wait(self) -> list[Tensor]:
        for w in self.works:
            w.wait()
        self._sent = None
        return self.bufs


class _AllGather(torch.autograd.Function):
    """Concatenation of every rank's x in rank order, with the gradient summed back.

    Forward: pad to the largest local row count, all-gather, drop the padding.
    Backward: the gradient of the gathered tensor differs on every rank (each rank's loss
    used all of it); this rank's rows get Σ_ranks gradient[rows of this rank], a
    reduce-scatter of the padded gradient (lightly #1528 returned only the local part).
    """

    @staticmethod
    def forward(ctx, x: Tensor, info: RankInfo, counts: list):
        ctx.info, ctx.counts = info, counts
        return _gather(x, info, counts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        no_double_backward()
        info, counts = ctx.info, ctx.counts
        pad = max(counts)
        grad = grad.contiguous()
        if all(c == pad for c in counts):
            full = grad
        else:
            full = grad.new_zeros((info.size * pad,) + tuple(grad.shape[1:]))
            o = 0
            for s, c in enumerate(counts):
                full[s * pad : s * pad + c] = grad[o : o + c]
                o += c
        out = grad.new_empty((pad,) + tuple(grad.shape[1:]))
        _reduce_scatter_single(out, full, group=info.group)
        return out[: counts[info.rank]], None, None


def _gather(x: Tensor, info: RankInfo, counts: list) -> Tensor:
    x = x.contiguous()
    pad = max(counts)
    if x.shape[0] != pad:
        x = torch.cat([x, x.new_zeros((pad - x.shape[0],) + tuple(x.shape[1:]))])
    full = x.new_empty((info.size * pad,) + tuple(x.shape[1:]))
    _all_gather_single(full, x, group=info.group)
    if all(c == pad for c in counts):
        return full
    return torch.cat([full[s * pad : s * pad + c] for s, c in enumerate(counts)])


def all_gather_with_grad(x: Tensor, info: RankInfo, counts: list) -> Tensor:
    return _AllGather.apply(x, info, counts)


def all_gather_no_grad(x: Tensor, info: RankInfo, counts: list) -> Tensor:
    with torch.no_grad():
        return _gather(x.detach(), info, counts)


class _MeanGradOverRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient and divides by the world size.

    For a scalar that every rank holds the same copy of (temperature, logit_scale): the sum
    over ranks of each rank's local gradient is world_size × the single-process gradient, so
    after this every rank holds exactly the single-process gradient, and DDP's averaging of
    identical values keeps it (replicas never drift, even for a parameter outside DDP).
    """

    @staticmethod
    def forward(ctx, x: Tensor, info: RankInfo):
        ctx.info = info
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        no_double_backward()
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.info.group)
        return grad / ctx.info.size, None


def mean_grad_over_ranks(x, info: RankInfo):
    if isinstance(x, Tensor) and x.requires_grad:
        return _MeanGradOverRanks.apply(x, info)
    return x
