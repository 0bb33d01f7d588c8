// C entry points that run the fastnce kernels under the CPU emulation (cuda_emu.h), through
// lse_ops.cpp's own orchestration (lse_calls.h: splits, -inf / zero pre-fills, the symmetric
// log-add, mirror or sum) on host buffers. The tests force small split sizes and panels so
// that every path (atomic merges, several backward passes) is taken at small sizes.
//   g++ -std=c++20 -O1 -shared -fPIC -DFASTNCE_EMULATE -include cuda_emu.h -I<cuda>/include \
//       emu_harness.cpp -o libfastnce_emu.so
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../lse_calls.h"
#include "../lse_kernels.cuh"
#include "emu_harness.h"

using namespace fastnce;

namespace {

template <class T, int KIND>
void run_forward(const LseParams& p) {
  const unsigned gx = unsigned((p.M + kBM - 1) / kBM);
  emu::launch([p] { lse_forward_kernel<T, KIND>(p); }, gx, unsigned(p.splits), kThreads,
              smem_layout(sizeof(T), 0, p.resident).total);
}

template <class T, bool FOR_K>
void run_backward_wide(const LseParams& p, unsigned gx) {
  const size_t smem = wide_smem_layout(p.resident).total;
  if (wide_two_warps_a_chunk(p.resident)) {
    emu::launch([p] { lse_backward_wide_kernel<T, FOR_K, 2>(p); }, gx, unsigned(p.splits), kWideThreads, smem);
  } else {
    emu::launch([p] { lse_backward_wide_kernel<T, FOR_K, 4>(p); }, gx, unsigned(p.splits), kWideThreads, smem);
  }
}

template <class T, int KIND>
void run_backward(const LseParams& p, bool for_k) {
  const unsigned gx = unsigned(((for_k ? p.N : p.M) + 63) / 64);
  if constexpr (KIND == kMmaWmma16) {
    if (p.wide) {
      if (for_k) {
        run_backward_wide<T, true>(p, gx);
      } else {
        run_backward_wide<T, false>(p, gx);
      }
      return;
    }
  }
  const size_t smem = smem_layout(sizeof(T), p.panel, p.resident).total;
  if (for_k) {
    emu::launch([p] { lse_backward_kernel<T, KIND, true>(p); }, gx, unsigned(p.splits), kThreads, smem);
  } else {
    emu::launch([p] { lse_backward_kernel<T, KIND, false>(p); }, gx, unsigned(p.splits), kThreads, smem);
  }
}

// kind: 0 fp16 (wmma), 1 bf16 (wmma), 2 fp32 tf32, 3 fp32 simt
void fwd_dispatch(int kind, const LseParams& p) {
  switch (kind) {
    case 0: run_forward<__half, kMmaWmma16>(p); break;
    case 1: run_forward<__nv_bfloat16, kMmaWmma16>(p); break;
    case 2: run_forward<float, kMmaTf32>(p); break;
    default: run_forward<float, kMmaSimt>(p);
  }
}

void bwd_dispatch(int kind, const LseParams& p, bool for_k) {
  switch (kind) {
    case 0: run_backward<__half, kMmaWmma16>(p, for_k); break;
    case 1: run_backward<__nv_bfloat16, kMmaWmma16>(p, for_k); break;
    case 2: run_backward<float, kMmaTf32>(p, for_k); break;
    default: run_backward<float, kMmaSimt>(p, for_k);
  }
}

// Bytes of one feature of kind (fwd_dispatch's): 16-bit for 0 and 1, float32 for 2 and 3.
int elem_bytes(int kind) { return kind <= 1 ? 2 : 4; }

// The launch limit on shared memory a block for a device that lets a block have optin bytes.
// The tests also plan for devices smaller than any sm_80+ GPU, to reach the streamed and
// multi-pass paths at small sizes; the limit is checked for real ones only (an RTX 30xx /
// 40xx's 99 KiB and up).
size_t smem_limit(size_t optin) { return optin >= 101376 ? optin : 0; }

// vec: 1 or 0 forces 16-byte copies or plain loads; -1 takes lse_ops.cpp's rule (use_vec_loads).
LseParams base(int kind, const void* q, const void* k, const float* scale, const float* bias, const int64_t* ql,
               const int64_t* kl, int mask_mode, int has_excl, int64_t off, int64_t M, int64_t N, int64_t D,
               int vec) {
  LseParams p;
  p.q = q;
  p.k = k;
  p.scale = scale;
  p.bias = bias;
  p.q_labels = ql;
  p.k_labels = kl;
  p.mask_mode = mask_mode;
  p.has_exclude = has_excl;
  p.exclude_offset = off;
  p.M = M;
  p.N = N;
  p.D = D;
  p.vec_loads = vec >= 0 ? vec : int(use_vec_loads(elem_bytes(kind), D, q, k));
  return p;
}

// lse_calls.h's buffers and launches on the host. An uninitialised buffer is NaN, as undefined
// as a GPU's: an output element no launch writes shows.
struct HostMem {
  using Buf = std::vector<float>;
  int kind;
  int launched = 0;  // backward kernels launched: 1 the row kernel, 2 the column kernel

  static Buf filled(Shape shape, float v) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return Buf(size_t(n), v);
  }
  static Buf uninit(Shape shape) { return filled(shape, std::nanf("")); }
  static Buf none() { return {}; }
  static float* data(Buf& b) { return b.data(); }
  void forward(const LseParams& p) const { fwd_dispatch(kind, p); }
  void backward(const LseParams& p, bool for_k) {
    launched |= for_k ? 2 : 1;
    bwd_dispatch(kind, p, for_k);
  }
  static Buf log_add(const Buf& a, const Buf& b) {  // as at::logaddexp, NaN and infinities included
    Buf out(a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      const float hi = std::fmax(a[i], b[i]), lo = std::fmin(a[i], b[i]);
      out[i] = std::isnan(a[i]) || std::isnan(b[i]) ? std::nanf("")
               : std::isinf(lo)                   ? hi  // -inf: the other; +inf: both are
                                                  : hi + std::log1p(std::exp(lo - hi));
    }
    return out;
  }
  static Buf copy(const Buf& a) { return a; }
  static void add(Buf& a, const Buf& b) {
    for (size_t i = 0; i < a.size(); ++i) a[i] += b[i];
  }
};

int g_backward_launched = 0;  // HostMem::launched of the last emu_backward

// Copies a computed output to the caller's buffer; one not computed (none()) leaves it as it was.
void copy_out(const std::vector<float>& b, float* to) {
  if (!b.empty() && to != nullptr) std::copy(b.begin(), b.end(), to);
}

}  // namespace

extern "C" {

// row: (M,), col: (N,) or null (not asked for). num_sms / min_tiles steer choose_splits,
// smem_per_sm whether the rows are resident.
void emu_forward(int kind, const void* q, const void* k, const float* scale, const float* bias, const int64_t* ql,
                 const int64_t* kl, int mask_mode, int has_excl, int64_t off, int64_t M, int64_t N, int64_t D,
                 int vec, float* row, float* col, int symmetric, int num_sms, int64_t min_tiles,
                 int64_t smem_per_sm) {
  LseParams p = base(kind, q, k, scale, bias, ql, kl, mask_mode, has_excl, off, M, N, D, vec);
  p.resident = forward_resident(elem_bytes(kind), D, size_t(smem_per_sm));
  emu::g_smem_per_block = smem_limit(size_t(smem_per_sm) - 1024);  // a multiprocessor's, less a block's reserve
  HostMem mem{kind};
  const auto [r, c] = lse_forward_call(mem, p, col != nullptr, symmetric != 0, num_sms, min_tiles);
  copy_out(r, row);
  copy_out(c, col);
}

// dq (M, D), dk (N, D), dbias (N,) or null (need_bias): the gradients lse_ops.cpp returns; a
// buffer for one it does not return (a frozen side, dk when k is q) is left as it was.
// Returns the number of backward passes used (D / panel, rounded up).
int emu_backward(int kind, const void* q, const void* k, const float* scale, const float* bias, const int64_t* ql,
                 const int64_t* kl, int mask_mode, int has_excl, int64_t off, int64_t M, int64_t N, int64_t D,
                 int vec, const float* row_lse, const float* col_lse, const float* grad_row, const float* grad_col,
                 float* dq, float* dk, float* dbias, int symmetric, int need_q, int need_k, int num_sms,
                 int64_t min_tiles, int64_t smem_optin) {
  LseParams p = base(kind, q, k, scale, bias, ql, kl, mask_mode, has_excl, off, M, N, D, vec);
  p.row_lse_in = row_lse;
  p.col_lse_in = grad_col ? col_lse : nullptr;
  p.grad_row = grad_row;
  p.grad_col = grad_col;
  plan_backward(p, elem_bytes(kind), size_t(smem_optin));
  emu::g_smem_per_block = smem_limit(size_t(smem_optin));
  HostMem mem{kind};
  const auto [gq, gk, gb] =
      lse_backward_call(mem, p, symmetric != 0, dbias != nullptr, need_q != 0, need_k != 0, num_sms, min_tiles);
  copy_out(gq, dq);
  copy_out(gk, dk);
  copy_out(gb, dbias);
  g_backward_launched = mem.launched;
  return int((D + p.panel - 1) / p.panel);
}

// The backward kernels the last emu_backward launched: 1 the row kernel, 2 the column kernel.
int emu_backward_launched() { return g_backward_launched; }

// Where the asynchronous copies land from now on: at the issuing thread's wait (0, the latest)
// or at their issue (1, the earliest); see cuda_emu.h.
void emu_set_copies_land_early(int early) { emu::g_copies_land_early = early != 0; }

// How launches run their blocks: all at once (0) or one after another in launch order (1).
void emu_set_blocks_in_order(int in_order) { emu::g_blocks_in_order = in_order != 0; }

// The first hardware rule the kernels broke since the last call (cuda_emu.h), or null.
const char* emu_take_violation() { return emu::take_violation(); }

// Features of the forward's rows held in shared memory (0: streamed) for D on a device with
// smem_per_sm bytes of shared memory a multiprocessor.
int emu_forward_resident(int kind, int64_t D, int64_t smem_per_sm) {
  return forward_resident(elem_bytes(kind), D, size_t(smem_per_sm));
}

// The backward's plan for D on a device with smem_optin bytes of shared memory a block:
// out = {wide, panel, resident}.
void emu_backward_plan(int kind, int64_t D, int64_t smem_optin, int* out) {
  LseParams p;
  p.D = D;
  plan_backward(p, elem_bytes(kind), size_t(smem_optin));
  out[0] = p.wide;
  out[1] = p.panel;
  out[2] = p.resident;
}

}  // extern "C"
