"""fastnce.distributed against the single-process losses, on 2 and 4 gloo processes on CPU.

One spawn per world size runs every case (a spawn costs seconds on a small machine). Each
worker builds the global batch from a fixed seed, computes the single-process loss and
gradients itself, runs its share distributed, and records what disagrees instead of raising
mid-way (a rank that raised would leave the others waiting in a collective); the parent
asserts on the records. Checks, for both schemes and every loss (nt_xent, clip_loss, info_nce,
dcl_loss, siglip_loss):

* mean over ranks of the returned losses == single-process loss on the concatenated batch;
* each rank's input gradients == world_size × the single-process gradients of its rows;
* a learnable temperature / logit_scale / logit_bias: every rank's gradient == the single-process one;
* siglip_loss, equal local batches: each rank's loss and gradients == OpenCLIP's distributed
  SigLipLoss (its neighbour exchange), where open_clip is installed;
* under DDP, the parameters' gradients == the single-process gradients;
with odd (3 rows per rank) and unequal local batch sizes, rtol 1e-5 in float32 (absolute
floor 1e-6 × the tensor's largest entry).
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback
from functools import partial

import pytest
import torch

import fastnce
import fastnce.distributed as fd
from open_clip_losses import open_clip_loss

RTOL, ATOL = 1e-5, 1e-6
D = 8
SIZES = {2: ([3, 3], [3, 2]), 4: ([3, 3, 3, 3], [3, 1, 4, 2])}
NEG_SIZES = {2: [4, 2], 4: [2, 5, 1, 3]}  # unpaired negatives per rank (unequal on purpose)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slices(sizes, rank):
    o = sum(sizes[:rank])
    return slice(o, o + sizes[rank])


def _two_view_rows(per_row, n, sl):
    """A rank's rows of a single-process two-view loss's per-row values (2n,): its slice of the
    first view's anchors, then of the second's, the order the distributed losses return."""
    return torch.cat([per_row[:n][sl], per_row[n:][sl]])


class _Recorder:
    def __init__(self):
        self.failures = []
        self.count = 0

    def close(self, what, actual, expected):
        self.count += 1
        try:
            # The absolute floor follows the tensor's scale: float32 cancellation near zero
            # errs by about eps × the largest entries, not by eps × the small one.
            scale = max(1.0, expected.detach().abs().max().item())
            torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * scale)
        except AssertionError as e:
            self.failures.append(f"{what}: {str(e).splitlines()[0:4]}")

    def check(self, what, cond, detail=""):
        self.count += 1
        if not cond:
            self.failures.append(f"{what}: {detail}")


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _run_case(rec, name, single_fn, dist_fn, tensors, _row_sizes, scalars, rank, world, group=None, frozen=()):
    """tensors: {name: (global tensor, per-rank sizes)}; scalars: {name: value} learnable;
    rank, world: in the group; frozen: names of tensors that require no gradient."""
    import torch.distributed as dist

    _leaf_unless_frozen = lambda k, v: v.detach().clone() if k in frozen else _leaf(v)
    g = {k: _leaf_unless_frozen(k, v) for k, (v, _) in tensors.items()}
    gs = {k: torch.tensor(v, requires_grad=True) for k, v in scalars.items()}
    ref = single_fn(**g, **gs)
    ref.backward()
    loc = {k: _leaf_unless_frozen(k, v[_slices(s, rank)]) for k, (v, s) in tensors.items()}
    ls = {k: torch.tensor(v, requires_grad=True) for k, v in scalars.items()}
    loss = dist_fn(**loc, **ls)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    rec.close(f"{name} loss (mean over ranks)", total / world, ref.detach())
    for k, (v, s) in tensors.items():
        if k in frozen:
            rec.check(f"{name} d{k} rank {rank} (frozen)", loc[k].grad is None)
        else:
            rec.close(f"{name} d{k} rank {rank}", loc[k].grad, world * g[k].grad[_slices(s, rank)])
    for k in scalars:
        rec.close(f"{name} d{k} rank {rank}", ls[k].grad, gs[k].grad)


def _cases(rank, world, rec):
    for sizes in SIZES[world]:
        N = sum(sizes)
        gen = torch.Generator().manual_seed(1234 + N)
        rnd = lambda *shape: torch.randn(*shape, generator=gen)
        z1, z2 = rnd(N, D), rnd(N, D)
        img = torch.nn.functional.normalize(rnd(N, D), dim=1)
        txt = torch.nn.functional.normalize(rnd(N, D), dim=1)
        qry, pos = rnd(N, D), rnd(N, D)
        negs = NEG_SIZES[world]
        neg = rnd(sum(negs), D)
        paired = rnd(N, 5, D)
        tag = f"sizes={sizes}"
        for scheme in fd.SCHEMES:
            kw = dict(scheme=scheme)
            t = f"[{scheme} {tag}]"
            _run_case(rec, f"nt_xent {t}", lambda z1, z2: fastnce.nt_xent(z1, z2, 0.1),
                      lambda z1, z2: fd.nt_xent(z1, z2, 0.1, **kw),
                      {"z1": (z1, sizes), "z2": (z2, sizes)}, sizes, {}, rank, world)
            _run_case(rec, f"nt_xent learnable temperature {t}",
                      lambda z1, z2, tau: fastnce.nt_xent(z1, z2, tau),
                      lambda z1, z2, tau: fd.nt_xent(z1, z2, tau, **kw),
                      {"z1": (z1, sizes), "z2": (z2, sizes)}, sizes, {"tau": 0.2}, rank, world)
            _run_case(rec, f"clip_loss {t}",
                      lambda a, b, s: fastnce.clip_loss(a, b, s),
                      lambda a, b, s: fd.clip_loss(a, b, s, **kw),
                      {"a": (img, sizes), "b": (txt, sizes)}, sizes, {"s": 10.0}, rank, world)
            for frozen in ("a", "b"):  # a locked tower (LiT): its side's product is skipped
                _run_case(rec, f"clip_loss frozen {frozen}, learnable scale {t}",
                          lambda a, b, s: fastnce.clip_loss(a, b, s),
                          lambda a, b, s: fd.clip_loss(a, b, s, **kw),
                          {"a": (img, sizes), "b": (txt, sizes)}, sizes, {"s": 10.0}, rank, world, frozen=(frozen,))
                _run_case(rec, f"siglip_loss frozen {frozen}, learnable scale and bias {t}",
                          lambda a, b, s, c: fastnce.siglip_loss(a, b, s, c),
                          lambda a, b, s, c: fd.siglip_loss(a, b, s, c, **kw),
                          {"a": (img, sizes), "b": (txt, sizes)}, sizes, {"s": 10.0, "c": -4.0}, rank, world,
                          frozen=(frozen,))
            _run_case(rec, f"clip_loss fixed scale {t}",
                      lambda a, b: fastnce.clip_loss(a, b, 5.0),
                      lambda a, b: fd.clip_loss(a, b, 5.0, **kw),
                      {"a": (img, sizes), "b": (txt, sizes)}, sizes, {}, rank, world)
            _run_case(rec, f"info_nce no negatives {t}",
                      lambda q, p: fastnce.info_nce(q, p, temperature=0.1),
                      lambda q, p: fd.info_nce(q, p, temperature=0.1, **kw),
                      {"q": (qry, sizes), "p": (pos, sizes)}, sizes, {}, rank, world)
            _run_case(rec, f"info_nce unpaired {t}",
                      lambda q, p, n, tau: fastnce.info_nce(q, p, n, temperature=tau),
                      lambda q, p, n, tau: fd.info_nce(q, p, n, temperature=tau, **kw),
                      {"q": (qry, sizes), "p": (pos, sizes), "n": (neg, negs)}, sizes, {"tau": 0.15}, rank, world)
            _run_case(rec, f"info_nce paired {t}",
                      lambda q, p, n: fastnce.info_nce(q, p, n, 0.1, negative_mode="paired"),
                      lambda q, p, n: fd.info_nce(q, p, n, 0.1, negative_mode="paired", **kw),
                      {"q": (qry, sizes), "p": (pos, sizes), "n": (paired, sizes)}, sizes, {}, rank, world)
            _run_case(rec, f"nt_xent reduction=sum {t}",
                      lambda z1, z2: fastnce.nt_xent(z1, z2, 0.1, "sum"),
                      lambda z1, z2: fd.nt_xent(z1, z2, 0.1, reduction="sum", **kw),
                      {"z1": (z1, sizes), "z2": (z2, sizes)}, sizes, {}, rank, world)
            # reduction='none': this rank's per-row losses are the single-process ones of its rows.
            sl = _slices(sizes, rank)
            per = fd.clip_loss(img[sl], txt[sl], 5.0, reduction="none", **kw)
            rec.close(f"clip_loss reduction=none {t}", per, fastnce.clip_loss(img, txt, 5.0, "none")[sl])
            per = fd.nt_xent(z1[sl], z2[sl], 0.1, reduction="none", **kw)
            ref = fastnce.nt_xent(z1, z2, 0.1, "none")
            rec.close(f"nt_xent reduction=none {t}", per, _two_view_rows(ref, N, sl))
            per = fd.info_nce(qry[sl], pos[sl], neg[_slices(negs, rank)], reduction="none", **kw)
            rec.close(f"info_nce reduction=none {t}", per, fastnce.info_nce(qry, pos, neg, reduction="none")[sl])
            _run_case(rec, f"dcl_loss {t}", lambda z1, z2: fastnce.functional.dcl_loss(z1, z2, 0.1),
                      lambda z1, z2: fd.dcl_loss(z1, z2, 0.1, **kw),
                      {"z1": (z1, sizes), "z2": (z2, sizes)}, sizes, {}, rank, world)
            pair_weights = lambda a, b: 1 + (a * b).sum(1)  # per pair, with a gradient
            _run_case(rec, f"dcl_loss learnable temperature, weighted {t}",
                      lambda z1, z2, tau: fastnce.functional.dcl_loss(z1, z2, tau, weight_fn=pair_weights),
                      lambda z1, z2, tau: fd.dcl_loss(z1, z2, tau, weight_fn=pair_weights, **kw),
                      {"z1": (z1, sizes), "z2": (z2, sizes)}, sizes, {"tau": 0.2}, rank, world)
            per = fd.dcl_loss(z1[sl], z2[sl], 0.1, reduction="none", **kw)
            ref = fastnce.functional.dcl_loss(z1, z2, 0.1, "none")
            rec.close(f"dcl_loss reduction=none {t}", per, _two_view_rows(ref, N, sl))
            _run_case(rec, f"siglip_loss learnable scale and bias {t}",
                      lambda a, b, s, c: fastnce.siglip_loss(a, b, s, c),
                      lambda a, b, s, c: fd.siglip_loss(a, b, s, c, **kw),
                      {"a": (img, sizes), "b": (txt, sizes)}, sizes, {"s": 10.0, "c": -4.0}, rank, world)
            _run_case(rec, f"siglip_loss no bias, reduction=sum {t}",
                      lambda a, b: fastnce.siglip_loss(a, b, 3.0, None, "sum"),
                      lambda a, b: fd.siglip_loss(a, b, 3.0, reduction="sum", **kw),
                      {"a": (img, sizes), "b": (txt, sizes)}, sizes, {}, rank, world)
            per = fd.siglip_loss(img[sl], txt[sl], 5.0, -2.0, reduction="none", **kw)
            rec.close(f"siglip_loss reduction=none {t}", per, fastnce.siglip_loss(img, txt, 5.0, -2.0, "none")[sl])
            sig = fastnce.losses.SigLipLoss(0.2, -3.0, learnable=False, normalize=False, distributed=scheme)
            _run_case(rec, f"SigLipLoss(distributed) {t}", lambda a, b: fastnce.siglip_loss(a, b, 5.0, -3.0),
                      lambda a, b: sig(a, b),
                      {"a": (img, sizes), "b": (txt, sizes)}, sizes, {}, rank, world)
            if open_clip_loss is not None and len(set(sizes)) == 1:
                _open_clip_siglip_case(rec, img, txt, sizes, scheme, rank, world)
            # The modules' distributed flag reaches the same code.
            ntx = fastnce.losses.NTXentLoss(0.1, distributed=scheme)
            _run_case(rec, f"NTXentLoss(distributed) {t}", lambda z1, z2: fastnce.nt_xent(z1, z2, 0.1),
                      lambda z1, z2: ntx(z1, z2),
                      {"z1": (z1, sizes), "z2": (z2, sizes)}, sizes, {}, rank, world)
            dcl = fastnce.losses.DCLLoss(0.1, distributed=scheme)
            _run_case(rec, f"DCLLoss(distributed) {t}", lambda z1, z2: fastnce.functional.dcl_loss(z1, z2, 0.1),
                      lambda z1, z2: dcl(z1, z2),
                      {"z1": (z1, sizes), "z2": (z2, sizes)}, sizes, {}, rank, world)
            clip = fastnce.losses.ClipLoss(0.2, learnable=False, normalize=False, distributed=scheme)
            _run_case(rec, f"ClipLoss(distributed) {t}", lambda a, b: fastnce.clip_loss(a, b, 5.0),
                      lambda a, b: clip(a, b),
                      {"a": (img, sizes), "b": (txt, sizes)}, sizes, {}, rank, world)
            # A memory bank: negatives without gradient (the backward sends no key gradients).
            nb = neg[_slices(negs, rank)]
            gq, lq = _leaf(qry), _leaf(qry[_slices(sizes, rank)])
            fastnce.info_nce(gq, pos, neg).backward()
            fd.info_nce(lq, pos[_slices(sizes, rank)], nb, **kw).backward()
            rec.close(f"info_nce unpaired, no-grad negatives dq {t} rank {rank}", lq.grad,
                      world * gq.grad[_slices(sizes, rank)])




def _open_clip_siglip_case(rec, img, txt, sizes, scheme, rank, world):
    """This rank's loss and gradients against OpenCLIP's SigLipLoss(rank, world_size) with its
    neighbour exchange ('bidir', its default, and 'shift'), the loss our ring is."""
    sl = _slices(sizes, rank)
    for impl in ("bidir", "shift"):
        theirs_in = [_leaf(img[sl]), _leaf(txt[sl]), torch.tensor(8.0, requires_grad=True),
                     torch.tensor(-2.0, requires_grad=True)]
        ours_in = [_leaf(x) for x in theirs_in]
        theirs = open_clip_loss.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(*theirs_in)
        theirs.backward()
        ours = fd.siglip_loss(*ours_in, scheme=scheme)
        ours.backward()
        what = f"siglip_loss vs OpenCLIP {impl} [{scheme}] rank {rank}"
        rec.close(f"{what} loss", ours, theirs.detach())
        rec.close(f"{what} dimage", ours_in[0].grad, theirs_in[0].grad)
        rec.close(f"{what} dtext", ours_in[1].grad, theirs_in[1].grad)
        # OpenCLIP leaves a shared scale's gradient per rank (DDP averages it); ours is already
        # the average over ranks: the mean of theirs.
        for i, name in ((2, "dscale"), (3, "dbias")):
            mean = theirs_in[i].grad.clone()
            torch.distributed.all_reduce(mean)
            rec.close(f"{what} {name}", ours_in[i].grad, mean / world)


def _ddp_case(rank, world, rec):
    """DDP-averaged parameter gradients of a CLIP step equal the single-process ones."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sizes = SIZES[world][1]
    N = sum(sizes)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(N, 6, generator=gen), torch.randn(N, 5, generator=gen)

    class Towers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.img = torch.nn.Linear(6, D)
            self.txt = torch.nn.Linear(5, D)
            for p in self.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.3
            self.log_scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x, y):
            a = torch.nn.functional.normalize(self.img(x), dim=1)
            b = torch.nn.functional.normalize(self.txt(y), dim=1)
            return a, b, self.log_scale.exp()

    single = Towers()
    fastnce.clip_loss(*single(x, y)).backward()
    for scheme in fd.SCHEMES:
        model = DDP(Towers())
        sl = _slices(sizes, rank)
        fd.clip_loss(*model(x[sl], y[sl]), scheme=scheme).backward()
        for (name, p), q in zip(model.module.named_parameters(), single.parameters()):
            rec.close(f"DDP [{scheme}] d{name} rank {rank}", p.grad, q.grad)


def _subgroup_case(rank, world, rec):
    """A group of ranks 0 and 2 (the others idle): its ring reaches its members by global rank."""
    group = torch.distributed.new_group([0, 2])
    if rank not in (0, 2):
        return
    sizes = [3, 2]
    gen = torch.Generator().manual_seed(7)
    img, txt = torch.randn(5, D, generator=gen), torch.randn(5, D, generator=gen)
    me = rank // 2
    # the modules take the group too
    loss = fastnce.losses.ClipLoss(learnable=False, normalize=False, distributed="ring", group=group)
    rec.close("ClipLoss(group=[0, 2])", loss(img[_slices(sizes, me)], txt[_slices(sizes, me)]),
              fd.clip_loss(img[_slices(sizes, me)], txt[_slices(sizes, me)], loss.scale(), group=group))
    moco = fastnce.losses.MoCoLoss(D, queue_size=16, distributed=True, group=group)
    moco(img[_slices(sizes, me)], txt[_slices(sizes, me)])
    rec.check("MoCoLoss(group=[0, 2]) enqueues the group's keys", int(moco.queue_ptr) == 5)
    for scheme in fd.SCHEMES:
        _run_case(rec, f"clip_loss group [0, 2] [{scheme}]", lambda a, b, s: fastnce.clip_loss(a, b, s),
                  lambda a, b, s: fd.clip_loss(a, b, s, scheme=scheme, group=group),
                  {"a": (img, sizes), "b": (txt, sizes)}, sizes, {"s": 4.0}, me, 2, group=group)


def _raises(rec, what, fn, match):
    """Records a failure unless fn raises a ValueError whose message holds `match`."""
    rec.count += 1
    try:
        fn()
    except ValueError as e:
        if match not in str(e):
            rec.failures.append(f"{what}: wrong message {e}")
        return
    rec.failures.append(f"{what}: no ValueError")


def _guarded(rec, what, fn):
    """One case whose exception (the same on every rank) fails that case only."""
    try:
        fn()
    except Exception:
        rec.failures.append(f"{what}: exception\n" + traceback.format_exc()[-1500:])


def _error_cases(rank, world, rec):
    """Mismatches across ranks are the same ValueError on every rank, never a hang."""
    raises = lambda what, fn, match: _raises(rec, what, fn, match)
    d = D if rank == 0 else D + 1
    raises("feature dim differs", lambda: fd.nt_xent(torch.randn(3, d), torch.randn(3, d)), "feature dimension")
    a = torch.randn(3, D, requires_grad=(rank == 0))
    raises("requires_grad differs", lambda: fd.clip_loss(a, torch.randn(3, D), 5.0), "requires_grad")
    x3 = torch.randn(3, D)
    for scheme in fd.SCHEMES:  # every requires_grad flag is compared, not only the first
        raises(f"text_features.requires_grad differs [{scheme}]",
               lambda: fd.clip_loss(x3, x3.clone().requires_grad_(rank == 0), 5.0, scheme=scheme),
               "text_features.requires_grad differs")
        raises(f"learnable temperature on rank 0 only [{scheme}]",
               lambda: fd.nt_xent(x3, x3, torch.tensor(0.1, requires_grad=(rank == 0)), scheme=scheme),
               "temperature.requires_grad differs")
        raises(f"image on rank 0, text on rank 1 need gradients [{scheme}]",  # as many flags set
               lambda: fd.clip_loss(x3.clone().requires_grad_(rank == 0), x3.clone().requires_grad_(rank == 1),
                                    5.0, scheme=scheme), "requires_grad differs")
        raises(f"info_nce negatives on rank 1 only [{scheme}]",
               lambda: fd.info_nce(x3, x3, x3 if rank == 1 else None, scheme=scheme), "differently")
        raises(f"clip logit_scale differs [{scheme}]", lambda: fd.clip_loss(x3, x3, 5.0 + rank, scheme=scheme),
               "logit_scale differs")
        raises(f"siglip logit_scale differs [{scheme}]",
               lambda: fd.siglip_loss(x3, x3, 5.0 + rank, -1.0, scheme=scheme), "logit_scale differs")
    raises("scheme mismatch", lambda: fd.nt_xent(torch.randn(3, D), torch.randn(3, D),
                                                 scheme="ring" if rank else "gather"), "differently")
    raises("bad scheme", lambda: fd.nt_xent(torch.randn(3, D), torch.randn(3, D), scheme="allgather"), "scheme")
    # an infinite image feature on rank 0: its row is NaN, and so are the gradients it reaches
    for scheme in fd.SCHEMES:
        a = torch.randn(3, D)
        if rank == 0:
            a[1, 0] = float("inf")
        a.requires_grad_()
        b = torch.randn(3, D, requires_grad=True)
        per = fd.siglip_loss(a, b, 5.0, -1.0, reduction="none", scheme=scheme)
        per.sum().backward()
        bad_row = torch.isnan(per[1]).item() if rank == 0 else torch.isfinite(per).all().item()
        rec.check(f"siglip_loss non-finite [{scheme}] rows rank {rank}", bad_row, f"{per}")
        rec.check(f"siglip_loss non-finite [{scheme}] text grads rank {rank}", torch.isnan(b.grad).all().item(),
                  f"{b.grad}")
        if rank == 0:
            rec.check(f"siglip_loss non-finite [{scheme}] image grad", torch.isnan(a.grad[1]).all().item(), f"{a.grad}")
    raises("logit_bias on some ranks only",
           lambda: fd.siglip_loss(torch.randn(3, D), torch.randn(3, D), 5.0, None if rank else -1.0),
           "logit_bias given or None")
    # Arguments rejected on one rank only: that rank raises its own error, every other rank a
    # ValueError naming it (once, the others waited in a collective for ever).
    def one_rank_rejects(what, fn, own_error):
        rec.count += 1
        try:
            fn()
        except (TypeError, ValueError, fastnce.ops.BackendUnavailable) as e:
            want = own_error if rank == 1 else "rank(s) [1] of the group raised an error before the collective part"
            if want not in str(e):
                rec.failures.append(f"{what} rank {rank}: wrong message {e}")
            return
        rec.failures.append(f"{what} rank {rank}: no error")

    one_rank_rejects("empty batch on rank 1",
                     lambda: fd.clip_loss(x3[: 0 if rank == 1 else 3], x3[: 0 if rank == 1 else 3], 5.0),
                     "image_features is an empty batch")
    one_rank_rejects("scheme on rank 1", lambda: fd.nt_xent(x3, x3, scheme="allgather" if rank == 1 else "ring"),
                     "scheme must be one of")
    one_rank_rejects("temperature on rank 1", lambda: fd.info_nce(x3, x3, temperature=-1.0 if rank == 1 else 0.1),
                     "temperature must be a positive")
    one_rank_rejects("MoCoLoss on rank 1", lambda: fastnce.losses.MoCoLoss(D, 16, distributed=True)(
        x3, torch.randn(3, D + (rank == 1))), "key must have dim")
    one_rank_rejects("gather_keys on rank 1", lambda: fd.gather_keys(x3 if rank != 1 else [1.0]),
                     "x must be a torch.Tensor")
    # found by a fuzzer: the backend was resolved, and DCL's weight_fn output checked, only after
    # the call's exchange, inside the ring or the gathered loss: the other ranks waited
    for scheme in fd.SCHEMES:
        one_rank_rejects(f"backend name on rank 1 [{scheme}]",
                         lambda: fd.clip_loss(x3, x3, 5.0, scheme=scheme, backend="nope" if rank == 1 else "auto"),
                         "backend must be one of")
        one_rank_rejects(f"backend unavailable on rank 1 [{scheme}]",
                         lambda: fd.siglip_loss(x3, x3, 5.0, scheme=scheme, backend="cuda" if rank == 1 else "auto"),
                         "backend='cuda' is unavailable")
        one_rank_rejects(f"DCL weight_fn on rank 1 [{scheme}]",
                         lambda: fd.dcl_loss(x3, x3, scheme=scheme,
                                             weight_fn=lambda a, b: torch.ones(a.shape[0] + (rank == 1))),
                         "weight_fn must return")
    # the transfers' backward is not differentiated again: create_graph=True through them is an
    # error, not a number (with the reference backend, a second-order gradient lacked the other
    # ranks' parts)
    for scheme in fd.SCHEMES:
        rec.count += 1
        a = torch.randn(3, D, requires_grad=True)
        try:
            g, = torch.autograd.grad(fd.nt_xent(a, x3, scheme=scheme, backend="reference"), a, create_graph=True)
            rec.failures.append(f"double backward [{scheme}] rank {rank}: no error")
        except RuntimeError as e:
            if "double backward (create_graph=True) is not supported" not in str(e):
                rec.failures.append(f"double backward [{scheme}] rank {rank}: wrong message {e}")
    # Agreement checked across ranks: values, reductions, the function called, gather_keys' layout.
    raises("temperature differs", lambda: fd.nt_xent(x3, x3, 0.1 + 0.1 * rank), "temperature differs across ranks")
    raises("logit_bias differs", lambda: fd.siglip_loss(x3, x3, 5.0, -1.0 - rank), "logit_bias differs")
    rec.count += 1
    try:  # the same value: 0.0 and -0.0 (the check compares bits)
        fd.siglip_loss(x3, x3, 5.0, -0.0 if rank else 0.0)
    except ValueError as e:
        rec.failures.append(f"logit_bias 0.0 and -0.0 rejected: {e}")
    raises("reduction differs", lambda: fd.clip_loss(x3, x3, 5.0, reduction="sum" if rank else "mean"),
           "reduction differs")
    raises("different functions",
           lambda: fd.nt_xent(x3, x3) if rank else fd.dcl_loss(x3, x3), "called different functions")
    raises("gather_keys trailing shape", lambda: fd.gather_keys(torch.zeros(1, 2, 3) if rank else torch.zeros(1, 3, 2)),
           "trailing dimensions differ")
    raises("gather_keys dtype", lambda: fd.gather_keys(torch.zeros(2, 3, dtype=torch.int64 if rank else torch.int32)),
           "dtype differs")
    # A process outside the group: an error, not its local loss; a group of one: the local loss.
    solo = torch.distributed.new_group([0])
    if rank == 0:
        rec.check("group of one", torch.equal(fd.clip_loss(x3, x3, 5.0, group=solo), fastnce.clip_loss(x3, x3, 5.0)))
    else:
        raises("not a member", lambda: fd.clip_loss(x3, x3, 5.0, group=solo), "not a member of group")
    # every module passes its group on
    L = fastnce.losses
    for name, module, single in (
        ("NTXentLoss", L.NTXentLoss(0.1, distributed="ring", group=solo), lambda u, v: fastnce.nt_xent(u, v, 0.1)),
        ("DCLLoss", L.DCLLoss(0.1, distributed="ring", group=solo), lambda u, v: fastnce.functional.dcl_loss(u, v, 0.1)),
        ("SigLipLoss", L.SigLipLoss(0.2, -3.0, learnable=False, normalize=False, distributed="ring", group=solo),
         lambda u, v: fastnce.siglip_loss(u, v, 5.0, -3.0)),
        ("ClipLoss", L.ClipLoss(0.2, learnable=False, normalize=False, distributed="ring", group=solo),
         lambda u, v: fastnce.clip_loss(u, v, 5.0)),
    ):
        if rank == 0:
            _guarded(rec, f"{name}(group=solo)",
                     lambda: rec.close(f"{name}(group=solo) rank 0", module(x3, x3.flip(0)), single(x3, x3.flip(0))))
        else:
            raises(f"{name}(group=solo) rank {rank}", lambda: module(x3, x3.flip(0)), "not a member of group")
    # gather_keys: every rank's rows in rank order, no gradient, unequal sizes.
    sizes = SIZES[world][1]
    full = torch.arange(sum(sizes) * 2, dtype=torch.float32).view(-1, 2)
    got = fd.gather_keys(full[_slices(sizes, rank)].requires_grad_(True))
    rec.check("gather_keys", torch.equal(got, full) and not got.requires_grad, f"{got}")
    # MoCo enqueues the keys of every rank: the queues stay equal across ranks.
    moco = fastnce.losses.MoCoLoss(D, queue_size=64, distributed=True)
    torch.manual_seed(0)
    moco.queue.copy_(torch.nn.functional.normalize(torch.randn(64, D), dim=1))
    keys = torch.randn(3 + rank, D)
    moco(torch.randn(3 + rank, D), keys)
    queues = [torch.empty_like(moco.queue) for _ in range(world)]
    torch.distributed.all_gather(queues, moco.queue)
    rec.check("MoCoLoss(distributed) queues equal", all(torch.equal(q, queues[0]) for q in queues))
    rec.check("MoCoLoss(distributed) pointer", int(moco.queue_ptr) == sum(3 + r for r in range(world)) % 64)


def _flag_cases(rank, world, rec):
    """Unequal local batches: all features frozen with a learnable scale, paired negatives with a
    learnable temperature, and the modules' reduction and weight_fn reaching the losses."""
    sizes = SIZES[world][1]
    N = sum(sizes)
    gen = torch.Generator().manual_seed(4321 + N)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)
    z1, z2, qry, pos = rnd(N, D), rnd(N, D), rnd(N, D), rnd(N, D)
    img = torch.nn.functional.normalize(rnd(N, D), dim=1)
    txt = torch.nn.functional.normalize(rnd(N, D), dim=1)
    paired = rnd(N, 5, D)
    sl = _slices(sizes, rank)
    L = fastnce.losses
    for scheme in fd.SCHEMES:
        kw = dict(scheme=scheme)
        t = f"[{scheme} sizes={sizes}]"
        # precomputed features, a scale calibrated alone: the ring still computes the scale's product
        _guarded(rec, f"clip_loss both frozen {t}", lambda: _run_case(
            rec, f"clip_loss both frozen, learnable scale {t}", lambda a, b, s: fastnce.clip_loss(a, b, s),
            lambda a, b, s: fd.clip_loss(a, b, s, **kw), {"a": (img, sizes), "b": (txt, sizes)}, sizes,
            {"s": 10.0}, rank, world, frozen=("a", "b")))
        _guarded(rec, f"nt_xent both frozen {t}", lambda: _run_case(
            rec, f"nt_xent frozen views, learnable temperature {t}", lambda z1, z2, tau: fastnce.nt_xent(z1, z2, tau),
            lambda z1, z2, tau: fd.nt_xent(z1, z2, tau, **kw), {"z1": (z1, sizes), "z2": (z2, sizes)}, sizes,
            {"tau": 0.2}, rank, world, frozen=("z1", "z2")))
        _guarded(rec, f"siglip_loss both frozen {t}", lambda: _run_case(
            rec, f"siglip_loss both frozen, learnable scale and bias {t}",
            lambda a, b, s, c: fastnce.siglip_loss(a, b, s, c), lambda a, b, s, c: fd.siglip_loss(a, b, s, c, **kw),
            {"a": (img, sizes), "b": (txt, sizes)}, sizes, {"s": 10.0, "c": -4.0}, rank, world, frozen=("a", "b")))
        _guarded(rec, f"info_nce paired, learnable temperature {t}", lambda: _run_case(
            rec, f"info_nce paired, learnable temperature {t}",
            lambda q, p, n, tau: fastnce.info_nce(q, p, n, tau, negative_mode="paired"),
            lambda q, p, n, tau: fd.info_nce(q, p, n, tau, negative_mode="paired", **kw),
            {"q": (qry, sizes), "p": (pos, sizes), "n": (paired, sizes)}, sizes, {"tau": 0.15}, rank, world))
        for red in ("sum", "none"):
            mods = (
                ("ClipLoss", L.ClipLoss(0.2, learnable=False, normalize=False, reduction=red, distributed=scheme),
                 lambda: fastnce.clip_loss(img, txt, 5.0, red), (img, txt)),
                ("SigLipLoss", L.SigLipLoss(0.2, -3.0, learnable=False, normalize=False, reduction=red,
                                            distributed=scheme),
                 lambda: fastnce.siglip_loss(img, txt, 5.0, -3.0, red), (img, txt)),
                ("NTXentLoss", L.NTXentLoss(0.1, reduction=red, distributed=scheme),
                 lambda: fastnce.nt_xent(z1, z2, 0.1, red), (z1, z2)),
                ("DCLLoss", L.DCLLoss(0.1, reduction=red, distributed=scheme),
                 lambda: fastnce.functional.dcl_loss(z1, z2, 0.1, red), (z1, z2)),
            )
            for name, module, single, (u, v) in mods:
                def case(name=name, module=module, single=single, u=u, v=v):
                    ours, ref = module(u[sl], v[sl]), single()
                    what = f"{name}(reduction={red!r}, distributed) {t}"
                    if red == "sum":  # the ranks' values average to the single-process sum
                        total = ours.detach().clone()
                        torch.distributed.all_reduce(total)
                        rec.close(what, total / world, ref)
                    elif name in ("NTXentLoss", "DCLLoss"):  # this rank's z1 anchors, then its z2 anchors
                        rec.close(what, ours, _two_view_rows(ref, N, sl))
                    else:
                        rec.close(what, ours, ref[sl])
                _guarded(rec, f"{name}(reduction={red!r}) {t}", case)
        pair_weights = lambda a, b: 1 + (a * b).sum(1)
        dclw = L.DCLLoss(0.1, weight_fn=pair_weights, distributed=scheme)
        _guarded(rec, f"DCLLoss(weight_fn, distributed) {t}", lambda: _run_case(
            rec, f"DCLLoss(weight_fn, distributed) {t}",
            lambda z1, z2: fastnce.functional.dcl_loss(z1, z2, 0.1, weight_fn=pair_weights),
            lambda z1, z2: dclw(z1, z2), {"z1": (z1, sizes), "z2": (z2, sizes)}, sizes, {}, rank, world))
        vmf = L.DCLWLoss(0.1, sigma=0.5, distributed=scheme)
        _guarded(rec, f"DCLWLoss(distributed) {t}", lambda: rec.close(
            f"DCLWLoss(distributed) {t}", vmf(z1[sl], z2[sl]),
            fd.dcl_loss(z1[sl], z2[sl], 0.1, weight_fn=partial(fastnce.functional.vmf_weights, sigma=0.5), **kw)))
    # MoCoLoss(distributed=True) in eval mode enqueues nothing and so runs no collective: a rank
    # that rejects its arguments raises at once, the others return their loss (none waits)
    short = torch.distributed.new_group(list(range(world)), timeout=datetime.timedelta(seconds=5))
    moco = L.MoCoLoss(D, 16, distributed=True, group=short).eval()
    x3 = torch.randn(3, D)
    rec.count += 1
    try:
        loss = moco(x3, torch.randn(3, D + (rank == 1)))
        if rank == 1:
            rec.failures.append(f"MoCoLoss eval, rank 1 rejects: no error (loss {loss})")
    except ValueError as e:
        if rank != 1 or "key must have dim" not in str(e):
            rec.failures.append(f"MoCoLoss eval, rank 1 rejects, rank {rank}: {e}")
    except Exception as e:  # a collective that waited for a rank that was not in it
        rec.failures.append(f"MoCoLoss eval, rank 1 rejects, rank {rank}: {type(e).__name__} {str(e)[:200]}")
    torch.distributed.barrier()


def _ring_memory_case(rank, world, rec):
    """The ring's point: a rank holds at most two other ranks' key blocks at a time (the one it
    computes with and the next, arriving), forward and backward; holding each until the walk
    ends would be O(N·D) a rank (a change once did that, unseen by the value checks)."""
    import gc
    import weakref

    import fastnce.distributed.ring as ring

    width = 40  # the key blocks' shape[1], told apart from the other transfers
    received, live = [], {"forward": 0, "backward": 0}
    real_transfer, real_fwd, real_bwd = ring.RingTransfer, ring.lse_forward, ring.lse_backward

    class Tracked(real_transfer):
        def __init__(self, info, send, recv_like, tag):
            super().__init__(info, send, recv_like, tag)
            if tag == ring._TAG_KEYS:
                received.extend(weakref.ref(b) for b in self.bufs if b.dim() == 2 and b.shape[1] == width)

    def counting(where, fn):
        def run(*args, **kwargs):
            gc.collect()
            live[where] = max(live[where], sum(r() is not None for r in received))
            return fn(*args, **kwargs)
        return run

    ring.RingTransfer = Tracked
    ring.lse_forward, ring.lse_backward = counting("forward", real_fwd), counting("backward", real_bwd)
    try:
        x = torch.randn(5, width, requires_grad=True)
        fd.clip_loss(x, torch.randn(5, width, requires_grad=True), 5.0, scheme="ring").backward()
    finally:
        ring.RingTransfer, ring.lse_forward, ring.lse_backward = real_transfer, real_fwd, real_bwd
    rec.check(f"ring key blocks held at once, rank {rank}", received and max(live.values()) <= 2, f"{live}")


def _worker(rank, world, port, outdir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    rec = _Recorder()
    try:
        _cases(rank, world, rec)
        _ddp_case(rank, world, rec)
        _error_cases(rank, world, rec)
        _flag_cases(rank, world, rec)
        if world == 4:
            _subgroup_case(rank, world, rec)
            _ring_memory_case(rank, world, rec)
    except Exception:
        rec.failures.append("exception:\n" + traceback.format_exc())
    with open(os.path.join(outdir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{rec.count}\n" + "\n".join(rec.failures))
    dist.destroy_process_group()
    # As examples/distributed_clip.py: with torch 2.13 the gloo group that DDP held (_ddp_case)
    # outlives destroy_process_group, and its threads torn down with the interpreter abort the
    # process now and then ("terminate called without an active exception", seen in a full run
    # here). The report is written and closed: leave without the teardown.
    os._exit(0)


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process(world):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(world, _free_port(), outdir), nprocs=world, join=True)
        reports = []
        for r in range(world):
            with open(os.path.join(outdir, f"rank{r}.txt")) as f:
                count, *failures = f.read().split("\n")
            assert int(count) > 50, f"rank {r} ran only {count} checks: " + "\n".join(failures)
            reports += [f for f in failures if f]
    assert not reports, "\n".join(reports)


def test_single_process_calls_through():
    """torch.distributed not initialised: exactly the single-process losses."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, D, generator=g), torch.randn(5, D, generator=g)
    neg = torch.randn(7, D, generator=g)
    for scheme in fd.SCHEMES:
        assert torch.equal(fd.nt_xent(a, b, 0.2, scheme=scheme), fastnce.nt_xent(a, b, 0.2))
        assert torch.equal(fd.clip_loss(a, b, 3.0, scheme=scheme), fastnce.clip_loss(a, b, 3.0))
        assert torch.equal(fd.info_nce(a, b, neg, scheme=scheme), fastnce.info_nce(a, b, neg))
        assert torch.equal(fd.siglip_loss(a, b, 3.0, -1.0, scheme=scheme), fastnce.siglip_loss(a, b, 3.0, -1.0))
    assert torch.equal(fd.gather_keys(a), a)
    with pytest.raises(ValueError, match="scheme"):
        fd.clip_loss(a, b, 3.0, scheme="ring2")


def _world_of_one_worker(rank, port, outdir, pg_backend):
    """World size 1 on pg_backend ('nccl' on a GPU, 'gloo' on the CPU), through the distributed
    code paths (not the single-process call-through), against the single-process losses."""
    from fastnce.distributed import functional as dfn

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import torch.distributed as dist

    device = "cuda" if pg_backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(pg_backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    rec = _Recorder()
    two_views = lambda x, y: dfn.l2_normalize(torch.cat([x, y]))  # what dfn.nt_xent hands _nt_xent
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(37, 64, device=device, generator=g)
        b = torch.randn(37, 64, device=device, generator=g)
        for scheme in dfn.SCHEMES:
            code = dfn._check_scheme(scheme)
            for name, single, multi in (
                ("nt_xent", lambda x, y, s: fastnce.nt_xent(x, y, 1 / s),
                 lambda x, y, s: dfn._nt_xent(two_views(x, y), 1 / s, scheme, code, None, "auto")),
                ("clip", lambda x, y, s: fastnce.clip_loss(x, y, s),
                 lambda x, y, s: dfn._clip_loss(x, y, s, scheme, code, None, "auto")),
                ("info_nce", lambda x, y, s: fastnce.info_nce(x, y, temperature=1 / s),
                 lambda x, y, s: dfn._info_nce(x, y, None, 1 / s, "unpaired", scheme, code, None, "auto")),
                ("dcl", lambda x, y, s: fastnce.functional.dcl_loss(x, y, 1 / s),
                 lambda x, y, s: dfn._nt_xent(two_views(x, y), 1 / s, scheme, code, None, "auto", decoupled=True)),
                ("siglip", lambda x, y, s: fastnce.siglip_loss(x, y, s, -s),
                 lambda x, y, s: dfn._siglip_loss(x, y, s, -s, scheme, code, None, "auto")),
            ):
                x1, y1, s1 = _leaf(a), _leaf(b), torch.tensor(5.0, device=device, requires_grad=True)
                x2, y2, s2 = _leaf(a), _leaf(b), torch.tensor(5.0, device=device, requires_grad=True)
                try:
                    l1, l2 = single(x1, y1, s1), multi(x2, y2, s2)
                    l1.backward()
                    l2.backward()
                except Exception:  # one loss failing must not hide the others
                    rec.failures.append(f"{name} {scheme}:\n" + traceback.format_exc())
                    continue
                for what, u, v in (("loss", l2, l1), ("dx", x2.grad, x1.grad), ("dy", y2.grad, y1.grad),
                                   ("ds", s2.grad, s1.grad)):
                    rec.count += 1
                    try:
                        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
                    except AssertionError as e:
                        rec.failures.append(f"{name} {scheme} {what}: {e}")
        if rec.count != 2 * 5 * 4:
            rec.failures.append(f"{rec.count} comparisons made, not 40")
    except Exception:
        rec.failures.append("exception:\n" + traceback.format_exc())
    with open(os.path.join(outdir, "rank0.txt"), "w") as f:
        f.write("\n".join(rec.failures))
    dist.destroy_process_group()


def _run_world_of_one(pg_backend):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_world_of_one_worker, args=(_free_port(), outdir, pg_backend), nprocs=1, join=True)
        with open(os.path.join(outdir, "rank0.txt")) as f:
            failures = f.read()
    assert not failures, failures


def test_gloo_world_size_one():
    """The NCCL test's worker on gloo: CI keeps the GPU check's own code from going stale (its
    calls once passed the arguments of an older _nt_xent and could not have passed)."""
    _run_world_of_one("gloo")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nccl_world_size_one():
    _run_world_of_one("nccl")


def test_same_arguments_as_the_single_process_losses():
    import inspect

    for name in ("nt_xent", "clip_loss", "info_nce", "dcl_loss", "siglip_loss"):
        single = list(inspect.signature(getattr(fastnce.functional, name)).parameters.values())
        dist_ = [p for p in inspect.signature(getattr(fd, name)).parameters.values() if p.name not in ("scheme", "group")]
        assert [(p.name, p.kind, p.default) for p in dist_] == [(p.name, p.kind, p.default) for p in single], name
