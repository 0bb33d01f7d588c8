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

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}

# torch 2.13 renamed the tensor-in/tensor-out collectives; GPU machines may run older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_active(group=None) -> bool:
    """True when torch.distributed is initialised and the group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _comm_device(x: Tensor) -> torch.device:
    """Where small bookkeeping tensors live: NCCL only talks CUDA tensors, gloo either."""
    return x.device if x.is_cuda else torch.device("cpu")


class RankInfo:
    """This rank's place in the group and the per-rank shapes of one loss call.

    rows[s], keys[s]: how many loss rows and how many key rows rank s holds. `exchange`
    learns them with one all-gather of a few integers per call (ranks may hold different
    numbers of rows), and checks, on every rank alike, that what must agree does agree, so a
    mismatch is the same ValueError everywhere instead of a hang or silent garbage.
    """

    def __init__(self, group, table: Tensor):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        g = group if group is not None else dist.group.WORLD
        self.next = dist.get_global_rank(g, (self.rank + 1) % self.size)  # P2P peers are global ranks
        self.prev = dist.get_global_rank(g, (self.rank - 1) % self.size)
        t = table.tolist()
        self.rows = [r[0] for r in t]
        self.keys = [r[1] for r in t]
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


def exchange(what: str, group, device: torch.device, rows: int, keys: int, dim: int, dtype: torch.dtype,
             mode: int, flags: Sequence[bool], flag_names: Sequence[str],
             mode_names: str = "scheme, negative_keys or negative_mode") -> RankInfo:
    """One all-gather of [rows, keys, dim, dtype, mode, flags...]; checks agreement; RankInfo.

    mode: an integer that must agree across ranks (scheme and argument layout), mode_names what
    it encodes, for the error;
    flags: requires_grad of every tensor whose gradient crosses ranks, which decides what
    the backward sends, so it must agree too.
    """
    local = torch.tensor([rows, keys, dim, _DTYPE_CODES.get(dtype, 0), mode] + [int(bool(f)) for f in flags],
                         dtype=torch.int64, device=device)
    W = dist.get_world_size(group)
    table = torch.empty(W * local.numel(), dtype=torch.int64, device=device)
    _all_gather_single(table, local, group=group)
    table = table.view(W, -1).cpu()
    cols = table.T.tolist()
    if len(set(cols[2])) != 1:
        raise ValueError(f"fastnce.distributed.{what}: the feature dimension differs across ranks: {cols[2]}")
    if len(set(cols[3])) != 1:
        names = {v: k for k, v in _DTYPE_CODES.items()}
        raise ValueError(f"fastnce.distributed.{what}: the dtype differs across ranks: {[names.get(c) for c in cols[3]]}")
    if len(set(cols[4])) != 1:
        raise ValueError(
            f"fastnce.distributed.{what}: ranks called it differently ({mode_names} "
            f"must be the same on every rank)"
        )
    for name, col in zip(flag_names, cols[5:]):
        if len(set(col)) != 1:
            raise ValueError(
                f"fastnce.distributed.{what}: {name}.requires_grad differs across ranks ({[bool(c) for c in col]}); "
                f"the backward is collective, so every rank must need the same gradients"
            )
    return RankInfo(group, table)


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
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.info.group)
        return grad / ctx.info.size, None


def mean_grad_over_ranks(x, info: RankInfo):
    if isinstance(x, Tensor) and x.requires_grad:
        return _MeanGradOverRanks.apply(x, info)
    return x
