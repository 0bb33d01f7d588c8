"""Per-dtype accuracy checks (DESIGN.md §6)."""
import torch

# Error floors for a fast backend against the float64 reference, per input dtype.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close(actual, expected, dtype, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL[dtype], atol=ATOL[dtype], msg=msg)


def assert_within_twice_reference_error(fast, low_ref, exact, floor, what=""):
    """flash-attention's criterion: |fast − exact| ≤ 2·|low_ref − exact| + floor, worst case."""
    fast_err = (fast.double() - exact.double()).abs().max().item()
    ref_err = (low_ref.double() - exact.double()).abs().max().item()
    assert fast_err <= 2 * ref_err + floor, f"{what}: error {fast_err:.3g} > 2 × reference error {ref_err:.3g} + {floor:g}"
