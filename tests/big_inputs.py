"""Inputs for the GPU tests of 64-bit offsets (tests/test_edges.py, tests/test_siglip.py)."""
import torch


def operands_past_2_to_the_31(side):
    """bfloat16 q, k on the GPU, one of them (`side`) of 2³¹ + ~2M elements (4.3 GB), the other
    64 × 512, both requiring grad; returns q, k, the big one and the slice of its last 300 rows,
    where 32-bit offsets would have wrapped."""
    big_rows, D = (1 << 31) // 512 + 4099, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(big_rows, D, device="cuda", dtype=torch.bfloat16, generator=g)
    small = torch.randn(64, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k = (big, small) if side == "q" else (small, big)
    q.requires_grad_(), k.requires_grad_()
    return q, k, big, slice(big_rows - 300, big_rows)
