// A small CPU emulation of the CUDA features the fastnce kernels use, so that their logic
// (tiling, masks, online softmax, atomics, barriers, asynchronous copies) can be tested on
// machines without a GPU.
//
// Compile the kernels with g++ -std=c++20 -DFASTNCE_EMULATE -include this header. Every CUDA
// thread of a block is a std::thread; __syncthreads is a std::barrier over the block, warp
// shuffles a barrier over the warp; all blocks of a grid run at once (so the atomics race for
// real). WMMA fragments hold the whole 16 x 16 tile in every lane: the API semantics, not the
// register layout. Not emulated: the memory model beyond what the barriers give, timing.
// The hardware's rules that a CPU would let pass are checked and the first one broken is kept
// for the caller (emu::take_violation): WMMA's 32-byte pointers and 16-byte leading dimensions,
// WMMA calls uniform across a warp, cp.async's 16-byte addresses, and a launch's limits
// (threads, grid, shared memory a block).
// Used by tests/test_cuda.py (emulated kernels); never part of a build.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;

namespace emu {

// The first hardware rule broken since the last take_violation(), or null.
inline std::atomic<const char*> g_violation{nullptr};
inline void require(bool ok, const char* rule) {
  const char* none = nullptr;
  if (!ok) g_violation.compare_exchange_strong(none, rule);
}
inline const char* take_violation() { return g_violation.exchange(nullptr); }
inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Dynamic shared memory a block may use on the emulated device (0: unchecked); set by the caller
// from the device it plans for (cudaDevAttrMaxSharedMemoryPerBlockOptin).
inline size_t g_smem_per_block = 0;

struct Block;

// Run once all threads of a block reach a barrier (and at the kernel's end): the lanes of each
// warp made the same warp-collective WMMA calls with the same arguments so far (on a GPU, calls
// from part of a warp, or with per-lane pointers, are undefined behaviour).
struct WarpUniform {
  Block* b;
  void operator()() noexcept;
};

struct Block {
  // The shared memory is exactly smem_bytes from a 128-byte boundary, so that a sanitizer sees
  // an access past its end.
  explicit Block(int threads, size_t smem_bytes)
      : bar(threads, WarpUniform{this}),
        smem(static_cast<unsigned char*>(::operator new[](smem_bytes > 0 ? smem_bytes : 1, std::align_val_t(128)))),
        xbuf(threads),
        wmma_trace(threads) {
    // A GPU's shared memory starts undefined (what the last block left there): NaN in every
    // float type here, so that a kernel reading a slot it never wrote gives wrong values.
    std::memset(smem, 0xFF, smem_bytes);
    for (int w = 0; w < threads / 32; ++w) warp.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  ~Block() { ::operator delete[](smem, std::align_val_t(128)); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  std::barrier<WarpUniform> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  unsigned char* smem;
  std::vector<uint64_t> xbuf;
  std::vector<uint64_t> wmma_trace;  // a thread's WMMA calls and their arguments, hashed
};

inline void WarpUniform::operator()() noexcept {
  for (size_t t = 0; t < b->wmma_trace.size(); ++t)
    require(b->wmma_trace[t] == b->wmma_trace[t & ~size_t(31)],
            "wmma: lanes of a warp made different calls (WMMA is warp-collective)");
}

inline thread_local Block* tl_block = nullptr;

inline unsigned char* block_smem() { return tl_block->smem; }

inline void trace_wmma(uint64_t op, const void* p, unsigned ldm) {
  uint64_t& h = tl_block->wmma_trace[threadIdx.x];
  h = (h ^ op ^ uint64_t(reinterpret_cast<uintptr_t>(p)) ^ (uint64_t(ldm) << 48)) * 0x100000001b3ull;
}

// cp.async: a copy may land on a GPU any time between its issue and the issuing thread's
// cp.async.wait_all. By default it lands here at the wait, the latest, so that a kernel reading a
// slot before waiting reads stale data; with g_copies_land_early at the issue, the earliest, so
// that a copy into a slot other threads still read is a write under their reads (a wrong value,
// and under ThreadSanitizer a reported race).
struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<PendingCopy> tl_copies;

inline bool g_copies_land_early = false;

inline void land(const PendingCopy& c) {
  if (c.valid) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}

inline void cp_async16(void* dst, const void* src, bool valid) {
  require(aligned(dst, 16), "cp.async: shared-memory address not 16-byte aligned");
  require(!valid || aligned(src, 16), "cp.async: global address not 16-byte aligned");
  if (g_copies_land_early) {
    land({dst, src, valid});
  } else {
    tl_copies.push_back({dst, src, valid});
  }
}

inline void cp_async_wait_all() {
  for (const PendingCopy& c : tl_copies) land(c);
  tl_copies.clear();
}

// How a launch runs its blocks: all at once (the default, so that races happen), or one after
// another in launch order (blockIdx.x fastest), so that the atomic merges of a split grid come
// in a known order.
inline bool g_blocks_in_order = false;

// Runs kernel(args...) on a grid of (gx, gy) blocks of `threads` threads (g_blocks_in_order).
template <class F>
void launch(F kernel, unsigned gx, unsigned gy, int threads, size_t smem_bytes) {
  // A launch the GPU would refuse does not run (cudaErrorInvalidConfiguration and the like).
  const bool threads_ok = threads >= 1 && threads <= 1024;
  const bool whole_warps = threads % 32 == 0;  // the emulation's own need (its warp barriers)
  const bool grid_ok = gx >= 1 && gx <= 0x7fffffffu && gy >= 1 && gy <= 65535;
  const bool smem_ok = g_smem_per_block == 0 || smem_bytes <= g_smem_per_block;
  require(threads_ok, "launch: threads a block not in [1, 1024]");
  require(whole_warps, "emulation: threads a block must be whole warps");
  require(grid_ok, "launch: grid not in [1, 2^31 - 1] x [1, 65535]");
  require(smem_ok, "launch: more dynamic shared memory than a block may have on the device");
  if (!threads_ok || !whole_warps || !grid_ok || !smem_ok) return;
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<std::thread> pool;
  for (unsigned y = 0; y < gy; ++y)
    for (unsigned x = 0; x < gx; ++x) {
      blocks.emplace_back(std::make_unique<Block>(threads, smem_bytes));
      Block* b = blocks.back().get();
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([=] {
          tl_block = b;
          threadIdx = make_uint3(unsigned(t), 0u, 0u);
          blockIdx = make_uint3(x, y, 0u);
          kernel();
          if (!emu::tl_copies.empty()) std::abort();  // copies never waited for
        });
      if (g_blocks_in_order) {  // this block done before the next starts
        for (auto& th : pool) th.join();
        pool.clear();
      }
    }
  for (auto& th : pool) th.join();
  for (auto& b : blocks) WarpUniform{b.get()}();
}

}  // namespace emu

inline void __syncthreads() { emu::tl_block->bar.arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "");
  emu::Block* b = emu::tl_block;
  const int t = int(threadIdx.x);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b->xbuf[t] = bits;
  b->warp[t / 32]->arrive_and_wait();
  const uint64_t other = b->xbuf[(t & ~31) | ((t & 31) ^ lane_mask)];
  b->warp[t / 32]->arrive_and_wait();
  T r;
  std::memcpy(&r, &other, sizeof(T));
  return r;
}

inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }

namespace emu {
inline int load_relaxed(int* addr) { return std::atomic_ref<int>(*addr).load(std::memory_order_relaxed); }
}  // namespace emu

inline int atomicCAS(int* addr, int compare, int val) {
  std::atomic_ref<int> a(*addr);
  a.compare_exchange_strong(compare, val);
  return compare;  // the old value either way
}
inline float atomicAdd(float* addr, float v) {
  std::atomic_ref<float> a(*addr);
  return a.fetch_add(v);
}

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int m, int n, int k, class T, class Layout = void>
struct fragment {
  static constexpr int ROWS = std::is_same<Use, matrix_b>::value ? k : m;
  static constexpr int COLS = std::is_same<Use, matrix_a>::value ? k : n;
  using elem_t = typename std::conditional<std::is_same<T, precision::tf32>::value, float, T>::type;
  static constexpr int num_elements = ROWS * COLS;
  elem_t x[ROWS * COLS];  // the whole tile, row-major
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// load_matrix_sync / store_matrix_sync: "mptr must be a 256-bit aligned pointer", "ldm ... must
// be a multiple of 8 for __half element type or multiple of 4 for float" (CUDA C++ Programming
// Guide, warp matrix functions): 16 bytes either way.
template <class P>
inline void require_wmma_operand(const P* p, unsigned ldm) {
  emu::trace_wmma(1, p, ldm);
  emu::require(emu::aligned(p, 32), "wmma: matrix pointer not 32-byte aligned");
  emu::require(ldm * sizeof(P) % 16 == 0, "wmma: leading dimension not a multiple of 16 bytes");
}

template <class Use, int m, int n, int k, class T, class L, class P>
inline void load_matrix_sync(fragment<Use, m, n, k, T, L>& f, const P* p, unsigned ldm) {
  require_wmma_operand(p, ldm);
  using F = fragment<Use, m, n, k, T, L>;
  constexpr bool col = std::is_same<L, col_major>::value;
  for (int r = 0; r < F::ROWS; ++r)
    for (int c = 0; c < F::COLS; ++c) f.x[r * F::COLS + c] = col ? p[c * ldm + r] : p[r * ldm + c];
}

template <int m, int n, int k>
inline void load_matrix_sync(fragment<accumulator, m, n, k, float>& f, const float* p, unsigned ldm, layout_t l) {
  require_wmma_operand(p, ldm);
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < n; ++c) f.x[r * n + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <int m, int n, int k>
inline void store_matrix_sync(float* p, const fragment<accumulator, m, n, k, float>& f, unsigned ldm, layout_t l) {
  require_wmma_operand(p, ldm);
  if ((threadIdx.x & 31) != 0) return;  // one lane writes (the values are the same in all)
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < n; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * n + c];
}

template <class Use, int m, int n, int k, class T, class L>
inline void fill_fragment(fragment<Use, m, n, k, T, L>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int m, int n, int k, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, m, n, k, float>& d, const fragment<matrix_a, m, n, k, T, LA>& a,
                     const fragment<matrix_b, m, n, k, T, LB>& b, const fragment<accumulator, m, n, k, float>& c) {
  emu::trace_wmma(2, nullptr, 0);
  float out[m * n];
  for (int r = 0; r < m; ++r)
    for (int cc = 0; cc < n; ++cc) {
      float s = c.x[r * n + cc];
      for (int kk = 0; kk < k; ++kk) s += to_float(a.x[r * k + kk]) * to_float(b.x[kk * n + cc]);
      out[r * n + cc] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

// Round to tf32 (10 mantissa bits, to nearest, ties away from zero, as cvt.rna.tf32.f32).
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace wmma
}  // namespace nvcuda
