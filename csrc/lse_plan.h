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

  // Work split: blockIdx.y takes inner tiles [y * tiles_per_split, (y + 1) * tiles_per_split).
  // With more than one split the outputs are merged atomically (row_lse by log-add-exp into a
  // -inf filled buffer, dq / dk / dbias by addition into zeroed buffers).
  int64_t tiles_per_split = 0;
  int splits = 1;
};

// Leading dimensions (in elements) of the shared-memory tiles; the padding keeps WMMA's
// 32-byte pointer alignment and spreads rows over the banks.
FASTNCE_HD constexpr int ld_operand(int elem_bytes) { return elem_bytes == 2 ? kDK + 8 : kDK + 4; }
constexpr int kLdS = kBN + 4;  // float S / G tile
constexpr int kLdG16 = kBN + 8;  // 16-bit copy of G for the tensor-core products

FASTNCE_HD inline size_t align128(size_t x) { return (x + 127) & ~size_t(127); }

struct SmemLayout {
  size_t q_off, k_off, s_off, g_off, vec_off, acc_off, total;
};

// Vector scratch: row lse, row grad, col bias, col lse, col grad, and for the mirror the row lse
// and grad at the columns and the col lse and grad at the rows, and a reduction scratch
// (float); then 2 label tiles (int64).
constexpr int kVecFloats = 10;
FASTNCE_HD inline size_t vec_bytes() { return kVecFloats * 64 * sizeof(float) + 2 * 64 * sizeof(int64_t); }

// elem_bytes: 2 for fp16/bf16, 4 for fp32. panel: 0 for the forward (no accumulator).
FASTNCE_HD inline SmemLayout smem_layout(int elem_bytes, int panel) {
  SmemLayout L;
  const size_t op = size_t(kBM) * ld_operand(elem_bytes) * elem_bytes;  // kBM == kBN
  size_t off = 0;
  L.q_off = off; off = align128(off + op);
  L.k_off = off; off = align128(off + op);
  L.s_off = off; off = align128(off + size_t(kBM) * kLdS * sizeof(float));
  L.g_off = off;
  if (panel > 0 && elem_bytes == 2) off = align128(off + size_t(kBM) * kLdG16 * 2);
  L.vec_off = off; off = align128(off + vec_bytes());
  L.acc_off = off;
  if (panel > 0) off = align128(off + size_t(kBM) * (panel + 4) * sizeof(float));
  L.total = off;
  return L;
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

// Split the inner loop over blockIdx.y when the outer dimension alone gives too few blocks
// (MoCo: a few hundred queries against a queue of 65536 keys). Each split takes at least
// min_tiles tiles so that the atomic merge stays cheap beside the products.
inline void choose_splits(LseParams& p, int64_t outer_blocks, int64_t inner_tiles, int num_sms,
                          int64_t min_tiles = 4) {
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

}  // namespace fastnce
