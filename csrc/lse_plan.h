// fastnce CUDA backend: kernel parameters and the host-side launch plan (plain C++, no CUDA).
//
// Shared by the launchers (lse_kernels.cu) and anything that drives the kernels in another way,
// so the tile sizes and shared-memory budget are computed in one place.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTNCE_HD __host__ __device__
#else
#define FASTNCE_HD
#endif

namespace fastnce {

// Tile shape: a block of 128 threads (4 warps) owns a BM x BN tile of S; each warp a 32 x 32
// sub-tile. The feature dimension D streams through shared memory DK columns at a time.
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kDK = 64;
constexpr int kThreads = 128;
// Backward output chunks (of kDK features) that each warp keeps in registers over its walk
// (panel <= kRegChunks * kDK); wider panels accumulate in shared memory.
constexpr int kRegChunks = 2;

// Matrix-product flavours.
enum MmaKind : int {
  kMmaWmma16 = 0,  // fp16 / bf16 operands on tensor cores (WMMA m16n16k16), fp32 accumulate
  kMmaTf32 = 1,    // fp32 operands on tensor cores as tf32 (WMMA m16n16k8), only when allowed
  kMmaSimt = 2,    // fp32 operands, plain FMA
};

// The backward's terms of G share one exponential per entry when the tile's LSEs lie within
// this (40 nats, in base 2) of each other, as the Triton kernels do (triton_lse._span).
constexpr float kOneExpSpread2 = 40.0f * 1.4426950408889634f;

enum MaskMode : int { kMaskNone = 0, kMaskSame = 1, kMaskDifferent = 2 };

struct LseParams {
  const void* q = nullptr;          // (M, D), T
  const void* k = nullptr;          // (N, D), T
  const float* scale = nullptr;     // 0-dim, on the device
  const float* bias = nullptr;      // (N,) or null
  const int64_t* q_labels = nullptr;  // (M,) or null
  const int64_t* k_labels = nullptr;  // (N,) or null
  int mask_mode = kMaskNone;
  int has_exclude = 0;
  int64_t exclude_offset = 0;       // drop pairs j == i + exclude_offset
  int64_t M = 0, N = 0, D = 0;
  int vec_loads = 0;                // 16-byte loads allowed (D and base pointers aligned)

  // forward outputs
  float* row_lse = nullptr;         // (M,)
  float* col_lse = nullptr;         // (N,) pre-filled with -inf, or null
  // Forward with k == q, no bias, only self-pairs excluded (S and its masks symmetric): only the
  // tiles on and above the diagonal; a tile (I, J > I) gives rows I their part (row_lse) and,
  // through col_lse, rows J theirs. The caller log-adds the two: row LSE from half the products.
  int upper = 0;

  // backward inputs / outputs
  const float* row_lse_in = nullptr;  // (M,)
  const float* col_lse_in = nullptr;  // (N,) or null
  const float* grad_row = nullptr;    // (M,) or null
  const float* grad_col = nullptr;    // (N,) or null
  float* out = nullptr;             // dq (M, D) for the row kernel, dk (N, D) for the column kernel
  float* dbias = nullptr;           // (N,) or null (column kernel only)
  // Row kernel with k == q and no bias (NT-Xent): each tile also yields the mirror G[J, I]^T
  // (S[j, i] = S[i, j]), so one launch gives dq = (G + G^T) @ q, with no column kernel.
  int mirror = 0;
  int panel = 0;                    // output columns per pass of the backward (multiple of kDK)
  int resident = 0;                 // features of the block's own rows kept in shared memory (smem_layout)
  int wide = 0;                     // backward by lse_backward_wide_kernel (backward_wide)

  // Work split: blockIdx.y takes inner tiles [y * tiles_per_split, (y + 1) * tiles_per_split).
  // With more than one split the outputs are merged atomically (row_lse by log-add-exp into a
  // -inf filled buffer, dq / dk / dbias by addition into zeroed buffers).
  int64_t tiles_per_split = 0;
  int splits = 1;
};

// Leading dimensions (in elements) of the shared-memory tiles; the padding keeps WMMA's
// 32-byte pointer alignment and cp.async's 16-byte rows, and spreads rows over the banks.
FASTNCE_HD constexpr int ld_operand(int elem_bytes) { return elem_bytes == 2 ? kDK + 8 : kDK + 4; }
FASTNCE_HD constexpr int ld_resident(int elem_bytes, int width) { return width + (elem_bytes == 2 ? 8 : 4); }
constexpr int kLdS = kBN + 4;  // float S / G tile
constexpr int kLdG16 = kBN + 8;  // 16-bit copy of G for the tensor-core products

FASTNCE_HD inline size_t align128(size_t x) { return (x + 127) & ~size_t(127); }

// The operand chunks stream through two slots (double buffering: chunk e + 1 loads while chunk e
// is multiplied). A slot holds the inner operand's 64 x kDK chunk (the walked tiles' rows: k for
// the forward and the row kernel, q for the column kernel) and, when the block's own rows are
// not resident, theirs too.
constexpr int kSlots = 2;

struct SmemLayout {
  size_t res_off, slot_off, slot_bytes, s_off, g_off, vec_off, acc_off, total;
  int ld_res;
};

// Vector scratch of the backward: row lse, row grad, col bias, col lse, col grad, and for the
// mirror the row lse and grad at the columns and the col lse and grad at the rows, and a
// reduction scratch (float); then 2 label tiles (int64). The forward's: col bias (float), then
// the column labels (int64).
constexpr int kVecFloats = 10;
constexpr int kFwdVecFloats = 1;
FASTNCE_HD inline size_t vec_bytes(bool backward) {
  return backward ? kVecFloats * 64 * sizeof(float) + 2 * 64 * sizeof(int64_t)
                  : kFwdVecFloats * 64 * sizeof(float) + 64 * sizeof(int64_t);
}

// elem_bytes: 2 for fp16/bf16, 4 for fp32. panel: 0 for the forward (no accumulator).
// resident: features of the block's own 64 rows held in shared memory for the whole walk
// (a multiple of kDK covering D), 0 to stream them with the inner operand.
FASTNCE_HD inline SmemLayout smem_layout(int elem_bytes, int panel, int resident = 0) {
  SmemLayout L;
  const size_t op = size_t(kBM) * ld_operand(elem_bytes) * elem_bytes;  // kBM == kBN
  L.ld_res = resident > 0 ? ld_resident(elem_bytes, resident) : 0;
  size_t off = 0;
  L.res_off = off; off = align128(off + size_t(kBM) * L.ld_res * elem_bytes);
  L.slot_bytes = op;
  L.slot_off = off; off = align128(off + size_t(kSlots) * (resident > 0 ? 1 : 2) * op);
  L.s_off = off; off = align128(off + size_t(kBM) * kLdS * sizeof(float));
  L.g_off = off;
  if (panel > 0 && elem_bytes == 2) off = align128(off + size_t(kBM) * kLdG16 * 2);
  L.vec_off = off; off = align128(off + vec_bytes(panel > 0));
  const size_t acc = size_t(kBM) * (panel + 4) * sizeof(float);
  // Accumulators kept in registers reach shared memory only after the walk, when the slots and
  // the S / G tiles are free: they share that space when it is large enough.
  if (panel > 0 && panel <= kRegChunks * kDK && acc <= L.vec_off - L.slot_off) {
    L.acc_off = L.slot_off;
  } else {
    L.acc_off = off;
    if (panel > 0) off = align128(off + acc);
  }
  L.total = off;
  return L;
}

FASTNCE_HD inline int padded_features(int64_t D) { return int((D + kDK - 1) / kDK * kDK); }

// Blocks of the forward kernel a multiprocessor holds by its shared memory (1 KiB reserved per
// block), at most kForwardBlocksPerSm: the registers' limit (<= 128 a thread, 128 threads; the
// forward kernel's __launch_bounds__ holds ptxas to it, tests/test_cuda_compile.py checks that it
// does so without spilling).
constexpr int kForwardBlocksPerSm = 4;
inline int forward_blocks_per_sm(size_t smem, size_t smem_per_sm) {
  const size_t b = smem_per_sm / (smem + 1024);
  return int(b < size_t(kForwardBlocksPerSm) ? b : size_t(kForwardBlocksPerSm));
}

// The forward holds its 64 rows in shared memory, so that each tile copies only its 64 keys:
// half the operand bytes. A 64 x 64 tile's product does 32 FLOP per byte copied from L2 when
// both operands stream and 64 when the rows stay, and at 32 the copies, not the tensor cores,
// bound it (about 7 TB/s of L2 on an H100 / H200 feeds ~220 TFLOP/s). So the rows stay while
// at least kForwardMinBlocks blocks (8 warps) a multiprocessor remain: H100 / H200 up to
// D = 576 for 16-bit inputs (D <= 128: 4 blocks either way; D = 512: 2 instead of 4), fp32 up
// to D = 192. FASTNCE_CUDA_FORWARD_ROWS (lse_ops.cpp) overrides this, for timing both.
constexpr int kForwardMinBlocks = 2;
inline int forward_resident(int elem_bytes, int64_t D, size_t smem_per_sm) {
  const int w = padded_features(D);
  if (w > 1024) return 0;
  const int held = forward_blocks_per_sm(smem_layout(elem_bytes, 0, w).total, smem_per_sm);
  const int streamed = forward_blocks_per_sm(smem_layout(elem_bytes, 0, 0).total, smem_per_sm);
  return held >= 1 && held >= (streamed < kForwardMinBlocks ? streamed : kForwardMinBlocks) ? w : 0;
}

// The backward holds the block's own rows when its accumulators live in registers (the panel
// covers D in at most kRegChunks chunks); wider panels need that shared memory for themselves.
inline int backward_resident(int64_t D, int panel) {
  const int w = padded_features(D);
  return (panel >= w && w <= kRegChunks * kDK) ? w : 0;
}

// Output columns per backward pass: all of D when the accumulator fits in the shared memory a
// block may opt into, else the largest multiple of kDK that fits (the tiles are recomputed once
// per pass).
inline int backward_panel(int elem_bytes, int64_t D, size_t smem_optin) {
  int64_t p = (D + kDK - 1) / kDK * kDK;
  if (p > 1024) p = 1024;  // no GPU has shared memory for more
  while (p > kDK && smem_layout(elem_bytes, int(p)).total > smem_optin) p -= kDK;
  return int(p);
}

// The wide backward (16-bit inputs, 128 < D <= 512: CLIP's widths), lse_backward_wide_kernel:
// 8 warps; the block's own 64 rows resident; the walked tile's 64 rows x D staged whole and
// double-buffered, one load serving both products; the 64 x D fp32 accumulator in the warps'
// registers for the whole walk. Shared memory: own rows, two walked tiles, S, G, vectors; the
// accumulator is staged through the two tiles' space at the end (64 x (D + 4) fp32 fits).
constexpr int kWideThreads = 256;
constexpr int kWideMaxWidth = 512;

FASTNCE_HD inline SmemLayout wide_smem_layout(int width) {
  SmemLayout L;
  L.ld_res = ld_resident(2, width);
  const size_t tile = size_t(kBM) * L.ld_res * 2;
  size_t off = 0;
  L.res_off = off; off = align128(off + tile);
  L.slot_bytes = tile;
  L.slot_off = off; off = align128(off + 2 * tile);
  L.s_off = off; off = align128(off + size_t(kBM) * kLdS * sizeof(float));
  L.g_off = off; off = align128(off + size_t(kBM) * kLdG16 * 2);
  L.vec_off = off; off = align128(off + vec_bytes(true));
  L.acc_off = L.slot_off;
  L.total = off;
  return L;
}

// The wide backward's width (D padded to kDK), or 0 where it does not apply: fp32 inputs, D up
// to 128 (registers hold those accumulators in the 4-warp kernel, whose rows are resident too),
// D above 512, or too little shared memory (an H100 / H200 holds D = 512, 225 KiB; an A100 up
// to D = 320).
inline int backward_wide(int elem_bytes, int64_t D, size_t smem_optin) {
  const int w = padded_features(D);
  const bool fits = w > kRegChunks * kDK && w <= kWideMaxWidth && wide_smem_layout(w).total <= smem_optin;
  return elem_bytes == 2 && fits ? w : 0;
}

// In the wide backward each warp owns a 64-feature chunk of the output: all 64 rows, or up to
// 256 features (4 chunks for 8 warps) half of them, two warps a chunk.
inline bool wide_two_warps_a_chunk(int width) { return width <= 4 * kDK; }

// The backward's plan: p.wide, p.panel and p.resident for D on this device.
inline void plan_backward(LseParams& p, int elem_bytes, size_t smem_optin) {
  const int w = backward_wide(elem_bytes, p.D, smem_optin);
  p.wide = w > 0;
  p.panel = w > 0 ? w : backward_panel(elem_bytes, p.D, smem_optin);
  p.resident = w > 0 ? w : backward_resident(p.D, p.panel);
}

// Split the inner loop over blockIdx.y when the outer dimension alone gives too few blocks
// (MoCo: a few hundred queries against a queue of 65536 keys). Each split takes at least
// min_tiles tiles so that the atomic merge stays cheap beside the products (the emulation's
// tests take fewer, to reach the merges at small sizes).
constexpr int64_t kMinTilesPerSplit = 4;
inline void choose_splits(LseParams& p, int64_t outer_blocks, int64_t inner_tiles, int num_sms,
                          int64_t min_tiles = kMinTilesPerSplit) {
  int64_t s = (2 * int64_t(num_sms) + outer_blocks - 1) / outer_blocks;
  int64_t max_s = inner_tiles / min_tiles;
  if (s > max_s) s = max_s;
  if (s > 65535) s = 65535;
  if (s < 1) s = 1;
  const int64_t per = (inner_tiles + s - 1) / s;
  p.tiles_per_split = per < 1 ? 1 : per;
  p.splits = int((inner_tiles + p.tiles_per_split - 1) / p.tiles_per_split);
  if (p.splits < 1) p.splits = 1;
}

// The features move in 16-byte asynchronous copies (cp.async) when each row is whole 16-byte
// vectors and both operands start on 16 bytes (a slice of a flat buffer need not); plain loads
// otherwise (LseParams::vec_loads).
inline bool use_vec_loads(int elem_bytes, int64_t D, const void* q, const void* k) {
  const auto on_16 = [](const void* a) { return reinterpret_cast<uintptr_t>(a) % 16 == 0; };
  return D % (16 / elem_bytes) == 0 && on_16(q) && on_16(k);
}

}  // namespace fastnce
