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


def g_term_sums(G, q, k=None):
    """{"dq": |G| @ |k|, "dk": |G|ᵀ @ |q|} (k None, symmetric: dq (|G| + |G|ᵀ) @ |q|, no dk),
    float64: what a relative error of each term of G (one rounding to the input dtype for the
    second product, as FlashAttention's P) can move the unscaled dq = G @ k and dk = Gᵀ @ q by."""
    G, q = G.double().abs(), q.double().abs()
    if k is None:
        return {"dq": (G + G.T) @ q}
    k = k.double().abs()
    return {"dq": G @ k, "dk": G.T @ q}
