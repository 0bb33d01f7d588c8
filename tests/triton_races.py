"""A race detector for Triton kernels under the interpreter (TRITON_INTERPRET=1).

The interpreter runs a launch's programs one after another, so that a kernel whose programs
write one address twice, or read what another program of the same launch writes, gives the
same values every run here, whatever the order: on a GPU, where the programs run at once,
it gives what the timing gives. `races()` records, per launch, which program stored, loaded
or atomically updated each address (the lanes their masks keep) and reports:
  - an address stored by two programs (write-write);
  - an address one program stores and another loads (read-write);
  - an address updated atomically by one program and stored or loaded plainly by another.
Atomics among themselves do not race. Used by tests/test_triton.py.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np


def _interpreter():
    from triton.runtime import interpreter

    return interpreter


class _Launch:
    def __init__(self, name: str):
        self.name = name
        self.accesses = defaultdict(list)  # kind -> [(addresses, program)]

    def record(self, kind: str, pointers, mask, program: int) -> None:
        addresses = np.asarray(pointers).reshape(-1).astype(np.uint64)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask), np.shape(pointers)).reshape(-1)]
        if addresses.size:
            self.accesses[kind].append((np.unique(addresses), program))

    def _pairs(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(addresses, programs): the unique (address, program) pairs of one kind of access."""
        if not self.accesses[kind]:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        addr = np.concatenate([a for a, _ in self.accesses[kind]])
        prog = np.concatenate([np.full(a.size, p, np.int64) for a, p in self.accesses[kind]])
        pairs = np.unique(np.stack([addr, prog.astype(np.uint64)], 1), axis=0)
        return pairs[:, 0], pairs[:, 1].astype(np.int64)

    def races(self) -> list[str]:
        found = []
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
def races():
    """Within the block, every interpreted launch is checked; yields the list the races found
    are appended to (one line each, naming the kernel) and `launches`, how many were checked."""
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
        state["launch"] = _Launch(getattr(self.fn, "__name__", str(self.fn)))
        try:
            return call(self, *args, **kwargs)
        finally:
            found.extend(state["launch"].races())
            state["launch"] = None
            state["launches"] += 1

    builder.create_masked_store = recording("store", originals["create_masked_store"], 0, 2)
    builder.create_masked_load = recording("load", originals["create_masked_load"], 0, 1)
    builder.create_atomic_rmw = recording("atomic", originals["create_atomic_rmw"], 1, 3)
    builder.create_atomic_cas = recording("atomic", originals["create_atomic_cas"], 0, None)
    executor.__call__ = launch
    report = type("Report", (), {})()
    report.found, report.state = found, state
    try:
        yield report
    finally:
        for name, method in originals.items():
            setattr(builder, name, method)
        executor.__call__ = call
