"""The `triton` backend: the primitive as fused tiled Triton kernels (DESIGN.md §1, §2).

Launcher contract: fastnce/ops/function.py. The kernels:

* `_fwd_kernel`, grid (⌈M/BM⌉,): one program owns BM rows and walks all columns in tiles of
  BN, keeping an online (max, sum-exp) pair per row in fp32; S is never written out. Used for
  row_lse alone, and (COL_LSE = "transposed", FASTNCE_TRITON_COL_LSE=transposed) for col_lse
  as the row LSE of Sᵀ: a second launch on (k, q), bias on the rows, exclusion offset negated,
  one more S product but no extra memory.
* `_fwd_panel_kernel` + `_col_merge_kernel` (default when col_lse is asked for): row and
  column LSE from ONE pass over S, deterministic, no atomics. P programs ("panels"); panel p
  owns the row blocks p, p+P, p+2P, … and, besides the online row pair, keeps the running
  (max, sum-exp) of every column over its own rows in row p of a (2, P, N) fp32 buffer, read-
  modified-written tile by tile (one writer per buffer row: no race). The merge folds the P
  partials per column in a fixed order. P = min(#row blocks, 4·SMs, max(SMs, 64 MiB / 8N))
  (_panels): at N = 32768, P = 256 and 64 MiB of partials; P is not cut below the SM count
  to save memory (idle SMs would cost more than the product saved), and where SMs·N·8 passes
  256 MiB (N > 254k on 132 SMs) the transposed pass is used instead.
* `_bwd_kernel`, grid (⌈M/BM⌉, ⌈D/BDV⌉): one program owns BM rows × BDV output features,
  walks all column tiles, recomputes S from q, k (full D) and the saved LSEs, forms
      G = g[i]·exp(S − r[i]) + h[j]·exp(S − c[j])        (0 where masked or lse = −inf)
  and accumulates G @ y_J (y = k for dq). dk = Gᵀ @ q is the same kernel on the transposed
  problem (rows = columns of k, bias on the rows, (g, r) and (h, c) swapped), and its row
  sums of Gᵀ are dbias. Two recomputes of S (4 products), no atomics, bit-for-bit
  reproducible: the non-symmetric backward's "two-pass" plan, always taken when
  torch.are_deterministic_algorithms_enabled() or FASTNCE_TRITON_DETERMINISTIC=1.
* `_bwd_atomic_kernel`, grid (⌈N/BN⌉, ⌈D/BDV⌉) (the "atomic" plan, FlashAttention-2 style;
  which plan runs is timed once per shape class on the GPU, see _backward_plan): program J
  recomputes S[:, J] once per row block I, accumulates dk_J += Gᵀ @ q_I and
  dbias_J in registers (single writer) and adds dq_I += G @ k_J into a zeroed fp32 (M, D)
  buffer with tl.atomic_add. One recompute (3 products) when BDV = D; the order of the
  ⌈N/BN⌉ additions into each dq element varies, so dq differs run to run in the last bits.
* `_fwd_half_kernel` + `_col_merge_kernel` (symmetric S without bias, plan "half"): the row
  LSE from the tiles on and above the diagonal only (half the products); a tile (I, J > I)
  feeds rows I and, as its transpose, rows J through per-program column partials, and one
  exponential serves both where the tile allows (_span). Programs own balanced block pairs
  (k, n − 1 − k). Timed against the all-tiles `_fwd_kernel` per shape class (_plan).
* Symmetric (k is q, NT-Xent): S is symmetric up to the column bias, so the tile that
  yields G[I, J] also yields the mirror G[J, I]ᵀ (S[j, i] = S[i, j] − b[j] + b[i]; masks
  mirrored). One launch of `_bwd_kernel` with SYM accumulates (G[I,J] + G[J,I]ᵀ) @ q_J and,
  for dbias, the row sums of the mirror: 2 products for the whole backward instead of 4,
  deterministic (plan "mirror").
* `_bwd_half_kernel` (symmetric S without bias, plan "half", D ≤ 128): the backward from the
  tiles on and above the diagonal only: a tile (I, J > I) gives Gs = G[I, J] + G[J, I]ᵀ once,
  dq_I += Gs @ q_J in registers and dq_J += Gsᵀ @ q_I by fp32 atomics. 3 products and one
  exponential per entry over half of S (1.5 and 0.5 per entry of S, against the mirror's 2
  and 1), for M²·D/(2·BM) atomic adds (1.1·10⁹, 4.3 GB of L2 reduction traffic, at
  simclr-16k with BM = 64: whether that costs more than it saves is timed, _plan).

* Pipelining: each kernel walks tiles of S in a loop. Where D fits in one BK chunk (ONE_K,
  a heuristic on the config's BK; the BK = 128 and 512 candidates at D = 128, 512), the
  loop-invariant operand (the program's own rows) is loaded once and the loop body is one
  load and one product with no inner loop over D, so Triton software-pipelines it
  (num_stages: the next tile's load overlaps this tile's work), as it does only for innermost
  loops; the same tile rows then also feed the second product. With BK < D each tile loops
  over D and pays its load latency (seen in the TTGIR: the outer loop is not pipelined).
* Exponentials: a tile's row and column sums in the one-pass and half forwards, and the two
  terms of G in the backward (row and column LSE; or G and its mirror for NT-Xent), come from
  ONE exponential per entry when the tile's maxima (forward) or LSEs (backward) lie within
  ONE_EXP_SPREAD (40) of each other, for 16-bit inputs or tf32 (_spread):
  a·e^(S − l) = e^(S − hi)·(a·e^(hi − l)) with hi the tile's largest LSE (_span says why
  nothing that matters underflows or overflows); else one each. At D = 128
  an exponential costs about one product per entry (16 MUFU results vs 4096 tensor-core
  flops a clock per SM): this takes the NT-Xent backward from 2 exponentials per entry to 1,
  CLIP's forward from 2 to 1 and its backward from 2 to 1.

Cost per training step for CLIP (q ≠ k, row and column LSE, both gradients), in products
of 2·M·N·D: before, 6 (forward row pass + transposed col pass, dq pass + dk pass with a
recompute each); now 4 (panel forward 1; one recompute, dq, dk), 5 in deterministic mode.
clip-32k (N = 32768, D = 512, bf16): one product is 1.10 TFLOP, so 6.60 → 4.40 TFLOP a step:
at an achieved T TFLOP/s that is 6600/T → 4400/T ms (T = 500: 13.2 → 8.8 ms, just the
target of 0.9 × 9.8 ms; 6 products would need 750, the ceiling). Beside the products: M·N
exponentials in the forward and M·N in the backward with the shared ones (2.1·10⁹, ~0.5 ms
at ~4·10¹²/s if not overlapped; 4·M·N before), the merge (reads 64 MiB, ~0.03 ms), and the
dq atomics: M·D·⌈N/BN⌉ fp32 adds, 34 GB of L2 reduction traffic at BN = 64 (17 GB at
BN = 128, which needs BDV ≤ 256 at D = 512, i.e. 2 recomputes). Registers are the other
risk at D = 512: the one-recompute (BDV = D) atomic kernel holds a (BN, 512) fp32
accumulator; with dq formed in 128-feature chunks two of its four candidates are spill-free on
sm_90 (triton 3.6) and two spill 8 and 32 bytes (before the chunks, all spilled, 56-1496
bytes), while the two-pass kernel has two spill-free BDV = 512 candidates
(tests/triton_aot.py --configs). Which plan wins is timed per shape class (_backward_plan).
simclr-16k (NT-Xent, 2N = 32768, D = 128, row LSE only): 3 products (forward 1, symmetric
backward 2), 0.82 TFLOP, or 2.5 with the half forward (0.69 TFLOP), 2 with the half backward
too (0.55 TFLOP); exponentials 3·M·N → 1.5·M·N with the shared ones and the half forward, M·N
with the half backward too (~0.8 → ~0.4 → ~0.27 ms at ~4·10¹²/s): at D = 128 they cost as
much as the products.
The GPU benchmark (python -m fastnce.bench gpu) reports achieved TFLOP/s counting 4 products.

Dtypes: float16, bfloat16, float32 in, fp32 accumulation and LSEs out. The second product
of the backward casts G to the input dtype (tensor cores, as FlashAttention does with P);
for float16, G is first divided by max(|g|, |h|) so that small gradients (1/N at N=1M) do
not underflow, and the accumulator multiplied back. float32 inputs use tf32 only when
PyTorch's float32 matmuls may (`torch.backends.cuda.matmul.fp32_precision = 'tf32'`, or
the legacy `allow_tf32`), else "tf32x3" (near-fp32 error, on the tensor
cores; FASTNCE_TRITON_FP32_PRECISION=ieee for the exact but ~10x slower FMA path).
Autotuning (GPU): configs keyed on (M, N) size classes (capped at 2**16), D and the mask
flags; FASTNCE_TRITON_AUTOTUNE=0 uses one fixed config per variant instead.

Under TRITON_INTERPRET=1 (CPU tensors): one small config (so tiles and tails are exercised
on small tests), and bfloat16 tiles are upcast to fp32 before tl.dot (the interpreter's bf16
dot is wrong, DESIGN §6).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .naive import tf32_allowed

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - triton is a Linux dependency
    triton = tl = None
    _IMPORT_ERROR = str(e)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The backward's terms (and the half forward's row and column sums) share one exponential per
# entry of S when a tile's LSEs lie within this of each other (_span), for 16-bit inputs or
# tf32 (_spread); tests set it to -1 to check the one-exponential-per-term path against it.
ONE_EXP_SPREAD = 40.0
# tl.dot precision for float32 inputs when tf32 is not allowed.
_FP32_PRECISION = os.environ.get("FASTNCE_TRITON_FP32_PRECISION", "tf32x3")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    device = torch.device(device)
    if _IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_IMPORT_ERROR}); pip install triton"
    if dtype not in SUPPORTED_DTYPES:
        return (f"the triton backend computes in float16, bfloat16 and float32, got {dtype}; "
                "use backend='torch' or 'reference' for float64")
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    if device.type == "cpu":
        return ("triton runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
                "before importing triton (slow, for testing)")
    return f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got device {device}"


if triton is not None:
    _INTERPRET = _interpreting()

    # ------------------------------------------------------------------ configs
    # Autotuning (GPU only) can be switched off with FASTNCE_TRITON_AUTOTUNE=0: each kernel
    # variant then compiles once with _default_meta's config instead of ~8 candidates.
    AUTOTUNE = os.environ.get("FASTNCE_TRITON_AUTOTUNE", "1") != "0" and not _INTERPRET

    def _cfgs(fwd: bool):
        out = []
        # BK ≥ D (one K step, ONE_K): the tile loop is innermost and software-pipelined; the
        # BK = 128 and 512 candidates are those (D = 128, 512), spill-free on sm_90 with ptxas.
        if fwd:
            for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 128, 128, 8, 2),
                                     (64, 128, 64, 4, 3), (128, 64, 128, 4, 2), (64, 64, 64, 4, 4),
                                     (64, 64, 32, 4, 4),
                                     (128, 64, 128, 4, 3), (128, 64, 128, 8, 3), (128, 128, 128, 8, 3),
                                     (64, 128, 128, 4, 3), (64, 64, 512, 8, 2), (64, 64, 512, 4, 2),
                                     (64, 32, 512, 4, 3), (64, 32, 512, 8, 3)]:
                out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s))
        else:
            # BDV = D keeps one S recompute per program; D = 512 needs BM = 32..64 for the
            # (BM, 512) fp32 accumulator to fit in registers, hence the 512-wide configs.
            # (ptxas on sm_90: the 4-warp 64×64 tiles spill, the symmetric variant most; 8 warps don't)
            for bm, bn, bk, bdv, w, s in [(64, 64, 64, 128, 8, 2), (64, 32, 64, 128, 8, 2),
                                          (64, 64, 64, 128, 4, 2), (128, 64, 64, 128, 8, 2),
                                          (64, 128, 64, 128, 8, 2), (64, 64, 64, 64, 4, 2),
                                          (64, 32, 64, 64, 4, 3), (128, 64, 64, 64, 8, 2),
                                          (64, 64, 64, 256, 8, 2), (32, 64, 64, 512, 8, 2),
                                          (64, 32, 64, 512, 8, 2), (64, 64, 64, 512, 16, 2),
                                          (64, 64, 128, 128, 8, 2), (64, 64, 128, 128, 8, 3),
                                          (128, 64, 128, 128, 8, 2), (64, 128, 128, 128, 8, 2),
                                          (64, 32, 128, 128, 4, 3), (32, 64, 512, 512, 8, 2),
                                          (64, 32, 512, 512, 8, 2)]:
                out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "BDV": bdv}, num_warps=w, num_stages=s))
        return out

    def _prune(configs, named_args, **kwargs):
        """Drop configs whose feature tiles exceed the padded D (they only waste work), backward
        configs that would split D into more than 4 output blocks (each split recomputes S),
        and, up to D = 128, configs that loop over D: with 2 or 4 steps per tile they leave most
        of each tile's load latency exposed, where one-K-step configs pipeline across tiles
        (at D = 512 the 8-step loop is pipelined within each tile, and both kinds are tried)."""
        D = named_args["D"]
        dpad = max(16, triton.next_power_of_2(D))
        kept = [c for c in configs
                if c.kwargs["BK"] <= max(dpad, 32)
                and min(dpad, 128) <= c.kwargs.get("BDV", dpad) <= max(dpad, 64)]
        if dpad <= 128:
            kept = [c for c in kept if c.kwargs["BK"] >= D] or kept
        return kept or configs[:1]

    # ------------------------------------------------------------------ jit helpers
    @triton.jit
    def _s_tile(p_x, p_y, o_i, o_j, m_i, m_j, D,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                DOT_F32: tl.constexpr, PREC: tl.constexpr):
        """x[o_i] @ y[o_j]ᵀ, (BM, BN) fp32, looping over D in chunks of BK.

        o_i / o_j are int64 row indices (x, y are row-major (·, D)); out-of-range rows read 0.
        """
        b_s = tl.zeros([BM, BN], dtype=tl.float32)
        for d0 in range(0, D, BK):
            o_d = d0 + tl.arange(0, BK)
            m_d = o_d < D
            b_x = tl.load(p_x + o_i[:, None] * D + o_d[None, :], mask=m_i[:, None] & m_d[None, :], other=0.0)
            b_y = tl.load(p_y + o_j[:, None] * D + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.0)
            if DOT_F32:
                b_x = b_x.to(tl.float32)
                b_y = b_y.to(tl.float32)
            b_s += tl.dot(b_x, tl.trans(b_y), input_precision=PREC)
        return b_s

    @triton.jit
    def _rows_tile(p, o_r, m_r, D, BK: tl.constexpr, DOT_F32: tl.constexpr):
        """p[o_r, :D] as one (len(o_r), BK) tile, zero past D (BK ≥ D), fp32 when DOT_F32."""
        o_d = tl.arange(0, BK)
        b = tl.load(p + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & (o_d < D)[None, :], other=0.0)
        if DOT_F32:
            b = b.to(tl.float32)
        return b

    @triton.jit
    def _held(p, o_r, m_r, D, BK: tl.constexpr, DOT_F32: tl.constexpr, ONE_K: tl.constexpr):
        """The loop-invariant operand of the S tiles, loaded once when ONE_K (D ≤ BK): then the
        loop over the other operand's tiles holds no inner loop over D, and Triton software-
        pipelines it (prefetching the next tile while this one computes), which it does only
        for innermost loops. Without ONE_K a placeholder (the tiles loop over D, _s_tile)."""
        b = 0.0
        if ONE_K:
            b = _rows_tile(p, o_r, m_r, D, BK, DOT_F32)
        return b

    @triton.jit
    def _s_step(b_held, p_h, p_s, o_h, o_s, m_h, m_s, D, BH: tl.constexpr, BS: tl.constexpr,
                BK: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, ONE_K: tl.constexpr,
                HELD_ROWS: tl.constexpr):
        """One tile of the unscaled S between the program's held rows o_h of p_h (b_held, from
        _held) and the streamed rows o_s of p_s: (BH, BS) when the held rows are S's rows
        (HELD_ROWS), else (BS, BH); and the streamed tile when ONE_K (else a placeholder)."""
        b_t = 0.0
        if ONE_K:
            b_t = _rows_tile(p_s, o_s, m_s, D, BK, DOT_F32)
            if HELD_ROWS:
                b = tl.dot(b_held, tl.trans(b_t), input_precision=PREC)
            else:
                b = tl.dot(b_t, tl.trans(b_held), input_precision=PREC)
        else:
            if HELD_ROWS:
                b = _s_tile(p_h, p_s, o_h, o_s, m_h, m_s, D, BH, BS, BK, DOT_F32, PREC)
            else:
                b = _s_tile(p_s, p_h, o_s, o_h, m_s, m_h, D, BS, BH, BK, DOT_F32, PREC)
        return b, b_t

    @triton.jit
    def _features(p, o_r, m_r, o_v, m_v, D, b_loaded, REUSE: tl.constexpr, DOT_F32: tl.constexpr):
        """p[o_r, o_v], the features of the second product: with REUSE (ONE_K and one feature
        block spanning the tile) the tile of these rows already loaded for S, else a load;
        fp32 when DOT_F32."""
        if REUSE:
            b = b_loaded
        else:
            b = tl.load(p + o_r[:, None] * D + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
            if DOT_F32:
                b = b.to(tl.float32)
        return b

    @triton.jit
    def _add_tile(p, o_r, m_r, o_c, m_c, D, b, b_ginv, G_NORM: tl.constexpr):
        """p[o_r, o_c] += b by fp32 atomics (p row-major (·, D); the order of the additions
        varies run to run), b first freed of G's float16 scaling (G_NORM, see _g_operand)."""
        if G_NORM:
            b = b / b_ginv
        tl.atomic_add(p + o_r[:, None] * D + o_c[None, :], b, mask=m_r[:, None] & m_c[None, :], sem="relaxed")

    @triton.jit
    def _g_operand(b_G, b_like, b_ginv, G_NORM: tl.constexpr):
        """G (fp32) as the operand of a product with the features b_like: in their dtype (the
        tensor cores, as FlashAttention does with P), scaled by ginv first for float16 (G_NORM)."""
        if G_NORM:
            b_G = b_G * b_ginv
        return b_G.to(b_like.dtype)

    @triton.jit
    def _scalar(p, HAS: tl.constexpr, default: tl.constexpr):
        """The fp32 scalar at p, or default when it is absent (a float16 backward's G scale, 1;
        SigLIP's bias, 0)."""
        b = default
        if HAS:
            b = tl.load(p)
        return b

    @triton.jit
    def _store_grad(p_out, p_db, o_r, m_r, o_v, m_v, D, b_acc, b_db, b_ginv, i_d,
                    G_NORM: tl.constexpr, WRITE_DB: tl.constexpr):
        """A backward program's output: its (rows o_r, features o_v) block of the gradient, freed
        of G's float16 scaling, and, from feature block 0, its rows' sums of G."""
        if G_NORM:
            b_acc = b_acc / b_ginv
        tl.store(p_out + o_r[:, None] * D + o_v[None, :], b_acc, mask=m_r[:, None] & m_v[None, :])
        if WRITE_DB:
            if i_d == 0:
                tl.store(p_db + o_r, b_db, mask=m_r)

    @triton.jit
    def _pair_blocks(k, n_b):
        """(first, step, count) of the row blocks k and n_b − 1 − k that a program of the half
        kernels owns (n_b + 1 tiles on and above the diagonal together, balanced): block
        first + t·step for t < count; the middle block of an odd count once."""
        return k, n_b - 1 - 2 * k, 1 + (n_b - 1 - k > k).to(tl.int32)

    @triton.jit
    def _labels(p_l, o, m, MASK_MODE: tl.constexpr):
        """int64 labels at o when a label mask is on; zeros (unused) otherwise."""
        b = tl.zeros_like(o)
        if MASK_MODE != 0:
            b = tl.load(p_l + o, mask=m, other=0)
        return b

    @triton.jit
    def _keep(o_i, o_j, m_i, m_j, b_yi, b_yj, offset,
              EXCLUDE: tl.constexpr, MASK_MODE: tl.constexpr, MIRROR: tl.constexpr):
        """(BM, BN) bool: pair (i, j) in range, not excluded, labels as MASK_MODE says.

        Excluded: j == i + offset, or with MIRROR the pair (j, i), i.e. i == j + offset (the
        label relation is symmetric, so the mirror only changes the exclusion).
        """
        b_v = m_i[:, None] & m_j[None, :]
        if EXCLUDE:
            if MIRROR:
                b_v = b_v & (o_i[:, None] != o_j[None, :] + offset)
            else:
                b_v = b_v & (o_j[None, :] != o_i[:, None] + offset)
        if MASK_MODE == 1:
            b_v = b_v & (b_yi[:, None] == b_yj[None, :])
        if MASK_MODE == 2:
            b_v = b_v & (b_yi[:, None] != b_yj[None, :])
        return b_v

    # ------------------------------------------------------------------ forward
    @triton.jit
    def _online(b_m, b_l, b_tmax, b_tsum, b_tshift):
        """Merge a tile's contribution into running (max, Σ exp(x − max)) pairs: b_tmax the
        tile's maxima, b_tsum its Σ exp(x − b_tshift), b_tshift ≥ b_tmax. A line whose tile
        part is all −inf keeps its max, and its (zero, or NaN) sum is scaled by at most 1: a
        shift shared by the tile may lie far above such a line's max. −inf maxima shift by 0."""
        b_mn = tl.maximum(b_m, tl.where(b_tmax == float("-inf"), float("-inf"), b_tshift))
        b_c = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_l = b_l * tl.exp(b_m - b_c) + b_tsum * tl.exp(tl.minimum(b_tshift - b_c, 0.0))
        return b_mn, b_l

    @triton.jit
    def _row_col_update(b_s, b_m, b_l, b_cm, b_cl, SPREAD: tl.constexpr):
        """The online (max, sum-exp) pairs of a tile's rows (b_m, b_l) and columns (b_cm, b_cl)
        after the masked tile b_s. One exponential per entry serves both when the tile's row
        and column maxima lie within SPREAD of its maximum (then exp(S − top) ≥ e^−SPREAD at
        every line's largest entry: nothing that matters underflows), else one for each."""
        b_rmax = tl.max(b_s, 1)
        b_cmax = tl.max(b_s, 0)
        b_top = tl.max(b_rmax, 0)
        b_rlow = tl.min(tl.where(b_rmax == float("-inf"), b_top, b_rmax), 0)
        b_clow = tl.min(tl.where(b_cmax == float("-inf"), b_top, b_cmax), 0)
        if (b_top - b_rlow <= SPREAD) and (b_top - b_clow <= SPREAD):
            b_e = tl.exp(b_s - b_top)
            b_m, b_l = _online(b_m, b_l, b_rmax, tl.sum(b_e, 1), tl.zeros_like(b_rmax) + b_top)
            b_cm, b_cl = _online(b_cm, b_cl, b_cmax, tl.sum(b_e, 0), tl.zeros_like(b_cmax) + b_top)
        else:
            b_rs = tl.where(b_rmax == float("-inf"), 0.0, b_rmax)
            b_cs = tl.where(b_cmax == float("-inf"), 0.0, b_cmax)
            b_m, b_l = _online(b_m, b_l, b_rmax, tl.sum(tl.exp(b_s - b_rs[:, None]), 1), b_rs)
            b_cm, b_cl = _online(b_cm, b_cl, b_cmax, tl.sum(tl.exp(b_s - b_cs[None, :]), 0), b_cs)
        return b_m, b_l, b_cm, b_cl

    @triton.jit
    def _lse_of(b_m, b_l):
        """m + log l of online (max, sum-exp) pairs. l == 0 exactly when nothing was valid
        (m == −inf): −inf, without log(0). Compared with == so that a NaN stays NaN."""
        return tl.where(b_l == 0.0, float("-inf"), b_m + tl.log(tl.where(b_l == 0.0, 1.0, b_l)))

    @triton.jit
    def _row_update(b_s, b_m, b_l):
        """The online (max, sum-exp) pairs of a tile's rows after the masked tile b_s."""
        b_rmax = tl.max(b_s, 1)
        b_rs = tl.where(b_rmax == float("-inf"), 0.0, b_rmax)
        return _online(b_m, b_l, b_rmax, tl.sum(tl.exp(b_s - b_rs[:, None]), 1), b_rs)

    @triton.jit
    def _fwd_kernel(p_x, p_y, p_scale, p_bias, p_lx, p_ly, p_lse,
                    M, N, D, offset, KEY_M, KEY_N,
                    HAS_BIAS: tl.constexpr, BIAS_ON_ROW: tl.constexpr,
                    EXCLUDE: tl.constexpr, MASK_MODE: tl.constexpr,
                    DOT_F32: tl.constexpr, PREC: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ONE_K: tl.constexpr):
        """lse[i] = log Σ_j exp(scale·x[i]·y[j] + bias), masked; x (M, D), y (N, D), lse (M,) fp32.

        bias is indexed by the column j, or by the row i when BIAS_ON_ROW (the transposed
        launch that computes col_lse).
        """
        i_m = tl.program_id(0)
        o_i = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
        m_i = o_i < M
        b_scale = tl.load(p_scale)
        b_yi = _labels(p_lx, o_i, m_i, MASK_MODE)
        b_brow = _line(p_bias, o_i, m_i, HAS_BIAS and BIAS_ON_ROW)
        b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        b_xi = _held(p_x, o_i, m_i, D, BK, DOT_F32, ONE_K)
        for j0 in range(0, N, BN):
            o_j = (j0 + tl.arange(0, BN)).to(tl.int64)
            m_j = o_j < N
            b_s, _ = _s_step(b_xi, p_x, p_y, o_i, o_j, m_i, m_j, D, BM, BN, BK, DOT_F32, PREC, ONE_K, True)
            b_s = b_s * b_scale
            if HAS_BIAS:
                if BIAS_ON_ROW:
                    b_s += b_brow[:, None]
                else:
                    b_s += tl.load(p_bias + o_j, mask=m_j, other=0.0)[None, :]
            b_yj = _labels(p_ly, o_j, m_j, MASK_MODE)
            b_v = _keep(o_i, o_j, m_i, m_j, b_yi, b_yj, offset, EXCLUDE, MASK_MODE, False)
            b_m, b_l = _row_update(tl.where(b_v, b_s, float("-inf")), b_m, b_l)
        b_lse = _lse_of(b_m, b_l)
        tl.store(p_lse + o_i, b_lse, mask=m_i)

    # ------------------------------------------------------------------ backward
    @triton.jit
    def _g_tile(b_s, b_v, b_a, b_la, b_b, b_lb, HAS_A: tl.constexpr, HAS_B: tl.constexpr, SPREAD: tl.constexpr):
        """G = a[i]·exp(S − la[i]) + b[j]·exp(S − lb[j]) on valid pairs, 0 elsewhere (fp32).

        (a, la) are the gradient and lse of the LSE taken along the rows of this tile,
        (b, lb) those of the LSE along its columns; lse shifts of −inf were replaced by 0.
        With both terms, one exponential serves both where the tile allows it (_span).
        """
        b_s = tl.where(b_v, b_s, float("-inf"))
        b_gt = tl.zeros_like(b_s)
        if HAS_A and HAS_B:
            b_width, b_hi = _span(b_la, b_lb, b_la, b_lb)
            if b_width <= SPREAD:
                b_gt = tl.exp(b_s - b_hi) * ((b_a * tl.exp(b_hi - b_la))[:, None] + (b_b * tl.exp(b_hi - b_lb))[None, :])
            else:
                b_gt = b_a[:, None] * tl.exp(b_s - b_la[:, None]) + b_b[None, :] * tl.exp(b_s - b_lb[None, :])
        else:
            if HAS_A:
                b_gt = b_a[:, None] * tl.exp(b_s - b_la[:, None])
            if HAS_B:
                b_gt = b_b[None, :] * tl.exp(b_s - b_lb[None, :])
        return b_gt

    @triton.jit
    def _span(b_up1, b_up2, b_low1, b_low2):
        """(max − min, max) of LSE shifts: the max over b_up1, b_up2, the min over b_low1, b_low2
        (per row and per column vectors of a tile; up and low differ where a line has two).

        The exponentials' budget (FlashAttention-3's point: at D = 128 one exp costs about as
        much as one product per entry). Every valid S[i, j] is at most the LSEs of its row and
        its column, so with hi = the largest LSE of the tile, a·exp(S − l) = exp(S − hi)·(a·exp(hi − l))
        where exp(S − hi) ≤ 1 and, if every l is within 40 of hi, exp(hi − l) ≤ e^40: no
        overflow, and a term whose exp(S − hi) underflows is below e^−47 of its line's sum. So
        when max − min ≤ 40 (the usual case: LSEs sit near log N) several terms share one
        exponential per entry; otherwise each keeps its own. A NaN shift gives NaN either way.
        """
        b_hi = tl.maximum(tl.max(b_up1, 0), tl.max(b_up2, 0))
        b_lo = tl.minimum(tl.min(b_low1, 0), tl.min(b_low2, 0))
        return b_hi - b_lo, b_hi

    @triton.jit
    def _g_sym_tile(b_raw, b_v, b_vm, b_gi, b_ri, b_hj, b_cj, b_hi, b_ci, b_gj, b_rj,
                    HAS_G: tl.constexpr, HAS_H: tl.constexpr, SPREAD: tl.constexpr):
        """(G, Gm) of a symmetric tile without bias, Gm[i, j] = G[j, i] (S[j, i] = S[i, j]).

        G = g_i·e^(S − r_i) + h_j·e^(S − c_j) on b_v, Gm = h_i·e^(S − c_i) + g_j·e^(S − r_j) on
        b_vm: one exponential per entry for all the terms when _span allows, else as _g_tile.
        """
        if HAS_G and HAS_H:
            b_width, b_top = _span(tl.maximum(b_ri, b_ci), tl.maximum(b_rj, b_cj),
                                   tl.minimum(b_ri, b_ci), tl.minimum(b_rj, b_cj))
        elif HAS_G:
            b_width, b_top = _span(b_ri, b_rj, b_ri, b_rj)
        else:
            b_width, b_top = _span(b_ci, b_cj, b_ci, b_cj)
        if b_width <= SPREAD:
            b_e = tl.exp(tl.where(b_v | b_vm, b_raw, float("-inf")) - b_top)
            b_a1 = tl.zeros_like(b_ri)  # row and column factors of G (1) and Gm (2)
            b_b1 = tl.zeros_like(b_rj)
            b_a2 = tl.zeros_like(b_ri)
            b_b2 = tl.zeros_like(b_rj)
            if HAS_G:
                b_a1 = b_gi * tl.exp(b_top - b_ri)
                b_b2 = b_gj * tl.exp(b_top - b_rj)
            if HAS_H:
                b_b1 = b_hj * tl.exp(b_top - b_cj)
                b_a2 = b_hi * tl.exp(b_top - b_ci)
            b_G = b_e * tl.where(b_v, b_a1[:, None] + b_b1[None, :], 0.0)
            b_Gm = b_e * tl.where(b_vm, b_a2[:, None] + b_b2[None, :], 0.0)
        else:
            b_G = _g_tile(b_raw, b_v, b_gi, b_ri, b_hj, b_cj, HAS_G, HAS_H, SPREAD)
            b_Gm = _g_tile(b_raw, b_vm, b_hi, b_ci, b_gj, b_rj, HAS_H, HAS_G, SPREAD)
        return b_G, b_Gm

    @triton.jit
    def _shift(p_lse, o, m):
        # A fully masked line has lse −inf and only −inf entries: shift by 0, exp gives 0.
        b = tl.load(p_lse + o, mask=m, other=0.0)
        return tl.where(b == float("-inf"), 0.0, b)

    @triton.jit
    def _line(p, o, m, HAS: tl.constexpr):
        """fp32 values p[o] of a per-row / per-column vector, zeros when it is absent."""
        b = tl.zeros_like(o).to(tl.float32)
        if HAS:
            b = tl.load(p + o, mask=m, other=0.0).to(tl.float32)
        return b

    @triton.jit
    def _terms(p_grad, p_lse, o, m, HAS: tl.constexpr):
        """(gradient, lse shift) at the lines o of one LSE direction; zeros when it has no gradient."""
        b_grad = tl.zeros_like(o).to(tl.float32)
        b_shift = tl.zeros_like(o).to(tl.float32)
        if HAS:
            b_grad = tl.load(p_grad + o, mask=m, other=0.0)
            b_shift = _shift(p_lse, o, m)
        return b_grad, b_shift

    @triton.jit
    def _bwd_kernel(p_x, p_y, p_scale, p_bias, p_lx, p_ly,
                    p_g, p_r, p_h, p_c, p_ginv, p_dx, p_db,
                    M, N, D, offset, KEY_M, KEY_N,
                    HAS_BIAS: tl.constexpr, BIAS_ON_ROW: tl.constexpr,
                    EXCLUDE: tl.constexpr, MASK_MODE: tl.constexpr,
                    HAS_G: tl.constexpr, HAS_H: tl.constexpr, SYM: tl.constexpr,
                    WRITE_DB: tl.constexpr, G_NORM: tl.constexpr, SPREAD: tl.constexpr,
                    DOT_F32: tl.constexpr, PREC: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
                    ONE_K: tl.constexpr):
        """dx = G @ y (M, D) fp32, and db[i] = Σ_j G[i, j] when WRITE_DB (only the d-block 0 writes).

        x (M, D), y (N, D); g, r per row (grad and lse of the row LSE), h, c per column.
        With SYM (x is y, M == N), dx = (G + Gᵀ) @ y and db[i] = Σ_j G[j, i] (the mirror's
        row sums), from the same S tiles.
        """
        i_m = tl.program_id(0)
        i_d = tl.program_id(1)
        o_i = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
        m_i = o_i < M
        o_v = i_d * BDV + tl.arange(0, BDV)
        m_v = o_v < D
        b_scale = tl.load(p_scale)
        b_ginv = _scalar(p_ginv, G_NORM, 1.0)
        b_yi = _labels(p_lx, o_i, m_i, MASK_MODE)
        b_bi = _line(p_bias, o_i, m_i, HAS_BIAS and (BIAS_ON_ROW or SYM))
        # per-row terms of G (and, for the mirror, the per-column terms at the rows)
        b_gi, b_ri = _terms(p_g, p_r, o_i, m_i, HAS_G)
        b_hi, b_ci = _terms(p_h, p_c, o_i, m_i, SYM and HAS_H)
        b_acc = tl.zeros([BM, BDV], dtype=tl.float32)
        b_db = tl.zeros([BM], dtype=tl.float32)
        b_xi = _held(p_x, o_i, m_i, D, BK, DOT_F32, ONE_K)
        for j0 in range(0, N, BN):
            o_j = (j0 + tl.arange(0, BN)).to(tl.int64)
            m_j = o_j < N
            b_raw, b_yt = _s_step(b_xi, p_x, p_y, o_i, o_j, m_i, m_j, D, BM, BN, BK, DOT_F32, PREC, ONE_K, True)
            b_raw = b_raw * b_scale
            # the bias is the column's only when it is not on the row (the dk launch's bias has
            # M entries, not N: loaded at the columns it read past its end)
            b_bj = _line(p_bias, o_j, m_j, HAS_BIAS and not BIAS_ON_ROW)
            b_yj = _labels(p_ly, o_j, m_j, MASK_MODE)
            b_hj, b_cj = _terms(p_h, p_c, o_j, m_j, HAS_H)
            b_gj, b_rj = _terms(p_g, p_r, o_j, m_j, SYM and HAS_G)
            # S[i, j]: bias on the column, or on the row for the transposed (dk) launch
            b_s = b_raw
            if HAS_BIAS:
                if BIAS_ON_ROW:
                    b_s = b_raw + b_bi[:, None]
                else:
                    b_s = b_raw + b_bj[None, :]
            b_v = _keep(o_i, o_j, m_i, m_j, b_yi, b_yj, offset, EXCLUDE, MASK_MODE, False)
            if SYM:
                # mirror: Gm[i, j] = G[j, i], from S[j, i] = raw + b[i]; pair (j, i) is dropped
                # when i == j + offset. Row terms come from j, column terms from i.
                b_vm = _keep(o_i, o_j, m_i, m_j, b_yi, b_yj, offset, EXCLUDE, MASK_MODE, True)
                if HAS_BIAS:
                    b_G = _g_tile(b_s, b_v, b_gi, b_ri, b_hj, b_cj, HAS_G, HAS_H, SPREAD)
                    # Gm's row LSE runs along this tile's columns: (h_i, c_i) act per row, (g_j, r_j) per column
                    b_Gm = _g_tile(b_raw + b_bi[:, None], b_vm, b_hi, b_ci, b_gj, b_rj, HAS_H, HAS_G, SPREAD)
                else:  # S[j, i] = S[i, j]: one exponential for G and its mirror
                    b_G, b_Gm = _g_sym_tile(b_raw, b_v, b_vm, b_gi, b_ri, b_hj, b_cj, b_hi, b_ci, b_gj, b_rj,
                                            HAS_G, HAS_H, SPREAD)
                if WRITE_DB:
                    b_db += tl.sum(b_Gm, 1)
                b_G += b_Gm
            else:
                b_G = _g_tile(b_s, b_v, b_gi, b_ri, b_hj, b_cj, HAS_G, HAS_H, SPREAD)
                if WRITE_DB:
                    b_db += tl.sum(b_G, 1)
            b_yv = _features(p_y, o_j, m_j, o_v, m_v, D, b_yt, ONE_K and BDV == BK, DOT_F32)
            b_acc += tl.dot(_g_operand(b_G, b_yv, b_ginv, G_NORM), b_yv, input_precision=PREC)
        _store_grad(p_dx, p_db, o_i, m_i, o_v, m_v, D, b_acc, b_db, b_ginv, i_d, G_NORM, WRITE_DB)


    # ------------------------------------------------------------------ forward, one pass (panels)
    @triton.jit
    def _fwd_panel_kernel(p_x, p_y, p_scale, p_bias, p_lx, p_ly, p_lse, p_pm, p_pl,
                          M, N, D, offset, P, KEY_M, KEY_N,
                          HAS_BIAS: tl.constexpr, EXCLUDE: tl.constexpr, MASK_MODE: tl.constexpr,
                          DOT_F32: tl.constexpr, PREC: tl.constexpr, SPREAD: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ONE_K: tl.constexpr):
        """Row lse (M,) and this panel's column partials, from one pass over S; grid (P,).

        Program p owns the row blocks p, p + P, p + 2P, … and keeps, in row p of pm, pl (P, N)
        fp32, the running (max, Σ exp(S − max)) of each column over the rows it has seen. Only
        program p touches row p, so there is no race and no atomic; _col_merge_kernel folds the
        P partials into col_lse. A program with no row block (P was sized for the smallest BM)
        writes the empty partial (−inf, 0).
        """
        i_p = tl.program_id(0)
        n_mb = tl.cdiv(M, BM)
        b_scale = tl.load(p_scale)
        p_pm_p = p_pm + i_p.to(tl.int64) * N
        p_pl_p = p_pl + i_p.to(tl.int64) * N
        if i_p >= n_mb:
            for j0 in range(0, N, BN):
                o_j = j0 + tl.arange(0, BN)
                m_j = o_j < N
                tl.store(p_pm_p + o_j, tl.full([BN], float("-inf"), dtype=tl.float32), mask=m_j)
                tl.store(p_pl_p + o_j, tl.zeros([BN], dtype=tl.float32), mask=m_j)
        for i_m in range(i_p, n_mb, P):
            # The partials written for the previous row block may have been stored by other
            # threads of this program than the ones that load them now: make them visible.
            tl.debug_barrier()
            o_i = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
            m_i = o_i < M
            b_yi = _labels(p_lx, o_i, m_i, MASK_MODE)
            b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
            b_l = tl.zeros([BM], dtype=tl.float32)
            # the panel's first row block starts the column partials afresh (no memset needed,
            # and autotuning may rerun the kernel on the same buffers)
            b_seen = (tl.zeros([BN], dtype=tl.int32) + i_m) != i_p  # (BN,): a mask must be a tensor
            b_xi = _held(p_x, o_i, m_i, D, BK, DOT_F32, ONE_K)
            for j0 in range(0, N, BN):
                o_j = (j0 + tl.arange(0, BN)).to(tl.int64)
                m_j = o_j < N
                b_s, _ = _s_step(b_xi, p_x, p_y, o_i, o_j, m_i, m_j, D, BM, BN, BK, DOT_F32, PREC, ONE_K, True)
                b_s = b_s * b_scale
                if HAS_BIAS:
                    b_s += tl.load(p_bias + o_j, mask=m_j, other=0.0)[None, :]
                b_yj = _labels(p_ly, o_j, m_j, MASK_MODE)
                b_v = _keep(o_i, o_j, m_i, m_j, b_yi, b_yj, offset, EXCLUDE, MASK_MODE, False)
                b_s = tl.where(b_v, b_s, float("-inf"))
                # rows in registers; columns read from / written to row p of the partials
                b_cm = tl.load(p_pm_p + o_j, mask=m_j & b_seen, other=float("-inf"))
                b_cl = tl.load(p_pl_p + o_j, mask=m_j & b_seen, other=0.0)
                b_m, b_l, b_cm, b_cl = _row_col_update(b_s, b_m, b_l, b_cm, b_cl, SPREAD)
                tl.store(p_pm_p + o_j, b_cm, mask=m_j)
                tl.store(p_pl_p + o_j, b_cl, mask=m_j)
            b_lse = _lse_of(b_m, b_l)
            tl.store(p_lse + o_i, b_lse, mask=m_i)

    @triton.jit
    def _fwd_half_kernel(p_x, p_scale, p_lx, p_row, p_pm, p_pl, M, D, P, KEY_M, KEY_N,
                         EXCLUDE: tl.constexpr, MASK_MODE: tl.constexpr,
                         DOT_F32: tl.constexpr, PREC: tl.constexpr, SPREAD: tl.constexpr,
                         BM: tl.constexpr, BK: tl.constexpr, ONE_K: tl.constexpr):
        """Row LSE of a symmetric S = scale·x@xᵀ (no bias; only self-pairs excluded; label
        masks are symmetric) from the tiles on and above the diagonal: half the products.

        Square tiles of BM. A tile (I, J), J > I, holds row I's entries and, transposed, row
        J's: program p adds it to the online pairs of rows I (registers) and to its column
        partials of J (row p of pm, pl (P, M), as _fwd_panel_kernel); the diagonal tile adds
        to rows I only. p_row gets the row part; the caller merges the column partials
        (_col_merge_kernel) and log-adds them. Program p owns the block pairs (k, n − 1 − k)
        for k = p, p + P, …: n + 1 tiles a pair, balanced. One exponential per entry serves the
        row and the column sums where the tile's line maxima lie within SPREAD of its maximum
        (as _span argues for the backward), else one each.
        """
        i_p = tl.program_id(0)
        n_b = tl.cdiv(M, BM)
        b_scale = tl.load(p_scale)
        p_pm_p = p_pm + i_p.to(tl.int64) * M
        p_pl_p = p_pl + i_p.to(tl.int64) * M
        for j0 in range(0, M, BM):  # the program's column partials start empty
            o_j = j0 + tl.arange(0, BM)
            tl.store(p_pm_p + o_j, tl.full([BM], float("-inf"), dtype=tl.float32), mask=o_j < M)
            tl.store(p_pl_p + o_j, tl.zeros([BM], dtype=tl.float32), mask=o_j < M)
        for k in range(i_p, (n_b + 1) // 2, P):
            first, step, n_own = _pair_blocks(k, n_b)
            for t in range(0, n_own):
                i_b = first + t * step
                tl.debug_barrier()  # column partials stored by other threads of this program
                o_i = (i_b * BM + tl.arange(0, BM)).to(tl.int64)
                m_i = o_i < M
                b_yi = _labels(p_lx, o_i, m_i, MASK_MODE)
                b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
                b_l = tl.zeros([BM], dtype=tl.float32)
                b_xi = _held(p_x, o_i, m_i, D, BK, DOT_F32, ONE_K)
                for j_b in range(i_b, n_b):
                    o_j = (j_b * BM + tl.arange(0, BM)).to(tl.int64)
                    m_j = o_j < M
                    b_s, _ = _s_step(b_xi, p_x, p_x, o_i, o_j, m_i, m_j, D, BM, BM, BK, DOT_F32, PREC, ONE_K, True)
                    b_s = b_s * b_scale
                    b_yj = _labels(p_lx, o_j, m_j, MASK_MODE)
                    b_v = _keep(o_i, o_j, m_i, m_j, b_yi, b_yj, 0, EXCLUDE, MASK_MODE, False)
                    b_s = tl.where(b_v, b_s, float("-inf"))
                    if j_b == i_b:  # the diagonal tile holds both halves of its rows
                        b_m, b_l = _row_update(b_s, b_m, b_l)
                    else:
                        b_cm = tl.load(p_pm_p + o_j, mask=m_j, other=float("-inf"))
                        b_cl = tl.load(p_pl_p + o_j, mask=m_j, other=0.0)
                        b_m, b_l, b_cm, b_cl = _row_col_update(b_s, b_m, b_l, b_cm, b_cl, SPREAD)
                        tl.store(p_pm_p + o_j, b_cm, mask=m_j)
                        tl.store(p_pl_p + o_j, b_cl, mask=m_j)
                b_lse = _lse_of(b_m, b_l)
                tl.store(p_row + o_i, b_lse, mask=m_i)

    @triton.jit
    def _col_merge_kernel(p_pm, p_pl, p_lse, P, N, BN: tl.constexpr):
        """col_lse[j] = log Σ_p pl[p, j]·exp(pm[p, j]) (N,) fp32, stably; pm, pl (P, N); grid ⌈N/BN⌉."""
        o_j = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
        m_j = o_j < N
        b_m = tl.full([BN], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BN], dtype=tl.float32)
        for i_p in range(0, P):  # i_p · N stays in int32: P·N·8 ≤ 256 MiB (_panels)
            b_pm = tl.load(p_pm + i_p * N + o_j, mask=m_j, other=float("-inf"))
            b_pl = tl.load(p_pl + i_p * N + o_j, mask=m_j, other=0.0)
            b_mn = tl.maximum(b_m, b_pm)
            b_c = tl.where(b_mn == float("-inf"), 0.0, b_mn)
            b_l = b_l * tl.exp(b_m - b_c) + b_pl * tl.exp(b_pm - b_c)
            b_m = b_mn
        b_lse = _lse_of(b_m, b_l)
        tl.store(p_lse + o_j, b_lse, mask=m_j)

    # ------------------------------------------------------------------ backward, one recompute (atomics)
    @triton.jit
    def _bwd_atomic_kernel(p_q, p_k, p_scale, p_bias, p_lq, p_lk,
                           p_g, p_r, p_h, p_c, p_ginv, p_dq, p_dk, p_db,
                           M, N, D, offset, KEY_M, KEY_N,
                           HAS_BIAS: tl.constexpr, EXCLUDE: tl.constexpr, MASK_MODE: tl.constexpr,
                           HAS_G: tl.constexpr, HAS_H: tl.constexpr,
                           WRITE_DB: tl.constexpr, G_NORM: tl.constexpr, SPREAD: tl.constexpr,
                           DOT_F32: tl.constexpr, PREC: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
                           DQC: tl.constexpr, ONE_K: tl.constexpr):
        """dq and dk from one recompute of S (FlashAttention-2 style); grid (⌈N/BN⌉, ⌈D/BDV⌉).

        Program (J, d) owns the key block J (BN keys) × features d (BDV) and walks all query
        blocks I: recompute S[I, J] (full D), form G (BM, BN), then
            dk[J, d] += G[I, J]ᵀ @ q[I, d]     in registers, stored once (single writer)
            db[J]    += Σ_i G[i, J]            (feature block 0 only)
            dq[I, d] += G[I, J] @ k[J, d]      fp32 atomic add into p_dq (zeroed, (M, D))
        q (M, D), k (N, D); g, r (M,) grad and lse of the row LSE, h, c (N,) of the column LSE.
        """
        i_n = tl.program_id(0)
        i_d = tl.program_id(1)
        o_j = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_j = o_j < N
        o_v = i_d * BDV + tl.arange(0, BDV)
        m_v = o_v < D
        b_scale = tl.load(p_scale)
        b_ginv = _scalar(p_ginv, G_NORM, 1.0)
        b_yj = _labels(p_lk, o_j, m_j, MASK_MODE)
        b_bj = _line(p_bias, o_j, m_j, HAS_BIAS)
        b_hj, b_cj = _terms(p_h, p_c, o_j, m_j, HAS_H)
        b_acc = tl.zeros([BN, BDV], dtype=tl.float32)
        b_db = tl.zeros([BN], dtype=tl.float32)
        b_kj = _held(p_k, o_j, m_j, D, BK, DOT_F32, ONE_K)
        for i0 in range(0, M, BM):
            o_i = (i0 + tl.arange(0, BM)).to(tl.int64)
            m_i = o_i < M
            b_s, b_qi = _s_step(b_kj, p_k, p_q, o_j, o_i, m_j, m_i, D, BN, BM, BK, DOT_F32, PREC, ONE_K, False)
            b_s = b_s * b_scale
            if HAS_BIAS:
                b_s += b_bj[None, :]
            b_yi = _labels(p_lq, o_i, m_i, MASK_MODE)
            b_gi, b_ri = _terms(p_g, p_r, o_i, m_i, HAS_G)
            b_v = _keep(o_i, o_j, m_i, m_j, b_yi, b_yj, offset, EXCLUDE, MASK_MODE, False)
            b_G = _g_tile(b_s, b_v, b_gi, b_ri, b_hj, b_cj, HAS_G, HAS_H, SPREAD)
            if WRITE_DB:
                b_db += tl.sum(b_G, 0)
            b_qv = _features(p_q, o_i, m_i, o_v, m_v, D, b_qi, ONE_K and BDV == BK, DOT_F32)
            b_Gc = _g_operand(b_G, b_qv, b_ginv, G_NORM)
            b_acc += tl.dot(tl.trans(b_Gc), b_qv, input_precision=PREC)
            # dq[I, d] += G @ k[J, d] in feature chunks of DQC: a (BM, BDV) fp32 tile beside the
            # (BN, BDV) accumulator is what made the BDV = 512 configs spill
            for c0 in tl.static_range(0, BDV, DQC):
                o_c = i_d * BDV + c0 + tl.arange(0, DQC)
                m_c = o_c < D
                # with one chunk spanning the held rows of k (ONE_K, DQC == BK), those rows
                b_kc = _features(p_k, o_j, m_j, o_c, m_c, D, b_kj, ONE_K and DQC == BK, DOT_F32)
                # fp32 atomics: the order of the ⌈N/BN⌉ additions into dq[i] varies run to run
                _add_tile(p_dq, o_i, m_i, o_c, m_c, D, tl.dot(b_Gc, b_kc, input_precision=PREC), b_ginv, G_NORM)
        _store_grad(p_dk, p_db, o_j, m_j, o_v, m_v, D, b_acc, b_db, b_ginv, i_d, G_NORM, WRITE_DB)


    # ------------------------------------------------------------------ symmetric backward, half the tiles (atomics)
    @triton.jit
    def _gs_tile(b_raw, b_scale, o_i, o_j, m_i, m_j, b_yi, b_yj, b_gi, b_ri, b_hi, b_ci,
                 b_gj, b_rj, b_hj, b_cj, EXCLUDE: tl.constexpr, MASK_MODE: tl.constexpr,
                 HAS_G: tl.constexpr, HAS_H: tl.constexpr, SPREAD: tl.constexpr):
        """G[I, J] + G[J, I]ᵀ (BM, BM) fp32 of a symmetric S = scale·x@xᵀ (no bias, only
        self-pairs excluded: the masks are symmetric too) from the unscaled tile b_raw."""
        b_v = _keep(o_i, o_j, m_i, m_j, b_yi, b_yj, 0, EXCLUDE, MASK_MODE, False)
        b_G, b_Gm = _g_sym_tile(b_raw * b_scale, b_v, b_v, b_gi, b_ri, b_hj, b_cj, b_hi, b_ci, b_gj, b_rj,
                                HAS_G, HAS_H, SPREAD)
        return b_G + b_Gm

    @triton.jit
    def _bwd_half_kernel(p_x, p_scale, p_lx, p_g, p_r, p_h, p_c, p_ginv, p_dx, M, D, KEY_M, KEY_N,
                         EXCLUDE: tl.constexpr, MASK_MODE: tl.constexpr, HAS_G: tl.constexpr,
                         HAS_H: tl.constexpr, G_NORM: tl.constexpr, SPREAD: tl.constexpr,
                         DOT_F32: tl.constexpr, PREC: tl.constexpr,
                         BM: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, ONE_K: tl.constexpr):
        """dx += (G + Gᵀ) @ x (M, D) fp32 (dx zeroed) of a symmetric S from the tiles on and above
        the diagonal; x (M, D) with D ≤ BDV; grid (⌈n/2⌉,) for n = ⌈M/BM⌉ square row blocks.

        Program k owns the row blocks k and n − 1 − k (n + 1 tiles together, balanced). A tile
        (I, J ≥ I) yields Gs = G[I, J] + G[J, I]ᵀ once (one product for S, one exponential per
        entry where _span allows), then
            dx[I] += Gs @ x[J]     in registers, added to dx once per row block
            dx[J] += Gsᵀ @ x[I]    fp32 atomic add, for J > I (the diagonal tile feeds I only)
        3 products over half the tiles where the mirrored `_bwd_kernel` does 2 over all of
        them, and half its exponentials; the atomics' order varies, so dx's last bits do too.
        """
        i_k = tl.program_id(0)
        n_b = tl.cdiv(M, BM)
        b_scale = tl.load(p_scale)
        b_ginv = _scalar(p_ginv, G_NORM, 1.0)
        o_v = tl.arange(0, BDV)
        m_v = o_v < D
        first, step, n_own = _pair_blocks(i_k, n_b)
        for t in range(0, n_own):
            i_b = first + t * step
            o_i = (i_b * BM + tl.arange(0, BM)).to(tl.int64)
            m_i = o_i < M
            b_yi = _labels(p_lx, o_i, m_i, MASK_MODE)
            b_gi, b_ri = _terms(p_g, p_r, o_i, m_i, HAS_G)
            b_hi, b_ci = _terms(p_h, p_c, o_i, m_i, HAS_H)
            b_held = _held(p_x, o_i, m_i, D, BK, DOT_F32, ONE_K)
            b_xi = _features(p_x, o_i, m_i, o_v, m_v, D, b_held, ONE_K and BDV == BK, DOT_F32)
            # the diagonal tile, its rows streamed as in the forwards (so that S rounds alike)
            b_raw, b_xt = _s_step(b_held, p_x, p_x, o_i, o_i, m_i, m_i, D, BM, BM, BK, DOT_F32, PREC, ONE_K, True)
            b_Gs = _gs_tile(b_raw, b_scale, o_i, o_i, m_i, m_i, b_yi, b_yi, b_gi, b_ri, b_hi, b_ci,
                            b_gi, b_ri, b_hi, b_ci, EXCLUDE, MASK_MODE, HAS_G, HAS_H, SPREAD)
            b_acc = tl.dot(_g_operand(b_Gs, b_xi, b_ginv, G_NORM), b_xi, input_precision=PREC)
            for j_b in range(i_b + 1, n_b):
                o_j = (j_b * BM + tl.arange(0, BM)).to(tl.int64)
                m_j = o_j < M
                b_raw, b_xt = _s_step(b_held, p_x, p_x, o_i, o_j, m_i, m_j, D, BM, BM, BK, DOT_F32, PREC, ONE_K,
                                      True)
                b_xj = _features(p_x, o_j, m_j, o_v, m_v, D, b_xt, ONE_K and BDV == BK, DOT_F32)
                b_yj = _labels(p_lx, o_j, m_j, MASK_MODE)
                b_gj, b_rj = _terms(p_g, p_r, o_j, m_j, HAS_G)
                b_hj, b_cj = _terms(p_h, p_c, o_j, m_j, HAS_H)
                b_Gs = _gs_tile(b_raw, b_scale, o_i, o_j, m_i, m_j, b_yi, b_yj, b_gi, b_ri, b_hi, b_ci,
                                b_gj, b_rj, b_hj, b_cj, EXCLUDE, MASK_MODE, HAS_G, HAS_H, SPREAD)
                b_Gc = _g_operand(b_Gs, b_xi, b_ginv, G_NORM)
                b_acc += tl.dot(b_Gc, b_xj, input_precision=PREC)
                _add_tile(p_dx, o_j, m_j, o_v, m_v, D, tl.dot(tl.trans(b_Gc), b_xi, input_precision=PREC), b_ginv,
                          G_NORM)
            _add_tile(p_dx, o_i, m_i, o_v, m_v, D, b_acc, b_ginv, G_NORM)

    # The one-recompute backward holds the key block (BN × BDV fp32) in registers and streams
    # query blocks of BM: BDV = D (no feature split, so one recompute) needs small BM and 8
    # warps at D = 512; the BDV < D configs trade extra recomputes for register room. (16 warps
    # cap a thread at 128 registers: the two 16-warp BDV = 512 candidates this list had spilled
    # 168-332 bytes on sm_90 under triton 3.6 and 3.9, in CLIP's and SigLIP's kernels.)
    _ATOMIC_CFGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "BDV": bdv, "DQC": min(bdv, 128)},
                                  num_warps=w, num_stages=s)
                    for bm, bn, bk, bdv, w, s in [(64, 64, 64, 128, 8, 2), (32, 64, 64, 128, 4, 2),
                                                  (64, 128, 64, 128, 8, 2), (64, 64, 64, 64, 4, 2),
                                                  (64, 64, 64, 256, 8, 2), (32, 64, 64, 256, 8, 2),
                                                  (32, 64, 64, 512, 8, 2), (32, 32, 64, 512, 8, 2),
                                                  (64, 64, 128, 128, 8, 2), (32, 32, 512, 512, 8, 2),
                                                  (32, 64, 512, 512, 8, 2)]]
    # Square row tiles for the half backward, which holds x_I, x_J, the (BM, D) accumulator and
    # the atomics' (BM, D) tile: at D = 128 on sm_90 these are its spill-free candidates (BM = 128
    # spills 500-900 bytes with 8 or 16 warps, BM = 64 with 4 warps 150). BK ≥ D (_prune).
    _HALF_BWD_CFGS = [triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=s)
                      for bk in (32, 64, 128)
                      for bm, w, s in [(64, 8, 2), (64, 8, 3), (32, 4, 2), (32, 4, 3), (32, 8, 2)]]
    _KEY = ["KEY_M", "KEY_N", "D", "HAS_BIAS", "MASK_MODE", "EXCLUDE"]
    # ONE_K (D fits in one BK chunk) follows from the launch's D and the config's BK
    _one_k = triton.heuristics({"ONE_K": lambda args: args["D"] <= args["BK"]})
    _fwd, _panel, _half, _bwd, _atomic, _half_bwd = (
        _one_k(k) for k in (_fwd_kernel, _fwd_panel_kernel, _fwd_half_kernel, _bwd_kernel, _bwd_atomic_kernel,
                            _bwd_half_kernel))
    # square tiles (BM = BN) for the half forward
    _HALF_CFGS = [triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=s)
                  for bm, bk, w, s in [(64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                                       (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 512, 8, 2),
                                       (64, 512, 4, 2)]]
    # The CLIP panel also sums each tile's columns: on sm_90 its 128 × 128 × 128 tiles spill
    # (12-124 bytes at D = 128 and 512, triton 3.6 and 3.9), and at D = 128 under triton 3.6 three
    # of the other four BK = 128 candidates do (32-96 bytes); the three 8-warp tiles added are
    # spill-free at both D under both (tests/triton_aot.py --configs).
    _PANEL_CFGS = ([c for c in _cfgs(True) if (c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]) != (128, 128, 128)]
                   + [triton.Config({"BM": bm, "BN": bn, "BK": 128}, num_warps=8, num_stages=s)
                      for bm, bn, s in [(64, 64, 3), (128, 64, 2), (64, 128, 3)]])

    def _tuned(kernel, configs, key, **kwargs):
        """kernel autotuned over configs (pruned by _prune) per value of key. The choice is cached
        on disk (Triton's cache directory, keyed by the kernel's source, the GPU target and key):
        a later process skips the benchmarking and compiles only the chosen config."""
        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune},
                               cache_results=True, **kwargs)(kernel)

    _KERNELS = {  # kind -> (kernel, autotuned kernel)
        "fwd": (_fwd, _tuned(_fwd, _cfgs(True), _KEY)),
        "panel": (_panel, _tuned(_panel, _PANEL_CFGS, _KEY)),
        "half": (_half, _tuned(_half, _HALF_CFGS, ["KEY_M", "D", "MASK_MODE", "EXCLUDE"])),
        "bwd": (_bwd, _tuned(_bwd, _cfgs(False), _KEY + ["SYM", "HAS_G", "HAS_H"])),
        # reset_to_zero: the autotuner reruns the kernel, and dq is accumulated with atomics
        "atomic": (_atomic, _tuned(_atomic, _ATOMIC_CFGS, _KEY + ["HAS_G", "HAS_H"], reset_to_zero=["p_dq"])),
        "half-bwd": (_half_bwd, _tuned(_half_bwd, _HALF_BWD_CFGS, ["KEY_M", "D", "MASK_MODE", "EXCLUDE", "HAS_G", "HAS_H"],
                                       reset_to_zero=["p_dx"])),
    }


# smallest BM of the forward configs: the panel count is sized for it (any BM then works)
_PANEL_MIN_BM = 16 if triton is not None and _INTERPRET else 64


def _default_meta(kind: str, D: int) -> dict:
    """The config used without autotuning; under the interpreter one small config (16-row and
    -column tiles, so the small test shapes cross several tiles and leave tails)."""
    if kind == "half-bwd":  # square tiles; BDV (the padded D) comes from the launcher
        if _INTERPRET:
            return dict(BM=16, BK=32, num_warps=1)
        return dict(BM=64, BK=max(32, triton.next_power_of_2(D)), num_warps=8, num_stages=2)
    fwd = kind in ("fwd", "panel")
    atomic = dict(DQC=16) if kind == "atomic" else {}  # two dq chunks per feature block under the interpreter
    if kind == "half":  # square tiles
        if _INTERPRET:
            return dict(BM=16, BK=32, num_warps=1)
        dpad = max(16, triton.next_power_of_2(D))
        return dict(BM=64, BK=max(32, dpad) if dpad <= 128 else 64, num_warps=4, num_stages=3)
    if _INTERPRET:
        return dict(BM=16, BN=16, BK=32, num_warps=1) if fwd else dict(BM=16, BN=16, BK=32, BDV=32, num_warps=1, **atomic)
    dpad = max(16, triton.next_power_of_2(D))
    bk = max(32, dpad) if dpad <= 128 else 64  # one K step (ONE_K) up to D = 128
    if fwd:  # the panel's one-K-step tile spills with 4 warps on sm_90 (76 B, triton 3.6), not with 8
        return dict(BM=128, BN=64, BK=bk, num_warps=8 if kind == "panel" and dpad <= 128 else 4, num_stages=3)
    bdv = max(64, dpad) if kind == "bwd" else min(max(64, dpad), 512)
    if kind == "atomic":
        atomic = dict(DQC=min(bdv, 128))
    return dict(BM=32 if bdv > 256 else 64, BN=64, BK=bk, BDV=bdv, num_warps=8, num_stages=2, **atomic)


def _launch(kind: str, grid, D: int, *args, **kwargs):
    kernel, tuned = _KERNELS[kind]
    if AUTOTUNE:
        tuned[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs, **_default_meta(kind, D))


# ---------------------------------------------------------------------- launchers
def _key(n: int) -> int:
    """Size class for the autotune key: the bit length, re-tuned per power of two up to 2**15.

    Beyond that the per-tile behaviour no longer changes, and tuning at N = 1M would run each
    candidate for seconds: larger sizes reuse the choice made at 32k..64k.
    """
    return min(max(int(n), 1).bit_length(), 16)


def _dot_args(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, PREC): upcast tiles before tl.dot? and the fp32 input precision."""
    if _INTERPRET:
        return dtype == torch.bfloat16, "ieee"  # the interpreter's bf16 dot is wrong
    if dtype == torch.float32:
        if tf32_allowed():
            return False, "tf32"
        # Without tf32, "tf32x3" (three tf32 products, error near fp32's) rather than "ieee": an
        # ieee fp32 tl.dot runs on the FMA units, ~10x slower, and compiles for ~20 s a config.
        return False, _FP32_PRECISION
    return False, "ieee"


def _spread(dtype: torch.dtype) -> float:
    """The SPREAD of the kernels: ONE_EXP_SPREAD where the products round G anyway (16-bit
    inputs, or tf32), else -1 (never shared). A shared exponential's arguments grow with the
    spread, and so does their rounding (up to 40·2⁻²⁴ relative in G): invisible beside bf16,
    fp16 or tf32 products (2⁻⁸, 2⁻¹¹), not beside fp32 ones (seen in the scale gradient)."""
    if dtype == torch.float32 and _dot_args(dtype)[1] != "tf32":
        return -1.0
    return ONE_EXP_SPREAD


def _dummy(x: Tensor, dtype=torch.float32) -> Tensor:
    return x.new_empty((1,), dtype=dtype)


def _lse(x, y, scale, bias, lx, ly, mask_mode, offset, bias_on_row) -> Tensor:
    M, D = x.shape
    N = y.shape[0]
    out = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    if N == 0:
        return out.fill_(float("-inf"))
    dot_f32, prec = _dot_args(x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]),)
    _launch(
        "fwd", grid, D, x, y, scale, _dummy(x) if bias is None else bias,
        _dummy(x, torch.int64) if lx is None else lx, _dummy(x, torch.int64) if ly is None else ly, out,
        M, N, D, 0 if offset is None else int(offset), _key(M), _key(N),
        HAS_BIAS=bias is not None, BIAS_ON_ROW=bias_on_row, EXCLUDE=offset is not None,
        MASK_MODE=int(mask_mode), DOT_F32=dot_f32, PREC=prec,
    )
    return out


def _check(q: Tensor, k: Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend does not compute in {q.dtype}")
    if not (q.is_contiguous() and k.is_contiguous()):
        raise ValueError("the triton backend needs contiguous q and k")


# Forward col_lse: "panel" (one pass over S, P × N fp32 partials) or "transposed" (a second
# pass over Sᵀ, no extra memory). Tests and comparisons set PANELS / COL_LSE directly.
COL_LSE = os.environ.get("FASTNCE_TRITON_COL_LSE", "panel")
# fixed panel count (tests; FASTNCE_TRITON_PANELS, read per call: the GPU bench's check of a
# panel owning several row blocks); None: _panels() picks it
PANELS: Optional[int] = None
_PANEL_SOFT_BYTES = 64 << 20  # aim: P·N·8 within this ...
_PANEL_MAX_BYTES = 256 << 20  # ... but keep P ≥ #SMs up to this; beyond it, transposed


def _panels(M: int, N: int, device: torch.device) -> int:
    """How many panels (programs) the one-pass forward uses; 0: use the transposed pass.

    P = min(#row blocks, 4·SMs, max(SMs, 64 MiB / 8N)): enough programs to fill the card, as
    few as that allows since each costs N·8 bytes of partials. P < SMs would leave SMs idle
    for the whole forward (slower than a second pass at full occupancy once P < SMs/2), so
    P is not pushed below the SM count to save memory; when SMs·N·8 passes 256 MiB (N > 254k
    at 132 SMs) the transposed pass (no extra memory) is used instead. At N = 32768: P = 256
    (64 MiB). Under the interpreter: at most 4 panels, so a panel owns several row blocks.
    """
    fixed = PANELS if PANELS is not None else os.environ.get("FASTNCE_TRITON_PANELS")
    if fixed is not None:  # as given, even above the row-block count (programs left idle)
        return max(1, int(fixed))
    n_mb = triton.cdiv(M, _PANEL_MIN_BM)
    if _INTERPRET or device.type != "cuda":
        return min(n_mb, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    p = min(n_mb, 4 * sms, max(sms, _PANEL_SOFT_BYTES // (8 * N)))
    return p if p * N * 8 <= _PANEL_MAX_BYTES else 0


def _lse_panel(q, k, scale, bias, lq, lk, mask_mode, offset, P) -> tuple[Tensor, Tensor]:
    """(row_lse (M,), col_lse (N,)) fp32 from one pass over S with P panels; M, N > 0."""
    M, D = q.shape
    N = k.shape[0]
    row = torch.empty((M,), dtype=torch.float32, device=q.device)
    part = torch.empty((2, P, N), dtype=torch.float32, device=q.device)  # (max, sum-exp) per panel
    dot_f32, prec = _dot_args(q.dtype)
    _launch(
        "panel", (P,), D, q, k, scale, _dummy(q) if bias is None else bias,
        _dummy(q, torch.int64) if lq is None else lq, _dummy(q, torch.int64) if lk is None else lk,
        row, part[0], part[1], M, N, D, 0 if offset is None else int(offset), P, _key(M), _key(N),
        HAS_BIAS=bias is not None, EXCLUDE=offset is not None, MASK_MODE=int(mask_mode),
        DOT_F32=dot_f32, PREC=prec, SPREAD=_spread(q.dtype),
    )
    return row, _merged(part)


def _half_panels(M: int, device: torch.device) -> int:
    """Programs of the half forward: P = min(block pairs, 2·SMs, max(SMs, 32 MiB / 8M)), each
    holding M column partials (8 bytes each): 132 and 33 MiB at M = 32768 on 132 SMs. Under
    the interpreter at most 3, so a program owns several pairs."""
    pairs = (triton.cdiv(M, _PANEL_MIN_BM) + 1) // 2
    if _INTERPRET or device.type != "cuda":
        return max(1, min(pairs, 3))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(pairs, 2 * sms, max(sms, (32 << 20) // (8 * M))))


def _lse_half(q, k, scale, bias, lq, lk, mask_mode, offset, P) -> Tensor:
    """row_lse (M,) fp32 of a symmetric S (k is q, no bias, offset None or 0) from the tiles
    on and above the diagonal with P programs; M > 0."""
    M, D = q.shape
    row = torch.empty((M,), dtype=torch.float32, device=q.device)
    part = torch.empty((2, P, M), dtype=torch.float32, device=q.device)  # column (max, sum-exp) per program
    dot_f32, prec = _dot_args(q.dtype)
    _launch(
        "half", (P,), D, q, scale, _dummy(q, torch.int64) if lq is None else lq, row, part[0], part[1],
        M, D, P, _key(M), _key(M), EXCLUDE=offset is not None, MASK_MODE=int(mask_mode),
        DOT_F32=dot_f32, PREC=prec, SPREAD=_spread(q.dtype),
    )
    return torch.logaddexp(row, _merged(part))


def _merged(part: Tensor) -> Tensor:
    """(N,) fp32 column LSEs from per-program partials part (2, P, N) of (max, sum-exp)."""
    _, P, N = part.shape
    col = torch.empty((N,), dtype=torch.float32, device=part.device)
    bn = 1024 if not _INTERPRET else 64
    _col_merge_kernel[(triton.cdiv(N, bn),)](part[0], part[1], col, P, N, BN=bn)
    return col


def _symmetric_s(bias, offset) -> bool:
    """With k = q: are S and its masks symmetric (no bias, only self-pairs excluded; label masks
    are), so that the half kernels' tiles on and above the diagonal hold all of S?"""
    return bias is None and offset in (None, 0)


def forward(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col, symmetric):
    """row_lse (M,) fp32 and col_lse (N,) fp32 or None; contract in fastnce/ops/function.py."""
    _check(q, k)
    scale = scale.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    M, N = q.shape[0], k.shape[0]
    args = (q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset)
    if symmetric and _symmetric_s(bias, exclude_offset) and M > 0:
        # S and its masks are symmetric: col_lse is row_lse
        run_sym = lambda plan, a: (_lse_half(*a, _half_panels(M, q.device)) if plan == "half"
                                   else _lse(*a, False))
        run = lambda a: run_sym(_plan("sym-forward", args, run_sym, "half"), a)
        _tune_on_slice(("sym",), run, args)
        row = run(args)
        return row, (row.clone() if with_col else None)
    P = _panels(M, N, q.device) if with_col and COL_LSE == "panel" and M > 0 and N > 0 else 0
    run = lambda a: _lse_panel(*a, P) if P > 0 else _lse_two_passes(*a, with_col)
    # the slice takes the same path (P as for the whole problem)
    _tune_on_slice(("fwd", P > 0), run, args)
    return run(args)


def _lse_two_passes(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, with_col):
    row = _lse(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, False)
    col = None
    if with_col:
        # col_lse of S is row_lse of Sᵀ: roles swapped, bias on the rows, j == i + o <=> i == j − o
        off = None if exclude_offset is None else -int(exclude_offset)
        col = _lse(k, q, scale, bias, k_labels, q_labels, mask_mode, off, True)
    return row, col


# Past 2**15 rows or columns the autotune size class (_key) no longer changes: the first call
# of a class that is larger tunes its kernels on the leading 2**15 rows and columns, where a
# candidate runs for milliseconds, not for seconds as at N = 1M.
_TUNE_MOST = 1 << 15
_tuned_on_slice: set = set()


def _tune_on_slice(kind: tuple, run, args: tuple) -> None:
    """Before the first run of a size class past _TUNE_MOST, run(args cut to _TUNE_MOST rows)."""
    q, k, _, bias, _, _, mask_mode, offset = args[:8]
    if not AUTOTUNE or max(q.shape[0], k.shape[0]) <= _TUNE_MOST:
        return
    key = kind + (_key(q.shape[0]), _key(k.shape[0]), q.shape[1], q.dtype, bias is not None, int(mask_mode),
                  offset is not None)
    if key not in _tuned_on_slice:
        run(_leading(args, _TUNE_MOST))
        _tuned_on_slice.add(key)


def _leading(args: tuple, most: int) -> tuple:
    """args with every tensor of q's rows or k's rows (features, bias, labels, per-row and
    per-column gradients and LSEs) cut to its first `most` rows; scale and flags as they are."""
    return tuple(a[:most] if isinstance(a, Tensor) and a.dim() > 0 else a for a in args)


def _ginv(dtype, g, h) -> Tensor:
    """(1,) fp32: 1 / max(|g|, |h|) for float16 (G is scaled by it before the cast, so that small
    gradients do not underflow; G ≤ max|g| + max|h| in size), else an unused placeholder."""
    ref = g if g is not None else h
    if dtype != torch.float16:
        return _dummy(ref)
    mx = torch.zeros((), dtype=torch.float32, device=ref.device)
    for t in (g, h):
        if t is not None and t.numel():
            mx = torch.maximum(mx, t.abs().max().float())
    return torch.where(mx > 0, 1.0 / mx, torch.ones_like(mx)).reshape(1)


def _grad(x, y, scale, bias, lx, ly, mask_mode, offset, g, r, h, c, bias_on_row, sym, write_db):
    """(G @ y (M, D) fp32, row sums of G (M,) or None); (g, r) per row, (h, c) per column."""
    M, D = x.shape
    N = y.shape[0]
    if M == 0 or N == 0 or D == 0 or (g is None and h is None):
        zero = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=x.device)
        return zero(M, D), (zero(M) if write_db else None)
    # every element is written by exactly one program (db by the programs of d-block 0)
    dx = torch.empty((M, D), dtype=torch.float32, device=x.device)
    db = torch.empty((M,), dtype=torch.float32, device=x.device) if write_db else None
    dot_f32, prec = _dot_args(x.dtype)
    g_norm = x.dtype == torch.float16
    ginv = _ginv(x.dtype, g, h)
    f = _dummy(x)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(D, meta["BDV"]))
    _launch(
        "bwd", grid, D, x, y, scale, f if bias is None else bias,
        _dummy(x, torch.int64) if lx is None else lx, _dummy(x, torch.int64) if ly is None else ly,
        f if g is None else g, f if r is None else r, f if h is None else h, f if c is None else c,
        ginv, dx, f if db is None else db,
        M, N, D, 0 if offset is None else int(offset), _key(M), _key(N),
        HAS_BIAS=bias is not None, BIAS_ON_ROW=bias_on_row, EXCLUDE=offset is not None,
        MASK_MODE=int(mask_mode), HAS_G=g is not None, HAS_H=h is not None, SYM=sym,
        WRITE_DB=write_db, G_NORM=g_norm, SPREAD=_spread(x.dtype), DOT_F32=dot_f32, PREC=prec,
    )
    return dx, db


def deterministic() -> bool:
    """Only atomics-free backward plans (two-pass, mirror)? torch's deterministic mode, or
    FASTNCE_TRITON_DETERMINISTIC=1."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FASTNCE_TRITON_DETERMINISTIC", "0") == "1"


# Where two kernel plans compute the same thing and which is faster depends on the card and
# the shape, the first call of each shape class on a GPU with autotuning times both (on the
# leading _TUNE_MOST rows, which autotunes their kernels there too) and keeps the faster;
# timed_plans() lists the choices. An environment variable fixes a plan; without timing
# (the interpreter, FASTNCE_TRITON_AUTOTUNE=0) a default applies.
#
# * The non-symmetric backward (FASTNCE_TRITON_BACKWARD = auto | atomic | two-pass): "atomic"
#   (one recompute; dq by atomics, dk in registers) or "two-pass" (a recompute for dq and one
#   for dk; no atomics). At D = 512 the atomic kernel's (BN, D) accumulator leaves it few
#   spill-free candidates on sm_90 where two-pass has several (tests/triton_aot.py --configs):
#   4 products with atomics against 5 without. Untimed: atomic up to D = 256, two-pass above.
#   Deterministic mode always takes two-pass.
# * The symmetric forward (FASTNCE_TRITON_SYM_FORWARD = auto | rows | half): "rows" (every
#   tile, _fwd_kernel) or "half" (the tiles on and above the diagonal, _fwd_half_kernel: half
#   the products and, mostly, one exponential for a row and a column, for (2, P, M) fp32 of
#   column partials). Untimed: half.
# * The symmetric backward (FASTNCE_TRITON_SYM_BACKWARD = auto | mirror | half), where S has no
#   bias, only self-pairs are excluded and D ≤ 128: "mirror" (every tile, G and its mirror
#   from one S product: 2 products and 1 exponential per entry of S, no atomics) or "half" (the
#   tiles on and above the diagonal, _bwd_half_kernel: 3 products and 1 exponential per entry
#   of half of S, i.e. 1.5 and 0.5, plus M²·D/(2·BM) fp32 atomic adds). Untimed: mirror.
#   Deterministic mode always takes mirror.
_PLANS = {"backward": ("FASTNCE_TRITON_BACKWARD", ("atomic", "two-pass")),
          # SigLIP's backward (triton_sigmoid.py): the same two plans, the same switch
          "sigmoid-backward": ("FASTNCE_TRITON_BACKWARD", ("atomic", "two-pass")),
          "sym-forward": ("FASTNCE_TRITON_SYM_FORWARD", ("rows", "half")),
          "sym-backward": ("FASTNCE_TRITON_SYM_BACKWARD", ("mirror", "half"))}
_plans: dict = {}


def timed_plans() -> dict:
    """The plan chosen by timing for each shape class so far: {(what, *class): plan}."""
    return dict(_plans)


def _plan(what: str, args: tuple, run, untimed: str) -> str:
    """The plan of `what` for args (run(plan, args) computes it); see the comment above."""
    env, plans = _PLANS[what]
    want = os.environ.get(env, "auto")
    if want in plans:
        return want
    if want != "auto":
        raise ValueError(f"{env} must be one of auto, {', '.join(plans)}; got {want!r}")
    q, k, _, bias, _, _, mask_mode, offset = args[:8]
    if _INTERPRET or not AUTOTUNE or q.device.type != "cuda":
        return untimed
    key = (what, _key(q.shape[0]), _key(k.shape[0]), q.shape[1], str(q.dtype).replace("torch.", ""),
           bias is not None, int(mask_mode), offset is not None) + tuple(a is not None for a in args[8:12])
    if key not in _plans:
        part = _leading(args, _TUNE_MOST)
        ms = {}
        for plan in plans:
            run(plan, part)  # the first call autotunes this plan's kernels
            ms[plan] = triton.testing.do_bench(lambda: run(plan, part))
        _plans[key] = min(ms, key=ms.get)
    return _plans[key]


def _backward_plan(args: tuple) -> str:
    """The plan for a non-symmetric backward; args are _grad_atomic's / _grad_two_pass's."""
    if deterministic():
        return "two-pass"
    return _plan("backward", args, _run_plan, "atomic" if args[0].shape[1] <= 256 else "two-pass")


def _grad_atomic(q, k, scale, bias, lq, lk, mask_mode, offset, g, r, h, c, write_db):
    """(G @ k (M, D), Gᵀ @ q (N, D), column sums of G (N,) or None), fp32, from one recompute."""
    M, D = q.shape
    N = k.shape[0]
    dq = torch.zeros((M, D), dtype=torch.float32, device=q.device)  # accumulated with atomics
    if M == 0 or N == 0 or D == 0 or (g is None and h is None):
        zero = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=q.device)
        return dq, zero(N, D), (zero(N) if write_db else None)
    dk = torch.empty((N, D), dtype=torch.float32, device=q.device)
    db = torch.empty((N,), dtype=torch.float32, device=q.device) if write_db else None
    dot_f32, prec = _dot_args(q.dtype)
    ginv = _ginv(q.dtype, g, h)
    f = _dummy(q)
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), triton.cdiv(D, meta["BDV"]))
    _launch(
        "atomic", grid, D, q, k, scale, f if bias is None else bias,
        _dummy(q, torch.int64) if lq is None else lq, _dummy(q, torch.int64) if lk is None else lk,
        f if g is None else g, f if r is None else r, f if h is None else h, f if c is None else c,
        ginv, dq, dk, f if db is None else db,
        M, N, D, 0 if offset is None else int(offset), _key(M), _key(N),
        HAS_BIAS=bias is not None, EXCLUDE=offset is not None, MASK_MODE=int(mask_mode),
        HAS_G=g is not None, HAS_H=h is not None, WRITE_DB=write_db,
        G_NORM=q.dtype == torch.float16, SPREAD=_spread(q.dtype), DOT_F32=dot_f32, PREC=prec,
    )
    return dq, dk, db


def backward(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset,
             row_lse, col_lse, grad_row, grad_col, symmetric, need_bias, need_q=True, need_k=True):
    """Unscaled fp32 dq = G @ k, dk = Gᵀ @ q (None when symmetric: dq = (G + Gᵀ) @ q), dbias;
    a side not needed costs no pass (_one_side)."""
    _check(q, k)
    scale = scale.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()
    g, r = f32(grad_row), f32(row_lse)
    h, c = (f32(grad_col), f32(col_lse)) if grad_col is not None else (None, None)
    if g is None:
        r = None
    args = (q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset, g, r, h, c, need_bias)
    if symmetric:
        run = lambda a: _run_sym_plan(_sym_backward_plan(a), a)
        _tune_on_slice(("sym", g is not None, h is not None), run, args)
        return run(args)
    one = _one_side("backward", args, need_q, need_k or need_bias, _dq_pass, _dk_pass)
    return one if one is not None else _run_plan(_backward_plan(args), args)


def _one_side(kind: str, args: tuple, need_rows: bool, need_cols: bool, dq_pass, dk_pass):
    """A backward with a frozen side: the rows' pass alone (G @ k; nothing of the columns
    wanted) or the columns' pass alone (Gᵀ @ q and its column sums; q frozen), tuned on a slice
    as the plans are; None when both sides are wanted. (dq or None, dk or None, db or None)."""
    if need_rows and need_cols:
        return None
    run = (lambda a: (dq_pass(*a), None, None)) if need_rows else (lambda a: (None,) + dk_pass(*a))
    _tune_on_slice((kind, need_rows), run, args)
    return run(args)


def _grad_symmetric(q, k, scale, bias, lq, lk, mask_mode, offset, g, r, h, c, write_db):
    """((G + Gᵀ) @ q (M, D), None, row sums of Gᵀ (M,) or None), fp32; k is q."""
    dq, db = _grad(q, q, scale, bias, lq, lq if lk is None else lk, mask_mode, offset, g, r, h, c,
                   False, True, write_db)
    return dq, None, db


# Up to this D the half backward's (BM, D) accumulator and row tiles fit in registers.
_HALF_BWD_MOST_D = 128


def _sym_backward_plan(args: tuple) -> str:
    """The plan for a symmetric backward: "mirror" (every tile, no atomics) or "half"."""
    q, _, _, bias, _, _, _, offset = args[:8]
    if deterministic() or not _symmetric_s(bias, offset) or q.shape[1] > _HALF_BWD_MOST_D:
        return "mirror"
    return _plan("sym-backward", args, _run_sym_plan, "mirror")


def _run_sym_plan(plan: str, args: tuple):
    return _grad_half(*args) if plan == "half" else _grad_symmetric(*args)


def _grad_half(q, k, scale, bias, lq, lk, mask_mode, offset, g, r, h, c, write_db):
    """((G + Gᵀ) @ q (M, D) fp32, None, None) from the tiles on and above the diagonal; k is q,
    no bias, offset None or 0 (symmetric masks), D ≤ _HALF_BWD_MOST_D."""
    M, D = q.shape
    dq = torch.zeros((M, D), dtype=torch.float32, device=q.device)  # accumulated with atomics
    if M == 0 or D == 0 or (g is None and h is None):
        return dq, None, None
    dot_f32, prec = _dot_args(q.dtype)
    f = _dummy(q)
    grid = lambda meta: (triton.cdiv(triton.cdiv(M, meta["BM"]), 2),)
    _launch(
        "half-bwd", grid, D, q, scale, _dummy(q, torch.int64) if lq is None else lq,
        f if g is None else g, f if r is None else r, f if h is None else h, f if c is None else c,
        _ginv(q.dtype, g, h), dq, M, D, _key(M), _key(M),
        EXCLUDE=offset is not None, MASK_MODE=int(mask_mode), HAS_G=g is not None, HAS_H=h is not None,
        G_NORM=q.dtype == torch.float16, SPREAD=_spread(q.dtype), DOT_F32=dot_f32, PREC=prec,
        BDV=max(16, triton.next_power_of_2(D)),
    )
    return dq, None, None


def _dq_pass(q, k, scale, bias, lq, lk, mask_mode, offset, g, r, h, c, write_db):
    """G @ k (M, D), fp32: the rows' pass (also all a backward needs when k is frozen)."""
    return _grad(q, k, scale, bias, lq, lk, mask_mode, offset, g, r, h, c, False, False, False)[0]


def _dk_pass(q, k, scale, bias, lq, lk, mask_mode, offset, g, r, h, c, write_db):
    """(Gᵀ @ q (N, D), column sums of G (N,) or None), fp32: the columns' pass (Gᵀ: k's rows
    against q's, the pairs j == i + offset at i == j − offset)."""
    off = None if offset is None else -int(offset)
    return _grad(k, q, scale, bias, lk, lq, mask_mode, off, h, c, g, r, True, False, write_db)


def _grad_two_pass(*args):
    """(G @ k (M, D), Gᵀ @ q (N, D), column sums of G (N,) or None), fp32, without atomics."""
    return (_dq_pass(*args),) + _dk_pass(*args)


def _run_plan(plan: str, args: tuple):
    return _grad_atomic(*args) if plan == "atomic" else _grad_two_pass(*args)
