// fastnce CUDA backend: the tiled similarity-LSE kernels (DESIGN.md §1).
//
//   S[i, j] = scale * q[i].k[j] + bias[j]     (masked pairs dropped)
//   forward:  row_lse[i] = log sum_j exp S[i, j],  col_lse[j] = log sum_i exp S[i, j] (optional)
//   backward: G[i, j] = g[i] exp(S - row_lse[i]) + h[j] exp(S - col_lse[j]);
//             dq = G @ k (row kernel), dk = G^T @ q and dbias = sum_i G[i, :] (column kernel)
//
// Organisation (kBM = kBN = 64, 128 threads = 4 warps, each warp a 32 x 32 sub-tile):
// * forward: a block owns 64 rows and walks column tiles (a slice of them when the grid is split
//   along N; for k == q without bias only the tiles on and above the diagonal, p.upper, the
//   column LSEs then giving the rows below their part: half the products). Per tile, S is
//   accumulated over D in 64-wide chunks staged in shared memory, stored as fp32 into shared
//   memory, masked, and folded into a running (max, sum) per row in base 2 (online softmax).
//   Column LSEs: each tile's 64-row partial LSE per column is merged into col_lse with an
//   atomic log-add-exp (compare-and-swap on the float); the blocks start at different column
//   tiles so they rarely meet on the same address.
// * backward: two launches of one kernel. The row kernel (dq) owns 64 rows and walks column
//   tiles; the column kernel (dk, dbias) owns 64 columns and walks row tiles. For k == q
//   without bias (NT-Xent) the row kernel alone, each tile giving G and its mirror (p.mirror):
//   dq = (G + G^T) @ q from one recompute, 2 products where the two launches take 4. Each
//   recomputes S per tile, forms G in shared memory (one exponential per entry for all its
//   terms where the tile's LSEs allow), and accumulates G @ k (or G^T @ q) into an fp32
//   accumulator of 64 x panel, in registers up to 128 features, else in shared memory; when D
//   does not fit (panel < D) the walk is repeated once per panel of output columns. No
//   atomics unless the grid is split. For 16-bit inputs with 128 < D <= 512 where shared
//   memory allows (H100 / H200: CLIP's D = 512), the wide kernel instead: 8 warps, the walked
//   tile staged whole for both products, the 64 x D accumulator in registers (see there).
// * operands: a block's operand chunks (64 rows x 64 features) form one stream in the order
//   they are multiplied, across tiles: double-buffered through two shared-memory slots, chunk
//   e + 1 copied (cp.async on sm_80+) while chunk e is multiplied, so the loads hide behind the
//   products and behind the softmax work between tiles. The block's own 64 rows stay resident
//   in shared memory for the whole walk where the plan allows (lse_plan.h: the forward while 2
//   blocks a multiprocessor remain), and then only the walked tiles' rows stream: half the
//   operand traffic. The backward's second
//   product streams the panel's chunks last first, reusing D's last chunk left by the S product.
// All products use fp32 accumulation; fp16/bf16 operands go through WMMA tensor cores, fp32
// through WMMA tf32 only when the caller allows tf32, else plain FMA.
#pragma once

#include "lse_plan.h"

#ifndef FASTNCE_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include <type_traits>

namespace fastnce {

namespace wmma = nvcuda::wmma;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
#define FASTNCE_NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------
// Warp tiles: one warp's 32 x 32 fp32 accumulator and  C += A (32 x K) @ B (K x 32)  with A and
// B in shared memory. A_COL: A[m][k] at A[k * lda + m] (else A[m * lda + k]); B_COL: B[k][n] at
// B[n * ldb + k] (else B[k * ldb + n]).
// ---------------------------------------------------------------------------------------------
template <class T, int KIND> struct WarpTile;

// A (16·MI)×(16·NJ) warp tile as MI×NJ WMMA fragments of depth KS (32×32 unless said); Frag is
// the fragment element type (T itself for fp16/bf16, wmma::precision::tf32 for fp32 inputs on
// the tensor cores).
template <class T, class Frag, int KS, int MI = 2, int NJ = 2> struct WmmaWarpTile {
  wmma::fragment<wmma::accumulator, 16, 16, KS, float> c[MI][NJ];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) wmma::fill_fragment(c[i][j], 0.0f);
  }
  __device__ __forceinline__ void load(const float* C, int ldc) {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) wmma::load_matrix_sync(c[i][j], C + 16 * i * ldc + 16 * j, ldc, wmma::mem_row_major);
  }
  __device__ __forceinline__ void store(float* C, int ldc) const {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j) wmma::store_matrix_sync(C + 16 * i * ldc + 16 * j, c[i][j], ldc, wmma::mem_row_major);
  }
  template <class F> __device__ __forceinline__ static void to_frag(F& f) {
    if constexpr (std::is_same<Frag, wmma::precision::tf32>::value) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
    }
  }
  template <bool A_COL, bool B_COL>
  __device__ __forceinline__ void mma(const T* A, int lda, const T* B, int ldb, int K) {
    using LA = typename std::conditional<A_COL, wmma::col_major, wmma::row_major>::type;
    using LB = typename std::conditional<B_COL, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::matrix_a, 16, 16, KS, Frag, LA> a[MI];
    wmma::fragment<wmma::matrix_b, 16, 16, KS, Frag, LB> b;
    for (int k0 = 0; k0 < K; k0 += KS) {
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        wmma::load_matrix_sync(a[i], A_COL ? A + k0 * lda + 16 * i : A + 16 * i * lda + k0, lda);
        to_frag(a[i]);
      }
#pragma unroll
      for (int j = 0; j < NJ; ++j) {  // one B fragment live at a time: registers for wide tiles
        wmma::load_matrix_sync(b, B_COL ? B + 16 * j * ldb + k0 : B + k0 * ldb + 16 * j, ldb);
        to_frag(b);
#pragma unroll
        for (int i = 0; i < MI; ++i) wmma::mma_sync(c[i][j], a[i], b, c[i][j]);
      }
    }
  }
};

template <class T> struct WarpTile<T, kMmaWmma16> : WmmaWarpTile<T, T, 16> {};
template <> struct WarpTile<float, kMmaTf32> : WmmaWarpTile<float, wmma::precision::tf32, 8> {};

// Plain FMA: lane l holds rows (l >> 2) + 8 ii and columns (l & 3) + 4 jj of the warp tile
// (interleaved so that a warp's shared-memory reads fall in distinct banks).
template <> struct WarpTile<float, kMmaSimt> {
  float c[4][8];

  __device__ __forceinline__ int lane() const { return threadIdx.x & 31; }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c[i][j] = 0.0f;
  }
  __device__ __forceinline__ void load(const float* C, int ldc) {
    const int r0 = lane() >> 2, c0 = lane() & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c[i][j] = C[(r0 + 8 * i) * ldc + c0 + 4 * j];
  }
  __device__ __forceinline__ void store(float* C, int ldc) const {
    const int r0 = lane() >> 2, c0 = lane() & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) C[(r0 + 8 * i) * ldc + c0 + 4 * j] = c[i][j];
  }
  template <bool A_COL, bool B_COL>
  __device__ __forceinline__ void mma(const float* A, int lda, const float* B, int ldb, int K) {
    const int r0 = lane() >> 2, c0 = lane() & 3;
    for (int k = 0; k < K; ++k) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = A_COL ? A[k * lda + r0 + 8 * i] : A[(r0 + 8 * i) * lda + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = B_COL ? B[(c0 + 4 * j) * ldb + k] : B[k * ldb + c0 + 4 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

// 16 bytes from global to shared memory: asynchronous on sm_80 and later (cp.async, landed
// once this thread passes copy_wait_all), zeros where !valid (src is then not read).
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
#if defined(FASTNCE_EMULATE)
  emu::cp_async16(dst, src, valid);
#elif __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

__device__ __forceinline__ void copy_wait_all() {
#if defined(FASTNCE_EMULATE)
  emu::cp_async_wait_all();
#elif __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// 64 rows x kDK features of src (nrows x D, row-major) from row row0 and feature d0 into dst
// (leading dimension ld); zeros outside. vec: 16-byte copies (D a multiple of 16 / sizeof(T) and
// src 16-byte aligned), asynchronous where the GPU has them; else plain loads and stores. Either
// way visible to the block after copy_wait_all and a barrier.
template <class T, int NT = kThreads>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* __restrict__ src, int64_t row0, int64_t nrows,
                                          int64_t d0, int64_t D, bool vec) {
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    constexpr int PER_ROW = kDK / V;
    for (int e = threadIdx.x; e < 64 * PER_ROW; e += NT) {
      const int r = e / PER_ROW, c = (e % PER_ROW) * V;
      const int64_t gr = row0 + r, gd = d0 + c;
      const bool ok = gr < nrows && gd < D;
      copy16(dst + r * ld + c, ok ? src + gr * D + gd : src, ok);
    }
  } else {
    for (int e = threadIdx.x; e < 64 * kDK; e += NT) {
      const int r = e / kDK, c = e % kDK;
      const int64_t gr = row0 + r, gd = d0 + c;
      dst[r * ld + c] = (gr < nrows && gd < D) ? src[gr * D + gd] : from_f<T>(0.0f);
    }
  }
}

// The operand chunks a block multiplies, in the order it multiplies them (its element stream),
// pass through kSlots = 2 shared-memory slots: element e sits in slot e % 2, and element e + 1
// loads while element e is multiplied. A slot holds the inner operand's 64 x kDK chunk (the
// walked tiles' rows) and, when the block's own 64 rows are not resident, their chunk too.
template <class T>
struct Slots {
  unsigned char* base;
  size_t bytes;  // one 64 x kDK operand buffer
  bool resident;
  __device__ __forceinline__ T* inner(int64_t e) const {
    return reinterpret_cast<T*>(base + (e & 1) * (resident ? 1 : 2) * bytes);
  }
  __device__ __forceinline__ T* outer(int64_t e) const { return inner(e) + bytes / sizeof(T); }
};

// Before multiplying element e: its copies have landed (this thread's, then, past the barrier,
// everyone's), and every thread is done with element e - 1, whose slot element e + 1 now takes.
template <class Issue>
__device__ __forceinline__ void stream_step(int64_t e, int64_t total, Issue&& issue) {
  copy_wait_all();
  __syncthreads();
  if (e + 1 < total) issue(e + 1);
}

__device__ __forceinline__ bool keep_pair(const LseParams& p, int64_t i, int64_t j, int64_t qlab, int64_t klab) {
  if (p.has_exclude && j == i + p.exclude_offset) return false;
  if (p.mask_mode == kMaskSame) return qlab == klab;
  if (p.mask_mode == kMaskDifferent) return qlab != klab;
  return true;
}

// *addr = log(exp(*addr) + exp(v)), natural log, lock-free.
__device__ __forceinline__ void atomic_logaddexp(float* addr, float v) {
  int* a = reinterpret_cast<int*>(addr);
#if defined(FASTNCE_EMULATE)
  int old = emu::load_relaxed(a);  // what the volatile load is on a GPU; a sanitizer sees it so
#else
  int old = *reinterpret_cast<volatile int*>(a);  // a first guess for the CAS, which checks it
#endif
  while (true) {
    const float cur = __int_as_float(old);
    const float hi = fmaxf(cur, v), lo = fminf(cur, v);
    // fmaxf/fminf drop a NaN: test for it first, so that NaN stays NaN.
    const float nv = (cur != cur || v != v) ? __int_as_float(0x7fc00000)
                     : (lo == FASTNCE_NEG_INF) ? hi : hi + log1pf(expf(lo - hi));
    const int prev = atomicCAS(a, old, __float_as_int(nv));
    if (prev == old) break;
    old = prev;
  }
}

// The S tile (64 x 64) as raw dot products, fp32, into Ss, from the tile's nc = D / kDK elements
// of the stream, e onwards (advanced past them). ROWS_INNER: S's rows are the streamed operand
// (the column kernel: q walks past a block of k), else its columns (k walks past a block of q).
// The block's own operand is res (leading dimension ld_res) when resident, else in each slot.
// hook() runs once, after the first element's barrier (every thread is done with the previous
// tile), for loading per-tile vectors; Ss is written after the last element's barrier and
// followed by one, so its previous users are done and its new contents visible.
template <class T, int KIND, bool ROWS_INNER, class Issue, class Hook>
__device__ __forceinline__ void compute_s_tile(const Slots<T>& sl, const T* res, int ld_res, float* Ss, int nc,
                                               int64_t& e, int64_t total, Issue&& issue, Hook&& hook) {
  constexpr int LDO = ld_operand(sizeof(T));
  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  WarpTile<T, KIND> acc;
  acc.zero();
  for (int c = 0; c < nc; ++c, ++e) {
    stream_step(e, total, issue);
    if (c == 0) hook();
    const T* in = sl.inner(e);
    const T* own = res != nullptr ? res + c * kDK : sl.outer(e);
    const int ld_own = res != nullptr ? ld_res : LDO;
    const T* A = ROWS_INNER ? in : own;
    const T* B = ROWS_INNER ? own : in;
    const int lda = ROWS_INNER ? LDO : ld_own, ldb = ROWS_INNER ? ld_own : LDO;
    acc.template mma<false, true>(A + wm * 32 * lda, lda, B + wn * 32 * ldb, ldb, kDK);
  }
  acc.store(Ss + wm * 32 * kLdS + wn * 32, kLdS);
  __syncthreads();
}

// The block's own 64 rows of src (from row0), all p.resident features, into res: copies issued
// before the stream's first element, so that element's wait covers them.
template <class T, int NT = kThreads>
__device__ __forceinline__ void load_resident(T* res, int ld_res, const T* src, int64_t row0, int64_t nrows,
                                              const LseParams& p) {
  for (int c = 0; c < p.resident; c += kDK)
    load_rows<T, NT>(res + c, ld_res, src, row0, nrows, c, p.D, p.vec_loads != 0);
}

// ---------------------------------------------------------------------------------------------
// Forward: grid (ceil(M / 64), splits). Writes row_lse (merged atomically when splits > 1) and,
// when p.col_lse is set, merges into col_lse.
// ---------------------------------------------------------------------------------------------
template <class T, int KIND>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSm) lse_forward_kernel(const LseParams p) {
#ifndef FASTNCE_EMULATE
  extern __shared__ __align__(128) unsigned char smem_raw[];
#else
  unsigned char* smem_raw = emu::block_smem();
#endif
  constexpr int LDO = ld_operand(sizeof(T));
  const SmemLayout L = smem_layout(sizeof(T), 0, p.resident);
  const Slots<T> slots{smem_raw + L.slot_off, L.slot_bytes, p.resident > 0};
  T* res = p.resident > 0 ? reinterpret_cast<T*>(smem_raw + L.res_off) : nullptr;
  float* Ss = reinterpret_cast<float*>(smem_raw + L.s_off);
  float* v_bias = reinterpret_cast<float*>(smem_raw + L.vec_off);
  int64_t* v_klab = reinterpret_cast<int64_t*>(smem_raw + L.vec_off + kFwdVecFloats * 64 * sizeof(float));

  const int tid = threadIdx.x;
  const int64_t M = p.M, N = p.N;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const float scale2 = *p.scale * kLog2e;  // S in base-2 units
  const bool labels = p.mask_mode != kMaskNone;
  const bool with_col = p.col_lse != nullptr;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);

  // Row pass ownership: thread (r, h) takes row r, columns h, h + 2, h + 4, ...
  const int r = tid >> 1, h = tid & 1;
  const int64_t i = row0 + r;
  const bool row_ok = i < M;
  const int64_t qlab = (labels && row_ok) ? p.q_labels[i] : 0;
  float m_run = FASTNCE_NEG_INF, l_run = 0.0f;

  const int64_t ntiles = (N + kBN - 1) / kBN;
  int64_t t_begin = int64_t(blockIdx.y) * p.tiles_per_split;
  int64_t t_end = t_begin + p.tiles_per_split;
  if (t_end > ntiles) t_end = ntiles;
  if (p.upper && t_begin < int64_t(blockIdx.x)) t_begin = blockIdx.x;  // tiles on and above the diagonal
  const int64_t nt = t_end - t_begin;  // may be <= 0 with upper: nothing to do
  // Start each block at a different tile: spreads the column atomics.
  auto tile_col0 = [&](int64_t it) { return (t_begin + (int64_t(blockIdx.x) + it) % nt) * kBN; };
  // The stream: tile it's chunk c is element it * nc + c (the keys' chunk, and the rows' unless resident).
  const int nc = int((p.D + kDK - 1) / kDK);
  const int64_t total = nt > 0 ? nt * nc : 0;
  auto issue = [&](int64_t e) {
    const int64_t d0 = (e % nc) * kDK;
    load_rows(slots.inner(e), LDO, k, tile_col0(e / nc), N, d0, p.D, p.vec_loads != 0);
    if (res == nullptr) load_rows(slots.outer(e), LDO, q, row0, M, d0, p.D, p.vec_loads != 0);
  };
  if (total > 0) {
    if (res != nullptr) load_resident(res, L.ld_res, q, row0, M, p);
    issue(0);
  }
  int64_t e = 0;
  for (int64_t it = 0; it < nt; ++it) {
    const int64_t col0 = tile_col0(it);
    compute_s_tile<T, KIND, false>(slots, res, L.ld_res, Ss, nc, e, total, issue, [&] {
      if (tid < kBN) {
        const int64_t j = col0 + tid;
        v_bias[tid] = (p.bias != nullptr && j < N) ? p.bias[j] * kLog2e : 0.0f;
        v_klab[tid] = (labels && j < N) ? p.k_labels[j] : 0;
      }
    });

    // Row pass: mask and scale in place, running max and sum (both threads of a row agree).
    float* srow = Ss + r * kLdS;
    float tmax = FASTNCE_NEG_INF;
#pragma unroll 4
    for (int cc = 0; cc < kBN / 2; ++cc) {
      const int c = h + 2 * cc;
      const int64_t j = col0 + c;
      float s = FASTNCE_NEG_INF;
      if (row_ok && j < N && keep_pair(p, i, j, qlab, v_klab[c])) s = srow[c] * scale2 + v_bias[c];
      srow[c] = s;
      tmax = fmaxf(tmax, s);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    const float m_new = fmaxf(m_run, tmax);
    const float shift = (m_new == FASTNCE_NEG_INF) ? 0.0f : m_new;  // all -inf so far: exp2 gives 0
    float sum = 0.0f;
#pragma unroll 4
    for (int cc = 0; cc < kBN / 2; ++cc) sum += exp2f(srow[h + 2 * cc] - shift);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * exp2f(m_run - shift) + sum;
    m_run = m_new;

    // (upper: the diagonal tile holds both halves of its rows, its columns add nothing)
    if (with_col && !(p.upper && col0 == row0)) {
      __syncthreads();  // the masked tile is complete
      const int c = tid >> 1;  // column c, rows h, h + 2, ...
      float cmax = FASTNCE_NEG_INF;
#pragma unroll 4
      for (int rr = 0; rr < kBM / 2; ++rr) cmax = fmaxf(cmax, Ss[(h + 2 * rr) * kLdS + c]);
      cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, 1));
      const float cshift = (cmax == FASTNCE_NEG_INF) ? 0.0f : cmax;
      float csum = 0.0f;
#pragma unroll 4
      for (int rr = 0; rr < kBM / 2; ++rr) csum += exp2f(Ss[(h + 2 * rr) * kLdS + c] - cshift);
      csum += __shfl_xor_sync(0xffffffffu, csum, 1);
      const int64_t j = col0 + c;
      // csum == 0: nothing valid in this tile's column. (Not cmax: fmaxf skips NaN, csum keeps it.)
      if (h == 0 && j < N && csum != 0.0f) atomic_logaddexp(p.col_lse + j, (cmax + log2f(csum)) * kLn2);
    }
  }
  if (h == 0 && row_ok) {
    // l_run == 0 exactly when nothing was valid; == (not > 0) keeps a NaN from a NaN input.
    const float lse = (l_run == 0.0f) ? FASTNCE_NEG_INF : (m_run + log2f(l_run)) * kLn2;
    if (p.splits > 1) {
      if (lse != FASTNCE_NEG_INF) atomic_logaddexp(p.row_lse + i, lse);
    } else {
      p.row_lse[i] = lse;
    }
  }
}

// The backward's per-tile vectors in shared memory (vec_bytes(true)): row lse, row grad, col
// bias, col lse, col grad; for the mirror the row lse and grad at the columns and the col lse
// and grad at the rows; a reduction scratch; the row and column labels.
struct BwdVecs {
  float *rlse, *grow, *bias, *clse, *gcol, *rlse_c, *grow_c, *clse_r, *gcol_r, *red;
  int64_t *qlab, *klab;
  __device__ __forceinline__ explicit BwdVecs(unsigned char* base) {
    float* f = reinterpret_cast<float*>(base);
    rlse = f, grow = f + 64, bias = f + 128, clse = f + 192, gcol = f + 256;
    rlse_c = f + 320, grow_c = f + 384, clse_r = f + 448, gcol_r = f + 512, red = f + 576;
    qlab = reinterpret_cast<int64_t*>(base + kVecFloats * 64 * sizeof(float));
    klab = qlab + 64;
  }
};

// The vectors of the tile (rows row0.., columns col0..), by threads 0..127 (rows, then columns).
__device__ __forceinline__ void load_tile_vectors(const LseParams& p, const BwdVecs& v, int64_t row0, int64_t col0,
                                                  bool mirror) {
  const int tid = threadIdx.x;
  const bool labels = p.mask_mode != kMaskNone;
  const bool has_grow = p.grad_row != nullptr, has_gcol = p.grad_col != nullptr;
  if (tid < 64) {
    const int64_t i = row0 + tid;
    const bool ok = i < p.M;
    v.rlse[tid] = (has_grow && ok) ? p.row_lse_in[i] * kLog2e : FASTNCE_NEG_INF;
    v.grow[tid] = (has_grow && ok) ? p.grad_row[i] : 0.0f;
    v.qlab[tid] = (labels && ok) ? p.q_labels[i] : 0;
    if (mirror) {
      v.clse_r[tid] = (has_gcol && ok) ? p.col_lse_in[i] * kLog2e : FASTNCE_NEG_INF;
      v.gcol_r[tid] = (has_gcol && ok) ? p.grad_col[i] : 0.0f;
    }
  } else if (tid < 128) {
    const int c = tid - 64;
    const int64_t j = col0 + c;
    const bool ok = j < p.N;
    v.bias[c] = (p.bias != nullptr && ok) ? p.bias[j] * kLog2e : 0.0f;
    v.clse[c] = (has_gcol && ok) ? p.col_lse_in[j] * kLog2e : FASTNCE_NEG_INF;
    v.gcol[c] = (has_gcol && ok) ? p.grad_col[j] : 0.0f;
    v.klab[c] = (labels && ok) ? p.k_labels[j] : 0;
    if (mirror) {
      v.rlse_c[c] = (has_grow && ok) ? p.row_lse_in[j] * kLog2e : FASTNCE_NEG_INF;
      v.grow_c[c] = (has_grow && ok) ? p.grad_row[j] : 0.0f;
    }
  }
}

// The largest finite LSE (base 2) of a backward tile's G terms (rows' rlse, columns' clse, and
// with the mirror the columns' rlse_c and rows' clse_r), when all its finite LSEs lie within
// kOneExpSpread2 of it; else -inf (also when there is none), NaN when one is NaN. Block-wide
// over NT threads: every thread gets the same value (one barrier; red holds 3 floats per warp).
template <int NT>
__device__ __forceinline__ float tile_lse_top(const BwdVecs& v, bool mirror) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float mx = FASTNCE_NEG_INF, mn = -FASTNCE_NEG_INF, nan = 0.0f;
  auto see = [&](float l) {
    if (l != l) nan = 1.0f;
    if (l != FASTNCE_NEG_INF) {
      mx = fmaxf(mx, l);
      mn = fminf(mn, l);
    }
  };
  if (tid < 64) {
    see(v.rlse[tid]);
    if (mirror) see(v.clse_r[tid]);
  } else if (tid < 128) {
    see(v.clse[tid - 64]);
    if (mirror) see(v.rlse_c[tid - 64]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    nan = fmaxf(nan, __shfl_xor_sync(0xffffffffu, nan, o));
  }
  if (lane == 0) {
    v.red[3 * warp] = mx;
    v.red[3 * warp + 1] = mn;
    v.red[3 * warp + 2] = nan;
  }
  __syncthreads();
  mx = FASTNCE_NEG_INF, mn = -FASTNCE_NEG_INF, nan = 0.0f;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) {
    mx = fmaxf(mx, v.red[3 * w]);
    mn = fminf(mn, v.red[3 * w + 1]);
    nan = fmaxf(nan, v.red[3 * w + 2]);
  }
  if (nan != 0.0f) return __int_as_float(0x7fc00000);
  return (mx - mn <= kOneExpSpread2) ? mx : FASTNCE_NEG_INF;
}

// a·2^(x − l), base 2: one term of G (x = s) or, for a shared exponential, a gradient times its
// correction (x = the tile's top LSE); 0 for an absent term (l = -inf: no gradient, or no pair).
__device__ __forceinline__ float g_term(float a, float x, float l) {
  return l == FASTNCE_NEG_INF ? 0.0f : a * exp2f(x - l);
}

// G of the tile (rows row0.., columns col0..) in place of its raw dot products in Ss, and its
// 16-bit copy Gs for the tensor cores; 0 where masked or where an lse is -inf. With the mirror,
// G[i, j] + G[j, i]: S[j, i] = S[i, j] (k is q, no bias), its row terms at j and column terms
// at i, the pair dropped where (j, i) is (keep_pair with the roles swapped). By NT threads,
// after the tile's vectors and Ss are complete; ends with a barrier.
template <class T, int KIND, int NT>
__device__ __forceinline__ void form_g_tile(const LseParams& p, const BwdVecs& v, float* Ss, T* Gs, int64_t row0,
                                            int64_t col0, float scale2, bool mirror) {
  constexpr bool kHalf = sizeof(T) == 2;
  const int tid = threadIdx.x;
  // One exponential per entry for all of G's terms (row and column, G and its mirror) when the
  // tile's LSEs lie within kOneExpSpread2 of each other: a·2^(s − l) = 2^(s − hi)·(a·2^(hi − l)),
  // hi the tile's largest LSE; every valid s is at most the LSEs of its lines, so 2^(s − hi) ≤ 1,
  // a·2^(hi − l) < a·2^58, and a term whose 2^(s − hi) underflows is below 2^-68 of its line's
  // sum. Not for fp32 FMA products, whose accuracy the larger arguments' rounding would show
  // (as in the Triton kernels).
  const float hi = KIND == kMmaSimt ? 0.0f : tile_lse_top<NT>(v, mirror);
  const bool shared = KIND != kMmaSimt && hi != FASTNCE_NEG_INF && hi == hi;  // (NaN: never)
  if (shared) {  // the gradients become the factors a·2^(hi − l), in place (this tile's copies)
    if (tid < 64) {
      v.grow[tid] = g_term(v.grow[tid], hi, v.rlse[tid]);
      if (mirror) v.gcol_r[tid] = g_term(v.gcol_r[tid], hi, v.clse_r[tid]);
    } else if (tid < 128) {
      v.gcol[tid - 64] = g_term(v.gcol[tid - 64], hi, v.clse[tid - 64]);
      if (mirror) v.grow_c[tid - 64] = g_term(v.grow_c[tid - 64], hi, v.rlse_c[tid - 64]);
    }
    __syncthreads();
  }
  for (int x = tid; x < kBM * kBN; x += NT) {
    const int r = x / kBN, c = x % kBN;
    const int64_t i = row0 + r, j = col0 + c;
    float g = 0.0f;
    if (i < p.M && j < p.N) {
      const float s = Ss[r * kLdS + c] * scale2 + v.bias[c];
      const bool keep = keep_pair(p, i, j, v.qlab[r], v.klab[c]);
      const bool keep_m = mirror && keep_pair(p, j, i, v.klab[c], v.qlab[r]);
      if (shared) {
        const float a = (keep ? v.grow[r] + v.gcol[c] : 0.0f) + (keep_m ? v.grow_c[c] + v.gcol_r[r] : 0.0f);
        if (a != 0.0f) g = a * exp2f(s - hi);
      } else {
        if (keep) g += g_term(v.grow[r], s, v.rlse[r]) + g_term(v.gcol[c], s, v.clse[c]);
        if (keep_m) g += g_term(v.grow_c[c], s, v.rlse_c[c]) + g_term(v.gcol_r[r], s, v.clse_r[r]);
      }
    }
    Ss[r * kLdS + c] = g;
    if constexpr (kHalf) Gs[r * kLdG16 + c] = from_f<T>(g);
  }
  __syncthreads();
}

// The backward's second product for one warp: acc += G @ X (the row kernel, dq; X the chunk of
// k) or G^T @ X (the column kernel, dk; X the chunk of q), its 32 x 32 part of 64 x kDK.
template <class T, int KIND, bool FOR_K>
__device__ __forceinline__ void accumulate_g_product(WarpTile<T, KIND>& acc, const T* Gs, const T* X) {
  constexpr int LDO = ld_operand(sizeof(T));
  constexpr int LDG = sizeof(T) == 2 ? kLdG16 : kLdS;
  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  if (FOR_K) {
    acc.template mma<true, false>(Gs + wm * 32, LDG, X + wn * 32, LDO, kBM);
  } else {
    acc.template mma<false, false>(Gs + wm * 32 * LDG, LDG, X + wn * 32, LDO, kBN);
  }
}

// The block's place in a backward launch: its 64 output rows (outer0.., n_outer of them in
// all) and the inner tiles [t_begin, t_end) it walks (its split of them, blockIdx.y).
struct BwdWalk {
  int64_t outer0, n_outer, t_begin, t_end;
};
template <bool FOR_K>
__device__ __forceinline__ BwdWalk bwd_walk(const LseParams& p) {
  BwdWalk w;
  w.outer0 = int64_t(blockIdx.x) * 64;
  w.n_outer = FOR_K ? p.N : p.M;
  const int64_t n_inner_tiles = FOR_K ? (p.M + kBM - 1) / kBM : (p.N + kBN - 1) / kBN;
  w.t_begin = int64_t(blockIdx.y) * p.tiles_per_split;
  w.t_end = w.t_begin + p.tiles_per_split;
  if (w.t_end > n_inner_tiles) w.t_end = n_inner_tiles;
  return w;
}

// The block's accumulated output columns pass0 .. pass0 + pw of its rows, from acc_s (leading
// dimension lda) into p.out, added atomically when the grid is split; by NT threads.
template <int NT>
__device__ __forceinline__ void write_out_panel(const LseParams& p, const BwdWalk& w, const float* acc_s, int lda,
                                                int64_t pass0, int pw) {
  for (int x = threadIdx.x; x < 64 * pw; x += NT) {
    const int r = x / pw, c = x % pw;
    const int64_t o = w.outer0 + r;
    if (o < w.n_outer) {
      float* dst = p.out + o * p.D + pass0 + c;
      if (p.splits > 1) {
        atomicAdd(dst, acc_s[r * lda + c]);
      } else {
        *dst = acc_s[r * lda + c];
      }
    }
  }
}

// The column kernel's dbias: thread tid < 64 holds column outer0 + tid's sum of G.
__device__ __forceinline__ void write_out_dbias(const LseParams& p, const BwdWalk& w, float colsum) {
  const int tid = threadIdx.x;
  if (p.dbias == nullptr || tid >= kBN || w.outer0 + tid >= p.N) return;
  if (p.splits > 1) {
    atomicAdd(p.dbias + w.outer0 + tid, colsum);
  } else {
    p.dbias[w.outer0 + tid] = colsum;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: FOR_K = false: grid (ceil(M / 64), splits), out = dq (M, D) = G @ k.
//           FOR_K = true:  grid (ceil(N / 64), splits), out = dk (N, D) = G^T @ q, dbias.
// With splits > 1 the outputs must be zeroed and are added to atomically.
// ---------------------------------------------------------------------------------------------
template <class T, int KIND, bool FOR_K>
__global__ void __launch_bounds__(kThreads) lse_backward_kernel(const LseParams p) {
#ifndef FASTNCE_EMULATE
  extern __shared__ __align__(128) unsigned char smem_raw[];
#else
  unsigned char* smem_raw = emu::block_smem();
#endif
  constexpr bool kHalf = sizeof(T) == 2;
  constexpr int LDO = ld_operand(sizeof(T));
  const SmemLayout L = smem_layout(sizeof(T), p.panel, p.resident);
  const Slots<T> slots{smem_raw + L.slot_off, L.slot_bytes, p.resident > 0};
  T* res = p.resident > 0 ? reinterpret_cast<T*>(smem_raw + L.res_off) : nullptr;
  float* Ss = reinterpret_cast<float*>(smem_raw + L.s_off);
  // G as the A operand: a 16-bit copy for the tensor cores, else the fp32 tile itself.
  T* Gs = kHalf ? reinterpret_cast<T*>(smem_raw + L.g_off) : reinterpret_cast<T*>(Ss);
  const BwdVecs vecs(smem_raw + L.vec_off);
  float* acc_s = reinterpret_cast<float*>(smem_raw + L.acc_off);
  const int lda = p.panel + 4;

  const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int64_t M = p.M, N = p.N, D = p.D;
  const BwdWalk walk = bwd_walk<FOR_K>(p);
  const int64_t outer0 = walk.outer0, n_outer = walk.n_outer, t_begin = walk.t_begin, t_end = walk.t_end;
  const float scale2 = *p.scale * kLog2e;
  const bool mirror = !FOR_K && p.mirror != 0;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  float colsum = 0.0f;  // dbias of column outer0 + tid (FOR_K, tid < 64)

  // Up to kRegChunks output chunks (D <= 128: NT-Xent's projections) the warps keep their
  // accumulator tiles in registers over the whole walk, written to acc_s once at the end;
  // wider panels accumulate in acc_s, loaded and stored around each chunk's product.
  const bool reg_acc = p.panel <= kRegChunks * kDK;
  WarpTile<T, KIND> racc[kRegChunks];
  // The walked tiles' rows (k for dq, q for dk) and, unless resident, the block's own rows.
  const T* inner_src = FOR_K ? q : k;
  const T* own_src = FOR_K ? k : q;
  const int64_t n_inner = FOR_K ? M : N;
  const int nc = int((D + kDK - 1) / kDK);
  const int64_t d_last = int64_t(nc - 1) * kDK;
  const int64_t ntiles = t_end > t_begin ? t_end - t_begin : 0;
  for (int64_t pass0 = 0; pass0 < D; pass0 += p.panel) {
    const int pw = int((D - pass0) < p.panel ? (D - pass0) : p.panel);
    const int nch = (pw + kDK - 1) / kDK;
    if (reg_acc) {
#pragma unroll
      for (int ch = 0; ch < kRegChunks; ++ch) racc[ch].zero();
    } else {
      for (int x = tid; x < 64 * lda; x += kThreads) acc_s[x] = 0.0f;
    }
    // The stream of one tile: its nc chunks of D for S, then the panel's chunks for the second
    // product, last first: the S product leaves D's last chunk in its slot (reuse) when this
    // panel holds it, so that chunk is not loaded again.
    const bool reuse = pass0 + int64_t(nch - 1) * kDK == d_last;
    const int n_g = nch - (reuse ? 1 : 0);
    const int per_tile = nc + n_g;
    const int64_t total = ntiles * per_tile;
    auto g_chunk = [&](int j) { return nch - 1 - (reuse ? j + 1 : j); };  // j-th loaded chunk of the panel
    auto issue = [&](int64_t e) {
      const int64_t t = t_begin + e / per_tile;
      const int local = int(e % per_tile);
      const int64_t d0 = local < nc ? int64_t(local) * kDK : pass0 + int64_t(g_chunk(local - nc)) * kDK;
      load_rows(slots.inner(e), LDO, inner_src, t * 64, n_inner, d0, D, p.vec_loads != 0);
      if (local < nc && res == nullptr) load_rows(slots.outer(e), LDO, own_src, outer0, n_outer, d0, D, p.vec_loads != 0);
    };
    if (total > 0) {
      if (res != nullptr && pass0 == 0) load_resident(res, L.ld_res, own_src, outer0, n_outer, p);
      issue(0);
    }
    auto g_product = [&](int ch, const T* X) {
      if (reg_acc) {
#pragma unroll
        for (int rc = 0; rc < kRegChunks; ++rc)  // a constant index keeps racc in registers
          if (rc == ch) accumulate_g_product<T, KIND, FOR_K>(racc[rc], Gs, X);
      } else {
        float* C = acc_s + wm * 32 * lda + ch * kDK + wn * 32;
        WarpTile<T, KIND> o;
        o.load(C, lda);
        accumulate_g_product<T, KIND, FOR_K>(o, Gs, X);
        o.store(C, lda);
      }
    };

    int64_t e = 0;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t row0 = FOR_K ? t * kBM : outer0;
      const int64_t col0 = FOR_K ? outer0 : t * kBN;
      compute_s_tile<T, KIND, FOR_K>(slots, res, L.ld_res, Ss, nc, e, total, issue,
                                     [&] { load_tile_vectors(p, vecs, row0, col0, mirror); });
      form_g_tile<T, KIND, kThreads>(p, vecs, Ss, Gs, row0, col0, scale2, mirror);
      if (FOR_K && p.dbias != nullptr && pass0 == 0 && tid < kBN) {
        for (int rr = 0; rr < kBM; ++rr) colsum += Ss[rr * kLdS + tid];
      }

      // acc[:, chunk] += G @ k[cols, chunk]   or   G^T @ q[rows, chunk]
      if (reuse) g_product(nch - 1, slots.inner(e - 1));
      for (int j = 0; j < n_g; ++j, ++e) {
        stream_step(e, total, issue);
        g_product(g_chunk(j), slots.inner(e));
      }
    }
    __syncthreads();  // the walk's last products are done with the slots and G, where acc_s may lie
    if (reg_acc) {
#pragma unroll
      for (int ch = 0; ch < kRegChunks; ++ch)
        if (ch < nch) racc[ch].store(acc_s + wm * 32 * lda + ch * kDK + wn * 32, lda);
    }
    __syncthreads();
    write_out_panel<kThreads>(p, walk, acc_s, lda, pass0, pw);
    __syncthreads();
  }
  if (FOR_K) write_out_dbias(p, walk, colsum);
}

// ---------------------------------------------------------------------------------------------
// Wide backward (16-bit inputs, 128 < D <= 512; lse_plan.h backward_wide): the outputs of
// lse_backward_kernel in one pass over D, with 8 warps. The block's own 64 rows stay resident;
// the walked tile's 64 rows x D are staged whole, double-buffered (tile t + 1 is copied while
// tile t is worked on), and serve both products, so a tile's operand bytes are loaded once
// (the 4-warp kernel streams them once per product, and the own rows too at these widths).
// S: warp w takes a 16 x 32 part. G @ X: each warp owns one 64-feature chunk of the output,
// all 64 rows (MI_G = 4; for D <= 256, MI_G = 2: two warps a chunk, 32 rows each), in registers
// for the whole walk, where the 4-warp kernel loads and stores a shared-memory accumulator
// around every chunk's product.
// ---------------------------------------------------------------------------------------------
template <class T, bool FOR_K, int MI_G>
__global__ void __launch_bounds__(kWideThreads, 1) lse_backward_wide_kernel(const LseParams p) {
#ifndef FASTNCE_EMULATE
  extern __shared__ __align__(128) unsigned char smem_raw[];
#else
  unsigned char* smem_raw = emu::block_smem();
#endif
  static_assert(sizeof(T) == 2, "the wide backward takes 16-bit inputs");
  const int W = p.resident;  // D padded to kDK
  const SmemLayout L = wide_smem_layout(W);
  const int ld = L.ld_res;
  T* res = reinterpret_cast<T*>(smem_raw + L.res_off);
  auto tile_buf = [&](int64_t t) { return reinterpret_cast<T*>(smem_raw + L.slot_off + (t & 1) * L.slot_bytes); };
  float* Ss = reinterpret_cast<float*>(smem_raw + L.s_off);
  T* Gs = reinterpret_cast<T*>(smem_raw + L.g_off);
  const BwdVecs vecs(smem_raw + L.vec_off);
  float* acc_s = reinterpret_cast<float*>(smem_raw + L.acc_off);
  const int lda = W + 4;

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t M = p.M, N = p.N, D = p.D;
  const BwdWalk walk = bwd_walk<FOR_K>(p);
  const int64_t outer0 = walk.outer0, n_outer = walk.n_outer, t_begin = walk.t_begin, t_end = walk.t_end;
  const float scale2 = *p.scale * kLog2e;
  const bool mirror = !FOR_K && p.mirror != 0;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* inner_src = FOR_K ? q : k;  // the walked tiles' rows
  const T* own_src = FOR_K ? k : q;
  const int64_t n_inner = FOR_K ? M : N;
  const int nc = W / kDK;
  const bool vec = p.vec_loads != 0;
  float colsum = 0.0f;  // dbias of column outer0 + tid (FOR_K, tid < 64)

  auto issue = [&](int64_t t) {
    for (int c = 0; c < nc; ++c)
      load_rows<T, kWideThreads>(tile_buf(t) + c * kDK, ld, inner_src, t * 64, n_inner, int64_t(c) * kDK, D, vec);
  };
  constexpr int kRowsG = 16 * MI_G;
  const int g_chunk = warp / (64 / kRowsG), g_row0 = (warp % (64 / kRowsG)) * kRowsG;
  const bool g_active = g_chunk < nc;
  WmmaWarpTile<T, T, 16, MI_G, 4> acc;
  acc.zero();
  const int s_row0 = (warp >> 1) * 16, s_col0 = (warp & 1) * 32;

  if (t_end > t_begin) {
    load_resident<T, kWideThreads>(res, ld, own_src, outer0, n_outer, p);
    issue(t_begin);
  }
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t row0 = FOR_K ? t * kBM : outer0;
    const int64_t col0 = FOR_K ? outer0 : t * kBN;
    // Tile t has landed (this thread's copies, then, past the barrier, everyone's), and every
    // thread is done with tile t - 1: its buffer takes tile t + 1, its S, G and vectors go.
    copy_wait_all();
    __syncthreads();
    if (t + 1 < t_end) issue(t + 1);
    load_tile_vectors(p, vecs, row0, col0, mirror);
    const T* X = tile_buf(t);
    {
      WmmaWarpTile<T, T, 16, 1, 2> s;
      s.zero();
      const T* A = FOR_K ? X : res;  // S's rows: the walked tile's for dk, the block's own for dq
      const T* B = FOR_K ? res : X;
      s.template mma<false, true>(A + s_row0 * ld, ld, B + s_col0 * ld, ld, W);
      s.store(Ss + s_row0 * kLdS + s_col0, kLdS);
    }
    __syncthreads();  // S and the vectors complete
    form_g_tile<T, kMmaWmma16, kWideThreads>(p, vecs, Ss, Gs, row0, col0, scale2, mirror);
    if (FOR_K && p.dbias != nullptr && tid < kBN) {
      for (int rr = 0; rr < kBM; ++rr) colsum += Ss[rr * kLdS + tid];
    }
    // acc[:, chunk] += G @ k[cols, chunk]   or   G^T @ q[rows, chunk]
    if (g_active) {
      if (FOR_K) {
        acc.template mma<true, false>(Gs + g_row0, kLdG16, X + g_chunk * kDK, ld, kBM);
      } else {
        acc.template mma<false, false>(Gs + g_row0 * kLdG16, kLdG16, X + g_chunk * kDK, ld, kBN);
      }
    }
  }
  __syncthreads();  // the last products are done with the tiles, whose space acc_s takes
  if (g_active) acc.store(acc_s + g_row0 * lda + g_chunk * kDK, lda);
  __syncthreads();
  write_out_panel<kWideThreads>(p, walk, acc_s, lda, 0, int(D));  // D <= kWideMaxWidth
  if (FOR_K) write_out_dbias(p, walk, colsum);
}

}  // namespace fastnce
