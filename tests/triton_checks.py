"""Checks of Triton kernels under the interpreter (TRITON_INTERPRET=1) for what only a GPU shows.

The interpreter runs a launch's programs one after another, so that a kernel whose programs
write one address twice, or read what another program of the same launch writes, gives the
same values every run here, whatever the order: on a GPU, where the programs run at once,
it gives what the timing gives. And it reads and writes host memory wherever a pointer
points: an access past a tensor reads a neighbour's bytes (or zeros) where a GPU faults or
reads garbage. `checked_launches()` records, per launch, which program stored, loaded or
atomically updated each address (the lanes their masks keep) and reports:
  - an address stored by two programs (write-write);
  - an address one program stores and another loads (read-write);
  - an address updated atomically by one program and stored or loaded plainly by another
    (atomics among themselves do not race);
  - an access outside every tensor the launch was given.
`poisoned_allocations()` fills new tensors with NaN, so that a read of an element no program
wrote shows. `with_meta()` gives launches a GPU's tile shapes. Used by tests/test_triton.py
and tests/test_siglip.py.
"""
from __future__ import annotations

import contextlib
import types
from collections import defaultdict

import numpy as np


def _interpreter():
    from triton.runtime import interpreter

    return interpreter


def _extent(t) -> tuple[int, int]:
    """[first, last + 1) byte addresses of a tensor's elements (its view, not its storage)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _Launch:
    def __init__(self, name: str, tensors):
        self.name = name
        self.accesses = defaultdict(list)  # kind -> [(addresses, program)]
        extents = sorted(_extent(t) for t in tensors)
        self.starts = np.array([a for a, _ in extents], dtype=np.uint64)
        self.ends = np.array([b for _, b in extents], dtype=np.uint64)
        self.outside = 0

    def record(self, kind: str, pointers, mask, program: int) -> None:
        addresses = np.asarray(pointers).reshape(-1).astype(np.uint64)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask), np.shape(pointers)).reshape(-1)]
        if addresses.size:
            addresses = np.unique(addresses)
            # the tensor whose extent starts last at or before each address must hold it
            i = np.searchsorted(self.starts, addresses, side="right") - 1
            inside = (i >= 0) & (addresses < self.ends[np.clip(i, 0, None)]) if self.ends.size else False
            self.outside += int(np.size(addresses) - np.count_nonzero(inside))
            self.accesses[kind].append((addresses, program))

    def _pairs(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(addresses, programs): the unique (address, program) pairs of one kind of access."""
        if not self.accesses[kind]:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        addr = np.concatenate([a for a, _ in self.accesses[kind]])
        prog = np.concatenate([np.full(a.size, p, np.int64) for a, p in self.accesses[kind]])
        pairs = np.unique(np.stack([addr, prog.astype(np.uint64)], 1), axis=0)
        return pairs[:, 0], pairs[:, 1].astype(np.int64)

    def faults(self) -> list[str]:
        found = [f"{self.name}: {self.outside} accesses outside every tensor argument"] if self.outside else []
        s_addr, s_prog = self._pairs("store")
        l_addr, l_prog = self._pairs("load")
        a_addr, a_prog = self._pairs("atomic")
        # write-write: an address with more than one storing program
        uniq, counts = np.unique(s_addr, return_counts=True)
        if (counts > 1).any():
            found.append(f"{self.name}: {int((counts > 1).sum())} addresses stored by more than one program")
        # read-write: a load of an address another program stores
        writer = dict(zip(s_addr.tolist(), s_prog.tolist()))
        rw = [(a, p) for a, p in zip(l_addr.tolist(), l_prog.tolist()) if a in writer and writer[a] != p]
        if rw:
            found.append(f"{self.name}: {len(rw)} loads of addresses another program stores")
        # atomic against plain accesses of other programs
        atomic_by = defaultdict(set)
        for a, p in zip(a_addr.tolist(), a_prog.tolist()):
            atomic_by[a].add(p)
        mixed = sum(1 for a, p in zip(np.concatenate([s_addr, l_addr]).tolist(), np.concatenate([s_prog, l_prog]).tolist())
                    if atomic_by.get(a, set()) - {p})
        if mixed:
            found.append(f"{self.name}: {mixed} plain accesses of addresses other programs update atomically")
        return found


@contextlib.contextmanager
def checked_launches():
    """Within the block, every interpreted launch is checked; yields a report: `found`, one line
    per fault (naming the kernel), and `launches`, how many launches were checked."""
    interp = _interpreter()
    builder = interp.interpreter_builder
    executor = interp.GridExecutor
    found: list[str] = []
    state = {"launch": None, "launches": 0}

    def program() -> int:
        x, y, z = builder.grid_idx
        nx, ny, _ = builder.grid_dim
        return (z * ny + y) * nx + x

    def recording(kind, method, pointer_arg, mask_arg):
        def wrapped(*args, **kwargs):
            launch = state["launch"]
            if launch is not None:
                pointers = args[pointer_arg].data
                mask = None if mask_arg is None or args[mask_arg] is None else args[mask_arg].data
                launch.record(kind, pointers, mask, program())
            return method(*args, **kwargs)

        return wrapped

    originals = {name: getattr(builder, name) for name in
                 ("create_masked_store", "create_masked_load", "create_atomic_rmw", "create_atomic_cas")}
    call = executor.__call__

    def launch(self, *args, **kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if hasattr(a, "data_ptr")]
        state["launch"] = _Launch(getattr(self.fn, "__name__", str(self.fn)), tensors)
        try:
            return call(self, *args, **kwargs)
        finally:
            found.extend(state["launch"].faults())
            state["launch"] = None
            state["launches"] += 1

    builder.create_masked_store = recording("store", originals["create_masked_store"], 0, 2)
    builder.create_masked_load = recording("load", originals["create_masked_load"], 0, 1)
    builder.create_atomic_rmw = recording("atomic", originals["create_atomic_rmw"], 1, 3)
    builder.create_atomic_cas = recording("atomic", originals["create_atomic_cas"], 0, None)
    executor.__call__ = launch
    report = types.SimpleNamespace(found=found, state=state)
    try:
        yield report
    finally:
        for name, method in originals.items():
            setattr(builder, name, method)
        executor.__call__ = call


@contextlib.contextmanager
def poisoned_allocations():
    """Within the block, torch.empty, torch.empty_like and Tensor.new_empty return floating-point
    tensors filled with NaN: a kernel that reads an element of its output (or scratch) that no
    program wrote gives NaN, where the interpreter's fresh CPU memory is often zeros and a GPU's
    is whatever the last user left."""
    import torch

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t

    torch.empty = lambda *a, **k: poisoned(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poisoned(empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poisoned(new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty


def with_meta(monkeypatch, module, kinds, **meta):
    """module's launches of the given kinds (triton_lse._default_meta's kinds: "bwd", "atomic",
    ...) take these meta-parameters over their defaults (one config, AUTOTUNE off): the tile
    and block shapes a GPU's configs have that the interpreter's one config does not."""
    from fastnce.ops import triton_lse

    default = triton_lse._default_meta
    monkeypatch.setattr(module, "_default_meta", lambda kind, d: dict(default(kind, d), **(meta if kind in kinds else {})))
